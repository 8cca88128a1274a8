"""One batch of fetched mail: parse -> classify -> tickets -> compose -> outbox, committed once.

The worker hands over ``(uid, raw bytes)`` pairs; this module turns them into tickets,
messages, attachments, acknowledgements, crisis replies and escalations, and moves the
mailbox cursor, all in one transaction (the transactional outbox): either everything a mail
caused is stored, or nothing is and the mail is fetched again.

Invariants:
- idempotent: a Message-ID already stored is a duplicate and changes nothing, so a batch
  replayed after a crash, or a re-scan after a UIDVALIDITY change, creates no second ticket;
- exactly one acknowledgement per ticket, never to a robot, a list, a bounce, our own address,
  nor past the per-sender limit; the ticket is recorded whatever happens to the reply;
- a crisis reply is never rate-limited and goes through the priority lane (0);
- a mail that breaks a step is set aside in ``rejected_mail`` with its raw bytes and the
  reason, and never blocks the mails behind it;
- nothing here logs a body, a subject or an address: only ids, references and rule ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from multiprocessing.reduction import ForkingPickler
from types import MappingProxyType
from typing import Any, Literal, Protocol

from sqlalchemy import exc as sa_exc
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk import compose, escalation, outbox, tickets
from helpdesk.classify import Classification, classify, classify_unreadable
from helpdesk.config import Settings
from helpdesk.crisis import CrisisResult, detect
from helpdesk.crisis.model import load_category_model
from helpdesk.db import SessionFactory
from helpdesk.models import MailboxState, Message, RejectedMail, Ticket, utcnow
from helpdesk.parse import InboundEmail, ParseError, parse

log = logging.getLogger(__name__)

Action = Literal["created", "appended", "duplicate", "rejected"]
_Writing = Callable[[], Awaitable[None]]


class RawMail(Protocol):
    @property
    def uid(self) -> int: ...
    @property
    def raw(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one mail. ``reply`` is what we sent back, or why we did not."""

    uid: int | None
    message_id: str
    action: Action
    reference: str | None
    reply: str
    crisis_tier: int | None = None
    rule_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Prepared:
    """The pure half of processing one mail, done before any database work."""

    uid: int | None
    raw: bytes
    email: InboundEmail | None
    classification: Classification | None
    error: str | None  # why it could not be parsed or classified
    crisis: CrisisResult
    # the routine acknowledgement, drafted ahead when the mail may get one (see AckSpec)
    ack: compose.AckDraft | None = None

    @property
    def message_id(self) -> str:
        if self.email is not None:
            return self.email.message_id
        digest = hashlib.sha256(self.raw).hexdigest()[:32]
        return f"<{digest}@unreadable.helpdesk.invalid>"


@dataclass(slots=True)
class _Writes:
    """What a batch inserts with Core executemany once its mails are planned: messages (and
    their attachments) and outbox rows. Tickets stay ORM objects (threading, escalation and
    the web code work on them); everything else of the hot path is a plain row."""

    messages: tickets.MessageRows = field(default_factory=tickets.MessageRows)
    outbox: list[dict[str, Any]] = field(default_factory=list)

    async def write(self, session: AsyncSession) -> None:
        await self.messages.write(session)
        await outbox.insert_rows(session, self.outbox)


@dataclass(slots=True)
class BatchResult:
    outcomes: list[Outcome] = field(default_factory=list)
    enqueued_priority: int = 0
    enqueued_routine: int = 0


@dataclass(frozen=True, slots=True)
class AckSpec:
    """What drafting acknowledgements ahead of the database work takes (see
    :func:`compose.ack_draft`): the reference is not known until the ticket is stored, so
    the draft has a slot as long as ``reference_length`` that the store fills."""

    identity: compose.Identity
    subject_template: str
    reply_window: str
    reference_length: int
    now: datetime


def why_no_reply(
    email: InboundEmail, cls: Classification, own_addresses: frozenset[str]
) -> str | None:
    """Why this mail must not be answered, or None when it may be (the per-sender limit
    aside, which needs the database)."""
    if cls.robot.suppress_reply:
        return f"{cls.robot.kind}: {cls.robot.reason}"
    recipient = email.reply_address
    if recipient is None or "@" not in recipient.email:
        return "no reply address"
    if recipient.key in own_addresses:
        return "loop: our own address"
    return None


def _draft_ack(
    email: InboundEmail, cls: Classification, spec: AckSpec, own_addresses: frozenset[str]
) -> compose.AckDraft | None:
    """The routine acknowledgement this mail would get if it opens a ticket; None for a
    crisis (its reply depends on the rota) or a mail we must not answer."""
    recipient = email.reply_address
    if recipient is None or cls.crisis.tier is not None:
        return None
    if why_no_reply(email, cls, own_addresses) is not None:
        return None
    try:
        return compose.ack_draft(
            reference_length=spec.reference_length,
            identity=spec.identity,
            to_addr=recipient.email,
            to_name=recipient.name,
            subject_template=spec.subject_template,
            reply_window=spec.reply_window,
            language=cls.language,
            in_reply_to=email.message_id,
            references=[*email.references, email.message_id],
            message_id=compose.new_message_id(spec.identity.message_id_domain),
            now=spec.now,
        )
    except Exception:  # composed again when stored, where the error is dealt with
        return None


def prepare(
    raw: bytes,
    *,
    uid: int | None,
    own_addresses: frozenset[str],
    own_templates: Sequence[str],
    ack: AckSpec | None = None,
) -> Prepared:
    """Parse and classify one mail, and draft its acknowledgement when ``ack`` is given.
    Pure; never raises."""
    try:
        email = parse(raw)
    except ParseError as exc:
        text = raw[:200_000].decode("utf-8", "replace")
        found = detect("", text)
        crisis = found if found.tier is not None else classify_unreadable(f"unparseable: {exc}")
        return Prepared(uid, raw, None, None, f"unparseable: {exc}", crisis)
    except Exception as exc:  # a parser bug must not lose the mail
        return Prepared(
            uid,
            raw,
            None,
            None,
            f"parser error: {type(exc).__name__}",
            classify_unreadable("parser error"),
        )
    try:
        classification = classify(email, own_addresses=own_addresses, own_templates=own_templates)
    except Exception as exc:
        return Prepared(
            uid,
            raw,
            email,
            None,
            f"classifier error: {type(exc).__name__}",
            classify_unreadable("classifier error"),
        )
    draft = None if ack is None else _draft_ack(email, classification, ack, own_addresses)
    return Prepared(uid, raw, email, classification, None, classification.crisis, draft)


def prepare_many(
    mails: Sequence[tuple[int | None, bytes]],
    *,
    own_addresses: frozenset[str],
    own_templates: Sequence[str],
    ack: AckSpec | None = None,
) -> list[Prepared]:
    """:func:`prepare` for a batch of ``(uid, raw)``; what the prepare process runs."""
    return [
        prepare(raw, uid=uid, own_addresses=own_addresses, own_templates=own_templates, ack=ack)
        for uid, raw in mails
    ]


_SAMPLE = (
    b"From: Warm Up <warm.up@example.invalid>\r\nTo: help@example.invalid\r\n"
    b"Subject: warm-up\r\nMessage-ID: <warm-up@example.invalid>\r\n\r\nHello.\r\n"
)


def warm_up() -> None:
    """Prepare one made-up mail, so that what the first real one would build (the crisis
    lexicon and model, compiled patterns, templates: ~1.5 s) is ready in this process and
    in a prepare process forked from it, instead of holding up the first batch."""
    identity = compose.Identity("help@example.invalid", "Warm Up", "example.invalid")
    spec = AckSpec(identity, compose.DEFAULT_ACK_SUBJECT, "5–7 days", 7, utcnow())
    prepare(
        _SAMPLE,
        uid=None,
        own_addresses=frozenset(),
        own_templates=compose.own_template_texts(),
        ack=spec,
    )
    load_category_model()  # used only by a model hit, which the sample does not make


def _mappingproxy(items: dict[str, Any]) -> MappingProxyType[str, Any]:
    return MappingProxyType(items)


def _reduce_mappingproxy(
    proxy: MappingProxyType[str, Any],
) -> tuple[Callable[[dict[str, Any]], MappingProxyType[str, Any]], tuple[dict[str, Any]]]:
    return _mappingproxy, (dict(proxy),)


# ``InboundEmail.headers`` is a read-only mapping, which pickle cannot carry on its own.
ForkingPickler.register(MappingProxyType, _reduce_mappingproxy)


def _prepare_process_init(parent: int) -> None:
    """In the prepare process: leave signals to the worker (which shuts the pool down), and
    exit when the worker is gone, even SIGKILLed (a pool process would otherwise wait on its
    queue for ever)."""
    signal.set_wakeup_fd(-1)  # inherited from the worker's event loop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def prepare_pool() -> ProcessPoolExecutor | None:
    """A one-process pool for :meth:`Pipeline.prepare_batch`, or None where it would not
    help (one core) or cannot start cheaply (no ``fork``: a spawned process would spend a
    second importing before its first batch).

    Parsing and the crisis detector are about half of the CPU an ingested mail costs; in
    their own process they run beside the database and SMTP work instead of before it.
    The process is forked at once, warmed up (see :func:`warm_up`), before the caller
    opens sockets or takes locks it should not share.
    """
    if (os.cpu_count() or 1) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    warm_up()  # the fork inherits it
    pool = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_prepare_process_init,
        initargs=(os.getpid(),),
    )
    pool.submit(int).result()  # fork now, not at the first batch
    return pool


_UNAVAILABLE_WORDS = (
    "connect",
    "closed",
    "terminat",
    "shutting down",
    "starting up",
    "does not exist",  # asyncpg: ConnectionDoesNotExistError
    "database is locked",
    "server closed",
)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be reached or the connection died,
    as opposed to this mail making a step fail."""
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError | sa_exc.ProgrammingError):
            return False
        text = f"{type(exc.orig).__name__} {exc.orig}".lower()
        return any(word in text for word in _UNAVAILABLE_WORDS)
    return False


class Pipeline:
    """Turns batches of raw mail into stored tickets and queued replies."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: SessionFactory,
        mailbox: str = "default",
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.mailbox = mailbox
        self.clock = clock
        self.identity = compose.Identity(
            address=settings.support_address,
            name=settings.support_name,
            message_id_domain=settings.message_id_domain_effective,
            base_url=settings.base_url,
        )
        self.own_addresses = frozenset({settings.support_address.lower()})
        self.own_templates = compose.own_template_texts()
        self.write_lock: asyncio.Lock | None = None
        # how long the next ticket's reference will be, for drafting acks ahead (see
        # AckSpec); learnt from the last ticket stored, so only a wrong guess at a power
        # of ten costs anything (those acks are composed when stored instead)
        self.reference_length = len(tickets.reference_for(1))

    def writing(self) -> contextlib.AbstractAsyncContextManager[object]:
        """Held around the writing part of each batch transaction: ``write_lock`` when the
        caller shares one with its other writers (the worker's outbox), so they queue in
        the event loop instead of in SQLite's busy handler, which sleeps in steps of up to
        25 ms."""
        return self.write_lock if self.write_lock is not None else contextlib.nullcontext()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[tuple[AsyncSession, _Writing]]:
        """A session in a transaction, and the step that takes :meth:`writing` before its
        first write; once taken, it is held until after the commit.

        The lookups before it hold nothing: SQLite (pysqlite) starts the transaction at
        the first write anyway, so the outbox can record its sends in the meantime.
        """
        async with contextlib.AsyncExitStack() as held:
            taken = False

            async def before_writes() -> None:
                nonlocal taken
                if not taken:
                    taken = True
                    await held.enter_async_context(self.writing())

            async with self.sessions() as session, session.begin():
                yield session, before_writes

    def ack_spec(self) -> AckSpec:
        return AckSpec(
            identity=self.identity,
            subject_template=self.settings.ack_subject,
            reply_window=self.settings.reply_window,
            reference_length=self.reference_length,
            now=self.clock(),
        )

    def prepare(self, raw: bytes, uid: int | None = None, *, draft_ack: bool = False) -> Prepared:
        """Parse and classify one mail; with ``draft_ack``, draft its acknowledgement too
        (worth it only for mail that is about to be stored)."""
        return prepare(
            raw,
            uid=uid,
            own_addresses=self.own_addresses,
            own_templates=self.own_templates,
            ack=self.ack_spec() if draft_ack else None,
        )

    async def prepare_batch(
        self, mails: Sequence[RawMail], *, pool: Executor | None = None, draft_acks: bool = True
    ) -> list[Prepared]:
        """Parse, classify and (with ``draft_acks``) draft acknowledgements for a batch: in
        ``pool`` (see :func:`prepare_pool`) when given, so that the next batch is prepared
        on another core while this one is stored."""
        job = functools.partial(
            prepare_many,
            [(m.uid, m.raw) for m in mails],
            own_addresses=self.own_addresses,
            own_templates=self.own_templates,
            ack=self.ack_spec() if draft_acks else None,
        )
        if pool is None:
            return job()
        return await asyncio.get_running_loop().run_in_executor(pool, job)

    async def ingest(
        self,
        mails: Sequence[RawMail],
        *,
        folder: str,
        uidvalidity: int | None,
    ) -> BatchResult:
        """Prepare and store one fetched batch (see :meth:`store`)."""
        prepared = await self.prepare_batch(mails)
        return await self.store(prepared, folder=folder, uidvalidity=uidvalidity)

    async def store(
        self,
        prepared: Sequence[Prepared],
        *,
        folder: str,
        uidvalidity: int | None,
    ) -> BatchResult:
        """Store one prepared batch and move the cursor past it, in one transaction.

        When the batch transaction fails, each mail is retried in a transaction of its own
        and one that still fails is set aside as a poison mail, so it never blocks the rest.
        """
        try:
            async with self._transaction() as (session, before_writes):
                return await self._store(
                    session,
                    prepared,
                    folder=folder,
                    uidvalidity=uidvalidity,
                    before_writes=before_writes,
                )
        except Exception as exc:
            if is_unavailable(exc):
                raise  # the database, not the mail: the worker retries the whole batch later
            if len(prepared) == 1:
                log.warning(
                    "mail failed, setting it aside",
                    extra={"uid": prepared[0].uid, "error": type(exc).__name__},
                )
                return await self._set_aside(
                    prepared[0], exc, folder=folder, uidvalidity=uidvalidity
                )
            log.warning(
                "batch failed, retrying mail by mail",
                extra={"batch": len(prepared), "error": type(exc).__name__},
            )
        total = BatchResult()
        for one in prepared:
            try:
                async with self._transaction() as (session, before_writes):
                    result = await self._store(
                        session,
                        [one],
                        folder=folder,
                        uidvalidity=uidvalidity,
                        before_writes=before_writes,
                    )
            except Exception as exc:
                if is_unavailable(exc):
                    raise
                log.warning(
                    "mail failed, setting it aside",
                    extra={"uid": one.uid, "error": type(exc).__name__},
                )
                result = await self._set_aside(one, exc, folder=folder, uidvalidity=uidvalidity)
            total.outcomes.extend(result.outcomes)
            total.enqueued_priority += result.enqueued_priority
            total.enqueued_routine += result.enqueued_routine
        return total

    async def store_priority(
        self, prepared: Sequence[Prepared], *, folder: str, uidvalidity: int | None
    ) -> BatchResult:
        """Store crisis mail ahead of the queue (the crisis scout): same transaction rules,
        but the cursor stays put, so the main loop later meets these mails as duplicates.

        The lookups come before the write lock, so the main loop may store one of these
        mails in between, and the insert then hits the unique Message-ID: nothing was
        written, and a second transaction finds the mail stored and counts it a duplicate
        (as :meth:`store` does in its mail-by-mail retry)."""
        for attempt in (1, 2):
            try:
                async with self._transaction() as (session, before_writes):
                    return await self._store(
                        session,
                        prepared,
                        folder=folder,
                        uidvalidity=uidvalidity,
                        move_cursor=False,
                        before_writes=before_writes,
                    )
            except sa_exc.IntegrityError:
                if attempt == 2:
                    raise
                log.info("priority store met the main loop on the same mail; storing again")
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _set_aside(
        self, one: Prepared, exc: BaseException, *, folder: str, uidvalidity: int | None
    ) -> BatchResult:
        """Record a poison mail with its bytes and the error, and move the cursor past it."""
        now = self.clock()
        async with self.sessions() as session, session.begin():
            session.add(
                RejectedMail(
                    mailbox=self.mailbox,
                    folder=folder,
                    uidvalidity=uidvalidity,
                    uid=one.uid,
                    sha256=hashlib.sha256(one.raw).hexdigest(),
                    raw=one.raw,
                    reason="processing failed",
                    detail=f"{type(exc).__name__}: {str(exc)[:300]}",
                    created_at=now,
                )
            )
            if one.uid is not None:
                await self._advance(
                    session, folder=folder, uidvalidity=uidvalidity, uid=one.uid, now=now
                )
        return BatchResult(
            outcomes=[Outcome(one.uid, one.message_id, "rejected", None, "none: processing failed")]
        )

    async def _advance(
        self,
        session: AsyncSession,
        *,
        folder: str,
        uidvalidity: int | None,
        uid: int,
        now: datetime,
    ) -> None:
        state = await mailbox_state(session, mailbox=self.mailbox, folder=folder)
        if uid > state.last_uid or state.uidvalidity != uidvalidity:
            state.last_uid = max(uid, state.last_uid if state.uidvalidity == uidvalidity else 0)
        state.uidvalidity = uidvalidity
        state.updated_at = now

    async def _store(
        self,
        session: AsyncSession,
        prepared: Sequence[Prepared],
        *,
        folder: str,
        uidvalidity: int | None,
        move_cursor: bool = True,
        before_writes: _Writing | None = None,
    ) -> BatchResult:
        """Store a batch with a handful of statements, whatever its size: the lookups are
        made for the whole batch, new tickets are inserted together, and everything else
        is flushed once at the commit. ``before_writes`` is awaited between the lookups
        and the first write."""
        now = self.clock()
        result = BatchResult()
        known = await tickets.known_message_ids(
            session, message_ids=[p.message_id for p in prepared]
        )
        fresh: list[Prepared] = []
        outcomes: dict[int, Outcome] = {}
        for i, p in enumerate(prepared):
            if p.message_id in known:
                outcomes[i] = Outcome(p.uid, p.message_id, "duplicate", None, "none: duplicate")
            else:
                known.add(p.message_id)
                fresh.append(p)
        readable = [p for p in fresh if p.email is not None and p.classification is not None]
        index = await tickets.ThreadIndex.load(session, [p.email for p in readable if p.email])
        # Routine mail opens its tickets as plain rows (cheap); a batch with a crisis
        # keeps ORM tickets throughout, which is what the escalation code works on.
        plain = not any(p.crisis.tier is not None for p in fresh)

        plans: list[tuple[Prepared, tickets.AnyTicket, bool, str]] = []
        created: list[Ticket] = []
        opened: list[tickets.NewTicket] = []
        for p in readable:
            email, cls = p.email, p.classification
            assert email is not None and cls is not None
            kind = "bounce" if cls.robot.kind == "bounce" else "mail"
            ticket = index.bounced(email) if kind == "bounce" else None
            ticket = ticket or index.find(email)
            is_new = ticket is None
            if ticket is None:
                requester = email.reply_address or email.from_addr
                values: dict[str, Any] = {
                    "subject": email.subject,
                    "requester": requester.key if requester else "",
                    "requester_name": requester.name if requester else "",
                    "language": cls.language,
                    "mailbox": self.mailbox,
                    "now": now,
                    "due_days": self.settings.due_days,
                }
                if plain:
                    ticket = tickets.NewTicket.open(**values)
                    opened.append(ticket)
                else:
                    ticket = tickets.new_ticket(session, **values)
                    created.append(ticket)
            index.remember(email.message_id, ticket)
            plans.append((p, ticket, is_new, kind))
        since = now - timedelta(hours=self.settings.ack_limit_window_hours)
        with session.no_autoflush:  # the new ORM tickets are written after the lock
            acks_sent = await tickets.acks_sent_since(
                session,
                recipients=[
                    p.email.reply_address.key
                    for p, _t, is_new, _k in plans
                    if is_new and p.email is not None and p.email.reply_address is not None
                ],
                since=since,
            )
        if before_writes is not None:
            await before_writes()
        await tickets.assign_references(session, created)
        await tickets.insert_new(session, opened)
        last = opened[-1] if opened else created[-1] if created else None
        if last is not None and last.reference is not None:
            self.reference_length = len(last.reference)
        writes = _Writes()
        by_prepared: dict[int, Outcome] = {}
        for p, ticket, is_new, kind in plans:
            by_prepared[id(p)] = await self._store_one(
                session,
                p,
                ticket,
                is_new=is_new,
                kind=kind,
                now=now,
                result=result,
                writes=writes,
                acks_sent=acks_sent,
            )
        for p in fresh:
            if id(p) not in by_prepared:
                by_prepared[id(p)] = await self._store_unreadable(
                    session, p, now=now, folder=folder, uidvalidity=uidvalidity
                )
        await writes.write(session)
        await tickets.finish_new(session, opened)
        fresh_ids = {id(p) for p in fresh}
        for i, p in enumerate(prepared):
            if id(p) in fresh_ids:
                outcomes[i] = by_prepared[id(p)]
        result.outcomes = [outcomes[i] for i in range(len(prepared))]
        uids = [p.uid for p in prepared if p.uid is not None]
        if uids and move_cursor:
            await self._advance(
                session, folder=folder, uidvalidity=uidvalidity, uid=max(uids), now=now
            )
        return result

    async def _store_one(
        self,
        session: AsyncSession,
        p: Prepared,
        ticket: tickets.AnyTicket,
        *,
        is_new: bool,
        kind: str,
        now: datetime,
        result: BatchResult,
        writes: _Writes,
        acks_sent: dict[str, int],
    ) -> Outcome:
        email, cls = p.email, p.classification
        assert email is not None and cls is not None
        robot = cls.robot
        tickets.add_inbound_message(
            session,
            rows=writes.messages,
            ticket=ticket,
            email=email,
            kind=kind,
            mailbox=self.mailbox,
            uid=p.uid,
            now=now,
            robot_reason=None if robot.kind == "human" else robot.reason,
            crisis_tier=p.crisis.tier,
            crisis_rules=p.crisis.rule_ids,
        )

        reply = "none: not a new ticket"
        crisis_replied = False
        if p.crisis.tier is not None:
            if not isinstance(ticket, Ticket):  # see _store: a crisis batch has ORM tickets
                raise TypeError("a crisis mail needs an ORM ticket")
            outcome = await escalation.open_or_update(
                session,
                ticket=ticket,
                result=p.crisis,
                received_at=now,
                now=now,
                identity=self.identity,
                settings=self.settings,
            )
            result.enqueued_priority += len(outcome.paged)
            log.warning(
                "crisis detected",
                extra={
                    "reference": ticket.reference,
                    "tier": p.crisis.tier,
                    "rules": ",".join(p.crisis.rule_ids),
                    "escalation_created": outcome.created,
                    "paged": len(outcome.paged),
                },
            )
            if outcome.created or outcome.reopened:
                why_not = self._why_no_reply(email, cls)
                if why_not is None:
                    self._enqueue_ack(
                        writes,
                        ticket=ticket,
                        email=email,
                        cls=cls,
                        now=now,
                        crisis=True,
                        oncall_alerted=outcome.oncall_configured,
                        draft=None,
                    )
                    result.enqueued_priority += 1
                    crisis_replied = True
                    reply = "crisis reply"
                else:
                    reply = f"none: {why_not}"
        if is_new and not crisis_replied:
            why_not = self._why_no_reply(email, cls)
            recipient = email.reply_address
            if why_not is None and recipient is not None:
                limit = self.settings.ack_limit_per_sender
                if acks_sent.get(recipient.key, 0) >= limit:
                    hours = self.settings.ack_limit_window_hours
                    why_not = f"rate limited ({limit} per {hours:g} h)"
            if why_not is None and recipient is not None:
                self._enqueue_ack(
                    writes,
                    ticket=ticket,
                    email=email,
                    cls=cls,
                    now=now,
                    crisis=False,
                    oncall_alerted=False,
                    draft=p.ack,
                )
                acks_sent[recipient.key] = acks_sent.get(recipient.key, 0) + 1
                result.enqueued_routine += 1
                reply = "ack"
            else:
                reply = f"none: {why_not}"
        return Outcome(
            p.uid,
            email.message_id,
            "created" if is_new else "appended",
            ticket.reference,
            reply,
            p.crisis.tier,
            p.crisis.rule_ids,
        )

    def _why_no_reply(self, email: InboundEmail, cls: Classification) -> str | None:
        return why_no_reply(email, cls, self.own_addresses)

    def _enqueue_ack(
        self,
        writes: _Writes,
        *,
        ticket: tickets.AnyTicket,
        email: InboundEmail,
        cls: Classification,
        now: datetime,
        crisis: bool,
        oncall_alerted: bool,
        draft: compose.AckDraft | None,
    ) -> None:
        recipient = email.reply_address
        assert recipient is not None and ticket.reference is not None
        references = [*email.references, email.message_id]
        # the draft (made with the same values in the prepare step) unless it does not fit
        msg = None if draft is None or crisis else draft.fill(ticket.reference)
        if msg is None:
            msg = compose.ack_bytes(
                identity=self.identity,
                to_addr=recipient.email,
                to_name=recipient.name,
                reference=ticket.reference,
                subject_template=self.settings.ack_subject,
                reply_window=self.settings.reply_window,
                language=cls.language,
                in_reply_to=email.message_id,
                references=references,
                message_id=compose.new_message_id(self.identity.message_id_domain),
                now=now,
                crisis=crisis,
                oncall_alerted=oncall_alerted,
            )
        message_id = msg.message_id
        row = outbox.new_row(
            msg=msg,
            kind="crisis_ack" if crisis else "ack",
            recipient=recipient.key,
            mail_from=self.identity.address,
            ticket_id=ticket.id,
            lane=0 if crisis else 1,
            now=now,
            deadline=timedelta(hours=self.settings.outbox_deadline_hours),
        )
        writes.outbox.append(row)
        tickets.add_outbound_record(
            rows=writes.messages,
            ticket=ticket,
            kind="crisis_ack" if crisis else "ack",
            message_id=message_id,
            from_addr=self.identity.address,
            to_addr=recipient.key,
            subject=msg.subject,
            text_body="(automatic crisis reply)" if crisis else "(automatic acknowledgement)",
            in_reply_to=email.message_id,
            references=" ".join(references),
            now=now,
        )

    async def _store_unreadable(
        self,
        session: AsyncSession,
        p: Prepared,
        *,
        now: datetime,
        folder: str,
        uidvalidity: int | None,
    ) -> Outcome:
        """A mail we cannot read still becomes a ticket (so it is seen and escalated at tier 2)
        and a rejection record that keeps its bytes for a retry after a fix."""
        ticket = await tickets.create_ticket(
            session,
            subject="(unreadable message)",
            requester="",
            requester_name="",
            language="en",
            mailbox=self.mailbox,
            now=now,
            due_days=self.settings.due_days,
        )
        session.add(
            Message(
                ticket_id=ticket.id,  # type: ignore[arg-type]
                direction="inbound",
                kind="mail",
                message_id=p.message_id,
                subject="(unreadable message)",
                text_body=f"This mail could not be read ({p.error}). Its raw bytes are kept in the"
                " admin health panel.",
                size=len(p.raw),
                crisis_tier=p.crisis.tier,
                crisis_rules=",".join(p.crisis.rule_ids),
                mailbox=self.mailbox,
                uid=p.uid,
                created_at=now,
            )
        )
        ticket.message_count += 1
        session.add(
            RejectedMail(
                mailbox=self.mailbox,
                folder=folder,
                uidvalidity=uidvalidity,
                uid=p.uid,
                sha256=hashlib.sha256(p.raw).hexdigest(),
                raw=p.raw,
                reason=(p.error or "unreadable")[:200],
                ticket_id=ticket.id,
                created_at=now,
            )
        )
        if p.crisis.tier is not None:
            await escalation.open_or_update(
                session,
                ticket=ticket,
                result=p.crisis,
                received_at=now,
                now=now,
                identity=self.identity,
                settings=self.settings,
            )
        return Outcome(
            p.uid,
            p.message_id,
            "rejected",
            ticket.reference,
            "none: unreadable",
            p.crisis.tier,
            p.crisis.rule_ids,
        )


async def mailbox_state(session: AsyncSession, *, mailbox: str, folder: str) -> MailboxState:
    """The cursor row for (mailbox, folder), created on first use."""
    row = await session.exec(
        select(MailboxState).where(MailboxState.mailbox == mailbox, MailboxState.folder == folder)
    )
    state = row.first()
    if state is None:
        state = MailboxState(mailbox=mailbox, folder=folder)
        session.add(state)
    return state


async def retry_rejected(
    *, sessions: SessionFactory, rejected_id: int, settings: Settings
) -> Outcome:
    """Run a set-aside mail through the pipeline again (after a fix), from its stored bytes."""
    async with sessions() as session:
        rejected = await session.get(RejectedMail, rejected_id)
        if rejected is None:
            from helpdesk.errors import NotFoundError

            raise NotFoundError(f"no rejected mail {rejected_id}")
        raw, mailbox = rejected.raw, rejected.mailbox
    pipeline = Pipeline(settings=settings, sessions=sessions, mailbox=mailbox)
    one = pipeline.prepare(raw, None)
    async with sessions() as session, session.begin():
        batch = await pipeline._store(session, [one], folder="", uidvalidity=None)
        rejected = await session.get(RejectedMail, rejected_id)
        if rejected is not None:
            rejected.status = "retried"
            rejected.attempts += 1
            rejected.retried_at = pipeline.clock()
    return batch.outcomes[0]
