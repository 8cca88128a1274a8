"""Which workers are alive, told by the database itself rather than by timeouts.

A worker holds a *presence* for as long as it runs:
- on SQLite, an exclusive ``flock`` on ``<database>.worker.lock``: one worker per SQLite
  database (a second one is refused with a clear message), and any row still claimed by
  another worker id belongs to a dead process;
- on PostgreSQL, a session advisory lock keyed by its worker id, held on a connection of
  its own: the server drops it the moment the process dies, so another worker can test
  whether a claimant is alive with ``pg_try_advisory_lock``.

The same connection holds the *mailbox lease* on PostgreSQL (another advisory lock): exactly
one worker watches a mailbox, and a survivor takes over as soon as the holder's connection
is gone. ``reclaim()`` releases outbox rows and escalations claimed by dead workers, so a
SIGKILL costs at most the one mail that was on the wire, never a lock that waits out its
timeout.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlmodel import col

from helpdesk.config import Settings
from helpdesk.db import SessionFactory
from helpdesk.errors import ConfigError
from helpdesk.models import Escalation, Outbox

log = logging.getLogger(__name__)


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _worker_key(worker_id: str) -> int:
    return advisory_key(f"helpdesk-worker:{worker_id}")


def _mailbox_key(mailbox: str) -> int:
    return advisory_key(f"helpdesk-mailbox:{mailbox}")


class Presence:
    """Held for the life of a worker; see the module docstring."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self._fd: int | None = None
        self._conn: Any = None  # asyncpg.Connection
        self.leases: set[str] = set()

    @property
    def is_sqlite(self) -> bool:
        return self.settings.is_sqlite

    async def __aenter__(self) -> Presence:
        if self.is_sqlite:
            self._lock_file()
        else:
            import asyncpg

            url = make_url(self.settings.async_database_url).set(drivername="postgresql")
            self._conn = await asyncpg.connect(url.render_as_string(hide_password=False))
            await self._conn.execute("SELECT pg_advisory_lock($1)", _worker_key(self.worker_id))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            try:
                await self._conn.close(timeout=5)
            except Exception:  # the server may be gone; the locks die with the session
                self._conn.terminate()
            self._conn = None
        self.leases.clear()

    def _lock_file(self) -> None:
        database = make_url(self.settings.async_database_url).database
        if not database or database == ":memory:":
            return
        path = Path(database).resolve().with_name(Path(database).name + ".worker.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another helpdesk worker is running on {database}; SQLite takes one worker"
                " (use PostgreSQL to run several)"
            ) from None
        self._fd = fd

    async def alive(self, worker_id: str) -> bool:
        """Whether the worker with this id still runs."""
        if worker_id == self.worker_id:
            return True
        if self.is_sqlite:
            return False  # we hold the only presence a SQLite database allows
        if self._conn is None:
            return True  # cannot tell while disconnected: never reclaim on a guess
        key = _worker_key(worker_id)
        got = await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
        if got:
            await self._conn.execute("SELECT pg_advisory_unlock($1)", key)
        return not got

    async def try_lease(self, mailbox: str) -> bool:
        """Take (or keep) the lease on a mailbox; True while this worker holds it."""
        if mailbox in self.leases:
            return True
        if self.is_sqlite:
            self.leases.add(mailbox)
            return True
        if self._conn is None:
            return False  # disconnected: watch nothing until check() reconnects
        if await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", _mailbox_key(mailbox)):
            self.leases.add(mailbox)
            log.info("mailbox lease taken", extra={"mailbox": mailbox, "worker": self.worker_id})
            return True
        return False

    async def check(self) -> None:
        """Make sure the presence connection is alive; after a database restart, reconnect
        and give up the mailbox leases (they died with the old session). Raises while the
        database cannot be reached; the next call tries again."""
        if self.is_sqlite:
            return
        if self._conn is not None:
            try:
                await self._conn.fetchval("SELECT 1", timeout=10)
                return
            except Exception:
                lost = sorted(self.leases)
                self.leases.clear()
                self._conn.terminate()
                self._conn = None
                log.warning(
                    "presence connection lost; leases dropped", extra={"leases": ",".join(lost)}
                )
        await self.__aenter__()

    async def reclaim(self, sessions: SessionFactory) -> int:
        """Release rows claimed by workers that are no longer alive; return how many."""
        async with sessions() as session:
            conn = await session.connection()
            outbox_claims = await conn.execute(
                sa.select(col(Outbox.locked_by))
                .where(col(Outbox.status) == "pending", col(Outbox.locked_by).is_not(None))
                .distinct()
            )
            escalation_claims = await conn.execute(
                sa.select(col(Escalation.locked_by))
                .where(col(Escalation.locked_until).is_not(None))
                .distinct()
            )
            claimants = set(outbox_claims.scalars()) | set(escalation_claims.scalars())
        dead = [w for w in claimants if w and not await self.alive(w)]
        if not dead:
            return 0
        async with sessions() as session, session.begin():
            conn = await session.connection()
            released = await conn.execute(
                sa.update(Outbox)
                .where(col(Outbox.locked_by).in_(dead), col(Outbox.status) == "pending")
                .values(locked_by=None, locked_until=None)
            )
            await conn.execute(
                sa.update(Escalation)
                .where(col(Escalation.locked_by).in_(dead))
                .values(locked_until=None)
            )
        count = int(released.rowcount or 0)
        if count:
            log.warning(
                "released mail claimed by stopped workers",
                extra={"rows": count, "workers": len(dead)},
            )
        return count
