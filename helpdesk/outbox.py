"""The SMTP edge: outbox rows -> SMTP (aiosmtplib), with bounded retries.

The outbox is a table (:class:`~helpdesk.models.Outbox`): the pipeline adds a row in the
same transaction as the ticket (:func:`enqueue`), and :func:`deliver_due` sends it later.

Invariants:
- a row is claimed before it is sent (``locked_by``/``locked_until``, in a short committed
  transaction; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several workers can share one
  database and never send the same row twice while its lock holds);
- each result is recorded in its own short transaction right after the SMTP reply, so a
  crash between the server's "250" and the commit re-sends at most that one mail, with the
  same Message-ID (the patient's client folds it as a duplicate);
- only failures we name are retried: :class:`TransientDeliveryError` (connection trouble,
  4xx) with exponential backoff and full jitter until the row's deadline;
  :class:`PermanentDeliveryError` (5xx) fails that row at once with the server's reason, and
  never blocks the other rows;
- lane 0 (crisis replies, escalations) retries sooner, and a worker drains it with its own
  loop and its own connection (``deliver_due(lanes=(0,))``), so it never waits behind a
  routine backlog.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any, Protocol

import aiosmtplib
import sqlalchemy as sa
from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk.compose import Composed, safe_header_value, to_bytes
from helpdesk.config import Settings
from helpdesk.errors import (
    ConfigError,
    DeliveryError,
    HelpdeskError,
    InvalidInputError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from helpdesk.models import Outbox
from helpdesk.oauth import TokenProvider, token_source

log = logging.getLogger(__name__)

OUTBOX_TABLE: sa.Table = Outbox.__table__  # type: ignore[attr-defined]

PENDING, SENT, FAILED = "pending", "sent", "failed"
_MAX_ERROR = 1000
# After this many transient failures in a row, stop the pass: the server is down or
# refusing everything, and each further row would only wait out its own timeout.
_TRANSIENT_STREAK_LIMIT = 3


# --- the sender seam ------------------------------------------------------------------


class Sender(Protocol):
    async def send(self, *, mail_from: str, recipient: str, raw: bytes) -> None:
        """Deliver one mail, or raise TransientDeliveryError / PermanentDeliveryError."""

    async def close(self) -> None: ...


def _reply_error(code: int, message: str) -> DeliveryError:
    text = f"{code} {message}".strip()
    if 500 <= code < 600:
        return PermanentDeliveryError(text)
    return TransientDeliveryError(text)


class SmtpSender:
    """One reused SMTP connection (aiosmtplib), opened lazily and re-opened after a failure.

    Sends one mail at a time (SMTP is a dialogue); run one sender per concurrent loop.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: str,
        user: str = "",
        password: str = "",
        timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        idle_check_seconds: float = 10.0,
        name: str = "",
    ) -> None:
        if security not in ("ssl", "starttls", "none"):
            raise ConfigError(f"SMTP security must be ssl, starttls or none, not {security!r}")
        self.host, self.port, self.security = host, port, security
        self.user, self._password = user, password
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.idle_check_seconds = idle_check_seconds
        self.name = name
        self.connections = 0  # opened so far; for metrics and tests
        self.oauth_token: TokenProvider | None = None  # XOAUTH2 instead of a password
        # told how each login went (None: it worked), e.g. helpdesk.logins.LoginRecorder.hook
        self.on_login: Callable[[str | None], Awaitable[None]] | None = None
        self._client: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, lane: str = "") -> SmtpSender:
        if not settings.smtp_host:
            raise ConfigError("HELPDESK_SMTP_HOST is not set")
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port_effective,
            security=settings.smtp_security,
            user=settings.smtp_user,
            password=settings.smtp_password.get_secret_value(),
            timeout=settings.smtp_timeout,
            name=lane,
        )

    def _new_client(self) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            use_tls=self.security == "ssl",
            start_tls=self.security == "starttls",
            timeout=self.timeout,
            tls_context=self.ssl_context,
        )

    async def _connect(self) -> aiosmtplib.SMTP:
        client = self._new_client()
        token: str | None = None
        try:
            await client.connect()
            if self.oauth_token is not None:
                try:
                    token = await self.oauth_token()
                except HelpdeskError as exc:  # OAuthTokenError: loud, and retried later
                    client.close()
                    log.error("SMTP OAuth token unavailable", extra={"error": str(exc)[:200]})
                    await self._login_done(f"OAuth token unavailable: {exc}")
                    raise TransientDeliveryError(f"SMTP OAuth token: {exc}") from exc
                await client.auth_xoauth2(self.user, token)
            elif self.user:
                await client.login(self.user, self._password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            if self.oauth_token is not None and token is not None and 500 <= exc.code < 600:
                # Refused (a 4xx is the server's trouble, not the token's): fetch a new one
                # at the next login rather than repeat this one until its expiry.
                self.oauth_token.invalidate(token)
            reason = f"SMTP login failed: {exc.code} {exc.message}"
            log.error("SMTP login refused: mail is NOT being sent", extra={"error": reason[:200]})
            await self._login_done(reason)
            # A bad password is a configuration problem, not this mail's: retry, don't fail.
            raise TransientDeliveryError(reason) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            raise TransientDeliveryError(
                f"cannot connect to SMTP {self.host}:{self.port}: {exc}"
            ) from exc
        self.connections += 1
        if self.oauth_token is not None or self.user:
            await self._login_done(None)
        return client

    async def _login_done(self, error: str | None) -> None:
        if self.on_login is not None:
            await self.on_login(error)

    async def _usable_client(self) -> aiosmtplib.SMTP:
        client = self._client
        if client is not None and client.is_connected:
            if time.monotonic() - self._last_used < self.idle_check_seconds:
                return client
            try:  # servers drop idle connections; find out before we start a mail
                await client.noop()
                return client
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                self._drop()
        self._drop()
        self._client = await self._connect()
        return self._client

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def send(self, *, mail_from: str, recipient: str, raw: bytes) -> None:
        async with self._lock:
            client = await self._usable_client()
            try:
                errors, _ = await client.sendmail(mail_from, [recipient], raw)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                refused = exc.recipients[0]
                raise _reply_error(refused.code, refused.message) from exc
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == 421:  # the server is closing the connection
                    self._drop()
                raise _reply_error(exc.code, exc.message) from exc
            except (aiosmtplib.SMTPNotSupported, ValueError) as exc:
                raise PermanentDeliveryError(f"cannot be sent: {exc}") from exc
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                self._drop()
                raise TransientDeliveryError(f"SMTP connection failed: {exc}") from exc
            finally:
                self._last_used = time.monotonic()
            if recipient in errors:  # only with several recipients; kept for completeness
                raise _reply_error(errors[recipient].code, errors[recipient].message)

    async def close(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
            if client is not None and client.is_connected:
                try:
                    await asyncio.wait_for(client.quit(), timeout=min(self.timeout, 5.0))
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()


async def check_smtp(settings: Settings) -> str:
    """One line for ``helpdesk check``: connect, EHLO and (if configured) log in.

    Returns the line on success; raises :class:`TransientDeliveryError` with a one-line
    reason on failure, :class:`ConfigError` when no SMTP host is configured.
    """
    sender = SmtpSender.from_settings(settings)
    if settings.smtp_auth == "xoauth2":
        sender.oauth_token = token_source(settings)
    started = time.monotonic()
    client = await sender._connect()
    try:
        if not client.last_ehlo_response:
            await client.ehlo()
        response = client.last_ehlo_response
        ehlo = response.message.splitlines()[0] if response else ""
    finally:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
    login = f", logged in as {settings.smtp_user}" if settings.smtp_user else ""
    login += " with XOAUTH2" if sender.oauth_token is not None else ""
    return (
        f"smtp ok: {settings.smtp_host}:{settings.smtp_port_effective}"
        f" ({settings.smtp_security}{login}) in {time.monotonic() - started:.2f}s: {ehlo}"
    )


# --- the outbox table -----------------------------------------------------------------


def new_row(
    *,
    msg: EmailMessage | Composed,
    kind: str,
    recipient: str,
    mail_from: str,
    ticket_id: int | None,
    lane: int,
    now: datetime,
    deadline: timedelta,
) -> dict[str, Any]:
    """The column values of one pending outbox mail (for :func:`enqueue`, or for
    :func:`insert_rows` when a batch adds many)."""
    if isinstance(msg, Composed):
        message_id, raw = msg.message_id, msg.raw
    else:
        message_id, raw = msg["Message-ID"], to_bytes(msg)
    if not message_id:
        raise InvalidInputError("an outbox mail needs a Message-ID")
    return {
        "ticket_id": ticket_id,
        "kind": kind,
        "lane": lane,
        "recipient": safe_header_value(recipient),
        "mail_from": safe_header_value(mail_from),
        "message_id": safe_header_value(str(message_id)),
        "raw": raw,
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "deadline_at": now + deadline,
        "created_at": now,
    }


async def enqueue(
    session: AsyncSession,
    *,
    msg: EmailMessage | Composed,
    kind: str,
    recipient: str,
    mail_from: str,
    ticket_id: int | None,
    lane: int,
    now: datetime,
    deadline: timedelta,
) -> Outbox:
    """Add one mail to the outbox (``session.add`` only: the caller commits, together with
    the ticket it belongs to)."""
    row = Outbox(
        **new_row(
            msg=msg,
            kind=kind,
            recipient=recipient,
            mail_from=mail_from,
            ticket_id=ticket_id,
            lane=lane,
            now=now,
            deadline=deadline,
        )
    )
    session.add(row)
    return row


async def insert_rows(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Add many :func:`new_row` rows with one Core ``INSERT``, in the caller's transaction."""
    if rows:
        conn = await session.connection()
        await conn.execute(sa.insert(OUTBOX_TABLE), list(rows))


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter. ``base == 0`` makes every retry instant
    (tests). Lane 0 uses ``priority_base``/``priority_cap``."""

    base: float
    cap: float
    priority_base: float = 2.0
    priority_cap: float = 30.0
    jitter: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(base=settings.outbox_retry_base_seconds, cap=settings.outbox_retry_max_seconds)

    def delay(self, attempts: int, lane: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        if self.base <= 0:
            return 0.0
        base, cap = self.base, self.cap
        if lane == 0:  # crisis replies and escalations: never retried later than routine mail
            base, cap = min(self.priority_base, base), min(self.priority_cap, cap)
        ceiling = min(cap, base * 2 ** min(max(attempts, 1) - 1, 32))
        return random.uniform(0, ceiling) if self.jitter else ceiling


@dataclass(frozen=True)
class DeliveryReport:
    sent: int
    retried: int
    failed: int
    # True when the pass gave up early because the server seems down (not compared: two
    # reports are equal when they count the same mails)
    stopped_early: bool = field(default=False, compare=False)

    def __add__(self, other: DeliveryReport) -> DeliveryReport:
        return DeliveryReport(
            self.sent + other.sent,
            self.retried + other.retried,
            self.failed + other.failed,
            self.stopped_early or other.stopped_early,
        )


@dataclass(frozen=True, slots=True)
class _Claimed:
    id: int
    lane: int
    recipient: str
    mail_from: str
    raw: bytes
    attempts: int
    deadline_at: datetime


async def next_due_in(sessions: async_sessionmaker[AsyncSession], *, now: datetime) -> float | None:
    """Seconds until the next pending, unclaimed row is due (<= 0: due now); None if none."""
    async with sessions() as session:
        row = await session.exec(
            select(sa.func.min(Outbox.next_attempt_at)).where(
                Outbox.status == PENDING,
                (col(Outbox.locked_until).is_(None)) | (col(Outbox.locked_until) < now),
            )
        )
        first = row.one()
    if first is None:
        return None
    if first.tzinfo is None:  # SQLite gives the aggregate back without our column type
        first = first.replace(tzinfo=UTC)
    return (first - now).total_seconds()


async def release_claims(
    sessions: async_sessionmaker[AsyncSession], *, worker_id: str, lanes: Sequence[int]
) -> int:
    """Unlock pending rows this worker claimed in ``lanes`` (after a pass that failed, e.g.
    when the database went away mid-pass). Only safe while no pass of this worker is
    running on those lanes."""
    async with sessions() as session, session.begin():
        result = await session.exec(
            update(Outbox)
            .where(
                col(Outbox.locked_by) == worker_id,
                col(Outbox.status) == PENDING,
                col(Outbox.lane).in_(list(lanes)),
            )
            .values(locked_by=None, locked_until=None)
        )
        return int(result.rowcount or 0)


async def _claim(
    sessions: async_sessionmaker[AsyncSession],
    *,
    worker_id: str,
    now: datetime,
    lanes: Sequence[int],
    limit: int,
    lock_seconds: float,
    exclude: set[int],
) -> list[_Claimed]:
    async with sessions() as session:
        query = (
            select(Outbox.id)
            .where(
                Outbox.status == PENDING,
                col(Outbox.lane).in_(list(lanes)),
                Outbox.next_attempt_at <= now,
                (col(Outbox.locked_until).is_(None)) | (col(Outbox.locked_until) < now),
            )
            .order_by(col(Outbox.lane), col(Outbox.next_attempt_at), col(Outbox.id))
            .limit(limit)
            # PostgreSQL: rows another worker is claiming are skipped, not waited for.
            # SQLite ignores this; its single writer makes the update below a compare-and-set.
            .with_for_update(skip_locked=True)
        )
        if exclude:
            query = query.where(col(Outbox.id).not_in(sorted(exclude)))
        ids = list((await session.exec(query)).all())
        if not ids:
            await session.rollback()
            return []
        claimed = await session.exec(
            update(Outbox)
            .where(
                col(Outbox.id).in_(ids),
                col(Outbox.status) == PENDING,
                (col(Outbox.locked_until).is_(None)) | (col(Outbox.locked_until) < now),
            )
            .values(locked_by=worker_id, locked_until=now + timedelta(seconds=lock_seconds))
            .returning(
                col(Outbox.id),
                col(Outbox.lane),
                col(Outbox.recipient),
                col(Outbox.mail_from),
                col(Outbox.raw),
                col(Outbox.attempts),
                col(Outbox.deadline_at),
            )
            .execution_options(synchronize_session=False)
        )
        rows = [_Claimed(*row) for row in claimed.all()]
        await session.commit()
    rows.sort(key=lambda r: ids.index(r.id))
    return rows


class _Recorder:
    """Records each send result on one connection held for the whole pass.

    Every ``record`` is one autocommitted Core UPDATE: no session, no ORM, no checkout or
    reset per row, so the result is durable before the next mail is sent (the at-most-one-
    duplicate-per-kill rule) at the cost of a single round trip to the database.
    """

    def __init__(self, session: AsyncSession, write_lock: asyncio.Lock | None) -> None:
        self._session = session
        self._write_lock = write_lock
        self._conn: AsyncConnection | None = None
        self._statements: dict[tuple[str, ...], sa.Update] = {}

    async def record(self, row_id: int, **values: object) -> None:
        if self._conn is None:
            self._conn = await self._session.connection(
                execution_options={"isolation_level": "AUTOCOMMIT"}
            )
        keys = tuple(sorted(values))
        statement = self._statements.get(keys)
        if statement is None:
            statement = (
                sa.update(OUTBOX_TABLE)
                .where(OUTBOX_TABLE.c.id == sa.bindparam("row_id"))
                .values(
                    locked_by=None,
                    locked_until=None,
                    **{key: sa.bindparam(f"v_{key}") for key in keys},
                )
            )
            self._statements[keys] = statement
        params = {f"v_{key}": value for key, value in values.items()}
        if self._write_lock is None:
            await self._conn.execute(statement, {"row_id": row_id, **params})
            return
        async with self._write_lock:
            await self._conn.execute(statement, {"row_id": row_id, **params})


async def _release(
    sessions: async_sessionmaker[AsyncSession], worker_id: str, ids: Sequence[int]
) -> None:
    """Give back rows we claimed but did not try, untouched."""
    async with sessions() as session:
        await session.exec(
            update(Outbox)
            .where(col(Outbox.id).in_(list(ids)), col(Outbox.locked_by) == worker_id)
            .values(locked_by=None, locked_until=None)
            .execution_options(synchronize_session=False)
        )
        await session.commit()


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 1] + "…"


async def deliver_due(
    *,
    sessions: async_sessionmaker[AsyncSession],
    sender: Sender,
    worker_id: str,
    now: Callable[[], datetime],
    policy: RetryPolicy,
    lanes: Sequence[int] = (0, 1),
    batch_size: int = 50,
    lock_seconds: float = 120.0,
    tried: set[int] | None = None,
    write_lock: asyncio.Lock | None = None,
) -> DeliveryReport:
    """Send every due row of ``lanes``, batch after batch, until none is due.

    A row that fails transiently is not tried again in the same call, even when its retry
    is due at once (``base=0``); after a few transient failures in a row the call stops
    early and gives back the rest of its batch (the server is down: don't queue timeouts).
    Pass the same ``tried`` set to several calls to make them count as one for that rule,
    and the ``write_lock`` that this process's other database writers hold (see
    ``Pipeline.write_lock``), if any, to wait for them in the event loop.
    """
    async with sessions() as session:
        return await _deliver(
            sessions,
            _Recorder(session, write_lock),
            sender=sender,
            worker_id=worker_id,
            now=now,
            policy=policy,
            lanes=lanes,
            batch_size=batch_size,
            lock_seconds=lock_seconds,
            tried_again_later=set() if tried is None else tried,
        )


async def _deliver(
    sessions: async_sessionmaker[AsyncSession],
    recorder: _Recorder,
    *,
    sender: Sender,
    worker_id: str,
    now: Callable[[], datetime],
    policy: RetryPolicy,
    lanes: Sequence[int],
    batch_size: int,
    lock_seconds: float,
    tried_again_later: set[int],
) -> DeliveryReport:
    sent = retried = failed = 0
    while True:
        batch = await _claim(
            sessions,
            worker_id=worker_id,
            now=now(),
            lanes=lanes,
            limit=batch_size,
            lock_seconds=lock_seconds,
            exclude=tried_again_later,
        )
        if not batch:
            break
        streak = 0
        for index, row in enumerate(batch):
            attempts = row.attempts + 1
            if now() > row.deadline_at:
                await recorder.record(
                    row.id,
                    status=FAILED,
                    last_error=_clip(f"deadline passed before delivery ({row.attempts} attempts)"),
                )
                failed += 1
                continue
            try:
                await sender.send(mail_from=row.mail_from, recipient=row.recipient, raw=row.raw)
            except PermanentDeliveryError as exc:
                log.warning("outbox %s to %s failed: %s", row.id, row.recipient, exc)
                await recorder.record(
                    row.id, status=FAILED, attempts=attempts, last_error=_clip(str(exc))
                )
                failed += 1
                streak = 0
                continue
            except Exception as exc:  # any other failure is retried too, bounded by the deadline
                if not isinstance(exc, TransientDeliveryError):
                    log.exception("outbox %s: unexpected error from the sender", row.id)
                error = _clip(str(exc) or type(exc).__name__)
                current = now()
                retry_at = current + timedelta(seconds=policy.delay(attempts, row.lane))
                if retry_at >= row.deadline_at:
                    await recorder.record(
                        row.id,
                        status=FAILED,
                        attempts=attempts,
                        last_error=_clip(f"deadline reached after {attempts} attempts: {error}"),
                    )
                    failed += 1
                else:
                    await recorder.record(
                        row.id,
                        attempts=attempts,
                        next_attempt_at=retry_at,
                        last_error=error,
                    )
                    tried_again_later.add(row.id)
                    retried += 1
                streak += 1
                if streak >= _TRANSIENT_STREAK_LIMIT:
                    rest = [r.id for r in batch[index + 1 :]]
                    if rest:
                        await _release(sessions, worker_id, rest)
                    return DeliveryReport(sent, retried, failed, stopped_early=True)
                continue
            await recorder.record(
                row.id, status=SENT, attempts=attempts, sent_at=now(), last_error=None
            )
            sent += 1
            streak = 0
    return DeliveryReport(sent, retried, failed)


async def outbox_backlog(session: AsyncSession) -> dict[str, int]:
    """Row counts by status, and pending rows by lane (``pending_lane_0``…)."""
    counts = {PENDING: 0, SENT: 0, FAILED: 0}
    by_status = select(Outbox.status, func.count()).group_by(col(Outbox.status))
    for status, count in (await session.exec(by_status)).all():
        counts[status] = count
    by_lane = (
        select(Outbox.lane, func.count()).where(Outbox.status == PENDING).group_by(col(Outbox.lane))
    )
    for lane, count in (await session.exec(by_lane)).all():
        counts[f"pending_lane_{lane}"] = count
    return counts
