"""Data access for the staff desk: the queue, search, a ticket's thread and what staff do to it.

Keyword-only async functions over an ``AsyncSession``; the routes in :mod:`helpdesk.web`
never build SQL. The caller owns the transaction: mutations add and flush, the route commits
once, so a reply's outbox row, its outbound ``Message`` row and its audit entry are stored
together or not at all.

Invariants:
- the queue pages by keyset (``last_message_at, id`` or ``due_at, id``), never OFFSET;
  open crisis tickets are listed apart ("pinned") on the first page, most severe tier first,
  and are left out of the pages below so that none shows twice;
- a ticket is found by its reference only; an attachment is served only through the ticket
  it belongs to;
- every change staff make is written to ``audit_log`` with the actor's address;
- search uses the full-text index when it exists (SQLite FTS5 ``message_fts``, PostgreSQL
  GIN ``ix_message_fts``) and falls back to LIKE when it does not.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import defer
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk import compose, logins, outbox
from helpdesk.errors import InvalidInputError, NotFoundError
from helpdesk.models import (
    CLOSED_STATUSES,
    TICKET_STATUSES,
    Attachment,
    AuditLog,
    CannedReply,
    Escalation,
    EscalationEvent,
    LoginState,
    MailboxState,
    Message,
    Outbox,
    RejectedMail,
    StaffUser,
    Ticket,
    WorkerHeartbeat,
)

ACTIVE_STATUSES = tuple(s for s in TICKET_STATUSES if s not in CLOSED_STATUSES)
STATUS_FILTERS = ("active", *TICKET_STATUSES, "all")
ASSIGNEE_FILTERS = ("anyone", "me", "unassigned")
SORTS = ("received", "due")
PAGE_SIZE = 50
MAX_BODY_CHARS = 100_000

# --- the queue -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueFilter:
    status: str = "active"
    assignee: str = "anyone"
    overdue: bool = False
    crisis: bool = False
    sort: str = "received"

    @classmethod
    def parse(
        cls, *, status: str, assignee: str, overdue: bool, crisis: bool, sort: str
    ) -> QueueFilter:
        """A filter from query parameters; unknown values fall back to the defaults."""
        return cls(
            status=status if status in STATUS_FILTERS else "active",
            assignee=assignee if assignee in ASSIGNEE_FILTERS else "anyone",
            overdue=overdue,
            crisis=crisis,
            sort=sort if sort in SORTS else "received",
        )


@dataclass(frozen=True, slots=True)
class QueueRow:
    ticket: Ticket
    assignee_name: str | None
    overdue: bool


@dataclass(frozen=True, slots=True)
class QueueCounts:
    active: int = 0
    mine: int = 0
    unassigned: int = 0
    overdue: int = 0
    crisis: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueuePage:
    pinned: list[QueueRow]
    rows: list[QueueRow]
    next_cursor: str | None
    counts: QueueCounts


_PINNED = sa.and_(col(Ticket.crisis_tier).is_not(None), col(Ticket.status).not_in(CLOSED_STATUSES))


def _conditions(filt: QueueFilter, *, me_id: int, now: datetime) -> list[Any]:
    where: list[Any] = []
    if filt.status == "active":
        where.append(col(Ticket.status).in_(ACTIVE_STATUSES))
    elif filt.status != "all":
        where.append(col(Ticket.status) == filt.status)
    if filt.assignee == "me":
        where.append(col(Ticket.assignee_id) == me_id)
    elif filt.assignee == "unassigned":
        where.append(col(Ticket.assignee_id).is_(None))
    if filt.overdue:
        where.append(col(Ticket.due_at) < now)
        where.append(col(Ticket.status).not_in(CLOSED_STATUSES))
    if filt.crisis:
        where.append(col(Ticket.crisis_tier).is_not(None))
    return where


def encode_cursor(when: datetime, ticket_id: int) -> str:
    raw = f"{when.isoformat()}|{ticket_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, int] | None:
    """The (timestamp, id) in a cursor, or None for a missing or malformed one."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, _, ticket_id = raw.partition("|")
        parsed = datetime.fromisoformat(when)
        if parsed.tzinfo is None:
            return None
        return parsed, int(ticket_id)
    except (ValueError, UnicodeDecodeError):
        return None


def _is_overdue(ticket: Ticket, now: datetime) -> bool:
    return ticket.status not in CLOSED_STATUSES and ticket.due_at < now


async def _rows(session: AsyncSession, tickets: Sequence[Ticket], now: datetime) -> list[QueueRow]:
    """Queue rows with assignee names (looked up once: staff are few, tickets many)."""
    ids = {t.assignee_id for t in tickets if t.assignee_id is not None}
    names: dict[int, str] = {}
    if ids:
        found = await session.exec(
            select(StaffUser.id, StaffUser.name, StaffUser.email).where(col(StaffUser.id).in_(ids))
        )
        names = {uid: (name or mail) for uid, name, mail in found.all() if uid is not None}
    return [
        QueueRow(
            ticket=t,
            assignee_name=names.get(t.assignee_id) if t.assignee_id is not None else None,
            overdue=_is_overdue(t, now),
        )
        for t in tickets
    ]


async def queue_counts(session: AsyncSession, *, me_id: int, now: datetime) -> QueueCounts:
    by_status = dict(
        (
            await session.exec(select(Ticket.status, sa.func.count()).group_by(col(Ticket.status)))
        ).all()
    )
    active = (
        await session.exec(  # type: ignore[call-overload]  # sqlmodel types up to 4 columns
            sa.select(
                sa.func.count(),
                sa.func.sum(sa.case((col(Ticket.assignee_id) == me_id, 1), else_=0)),
                sa.func.sum(sa.case((col(Ticket.assignee_id).is_(None), 1), else_=0)),
                sa.func.sum(sa.case((col(Ticket.due_at) < now, 1), else_=0)),
                sa.func.sum(sa.case((col(Ticket.crisis_tier).is_not(None), 1), else_=0)),
            ).where(col(Ticket.status).in_(ACTIVE_STATUSES))
        )
    ).one()
    return QueueCounts(
        active=int(active[0] or 0),
        mine=int(active[1] or 0),
        unassigned=int(active[2] or 0),
        overdue=int(active[3] or 0),
        crisis=int(active[4] or 0),
        by_status={str(k): int(v) for k, v in by_status.items()},
    )


async def queue(
    session: AsyncSession,
    *,
    filt: QueueFilter,
    me_id: int,
    now: datetime,
    cursor: str | None = None,
    limit: int = PAGE_SIZE,
) -> QueuePage:
    """One page of the queue; open crisis tickets pinned above the first page."""
    where = _conditions(filt, me_id=me_id, now=now)
    base = select(Ticket)
    position = decode_cursor(cursor)
    pinned: list[QueueRow] = []
    if position is None:
        pinned_rows = await session.exec(
            base.where(*where, _PINNED)
            .order_by(col(Ticket.crisis_tier), col(Ticket.last_message_at).desc())
            .limit(limit)
        )
        pinned = await _rows(session, pinned_rows.all(), now)

    not_pinned = sa.or_(col(Ticket.crisis_tier).is_(None), col(Ticket.status).in_(CLOSED_STATUSES))
    key = col(Ticket.due_at) if filt.sort == "due" else col(Ticket.last_message_at)
    query = base.where(*where, not_pinned)
    if filt.sort == "due":
        if position is not None:
            when, last_id = position
            query = query.where(sa.or_(key > when, sa.and_(key == when, col(Ticket.id) > last_id)))
        query = query.order_by(key, col(Ticket.id))
    else:
        if position is not None:
            when, last_id = position
            query = query.where(sa.or_(key < when, sa.and_(key == when, col(Ticket.id) < last_id)))
        query = query.order_by(key.desc(), col(Ticket.id).desc())
    result = list((await session.exec(query.limit(limit + 1))).all())
    rows = await _rows(session, result[:limit], now)
    next_cursor = None
    if len(result) > limit:
        last = rows[-1].ticket
        assert last.id is not None  # loaded from the database
        next_cursor = encode_cursor(
            last.due_at if filt.sort == "due" else last.last_message_at, last.id
        )
    counts = await queue_counts(session, me_id=me_id, now=now)
    return QueuePage(pinned=pinned, rows=rows, next_cursor=next_cursor, counts=counts)


# --- search ----------------------------------------------------------------------------------

SQLITE_SEARCH_DDL = (
    """CREATE VIRTUAL TABLE IF NOT EXISTS message_fts USING fts5(
        subject, text_body, from_addr, from_name,
        content='message', content_rowid='id', tokenize='unicode61 remove_diacritics 2')""",
    """CREATE TRIGGER IF NOT EXISTS message_fts_ai AFTER INSERT ON message BEGIN
        INSERT INTO message_fts(rowid, subject, text_body, from_addr, from_name)
        VALUES (new.id, new.subject, new.text_body, new.from_addr, new.from_name);
    END""",
    """CREATE TRIGGER IF NOT EXISTS message_fts_ad AFTER DELETE ON message BEGIN
        INSERT INTO message_fts(message_fts, rowid, subject, text_body, from_addr, from_name)
        VALUES ('delete', old.id, old.subject, old.text_body, old.from_addr, old.from_name);
    END""",
    """CREATE TRIGGER IF NOT EXISTS message_fts_au AFTER UPDATE ON message BEGIN
        INSERT INTO message_fts(message_fts, rowid, subject, text_body, from_addr, from_name)
        VALUES ('delete', old.id, old.subject, old.text_body, old.from_addr, old.from_name);
        INSERT INTO message_fts(rowid, subject, text_body, from_addr, from_name)
        VALUES (new.id, new.subject, new.text_body, new.from_addr, new.from_name);
    END""",
    # Index the rows that were there before the table existed (no-op on an empty table).
    "INSERT INTO message_fts(message_fts) VALUES ('rebuild')",
)
_PG_DOCUMENT = (
    "to_tsvector('simple', subject || ' ' || text_body || ' ' || from_addr || ' ' || from_name)"
)
POSTGRES_SEARCH_DDL = (
    f"CREATE INDEX IF NOT EXISTS ix_message_fts ON message USING GIN ({_PG_DOCUMENT})",
)
SEARCH_LIMIT = 50
_MATCH_LIMIT = 500
_REFERENCE = re.compile(r"^\s*\[?(HD-\d{1,12})\]?\s*$", re.IGNORECASE)


async def ensure_search_index(conn: AsyncConnection) -> None:
    """Create the full-text index for message search if it is missing (idempotent)."""
    if conn.dialect.name == "sqlite":
        exists = (
            await conn.execute(sa.text("SELECT 1 FROM sqlite_master WHERE name = 'message_fts'"))
        ).first()
        if exists:
            return
        for ddl in SQLITE_SEARCH_DDL:
            await conn.execute(sa.text(ddl))
    elif conn.dialect.name == "postgresql":
        for ddl in POSTGRES_SEARCH_DDL:
            await conn.execute(sa.text(ddl))


async def _has_search_index(session: AsyncSession, dialect: str) -> bool:
    if dialect == "sqlite":
        q = "SELECT 1 FROM sqlite_master WHERE name = 'message_fts'"
    else:
        q = "SELECT 1 FROM pg_indexes WHERE indexname = 'ix_message_fts'"
    return (await session.exec(sa.text(q))).first() is not None  # type: ignore[call-overload]


def fts5_query(q: str) -> str:
    """User text as a safe FTS5 query: every word quoted, all required, last one a prefix."""
    phrases = []
    for chunk in q.split()[:8]:
        words = re.findall(r"\w+", chunk)
        if words:
            phrases.append('"' + " ".join(words) + '"')
    if not phrases:
        return ""
    phrases[-1] += "*"
    return " ".join(phrases)


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def search(
    session: AsyncSession, *, q: str, now: datetime, limit: int = SEARCH_LIMIT
) -> list[QueueRow]:
    """Tickets whose subject, message text or requester match ``q``, newest first."""
    q = q.strip()[:200]
    if not q:
        return []
    base = select(Ticket)
    ref = _REFERENCE.match(q)
    if ref:
        found = (await session.exec(base.where(Ticket.reference == ref.group(1).upper()))).all()
        if found:
            return await _rows(session, found, now)

    dialect = (await session.connection()).dialect.name
    message_ids: Any
    if dialect in {"sqlite", "postgresql"} and await _has_search_index(session, dialect):
        if dialect == "sqlite":
            match = fts5_query(q)
            message_ids = (
                sa.text(
                    "SELECT rowid FROM message_fts WHERE message_fts MATCH :match"
                    " ORDER BY rowid DESC LIMIT :n"
                )
                .bindparams(match=match, n=_MATCH_LIMIT)
                .columns(sa.column("rowid", sa.Integer))
            )
            if not match:
                message_ids = None
        else:
            message_ids = (
                sa.text(
                    f"SELECT id FROM message WHERE {_PG_DOCUMENT}"  # noqa: S608  # a constant
                    " @@ plainto_tsquery('simple', :q)"
                    " ORDER BY id DESC LIMIT :n"
                )
                .bindparams(q=q, n=_MATCH_LIMIT)
                .columns(sa.column("id", sa.Integer))
            )
    else:
        pattern = _like(q)
        message_ids = (
            select(Message.id)
            .where(
                sa.or_(
                    col(Message.subject).like(pattern, escape="\\"),
                    col(Message.text_body).like(pattern, escape="\\"),
                    col(Message.from_addr).like(pattern, escape="\\"),
                )
            )
            .order_by(col(Message.id).desc())
            .limit(_MATCH_LIMIT)
        )

    matches: list[Any] = []
    requester = q.lower()
    matches.append(col(Ticket.requester) == requester)
    if "@" in requester or len(requester) >= 3:
        # A prefix range rather than LIKE, so the requester index serves it on both databases.
        matches.append(
            sa.and_(
                col(Ticket.requester) >= requester, col(Ticket.requester) < requester + "\uffff"
            )
        )
    if message_ids is not None:
        ticket_ids = select(Message.ticket_id).where(col(Message.id).in_(message_ids))
        matches.append(col(Ticket.id).in_(ticket_ids))
    result = await session.exec(
        base.where(sa.or_(*matches))
        .order_by(col(Ticket.last_message_at).desc(), col(Ticket.id).desc())
        .limit(limit)
    )
    return await _rows(session, result.all(), now)


# --- one ticket ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    id: int
    message_id: int
    filename: str
    content_type: str
    size: int


@dataclass(frozen=True, slots=True)
class ThreadItem:
    message: Message
    author_name: str | None
    attachments: list[AttachmentInfo]


@dataclass(frozen=True, slots=True)
class TicketView:
    ticket: Ticket
    assignee: StaffUser | None
    items: list[ThreadItem]
    audit: list[AuditLog]
    escalation: Escalation | None
    escalation_events: list[EscalationEvent]
    staff: list[StaffUser]
    canned: list[CannedReply]
    overdue: bool


async def get_ticket(session: AsyncSession, *, reference: str) -> Ticket:
    ticket = None
    if reference and len(reference) <= 32:
        ticket = (
            await session.exec(select(Ticket).where(Ticket.reference == reference.upper()))
        ).first()
    if ticket is None:
        raise NotFoundError("no such ticket")
    return ticket


async def ticket_view(session: AsyncSession, *, reference: str, now: datetime) -> TicketView:
    ticket = await get_ticket(session, reference=reference)
    assert ticket.id is not None  # loaded from the database
    messages = (
        await session.exec(
            select(Message)
            .where(Message.ticket_id == ticket.id)
            .order_by(col(Message.created_at), col(Message.id))
        )
    ).all()
    staff = await _staff(session)
    names = {u.id: (u.name or u.email) for u in staff}
    att_rows = (
        await session.exec(
            sa.select(  # type: ignore[call-overload]
                Attachment.id,
                Attachment.message_id,
                Attachment.filename,
                Attachment.content_type,
                Attachment.size,
            )
            .join(Message, col(Message.id) == col(Attachment.message_id))
            .where(Message.ticket_id == ticket.id)
            .order_by(col(Attachment.id))
        )
    ).all()
    by_message: dict[int, list[AttachmentInfo]] = {}
    for a_id, m_id, name, ctype, size in att_rows:
        by_message.setdefault(m_id, []).append(AttachmentInfo(a_id, m_id, name, ctype, size))
    items = [
        ThreadItem(
            message=m,
            author_name=names.get(m.author_id) if m.author_id else None,
            attachments=by_message.get(m.id or 0, []),
        )
        for m in messages
    ]
    audit = list(
        (
            await session.exec(
                select(AuditLog)
                .where(AuditLog.ticket_id == ticket.id)
                .order_by(col(AuditLog.created_at), col(AuditLog.id))
            )
        ).all()
    )
    esc = (await session.exec(select(Escalation).where(Escalation.ticket_id == ticket.id))).first()
    events: list[EscalationEvent] = []
    if esc is not None:
        events = list(
            (
                await session.exec(
                    select(EscalationEvent)
                    .where(EscalationEvent.escalation_id == esc.id)
                    .order_by(col(EscalationEvent.created_at), col(EscalationEvent.id))
                )
            ).all()
        )
    assignee = next((u for u in staff if u.id == ticket.assignee_id), None)
    if assignee is None and ticket.assignee_id is not None:
        assignee = await session.get(StaffUser, ticket.assignee_id)
    return TicketView(
        ticket=ticket,
        assignee=assignee,
        items=items,
        audit=audit,
        escalation=esc,
        escalation_events=events,
        staff=[u for u in staff if u.active],
        canned=await list_canned(session),
        overdue=_is_overdue(ticket, now),
    )


async def _staff(session: AsyncSession) -> list[StaffUser]:
    return list((await session.exec(select(StaffUser).order_by(col(StaffUser.name)))).all())


async def get_attachment(
    session: AsyncSession, *, reference: str, attachment_id: int
) -> Attachment:
    """The attachment, only if it belongs to a message of ticket ``reference``."""
    row = (
        await session.exec(
            select(Attachment)
            .join(Message, col(Message.id) == col(Attachment.message_id))
            .join(Ticket, col(Ticket.id) == col(Message.ticket_id))
            .where(col(Attachment.id) == attachment_id, col(Ticket.reference) == reference.upper())
        )
    ).first()
    if row is None:
        raise NotFoundError("no such attachment on this ticket")
    return row


def _audit(
    session: AsyncSession,
    *,
    ticket: Ticket | None,
    actor: StaffUser,
    action: str,
    detail: str,
    now: datetime,
) -> None:
    session.add(
        AuditLog(
            ticket_id=ticket.id if ticket else None,
            actor=actor.email,
            action=action,
            detail=detail[:1000],
            created_at=now,
        )
    )


async def assign(
    session: AsyncSession,
    *,
    reference: str,
    assignee_id: int | None,
    actor: StaffUser,
    now: datetime,
) -> Ticket:
    ticket = await get_ticket(session, reference=reference)
    if assignee_id is None:
        detail = "unassigned"
    else:
        user = await session.get(StaffUser, assignee_id)
        if user is None or not user.active:
            raise InvalidInputError("no such active staff user")
        detail = f"assigned to {user.email}"
    if ticket.assignee_id == assignee_id:
        return ticket
    ticket.assignee_id = assignee_id
    ticket.updated_at = now
    session.add(ticket)
    _audit(session, ticket=ticket, actor=actor, action="assign", detail=detail, now=now)
    return ticket


async def set_status(
    session: AsyncSession, *, reference: str, status: str, actor: StaffUser, now: datetime
) -> Ticket:
    if status not in TICKET_STATUSES:
        raise InvalidInputError(f"status must be one of {', '.join(TICKET_STATUSES)}")
    ticket = await get_ticket(session, reference=reference)
    if ticket.status == status:
        return ticket
    detail = f"{ticket.status} → {status}"
    ticket.status = status
    ticket.updated_at = now
    session.add(ticket)
    _audit(session, ticket=ticket, actor=actor, action="status", detail=detail, now=now)
    return ticket


def _clean_body(body: str) -> str:
    body = body.replace("\r\n", "\n").replace("\x00", "").strip()
    if not body:
        raise InvalidInputError("the text is empty")
    if len(body) > MAX_BODY_CHARS:
        raise InvalidInputError(f"the text is longer than {MAX_BODY_CHARS} characters")
    return body


async def add_note(
    session: AsyncSession,
    *,
    reference: str,
    body: str,
    author: StaffUser,
    message_id_domain: str,
    now: datetime,
) -> Message:
    """An internal note: stored on the thread, never mailed."""
    body = _clean_body(body)
    ticket = await get_ticket(session, reference=reference)
    note = Message(
        ticket_id=ticket.id,  # type: ignore[arg-type]  # loaded from the database
        direction="note",
        kind="note",
        message_id=f"<note.{uuid.uuid4().hex}@{message_id_domain}>",
        from_addr=author.email,
        from_name=author.name,
        subject="",
        text_body=body,
        size=len(body.encode()),
        author_id=author.id,
        created_at=now,
    )
    session.add(note)
    ticket.updated_at = now
    session.add(ticket)
    _audit(
        session,
        ticket=ticket,
        actor=author,
        action="note",
        detail=f"{len(body)} characters",
        now=now,
    )
    return note


async def reply(
    session: AsyncSession,
    *,
    reference: str,
    body: str,
    author: StaffUser,
    identity: compose.Identity,
    now: datetime,
    deadline: timedelta,
    status_after: str | None = "pending",
) -> Message:
    """Mail ``body`` to the requester, threaded under their last mail, via the outbox (lane 1).

    Stores an outbound ``Message`` with the same Message-ID, so the patient's answer to it
    finds this ticket.
    """
    body = _clean_body(body)
    if status_after is not None and status_after not in TICKET_STATUSES:
        raise InvalidInputError(f"status must be one of {', '.join(TICKET_STATUSES)}")
    ticket = await get_ticket(session, reference=reference)
    assert ticket.id is not None  # loaded from the database
    assert ticket.reference is not None
    if not ticket.requester:
        raise InvalidInputError("this ticket has no requester address to reply to")
    last_inbound = (
        await session.exec(
            select(Message)
            .where(Message.ticket_id == ticket.id, Message.direction == "inbound")
            .order_by(col(Message.created_at).desc(), col(Message.id).desc())
            .limit(1)
        )
    ).first()
    in_reply_to = last_inbound.message_id if last_inbound else None
    references = last_inbound.references.split() if last_inbound else []
    if in_reply_to:
        references.append(in_reply_to)
    message_id = compose.new_message_id(identity.message_id_domain)
    msg = compose.staff_reply_mail(
        identity=identity,
        to_addr=ticket.requester,
        to_name=ticket.requester_name,
        reference=ticket.reference,
        ticket_subject=ticket.subject,
        body_text=body,
        staff_name=author.name or author.email,
        language=ticket.language,
        in_reply_to=in_reply_to,
        references=references,
        message_id=message_id,
        now=now,
    )
    await outbox.enqueue(
        session,
        msg=msg,
        kind="reply",
        recipient=ticket.requester,
        mail_from=identity.address,
        ticket_id=ticket.id,
        lane=1,
        now=now,
        deadline=deadline,
    )
    # The same record the pipeline keeps of its acks, so the patient's answer finds the ticket.
    message = Message(
        ticket_id=ticket.id,
        direction="outbound",
        kind="reply",
        message_id=message_id,
        in_reply_to=in_reply_to or "",
        references=str(msg.get("References", ""))[:20000],
        from_addr=identity.address,
        from_name=author.name,
        to_addrs=ticket.requester,
        subject=str(msg["Subject"])[:998],
        text_body=body,
        size=len(body.encode()),
        author_id=author.id,
        created_at=now,
    )
    session.add(message)
    ticket.message_count += 1
    ticket.updated_at = now
    if status_after and ticket.status != status_after:
        _audit(
            session,
            ticket=ticket,
            actor=author,
            action="status",
            detail=f"{ticket.status} → {status_after}",
            now=now,
        )
        ticket.status = status_after
    session.add(ticket)
    _audit(
        session,
        ticket=ticket,
        actor=author,
        action="reply",
        detail=f"to {ticket.requester}",
        now=now,
    )
    return message


async def acknowledge(
    session: AsyncSession, *, reference: str, actor: StaffUser, now: datetime
) -> Ticket:
    """Acknowledge the ticket's escalation (stops the paging) and note it in the audit log."""
    from helpdesk import escalation

    ticket = await get_ticket(session, reference=reference)
    assert ticket.id is not None
    esc = await escalation.acknowledge_ticket(session, ticket_id=ticket.id, by=actor.email, now=now)
    if esc.acknowledged_at == now:
        _audit(
            session,
            ticket=ticket,
            actor=actor,
            action="acknowledge",
            detail="escalation acknowledged",
            now=now,
        )
    return ticket


async def ticket_for_escalation(session: AsyncSession, *, escalation_id: int) -> Ticket:
    row = (
        await session.exec(
            select(Ticket)
            .join(Escalation, col(Escalation.ticket_id) == col(Ticket.id))
            .where(Escalation.id == escalation_id)
        )
    ).first()
    if row is None:
        raise NotFoundError(f"no escalation {escalation_id}")
    return row


# --- canned replies --------------------------------------------------------------------------


async def list_canned(session: AsyncSession) -> list[CannedReply]:
    return list((await session.exec(select(CannedReply).order_by(col(CannedReply.title)))).all())


def _canned_values(title: str, body: str) -> tuple[str, str]:
    title = " ".join(title.split())[:200]
    if not title:
        raise InvalidInputError("a canned reply needs a title")
    return title, _clean_body(body)


async def save_canned(
    session: AsyncSession,
    *,
    canned_id: int | None,
    title: str,
    body: str,
    actor: StaffUser,
    now: datetime,
) -> CannedReply:
    """Create (``canned_id`` None) or update a canned reply; titles are unique."""
    title, body = _canned_values(title, body)
    clash = (await session.exec(select(CannedReply).where(CannedReply.title == title))).first()
    if clash is not None and clash.id != canned_id:
        raise InvalidInputError(f"a canned reply titled {title!r} already exists")
    if canned_id is None:
        canned = CannedReply(title=title, body=body, created_at=now, updated_at=now)
        action = "canned-add"
    else:
        found = await session.get(CannedReply, canned_id)
        if found is None:
            raise NotFoundError(f"no canned reply {canned_id}")
        canned, action = found, "canned-edit"
        canned.title, canned.body, canned.updated_at = title, body, now
    session.add(canned)
    _audit(session, ticket=None, actor=actor, action=action, detail=title, now=now)
    await session.flush()
    return canned


async def delete_canned(
    session: AsyncSession, *, canned_id: int, actor: StaffUser, now: datetime
) -> None:
    canned = await session.get(CannedReply, canned_id)
    if canned is None:
        raise NotFoundError(f"no canned reply {canned_id}")
    _audit(session, ticket=None, actor=actor, action="canned-delete", detail=canned.title, now=now)
    await session.delete(canned)


def audit_admin(
    session: AsyncSession, *, actor: StaffUser, action: str, detail: str, now: datetime
) -> None:
    """An audit entry for an administrative change that belongs to no ticket."""
    _audit(session, ticket=None, actor=actor, action=action, detail=detail, now=now)


# --- health and metrics ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    last_poll_at: datetime | None
    mailboxes: list[MailboxState]
    heartbeats: list[WorkerHeartbeat]
    backlog: dict[tuple[int, str], int]
    failed: list[Outbox]
    rejected: list[RejectedMail]
    logins: list[LoginState]

    @property
    def failing_logins(self) -> list[LoginState]:
        return [login for login in self.logins if not login.ok]


async def outbox_counts(session: AsyncSession) -> dict[tuple[int, str], int]:
    rows = await session.exec(
        select(Outbox.lane, Outbox.status, sa.func.count()).group_by(
            col(Outbox.lane), col(Outbox.status)
        )
    )
    return {(int(lane), str(status)): int(n) for lane, status, n in rows.all()}


async def last_poll_at(session: AsyncSession) -> datetime | None:
    polled = (await session.exec(select(sa.func.max(MailboxState.last_poll_at)))).one()
    beat = (await session.exec(select(sa.func.max(WorkerHeartbeat.last_poll_ok_at)))).one()
    times = [t for t in (polled, beat) if t is not None]
    # max() over a TypeDecorator column comes back as the raw value on SQLite.
    return max(_aware(t) for t in times) if times else None


def _aware(value: Any) -> datetime:
    from datetime import UTC

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"not a datetime: {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


async def health(session: AsyncSession) -> Health:
    mailboxes = list(
        (await session.exec(select(MailboxState).order_by(col(MailboxState.mailbox)))).all()
    )
    beats = list(
        (
            await session.exec(
                select(WorkerHeartbeat).order_by(col(WorkerHeartbeat.last_seen_at).desc())
            )
        ).all()
    )
    failed = list(
        (
            await session.exec(
                select(Outbox)
                .options(defer(Outbox.raw))  # type: ignore[arg-type]
                .where(Outbox.status == "failed")
                .order_by(col(Outbox.created_at).desc())
                .limit(50)
            )
        ).all()
    )
    rejected = list(
        (
            await session.exec(
                select(RejectedMail)
                .options(defer(RejectedMail.raw))  # type: ignore[arg-type]
                .where(RejectedMail.status == "pending")
                .order_by(col(RejectedMail.created_at).desc())
                .limit(50)
            )
        ).all()
    )
    return Health(
        last_poll_at=await last_poll_at(session),
        mailboxes=mailboxes,
        heartbeats=beats,
        backlog=await outbox_counts(session),
        failed=failed,
        rejected=rejected,
        logins=await logins.login_states(session),
    )


@dataclass(frozen=True, slots=True)
class Numbers:
    tickets_by_status: dict[str, int]
    acks_sent: int
    escalations_by_state: dict[str, int]
    outbox: dict[tuple[int, str], int]
    poll_age_seconds: float | None
    heartbeat_age_seconds: float | None
    rejected_pending: int
    rejected_total: int
    logins: list[LoginState]


async def heartbeat_age(session: AsyncSession, *, now: datetime) -> float | None:
    seen = (await session.exec(select(sa.func.max(WorkerHeartbeat.last_seen_at)))).one()
    return None if seen is None else (now - _aware(seen)).total_seconds()


async def numbers(session: AsyncSession, *, now: datetime) -> Numbers:
    by_status = (
        await session.exec(select(Ticket.status, sa.func.count()).group_by(col(Ticket.status)))
    ).all()
    acks = (
        await session.exec(
            select(sa.func.count())
            .select_from(Outbox)
            .where(col(Outbox.kind).in_(("ack", "crisis_ack")), Outbox.status == "sent")
        )
    ).one()
    esc = (
        await session.exec(
            select(Escalation.state, sa.func.count()).group_by(col(Escalation.state))
        )
    ).all()
    rejected = (
        await session.exec(
            select(RejectedMail.status, sa.func.count()).group_by(col(RejectedMail.status))
        )
    ).all()
    polled = await last_poll_at(session)
    rejected_by = {str(s): int(n) for s, n in rejected}
    return Numbers(
        tickets_by_status={str(s): int(n) for s, n in by_status},
        acks_sent=int(acks),
        escalations_by_state={str(s): int(n) for s, n in esc},
        outbox=await outbox_counts(session),
        poll_age_seconds=None if polled is None else (now - polled).total_seconds(),
        heartbeat_age_seconds=await heartbeat_age(session, now=now),
        rejected_pending=rejected_by.get("pending", 0),
        rejected_total=sum(rejected_by.values()),
        logins=await logins.login_states(session),
    )
