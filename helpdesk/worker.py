"""The worker: a thin async shell around the pipeline, the outbox and the escalation timer.

``poll_once()`` does one pass over the mailbox and returns what it did; ``run()`` is the loop
around it plus two delivery lanes (priority: crisis replies and escalation notices; routine:
acknowledgements and staff replies), the re-escalation timer and a heartbeat.

Invariants:
- mail is fetched by UID above the stored cursor, and ``\\Seen`` (or a move to the processed
  folder) is set only after the batch's transaction has committed;
- SIGTERM stops fetching, lets the batch in flight commit and the outbox drain what is due,
  then returns; SIGKILL at any moment loses nothing (the cursor moves with the commit);
- connection errors reconnect with backoff and jitter; they never end the worker;
- every IMAP and SMTP login outcome is recorded in the database (:mod:`helpdesk.logins`),
  so a refused password or a dead OAuth token shows in ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import select

from helpdesk import escalation, logins, outbox, webhook
from helpdesk.config import Settings
from helpdesk.db import SessionFactory
from helpdesk.mailbox import (
    Backoff,
    FetchedMail,
    ImapMailbox,
    Mailbox,
    MailboxAuthError,
    MailboxError,
    plan_fetch,
    wait_or_stop,
)
from helpdesk.models import WorkerHeartbeat, utcnow
from helpdesk.oauth import OAuthTokenError, TokenSource, token_source
from helpdesk.pipeline import Pipeline, Prepared, mailbox_state, prepare_pool, warm_up
from helpdesk.presence import Presence
from helpdesk.scout import CrisisScout

log = logging.getLogger(__name__)

MailboxFactory = Callable[[], Mailbox]
SenderFactory = Callable[[str], outbox.Sender]


@dataclass(slots=True)
class PollReport:
    fetched: int = 0
    created: int = 0
    appended: int = 0
    duplicates: int = 0
    rejected: int = 0
    acks: int = 0
    crisis: int = 0

    def add(self, other: PollReport) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class RunReport:
    poll: PollReport = field(default_factory=PollReport)
    sent: int = 0
    retried: int = 0
    failed: int = 0
    escalation_actions: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0  # CPU seconds of this process and its prepare process in the run


def _cpu_seconds() -> float:
    """CPU time of this process and its children that have been waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def imap_mailbox(settings: Settings, tokens: TokenSource | None = None) -> ImapMailbox:
    return ImapMailbox(
        host=settings.imap_host,
        port=settings.imap_port_effective,
        user=settings.imap_user,
        password=settings.imap_password.get_secret_value(),
        security=settings.imap_security,
        timeout=settings.imap_timeout,
        xoauth2_token=tokens if settings.imap_auth == "xoauth2" else None,
    )


def default_mailbox_factory(
    settings: Settings, tokens: TokenSource | None = None
) -> MailboxFactory:
    def make() -> Mailbox:
        return imap_mailbox(settings, tokens)

    return make


def default_sender_factory(
    settings: Settings,
    tokens: TokenSource | None = None,
    recorder: logins.LoginRecorder | None = None,
) -> SenderFactory:
    def make(lane: str) -> outbox.Sender:
        # the priority lane carries few mails: one connection is plenty
        parallel = 1 if lane == "priority" else settings.smtp_connections
        sender = outbox.SmtpSender.from_settings(settings, lane=lane, parallel=parallel)
        if settings.smtp_auth == "xoauth2":
            sender.oauth_token = tokens
        if recorder is not None:
            sender.on_login = recorder.hook(logins.SMTP, logins.RELAY, auth=settings.smtp_auth)
        return sender

    return make


@dataclass(slots=True)
class Watch:
    """One watched mailbox: its settings, pipeline, folder and IMAP connection."""

    settings: Settings
    pipeline: Pipeline
    factory: MailboxFactory
    connection: Mailbox | None = None

    @property
    def folder(self) -> str:
        return self.settings.imap_folder

    @property
    def name(self) -> str:
        return self.pipeline.mailbox


class Worker:
    def __init__(
        self,
        settings: Settings,
        sessions: SessionFactory,
        *,
        mailbox_factory: MailboxFactory | None = None,
        sender_factory: SenderFactory | None = None,
        clock: Callable[[], datetime] = utcnow,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.worker_id = (
            worker_id
            or settings.worker_id
            or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        )
        self.tokens = token_source(settings)
        # the crisis scout needs a real IMAP connection; injected test mailboxes go without
        self.scout_enabled = mailbox_factory is None and settings.crisis_scout
        # The batch transactions and the outbox results take turns on this lock in the
        # event loop, rather than in SQLite's sleeping busy handler.
        write_lock = asyncio.Lock()
        self.logins = logins.LoginRecorder(
            sessions, worker_id=self.worker_id, clock=clock, lock=write_lock
        )
        self.sender_factory = sender_factory or default_sender_factory(
            settings, self.tokens, self.logins
        )
        self.watches: list[Watch] = []
        for box in settings.mailbox_settings() or [settings]:
            pipeline = Pipeline(
                settings=box, sessions=sessions, mailbox=box.mailbox_name, clock=clock
            )
            pipeline.write_lock = write_lock
            factory = mailbox_factory or default_mailbox_factory(box, self.tokens)
            self.watches.append(Watch(box, pipeline, factory))
        ours = frozenset(w.settings.support_address.lower() for w in self.watches)
        for watch in self.watches:  # mail from any of our addresses is a loop, never answered
            watch.pipeline.own_addresses = watch.pipeline.own_addresses | ours
        self.pipeline = self.watches[0].pipeline  # identity for notices and webhooks
        self.policy = outbox.RetryPolicy(
            base=settings.outbox_retry_base_seconds, cap=settings.outbox_retry_max_seconds
        )
        self.folder = self.watches[0].folder
        self._stop = asyncio.Event()
        self._wake = {0: asyncio.Event(), 1: asyncio.Event()}
        self._processed = 0
        self._errors = 0
        self.presence = Presence(settings, self.worker_id)
        # the prepare process (see pipeline.prepare_pool), alive during run() / run_once()
        self._pool: ProcessPoolExecutor | None = None
        self._draft_acks = True  # see poll_once

    # -- one pass --------------------------------------------------------------------
    async def _connected(self, watch: Watch) -> Mailbox:
        if watch.connection is None:
            mailbox = watch.factory()
            auth = watch.settings.imap_auth
            try:
                await mailbox.connect()
            except (MailboxAuthError, OAuthTokenError) as exc:
                reason = str(exc)
                if isinstance(exc, OAuthTokenError):
                    reason = f"OAuth token unavailable: {reason}"
                await self.logins.failed(logins.IMAP, watch.name, auth=auth, reason=reason)
                raise
            await self.logins.ok(logins.IMAP, watch.name, auth=auth)
            watch.connection = mailbox
        return watch.connection

    async def _drop_connection(self, watch: Watch | None = None) -> None:
        for one in [watch] if watch is not None else self.watches:
            mailbox, one.connection = one.connection, None
            if mailbox is not None:
                with contextlib.suppress(Exception):
                    await mailbox.close()

    async def poll_once(self, watch: Watch | None = None) -> PollReport:
        """Fetch and process everything above the cursor of one mailbox (the main one by
        default); return what happened."""
        watch = watch or self.watches[0]
        report = PollReport()
        mailbox = await self._connected(watch)
        uidvalidity = await mailbox.select(watch.folder)
        async with self.sessions() as session:
            state = await mailbox_state(session, mailbox=watch.name, folder=watch.folder)
            stored_validity, last_uid = state.uidvalidity, state.last_uid
        after, rescan = plan_fetch(stored_validity, uidvalidity, last_uid)
        if rescan:
            log.warning(
                "UIDVALIDITY changed, re-scanning the folder (duplicates are skipped)",
                extra={"folder": watch.folder, "old": stored_validity, "new": uidvalidity},
            )
        started = time.monotonic()
        # Two batches in flight: batch k+1 is fetched and prepared (in the prepare process,
        # when there is one) while batch k is stored; each is committed, then marked, in order.
        batches = mailbox.batches(after, batch_size=self.settings.imap_batch_size)
        ahead = await self._fetch_ahead(watch, batches)
        try:
            while ahead is not None:
                batch, preparing = ahead
                ahead = None if self._stop.is_set() else await self._fetch_ahead(watch, batches)
                # The prepare process drafts the acknowledgements while it keeps up; once the
                # store has to wait for it, they are composed at the store instead, which
                # moves ~0.2 ms a mail to whichever side has time for it.
                self._draft_acks = preparing.done()
                result = await watch.pipeline.store(
                    await preparing, folder=watch.folder, uidvalidity=uidvalidity
                )
                for lane, count in ((0, result.enqueued_priority), (1, result.enqueued_routine)):
                    if count:
                        self._wake[lane].set()
                uids = [m.uid for m in batch]
                await mailbox.mark_seen(uids)
                if watch.settings.imap_processed_folder:
                    await mailbox.move(uids, watch.settings.imap_processed_folder)
                report.fetched += len(batch)
                for o in result.outcomes:
                    report.created += o.action == "created"
                    report.appended += o.action == "appended"
                    report.duplicates += o.action == "duplicate"
                    report.rejected += o.action == "rejected"
                    report.acks += o.reply == "ack"
                    report.crisis += o.crisis_tier is not None
                self._processed += len(batch)
                if report.fetched % 500 < len(batch) and report.fetched >= 500:
                    rate = report.fetched / max(time.monotonic() - started, 1e-6)
                    log.info("ingesting", extra={"done": report.fetched, "per_second": round(rate)})
                if self._stop.is_set():
                    break
        finally:
            if ahead is not None:  # stopping: that batch is fetched again next time
                ahead[1].cancel()
                with contextlib.suppress(BaseException):
                    await ahead[1]
            closing = getattr(batches, "aclose", None)
            if closing is not None:
                await closing()
        await self._record_poll(watch)
        if report.fetched:
            log.info("poll done", extra=_as_extra(report))
        return report

    async def _fetch_ahead(
        self, watch: Watch, batches: AsyncIterator[list[FetchedMail]]
    ) -> tuple[list[FetchedMail], asyncio.Future[list[Prepared]]] | None:
        batch = await anext(batches, None)
        if batch is None:
            return None
        return batch, asyncio.ensure_future(self._prepare(watch.pipeline, batch))

    async def _prepare(self, pipeline: Pipeline, batch: list[FetchedMail]) -> list[Prepared]:
        pool = self._pool
        if pool is not None:
            try:
                return await pipeline.prepare_batch(batch, pool=pool, draft_acks=self._draft_acks)
            except BrokenProcessPool:
                log.warning("the prepare process died; preparing in the worker from now on")
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
        return await pipeline.prepare_batch(batch)

    def warm_up(self) -> None:
        """Build what preparing the first mail would (see :func:`pipeline.warm_up`) now, at
        startup, rather than while the first batch waits for it."""
        warm_up()

    def _start_pool(self) -> None:
        if self._pool is None:
            self._pool = prepare_pool()

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    async def _record_poll(self, watch: Watch) -> None:
        now = self.clock()
        async with self.sessions() as session, session.begin():
            state = await mailbox_state(session, mailbox=watch.name, folder=watch.folder)
            state.last_poll_at = now
            state.last_error = None
            beat = await session.get(WorkerHeartbeat, self.worker_id)
            if beat is not None:
                beat.last_poll_ok_at = now

    async def drain_outbox(
        self,
        lanes: tuple[int, ...] = (0, 1),
        *,
        sender: outbox.Sender | None = None,
        tried: set[int] | None = None,
    ) -> outbox.DeliveryReport:
        own = sender is None
        sender = sender or self.sender_factory("all")
        try:
            return await outbox.deliver_due(
                sessions=self.sessions,
                sender=sender,
                worker_id=self.worker_id,
                now=self.clock,
                policy=self.policy,
                lanes=lanes,
                batch_size=self.settings.outbox_batch_size,
                tried=tried,
                write_lock=self.pipeline.write_lock,
            )
        finally:
            if own:
                await sender.close()

    async def _drain_until(self, done: asyncio.Event) -> outbox.DeliveryReport:
        """Send what each committed batch enqueued while the next batches are ingested, then
        one last pass once ``done`` is set. All passes count as one for the retry rules: a
        row that failed is not tried again, and a server that seems down ends the lot."""
        sender = self.sender_factory("all")
        tried: set[int] = set()
        total = outbox.DeliveryReport(0, 0, 0)
        try:
            while True:
                last = done.is_set()
                for event in self._wake.values():
                    event.clear()
                total += await self.drain_outbox(sender=sender, tried=tried)
                if last:
                    break
                waits = [asyncio.ensure_future(e.wait()) for e in (done, *self._wake.values())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waits:
                        waiter.cancel()
            # Mail that failed for a passing reason and is due again within moments is worth
            # one more try before exiting; anything later waits for the next run.
            for _ in range(3):
                due_in = await outbox.next_due_in(self.sessions, now=self.clock())
                if due_in is None or due_in > 10.0:
                    break
                await asyncio.sleep(max(due_in, 0.0))
                tried.clear()
                total += await self.drain_outbox(sender=sender, tried=tried)
            return total
        finally:
            await sender.close()

    async def escalate_due(self) -> int:
        return await escalation.run_due(
            sessions=self.sessions,
            now=self.clock(),
            identity=self.pipeline.identity,
            settings=self.settings,
            worker_id=self.worker_id,
        )

    async def deliver_webhooks(self) -> int:
        return await webhook.deliver_webhooks(
            sessions=self.sessions,
            now=self.clock(),
            identity=self.pipeline.identity,
            settings=self.settings,
        )

    # -- the loops -------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()
        for event in self._wake.values():
            event.set()

    async def run_once(self) -> RunReport:
        """Process everything in the mailbox now, fire due escalations, drain the outbox.

        The outbox is drained alongside the ingest (each batch's acks go out while the next
        batch is parsed), and once more after the escalation timer has run."""
        report = RunReport()
        started = time.perf_counter()
        cpu = _cpu_seconds()
        self._start_pool()  # before the presence lock: the prepare process must not hold it
        try:
            async with self.presence:
                # rows claimed by a worker that was killed are released now, not after a timeout
                await self.presence.reclaim(self.sessions)
                await self._run_once(report, started)
        finally:
            self._stop_pool()
        report.cpu = round(_cpu_seconds() - cpu, 3)  # the prepare process has been reaped
        return report

    async def _run_once(self, report: RunReport, started: float) -> RunReport:
        await self._heartbeat()
        done = asyncio.Event()
        drainer = asyncio.create_task(self._drain_until(done), name="drain-outbox")
        try:
            for watch in self.watches:
                if not await self.presence.try_lease(watch.name):
                    log.info("another worker holds the mailbox lease", extra={"box": watch.name})
                    continue
                try:
                    while True:
                        poll = await self.poll_once(watch)
                        report.poll.add(poll)
                        if poll.fetched == 0 or self._stop.is_set():
                            break
                finally:
                    await self._drop_connection(watch)
            report.escalation_actions = await self.escalate_due()
            await self.deliver_webhooks()
        except Exception:
            done.set()  # let the sends already due go out, each recorded, before failing
            with contextlib.suppress(Exception):
                await drainer
            raise
        except BaseException:  # cancelled: stop sending now (at most the mail in flight)
            drainer.cancel()
            with contextlib.suppress(BaseException):
                await drainer
            raise
        done.set()
        delivery = await drainer
        report.sent, report.retried, report.failed = (
            delivery.sent,
            delivery.retried,
            delivery.failed,
        )
        await self._heartbeat()
        report.elapsed = round(time.perf_counter() - started, 3)
        return report

    async def run(self) -> None:
        """Run until ``request_stop()`` (SIGTERM): mailbox, two delivery lanes, timers."""
        log.info("worker starting", extra={"worker": self.worker_id, "folder": self.folder})
        self._start_pool()  # before the presence lock: the prepare process must not hold it
        try:
            async with self.presence:
                await self.presence.reclaim(self.sessions)
                await self._run_tasks()
        finally:
            self._stop_pool()

    async def _run_tasks(self) -> None:
        tasks = [
            *(
                asyncio.create_task(self._mailbox_loop(w), name=f"mailbox-{w.name}")
                for w in self.watches
            ),
            asyncio.create_task(self._delivery_loop(0, until=self._stop), name="deliver-priority"),
            asyncio.create_task(self._delivery_loop(1, until=self._stop), name="deliver-routine"),
            asyncio.create_task(self._every(1.0, self._escalation_tick), name="escalation"),
            asyncio.create_task(self._every(2.0, self.deliver_webhooks), name="webhooks"),
            asyncio.create_task(self._every(10.0, self._heartbeat), name="heartbeat"),
            asyncio.create_task(self._every(5.0, self._reclaim), name="reclaim"),
        ]
        for watch in self.watches if self.scout_enabled else []:
            scout = CrisisScout(
                pipeline=watch.pipeline,
                mailbox_factory=functools.partial(imap_mailbox, watch.settings, self.tokens),
                folder=watch.folder,
                on_crisis=self._wake[0].set,
                active=functools.partial(self.presence.leases.__contains__, watch.name),
            )
            tasks.append(asyncio.create_task(scout.run(self._stop), name=f"scout-{watch.name}"))
        try:
            await self._stop.wait()
        finally:
            self.request_stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._drop_connection()
            log.info(
                "worker stopped", extra={"worker": self.worker_id, "processed": self._processed}
            )

    async def _mailbox_loop(self, watch: Watch) -> None:
        backoff = Backoff()
        attempt = 0
        while not self._stop.is_set():
            try:
                if not await self.presence.try_lease(watch.name):
                    await self._sleep(2.0)  # another worker watches this mailbox
                    continue
                await self.poll_once(watch)
                attempt = 0
                mailbox = await self._connected(watch)
                await wait_or_stop(mailbox, self.settings.imap_poll_interval, self._stop)
            except OAuthTokenError as exc:
                self._errors += 1
                attempt += 1
                log.error(
                    "IMAP OAuth token unavailable: mail is NOT being read",
                    extra={"error": str(exc)[:200]},
                )
                await self._drop_connection(watch)
                await self._sleep(backoff.delay(attempt))
            except MailboxAuthError as exc:
                self._errors += 1
                attempt += 1
                log.error(
                    "IMAP login refused: mail is NOT being read; check the login"
                    " (HELPDESK_IMAP_USER and password or OAuth token)",
                    extra={"error": str(exc)[:200]},
                )
                await self._drop_connection(watch)
                await self._sleep(max(backoff.delay(attempt), 60.0 if backoff.base else 0.0))
            except (MailboxError, OSError, TimeoutError) as exc:
                self._errors += 1
                attempt += 1
                delay = backoff.delay(attempt)
                log.warning(
                    "mailbox connection lost, reconnecting",
                    extra={
                        "error": type(exc).__name__,
                        "attempt": attempt,
                        "delay": round(delay, 2),
                    },
                )
                await self._drop_connection(watch)
                await self._sleep(delay)
            except Exception:
                self._errors += 1
                attempt += 1
                log.exception("mailbox pass failed; retrying")
                await self._drop_connection(watch)
                await self._sleep(backoff.delay(attempt))

    async def _delivery_loop(self, lane: int, *, until: asyncio.Event) -> None:
        sender = self.sender_factory("priority" if lane == 0 else "routine")
        event = self._wake[lane]
        orphaned = False  # a failed pass may leave rows claimed by us and never sent
        try:
            while not until.is_set():
                event.clear()
                try:
                    if orphaned:
                        # this loop is the only one of this worker using this lane, and no
                        # pass is running: whatever we still hold is left from a failed one
                        await outbox.release_claims(
                            self.sessions, worker_id=self.worker_id, lanes=(lane,)
                        )
                        orphaned = False
                    await outbox.deliver_due(
                        sessions=self.sessions,
                        sender=sender,
                        worker_id=self.worker_id,
                        now=self.clock,
                        policy=self.policy,
                        lanes=(lane,),
                        batch_size=self.settings.outbox_batch_size,
                    )
                except Exception:
                    self._errors += 1
                    orphaned = True
                    log.exception("delivery pass failed", extra={"lane": lane})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=1.0)
        finally:
            await sender.close()

    async def _reclaim(self) -> None:
        await self.presence.check()
        if await self.presence.reclaim(self.sessions):
            for event in self._wake.values():
                event.set()

    async def _escalation_tick(self) -> None:
        actions = await self.escalate_due()
        if actions:
            self._wake[0].set()

    async def _every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        while not self._stop.is_set():
            try:
                await job()
            except Exception:
                self._errors += 1
                log.exception("periodic job failed", extra={"job": getattr(job, "__name__", "?")})
            await self._sleep(seconds)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _heartbeat(self) -> None:
        now = self.clock()
        async with self.sessions() as session, session.begin():
            beat = await session.get(WorkerHeartbeat, self.worker_id)
            if beat is None:
                beat = WorkerHeartbeat(
                    worker_id=self.worker_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=now,
                )
                session.add(beat)
            beat.last_seen_at = now
            beat.processed = self._processed
            beat.errors = self._errors


def _as_extra(report: PollReport) -> dict[str, int]:
    # prefixed: some names ("created") are LogRecord attributes and may not be overwritten
    return {f"mails_{name}": getattr(report, name) for name in report.__slots__}


async def last_heartbeat(sessions: SessionFactory) -> WorkerHeartbeat | None:
    async with sessions() as session:
        rows = await session.exec(
            select(WorkerHeartbeat).order_by(WorkerHeartbeat.last_seen_at.desc())  # type: ignore[attr-defined]
        )
        return rows.first()
