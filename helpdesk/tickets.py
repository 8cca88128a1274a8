"""Data access for tickets and their messages. Keyword-only async functions; no commits.

Invariants:
- a Message-ID is stored once (``message.message_id`` is unique): ``known_message_ids``
  is how the pipeline recognises mail it has already turned into a ticket;
- a mail joins an existing ticket only through a Message-ID we stored or sent, or through a
  ticket reference in its subject *when its sender is that ticket's requester*: a reference
  typed by somebody else opens a new ticket, so nobody is shown another patient's thread;
- the caller owns the transaction: these functions add and flush, they never commit.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk.errors import NotFoundError
from helpdesk.models import (
    CLOSED_STATUSES,
    Attachment,
    AuditLog,
    Message,
    Outbox,
    Ticket,
)
from helpdesk.parse import Attachment as ParsedAttachment
from helpdesk.parse import InboundEmail

REFERENCE_PREFIX = "HD-"
REFERENCE_OFFSET = 1000
_SUBJECT_REF = re.compile(r"\bHD-(\d{1,12})\b", re.IGNORECASE)


def reference_for(ticket_id: int) -> str:
    return f"{REFERENCE_PREFIX}{ticket_id + REFERENCE_OFFSET}"


def references_in_subject(subject: str) -> list[str]:
    """Ticket references written in a subject, e.g. ``Re: … [HD-1042]`` -> ["HD-1042"]."""
    return [f"{REFERENCE_PREFIX}{m.group(1)}" for m in _SUBJECT_REF.finditer(subject)]


async def known_message_ids(session: AsyncSession, *, message_ids: Iterable[str]) -> set[str]:
    """Which of these Message-IDs are already stored."""
    ids = list(dict.fromkeys(message_ids))
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = await session.exec(
            select(Message.message_id).where(col(Message.message_id).in_(chunk))
        )
        found.update(rows.all())
    return found


class ThreadIndex:
    """Which ticket each mail of a batch belongs to, loaded with a few queries per batch.

    ``find`` applies the threading rule: a Message-ID we stored or sent (In-Reply-To first,
    then References from the newest), else a subject reference whose ticket belongs to
    the sender. ``remember`` makes mails of the same batch thread onto each other.
    """

    def __init__(
        self, by_message_id: dict[str, AnyTicket], by_reference: dict[str, Ticket]
    ) -> None:
        self.by_message_id = by_message_id
        self.by_reference = by_reference

    @classmethod
    async def load(cls, session: AsyncSession, emails: Sequence[InboundEmail]) -> ThreadIndex:
        ids: set[str] = set()
        refs: set[str] = set()
        for email in emails:
            ids.update(
                email.in_reply_to[:50], email.references[-50:], email.embedded_message_ids[:20]
            )
            refs.update(references_in_subject(email.subject))
        ticket_of: dict[str, int] = {}
        id_list = sorted(ids)
        for start in range(0, len(id_list), 500):
            rows = await session.exec(
                select(Message.message_id, Message.ticket_id).where(
                    col(Message.message_id).in_(id_list[start : start + 500])
                )
            )
            ticket_of.update(dict(rows.all()))
        by_id: dict[int, Ticket] = {}
        wanted = sorted(set(ticket_of.values()))
        conditions = []
        if wanted:
            conditions.append(col(Ticket.id).in_(wanted))
        if refs:
            conditions.append(col(Ticket.reference).in_(sorted(refs)))
        if conditions:
            rows_t = await session.exec(select(Ticket).where(sa.or_(*conditions)))
            by_id = {t.id: t for t in rows_t.all() if t.id is not None}
        by_reference = {t.reference: t for t in by_id.values() if t.reference}
        by_message_id: dict[str, AnyTicket] = {
            mid: by_id[tid] for mid, tid in ticket_of.items() if tid in by_id
        }
        return cls(by_message_id, by_reference)

    def find(self, email: InboundEmail) -> AnyTicket | None:
        for mid in (*email.in_reply_to, *reversed(email.references)):
            ticket = self.by_message_id.get(mid)
            if ticket is not None:
                return ticket
        senders = {a.key for a in (email.reply_address, email.from_addr) if a is not None}
        for ref in references_in_subject(email.subject):
            ticket = self.by_reference.get(ref)
            if ticket is not None and ticket.requester in senders:
                return ticket
        return None

    def bounced(self, email: InboundEmail) -> AnyTicket | None:
        """For a bounce: the ticket whose mail (our acknowledgement) bounced."""
        for mid in email.embedded_message_ids:
            ticket = self.by_message_id.get(mid)
            if ticket is not None:
                return ticket
        return None

    def remember(self, message_id: str, ticket: AnyTicket) -> None:
        self.by_message_id[message_id] = ticket


def new_ticket(
    session: AsyncSession,
    *,
    subject: str,
    requester: str,
    requester_name: str,
    language: str,
    mailbox: str,
    now: datetime,
    due_days: int,
) -> Ticket:
    """A new ticket, added to the session; its reference is set by ``assign_references``."""
    values = NewTicket.open(
        subject=subject,
        requester=requester,
        requester_name=requester_name,
        language=language,
        mailbox=mailbox,
        now=now,
        due_days=due_days,
    )
    ticket = Ticket(**dataclasses.asdict(values))  # one place for a new ticket's values
    session.add(ticket)
    return ticket


async def assign_references(session: AsyncSession, new: Sequence[Ticket]) -> None:
    """Flush new tickets (one INSERT for the lot) and give each its ``HD-`` reference."""
    if not new:
        return
    await session.flush()
    for ticket in new:
        assert ticket.id is not None  # flushed
        ticket.reference = reference_for(ticket.id)


async def create_ticket(session: AsyncSession, **fields: Any) -> Ticket:
    ticket = new_ticket(session, **fields)
    await assign_references(session, [ticket])
    return ticket


TICKET_TABLE: sa.Table = Ticket.__table__  # type: ignore[attr-defined]


@dataclass(slots=True, eq=False)
class NewTicket:
    """A ticket that a batch of routine mail opens, as a plain row: :func:`insert_new`
    writes the lot with one Core ``INSERT`` and :func:`finish_new` writes what the batch
    changed, where building and flushing ORM objects would cost more than the rest of
    storing the mail. Same attribute names as :class:`Ticket`, so the code that threads
    mail and records messages takes either."""

    subject: str
    requester: str
    requester_name: str
    language: str
    mailbox: str
    created_at: datetime
    updated_at: datetime
    last_message_at: datetime
    due_at: datetime
    status: str = "new"
    priority: str = "normal"
    message_count: int = 0
    id: int | None = None
    reference: str | None = None

    @classmethod
    def open(
        cls,
        *,
        subject: str,
        requester: str,
        requester_name: str,
        language: str,
        mailbox: str,
        now: datetime,
        due_days: int,
    ) -> NewTicket:
        """The same values :func:`new_ticket` gives a ticket."""
        return cls(
            subject=subject[:998],
            requester=requester.lower()[:320],
            requester_name=requester_name[:200],
            language=language,
            mailbox=mailbox,
            created_at=now,
            updated_at=now,
            last_message_at=now,
            due_at=now + timedelta(days=due_days),
        )


AnyTicket = Ticket | NewTicket

_FINISH_NEW = (
    sa.update(TICKET_TABLE)
    .where(TICKET_TABLE.c.id == sa.bindparam("ticket_id"))
    .values(
        reference=sa.bindparam("v_reference"),
        status=sa.bindparam("v_status"),
        message_count=sa.bindparam("v_message_count"),
        updated_at=sa.bindparam("v_updated_at"),
        last_message_at=sa.bindparam("v_last_message_at"),
    )
)


async def insert_new(session: AsyncSession, new: Sequence[NewTicket]) -> None:
    """Insert new tickets with one statement (the caller's transaction) and give each its
    id and ``HD-`` reference (written by :func:`finish_new`).

    Each row carries a stand-in reference until then, unique to this call, which is how
    the ids coming back are matched to the tickets: asking for them in the order of the
    rows instead would make SQLAlchemy insert row by row on SQLite.
    """
    if not new:
        return
    conn = await session.connection()
    stand_in = f"~{uuid.uuid4().hex[:20]}-"
    result = await conn.execute(
        sa.insert(TICKET_TABLE).returning(TICKET_TABLE.c.id, TICKET_TABLE.c.reference),
        [
            {
                "reference": f"{stand_in}{n}",
                "subject": t.subject,
                "requester": t.requester,
                "requester_name": t.requester_name,
                "status": t.status,
                "priority": t.priority,
                "language": t.language,
                "mailbox": t.mailbox,
                "message_count": t.message_count,
                "created_at": t.created_at,
                "updated_at": t.updated_at,
                "last_message_at": t.last_message_at,
                "due_at": t.due_at,
            }
            for n, t in enumerate(new)
        ],
    )
    ids = {reference: ticket_id for ticket_id, reference in result.all()}
    for n, ticket in enumerate(new):
        ticket.id = ids[f"{stand_in}{n}"]
        ticket.reference = reference_for(ticket.id)


async def finish_new(session: AsyncSession, new: Sequence[NewTicket]) -> None:
    """Write the reference and what the batch changed (message count, status, times) of
    tickets from :func:`insert_new`, with one executemany ``UPDATE``."""
    if not new:
        return
    conn = await session.connection()
    await conn.execute(
        _FINISH_NEW,
        [
            {
                "ticket_id": t.id,
                "v_reference": t.reference,
                "v_status": t.status,
                "v_message_count": t.message_count,
                "v_updated_at": t.updated_at,
                "v_last_message_at": t.last_message_at,
            }
            for t in new
        ],
    )


MESSAGE_TABLE: sa.Table = Message.__table__  # type: ignore[attr-defined]
ATTACHMENT_TABLE: sa.Table = Attachment.__table__  # type: ignore[attr-defined]


class MessageRows:
    """The messages (and their attachments) of one batch, written by :meth:`write` with one
    Core ``INSERT`` for the messages and one for the attachments, in the order they were
    added (so a ticket's inbound mail keeps a lower id than the ack that answers it).

    Plain rows, not SQLModel objects: building and flushing a table object costs ~0.2 ms
    each, and a batch has two messages per mail.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.attachments: dict[str, Sequence[ParsedAttachment]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(
        self,
        *,
        ticket_id: int,
        direction: str,
        kind: str,
        message_id: str,
        subject: str,
        now: datetime,
        in_reply_to: str = "",
        references: str = "",
        from_addr: str = "",
        from_name: str = "",
        to_addrs: str = "",
        text_body: str = "",
        html_body: str | None = None,
        size: int = 0,
        author_id: int | None = None,
        robot_reason: str | None = None,
        crisis_tier: int | None = None,
        crisis_rules: str = "",
        mailbox: str | None = None,
        uid: int | None = None,
        attachments: Sequence[ParsedAttachment] = (),
    ) -> None:
        self.rows.append(
            {
                "ticket_id": ticket_id,
                "direction": direction,
                "kind": kind,
                "message_id": message_id,
                "in_reply_to": in_reply_to,
                "references": references[:20000],
                "from_addr": from_addr,
                "from_name": from_name,
                "to_addrs": to_addrs,
                "subject": subject[:998],
                "text_body": text_body,
                "html_body": html_body,
                "size": size,
                "author_id": author_id,
                "robot_reason": robot_reason,
                "crisis_tier": crisis_tier,
                "crisis_rules": crisis_rules,
                "mailbox": mailbox,
                "uid": uid,
                "created_at": now,
            }
        )
        if attachments:
            self.attachments[message_id] = attachments

    async def write(self, session: AsyncSession) -> None:
        """Insert the rows (the caller's transaction; nothing is committed here)."""
        if not self.rows:
            return
        conn = await session.connection()
        if not self.attachments:
            await conn.execute(sa.insert(MESSAGE_TABLE), self.rows)
            return
        inserted = await conn.execute(
            sa.insert(MESSAGE_TABLE).returning(MESSAGE_TABLE.c.id, MESSAGE_TABLE.c.message_id),
            self.rows,
        )
        ids = {message_id: row_id for row_id, message_id in inserted.all()}
        await conn.execute(
            sa.insert(ATTACHMENT_TABLE),
            [
                {
                    "message_id": ids[message_id],
                    "filename": att.filename,
                    "content_type": att.content_type,
                    "size": att.size,
                    "sha256": att.sha256,
                    "content": att.content,
                }
                for message_id, atts in self.attachments.items()
                for att in atts
            ],
        )


def add_inbound_message(
    session: AsyncSession,
    *,
    rows: MessageRows,
    ticket: AnyTicket,
    email: InboundEmail,
    kind: str,
    mailbox: str,
    uid: int | None,
    now: datetime,
    robot_reason: str | None,
    crisis_tier: int | None,
    crisis_rules: Sequence[str],
) -> None:
    """Record a patient's mail (and its attachments) on ``ticket`` (a row in ``rows``, written
    with the batch); reopen a closed ticket."""
    assert ticket.id is not None  # flushed by assign_references, or loaded
    sender = email.from_addr or email.reply_address
    rows.add(
        ticket_id=ticket.id,
        direction="inbound",
        kind=kind,
        message_id=email.message_id,
        in_reply_to=" ".join(email.in_reply_to),
        references=" ".join(email.references),
        from_addr=sender.email[:320] if sender else "",
        from_name=sender.name[:200] if sender else "",
        to_addrs=", ".join(a.email for a in (*email.to, *email.cc))[:5000],
        subject=email.subject,
        text_body=email.text,
        html_body=email.html,
        size=email.size,
        robot_reason=robot_reason,
        crisis_tier=crisis_tier,
        crisis_rules=",".join(crisis_rules)[:500],
        mailbox=mailbox,
        uid=uid,
        now=now,
        attachments=email.attachments,
    )
    touch(ticket, now=now)
    if kind != "bounce":
        if ticket.status in CLOSED_STATUSES:
            session.add(
                AuditLog(
                    ticket_id=ticket.id,
                    actor="system",
                    action="reopened",
                    detail=f"patient wrote again after the ticket was {ticket.status}",
                    created_at=now,
                )
            )
            ticket.status = "open"
        elif ticket.status == "pending":
            ticket.status = "open"


def add_outbound_record(
    *,
    rows: MessageRows,
    ticket: AnyTicket,
    kind: str,
    message_id: str,
    from_addr: str,
    to_addr: str,
    subject: str,
    text_body: str,
    in_reply_to: str,
    references: str,
    now: datetime,
    author_id: int | None = None,
) -> None:
    """Record a mail we send (ack, reply) so that answers to it find this ticket."""
    assert ticket.id is not None
    rows.add(
        ticket_id=ticket.id,
        direction="outbound",
        kind=kind,
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=references,
        from_addr=from_addr,
        to_addrs=to_addr,
        subject=subject,
        text_body=text_body,
        author_id=author_id,
        now=now,
    )
    ticket.message_count += 1


def touch(ticket: AnyTicket, *, now: datetime) -> None:
    ticket.message_count += 1
    ticket.updated_at = now
    ticket.last_message_at = now


async def acks_sent_since(
    session: AsyncSession, *, recipients: Iterable[str], since: datetime
) -> dict[str, int]:
    """How many routine acknowledgements went to each address since ``since``."""
    wanted = sorted({r.lower() for r in recipients})
    if not wanted:
        return {}
    rows = await session.exec(
        select(Outbox.recipient, sa.func.count())
        .where(
            col(Outbox.recipient).in_(wanted),
            col(Outbox.kind) == "ack",
            col(Outbox.created_at) >= since,
        )
        .group_by(col(Outbox.recipient))
    )
    return {recipient: int(count) for recipient, count in rows.all()}


async def get_ticket(session: AsyncSession, *, reference: str) -> Ticket:
    row = await session.exec(select(Ticket).where(Ticket.reference == reference.upper()))
    ticket = row.first()
    if ticket is None:
        raise NotFoundError(f"no ticket {reference}")
    return ticket


async def list_tickets(
    session: AsyncSession, *, status: str | None = None, limit: int = 1000
) -> list[Ticket]:
    query = select(Ticket).order_by(col(Ticket.id).desc()).limit(limit)
    if status:
        query = query.where(Ticket.status == status)
    return list((await session.exec(query)).all())


async def thread(session: AsyncSession, *, ticket_id: int) -> list[Message]:
    rows = await session.exec(
        select(Message)
        .where(Message.ticket_id == ticket_id)
        .order_by(col(Message.created_at), col(Message.id))
    )
    return list(rows.all())
