"""The database tables (SQLModel on SQLAlchemy). One table class a concept; no queries here.

Invariants:
- every ``*_at`` column is a tz-aware UTC datetime on the Python side, on SQLite as on
  PostgreSQL (``UTCDateTime`` stores UTC and gives it back tz-aware);
- ``Message.message_id`` is unique over inbound and outbound mail: it is how a mail is
  recognised when it is fetched twice and how replies find their ticket;
- ``Outbox.message_id`` is fixed when the item is enqueued, so a resend after a crash carries
  the same Message-ID and the patient's client folds it as a duplicate;
- constraints are named by ``NAMING_CONVENTION`` so that migrations can refer to them on
  both SQLite (batch mode) and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION

TICKET_STATUSES = ("new", "open", "pending", "solved", "closed")
CLOSED_STATUSES = ("solved", "closed")
PRIORITIES = ("low", "normal", "high", "urgent")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned tz-aware."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def ts(*, nullable: bool = False, index: bool = False, default: bool = True) -> Any:
    """A tz-aware UTC timestamp column."""
    return Field(
        default_factory=utcnow if (default and not nullable) else lambda: None,
        sa_column_kwargs={},
        sa_type=UTCDateTime,
        nullable=nullable,
        index=index,
    )


def text(*, nullable: bool = False, default: str | None = "") -> Any:
    return Field(default=default, sa_type=sa.Text, nullable=nullable)


def blob() -> Any:
    return Field(default=b"", sa_type=sa.LargeBinary, nullable=False)


class StaffUser(SQLModel, table=True):
    __tablename__ = "staff_user"
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=320, unique=True)
    name: str = Field(default="", max_length=200)
    role: str = Field(default="agent", max_length=16)  # agent | admin
    password_hash: str = Field(default="", max_length=512)
    active: bool = True
    created_at: datetime = ts()
    last_login_at: datetime | None = ts(nullable=True)


class Ticket(SQLModel, table=True):
    __tablename__ = "ticket"
    __table_args__ = (
        sa.Index("ix_ticket_status_received", "status", "last_message_at"),
        sa.Index("ix_ticket_crisis", "crisis_tier", "last_message_at"),
        sa.Index("ix_ticket_due", "status", "due_at"),
        # The web queue (helpdesk.desk): keyset pages by received / due time, and the
        # per-view counts as a covering-index scan. Added by the web UI author; see the report.
        sa.Index("ix_ticket_last_message_at", "last_message_at", "id"),
        sa.Index("ix_ticket_due_at", "due_at", "id"),
        sa.Index("ix_ticket_queue_counts", "status", "assignee_id", "crisis_tier", "due_at"),
        # "overdue" walks only tickets still open, not years of solved ones.
        sa.Index(
            "ix_ticket_open_due",
            "due_at",
            "id",
            sqlite_where=sa.text("status NOT IN ('solved', 'closed')"),
            postgresql_where=sa.text("status NOT IN ('solved', 'closed')"),
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    reference: str | None = Field(default=None, max_length=32, unique=True)
    subject: str = Field(default="", max_length=998)
    requester: str = Field(default="", max_length=320, index=True)  # lowercased address
    requester_name: str = Field(default="", max_length=200)
    status: str = Field(default="new", max_length=16)
    priority: str = Field(default="normal", max_length=16)
    language: str = Field(default="en", max_length=8)
    mailbox: str = Field(default="default", max_length=64)
    assignee_id: int | None = Field(default=None, foreign_key="staff_user.id", index=True)
    message_count: int = 0
    crisis_tier: int | None = None
    crisis_category: str | None = Field(default=None, max_length=64)
    escalation_state: str | None = Field(default=None, max_length=16)
    created_at: datetime = ts()
    updated_at: datetime = ts()
    last_message_at: datetime = ts()
    due_at: datetime = ts()


class Message(SQLModel, table=True):
    __tablename__ = "message"
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    direction: str = Field(max_length=16)  # inbound | outbound | note
    kind: str = Field(
        default="mail", max_length=16
    )  # mail | ack | crisis_ack | reply | note | bounce
    message_id: str = Field(max_length=998, unique=True)
    in_reply_to: str = text()
    references: str = text()
    from_addr: str = Field(default="", max_length=320)
    from_name: str = Field(default="", max_length=200)
    to_addrs: str = text()
    subject: str = Field(default="", max_length=998)
    text_body: str = text()
    html_body: str | None = text(nullable=True, default=None)
    size: int = 0
    author_id: int | None = Field(default=None, foreign_key="staff_user.id")
    robot_reason: str | None = Field(default=None, max_length=200)
    crisis_tier: int | None = None
    crisis_rules: str = Field(default="", max_length=500)
    mailbox: str | None = Field(default=None, max_length=64)
    uid: int | None = None
    created_at: datetime = ts(index=True)


class Attachment(SQLModel, table=True):
    __tablename__ = "attachment"
    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="message.id", index=True)
    filename: str = Field(max_length=255)
    content_type: str = Field(default="application/octet-stream", max_length=255)
    size: int = 0
    sha256: str = Field(max_length=64)
    content: bytes = blob()


class MailboxState(SQLModel, table=True):
    __tablename__ = "mailbox_state"
    __table_args__ = (sa.UniqueConstraint("mailbox", "folder", name="uq_mailbox_state_folder"),)
    id: int | None = Field(default=None, primary_key=True)
    mailbox: str = Field(default="default", max_length=64)
    folder: str = Field(default="INBOX", max_length=255)
    uidvalidity: int | None = Field(default=None, sa_type=sa.BigInteger)
    last_uid: int = Field(default=0, sa_type=sa.BigInteger)
    last_poll_at: datetime | None = ts(nullable=True)
    last_error: str | None = Field(default=None, max_length=500)
    updated_at: datetime = ts()


class LoginState(SQLModel, table=True):
    """How the worker's last login to one IMAP mailbox, or to the SMTP relay, went: the
    health signal for a password or OAuth token that stopped working (helpdesk.logins)."""

    __tablename__ = "login_state"
    service: str = Field(primary_key=True, max_length=8)  # imap | smtp
    mailbox: str = Field(primary_key=True, max_length=64)  # the mailbox's name; "relay" for smtp
    auth: str = Field(default="password", max_length=16)  # password | xoauth2
    ok: bool = True
    failures: int = 0  # failed logins in a row since the last good one
    failing_since: datetime | None = ts(nullable=True)
    last_ok_at: datetime | None = ts(nullable=True)
    last_failure_at: datetime | None = ts(nullable=True)
    last_error: str | None = Field(default=None, max_length=500)
    worker_id: str = Field(default="", max_length=128)
    updated_at: datetime = ts()


class Outbox(SQLModel, table=True):
    __tablename__ = "outbox"
    __table_args__ = (
        sa.Index("ix_outbox_due", "status", "lane", "next_attempt_at"),
        sa.Index("ix_outbox_recipient_kind", "recipient", "kind", "created_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    kind: str = Field(max_length=16)  # ack | crisis_ack | reply | escalation
    lane: int = 1  # 0 = priority (crisis replies, escalations), 1 = routine
    recipient: str = Field(max_length=320)
    mail_from: str = Field(max_length=320)
    message_id: str = Field(max_length=998, unique=True)
    raw: bytes = blob()
    status: str = Field(default="pending", max_length=16)  # pending | sent | failed
    attempts: int = 0
    next_attempt_at: datetime = ts()
    deadline_at: datetime = ts()
    locked_by: str | None = Field(default=None, max_length=128)
    locked_until: datetime | None = ts(nullable=True)
    last_error: str | None = Field(default=None, max_length=1000)
    created_at: datetime = ts()
    sent_at: datetime | None = ts(nullable=True)


class RejectedMail(SQLModel, table=True):
    """A mail that could not become a normal ticket: kept whole, with the reason."""

    __tablename__ = "rejected_mail"
    id: int | None = Field(default=None, primary_key=True)
    mailbox: str = Field(default="default", max_length=64)
    folder: str = Field(default="INBOX", max_length=255)
    uidvalidity: int | None = Field(default=None, sa_type=sa.BigInteger)
    uid: int | None = Field(default=None, sa_type=sa.BigInteger)
    sha256: str = Field(max_length=64, index=True)
    raw: bytes = blob()
    reason: str = Field(max_length=200)
    detail: str = text()
    status: str = Field(default="pending", max_length=16)  # pending | retried | resolved
    attempts: int = 1
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id")
    created_at: datetime = ts()
    retried_at: datetime | None = ts(nullable=True)


class OnCallMember(SQLModel, table=True):
    __tablename__ = "oncall_member"
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=320, unique=True)
    name: str = Field(default="", max_length=200)
    level: int = Field(default=1, ge=1)
    phone: str = Field(default="", max_length=64)
    webhook_url: str = Field(default="", max_length=1000)
    active: bool = True
    created_at: datetime = ts()


class Escalation(SQLModel, table=True):
    """One escalation per ticket thread; follow-up crisis mails update it, never duplicate it."""

    __tablename__ = "escalation"
    __table_args__ = (sa.Index("ix_escalation_due", "state", "next_action_at"),)
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", unique=True)
    tier: int
    category: str = Field(default="", max_length=64)
    rule_ids: str = Field(default="", max_length=500)
    state: str = Field(default="open", max_length=16)  # open | acknowledged | exhausted
    level: int = 0  # the last level paged; 0 = none yet
    round: int = 1
    received_at: datetime = ts()
    created_at: datetime = ts()
    next_action_at: datetime | None = ts(nullable=True)
    acknowledged_at: datetime | None = ts(nullable=True)
    acknowledged_by: str | None = Field(default=None, max_length=320)
    locked_by: str | None = Field(default=None, max_length=128)
    locked_until: datetime | None = ts(nullable=True)


class EscalationEvent(SQLModel, table=True):
    """The audit trail of an escalation: every notice, acknowledgement and timeout."""

    __tablename__ = "escalation_event"
    id: int | None = Field(default=None, primary_key=True)
    escalation_id: int = Field(foreign_key="escalation.id", index=True)
    kind: str = Field(
        max_length=32
    )  # opened | notice | webhook | acknowledged | timeout | exhausted
    level: int = 0
    recipient: str = Field(default="", max_length=1000)
    detail: str = Field(default="", max_length=1000)
    created_at: datetime = ts()


class AuditLog(SQLModel, table=True):
    __tablename__ = "audit_log"
    # login rate limiting counts recent "login-failed" rows per account
    __table_args__ = (sa.Index("ix_audit_log_action_actor", "action", "actor", "created_at"),)
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    actor: str = Field(default="system", max_length=320)
    action: str = Field(max_length=64)
    detail: str = Field(default="", max_length=1000)
    created_at: datetime = ts()


class CannedReply(SQLModel, table=True):
    __tablename__ = "canned_reply"
    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(max_length=200, unique=True)
    body: str = text()
    created_at: datetime = ts()
    updated_at: datetime = ts()


class Lease(SQLModel, table=True):
    """A named lease (e.g. one mailbox) held by one worker until it stops renewing it."""

    __tablename__ = "lease"
    name: str = Field(primary_key=True, max_length=128)
    holder: str = Field(default="", max_length=128)
    expires_at: datetime = ts()
    renewed_at: datetime = ts()


class WorkerHeartbeat(SQLModel, table=True):
    __tablename__ = "worker_heartbeat"
    worker_id: str = Field(primary_key=True, max_length=128)
    hostname: str = Field(default="", max_length=255)
    pid: int = 0
    started_at: datetime = ts()
    last_seen_at: datetime = ts()
    last_poll_ok_at: datetime | None = ts(nullable=True)
    processed: int = 0
    errors: int = 0
