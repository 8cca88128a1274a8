"""Login health: how the worker's last IMAP and SMTP logins went, kept in the database.

A login that stops working is the quietest way to lose mail: the worker keeps running but
reads and sends nothing, and only its logs say why (a peer's users lost ten days of mail to
an OAuth token that silently died). So the worker writes every login outcome to the
``login_state`` table, one row per ``(service, mailbox)`` (``("smtp", "relay")`` for the
relay), and any web process reads it for ``/healthz``, ``/metrics`` and the admin health
panel.

Invariants:
- a failure is written every time it happens: ``failures`` counts them in a row and
  ``failing_since`` keeps the first; a success clears both, and is written when the stored
  row says otherwise or is older than ``OK_REFRESH`` (a healthy worker does not write for
  every connection it opens);
- each write is one atomic UPDATE (``failures = failures + 1``), then an INSERT when no row
  exists yet, so two delivery lanes recording at once lose no count;
- recording never raises: a database problem is logged and the caller goes on with its
  login error (or its mail);
- the stored reason is the error's own line (the server's reply, the token source's reason)
  clipped to 500 characters: no error of the mail edges or of the token source carries a
  token, and nothing here logs one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk.db import SessionFactory
from helpdesk.models import LoginState, UTCDateTime, utcnow

log = logging.getLogger(__name__)

IMAP, SMTP = "imap", "smtp"
RELAY = "relay"  # the mailbox name of the SMTP relay's row
OK_REFRESH = timedelta(minutes=5)
_MAX_ERROR = 500

LoginHook = Callable[[str | None], Awaitable[None]]
"""Called after a login with None (it worked) or the one-line reason it failed."""


class LoginRecorder:
    """Writes login outcomes for one worker (see the module docstring).

    ``lock`` is the worker's write lock (``Pipeline.write_lock``), so that on SQLite these
    writes take turns with the batch transactions in the event loop.
    """

    def __init__(
        self,
        sessions: SessionFactory,
        *,
        worker_id: str,
        clock: Callable[[], datetime] = utcnow,
        lock: asyncio.Lock | None = None,
    ) -> None:
        self.sessions = sessions
        self.worker_id = worker_id
        self.clock = clock
        self.lock = lock
        self._ok_written: dict[tuple[str, str], datetime] = {}

    async def ok(self, service: str, mailbox: str, *, auth: str) -> None:
        key, now = (service, mailbox), self.clock()
        written = self._ok_written.get(key)
        if written is not None and now - written < OK_REFRESH:
            return
        values = {
            "auth": auth,
            "ok": True,
            "failures": 0,
            "failing_since": None,
            "last_ok_at": now,
            "worker_id": self.worker_id,
            "updated_at": now,
        }
        if await self._write(service, mailbox, update=values, insert=values):
            self._ok_written[key] = now

    async def failed(self, service: str, mailbox: str, *, auth: str, reason: str) -> None:
        self._ok_written.pop((service, mailbox), None)
        now = self.clock()
        reason = reason if len(reason) <= _MAX_ERROR else reason[: _MAX_ERROR - 1] + "…"
        common = {
            "auth": auth,
            "ok": False,
            "last_failure_at": now,
            "last_error": reason,
            "worker_id": self.worker_id,
            "updated_at": now,
        }
        await self._write(
            service,
            mailbox,
            update={
                **common,
                "failures": col(LoginState.failures) + 1,
                "failing_since": sa.func.coalesce(
                    col(LoginState.failing_since), sa.literal(now, UTCDateTime())
                ),
            },
            insert={**common, "failures": 1, "failing_since": now},
        )

    def hook(self, service: str, mailbox: str, *, auth: str) -> LoginHook:
        """A :data:`LoginHook` that records into ``(service, mailbox)``."""

        async def record(error: str | None) -> None:
            if error is None:
                await self.ok(service, mailbox, auth=auth)
            else:
                await self.failed(service, mailbox, auth=auth, reason=error)

        return record

    async def _write(
        self, service: str, mailbox: str, *, update: dict[str, Any], insert: dict[str, Any]
    ) -> bool:
        try:
            if self.lock is None:
                await self._upsert(service, mailbox, update, insert)
            else:
                async with self.lock:
                    await self._upsert(service, mailbox, update, insert)
        except Exception as exc:  # the login's own outcome matters more than its record
            log.warning(
                "cannot record a login outcome",
                extra={"service": service, "box": mailbox, "error": type(exc).__name__},
            )
            return False
        return True

    async def _upsert(
        self, service: str, mailbox: str, update: dict[str, Any], insert: dict[str, Any]
    ) -> None:
        where = (col(LoginState.service) == service, col(LoginState.mailbox) == mailbox)
        for _ in range(2):  # a second try when another writer inserted the row meanwhile
            async with self.sessions() as session, session.begin():
                result = await session.exec(sa.update(LoginState).where(*where).values(update))
                if result.rowcount:
                    return
            try:
                async with self.sessions() as session, session.begin():
                    await session.exec(
                        sa.insert(LoginState).values(service=service, mailbox=mailbox, **insert)
                    )
                return
            except IntegrityError:
                continue


async def login_states(session: AsyncSession) -> list[LoginState]:
    """Every recorded login, failing ones first."""
    rows = await session.exec(
        select(LoginState).order_by(
            col(LoginState.ok), col(LoginState.service), col(LoginState.mailbox)
        )
    )
    return list(rows.all())
