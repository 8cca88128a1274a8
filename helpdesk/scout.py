"""The crisis scout: crisis mail jumps the queue.

The worker ingests mail in UID order, so a crisis mail that lands behind a backlog of
routine mail would wait for all of it. The scout keeps a second IMAP connection in IDLE,
fetches each new mail as it lands (``BODY.PEEK[]``: nothing is marked), runs the pure
parse + classify on it, and stores a crisis mail at once through the pipeline's priority
path: its ticket, its escalation notices and the crisis reply commit together and the
priority delivery lane is woken. The cursor is not moved: the main loop reaches the mail
later, finds its Message-ID stored, and counts it as a duplicate.

Invariants: the scout never marks, moves or deletes mail and never moves the cursor, so if
it fails or is killed the main loop still ingests everything; it handles only mail whose
classification says crisis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from helpdesk.mailbox import Backoff, ImapMailbox, MailboxError, wait_or_stop
from helpdesk.pipeline import Pipeline

log = logging.getLogger(__name__)


class CrisisScout:
    def __init__(
        self,
        *,
        pipeline: Pipeline,
        mailbox_factory: Callable[[], ImapMailbox],
        active: Callable[[], bool] = lambda: True,
        folder: str,
        on_crisis: Callable[[], None],
        idle_timeout: float = 25 * 60,
    ) -> None:
        self.pipeline = pipeline
        self.mailbox_factory = mailbox_factory
        self.folder = folder
        self.on_crisis = on_crisis
        self.active = active
        self.idle_timeout = idle_timeout
        self.fast_tracked = 0
        self.chunk = 10
        self._examined: set[int] = set()
        self._uidvalidity: int | None = None

    async def _cursor(self) -> int:
        from helpdesk.pipeline import mailbox_state

        async with self.pipeline.sessions() as session:
            state = await mailbox_state(session, mailbox=self.pipeline.mailbox, folder=self.folder)
            return state.last_uid if state.uidvalidity == self._uidvalidity else 0

    async def scan(self, mailbox: ImapMailbox) -> int:
        """Look at mail the main loop has not stored yet, newest first (a crisis mail is
        most often the one that just landed); fast-track crises. Returns how many."""
        uidvalidity = await mailbox.select(self.folder)
        if uidvalidity != self._uidvalidity:
            self._uidvalidity = uidvalidity
            self._examined.clear()
        cursor = await self._cursor()
        self._examined = {uid for uid in self._examined if uid > cursor}
        found = 0
        while True:
            pending = [u for u in await mailbox.search_after(cursor) if u not in self._examined]
            if not pending:
                return found
            chunk = pending[-self.chunk :]  # the newest ones
            self._examined.update(chunk)
            crises = []
            for mail in reversed(await mailbox.fetch(chunk)):
                prepared = self.pipeline.prepare(mail.raw, mail.uid)
                if prepared.crisis.tier is not None:
                    crises.append(prepared)
            if crises:
                result = await self.pipeline.store_priority(
                    crises, folder=self.folder, uidvalidity=uidvalidity
                )
                stored = sum(o.action in ("created", "appended") for o in result.outcomes)
                found += stored
                self.fast_tracked += stored
                if stored:
                    log.warning("crisis mail fast-tracked", extra={"mails": stored})
                    self.on_crisis()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        attempt = 0
        mailbox: ImapMailbox | None = None
        while not stop.is_set():
            try:
                if not self.active():  # another worker holds the mailbox lease
                    await _close(mailbox)
                    mailbox = None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=2.0)
                    continue
                if mailbox is None:
                    mailbox = self.mailbox_factory()
                    await mailbox.connect()
                await self.scan(mailbox)
                attempt = 0
                await wait_or_stop(mailbox, self.idle_timeout, stop)
            except (MailboxError, OSError, TimeoutError) as exc:
                attempt += 1
                log.warning("crisis scout reconnecting", extra={"error": type(exc).__name__})
                await _close(mailbox)
                mailbox = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff.delay(attempt))
            except Exception:
                attempt += 1
                log.exception("crisis scout pass failed")
                await _close(mailbox)
                mailbox = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff.delay(attempt))
        await _close(mailbox)


async def _close(mailbox: ImapMailbox | None) -> None:
    if mailbox is not None:
        with contextlib.suppress(Exception):
            await mailbox.close()
