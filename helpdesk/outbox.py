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
import re
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
    async def send(
        self,
        *,
        mail_from: str,
        recipient: str,
        raw: bytes,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Deliver one mail, or raise TransientDeliveryError / PermanentDeliveryError.

        ``before_end``, when given, is awaited just before the mail is handed over for
        good (SMTP's final dot): if it raises, the mail must not be delivered."""

    async def close(self) -> None: ...


def _reply_error(code: int, message: str) -> DeliveryError:
    text = f"{code} {message}".strip()
    if 500 <= code < 600:
        return PermanentDeliveryError(text)
    return TransientDeliveryError(text)


@dataclass(eq=False)
class _Line:
    """One SMTP connection of a sender, and when it was last used."""

    client: aiosmtplib.SMTP | None = None
    last_used: float = 0.0


# RFC 5321 4.5.2: a line that starts with a dot gets another one
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _data_bytes(raw: bytes) -> tuple[bytes, int]:
    """``raw`` as DATA sends it, without the final dot (CRLF line ends, dots doubled), and
    its size for MAIL's SIZE parameter (RFC 1870: CRLF line ends, no dot stuffing)."""
    bare = raw.replace(b"\r\n", b"")
    if b"\r" in bare or b"\n" in bare:
        raw = _LINE_END.sub(b"\r\n", raw)
    size = len(raw)
    raw = _LEADING_DOT.sub(b"..", raw)
    return (raw if raw.endswith(b"\r\n") else raw + b"\r\n"), size


# An address sent as <address> exactly as written: what aiosmtplib would send after
# parsing it, but without the parsing, which costs more than the rest of a mail's
# commands. Anything else goes through aiosmtplib's sendmail().
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)


class SmtpSender:
    """Reused SMTP connections (aiosmtplib), opened lazily and re-opened after a failure.

    SMTP is a dialogue, so a connection carries one mail at a time; ``parallel`` of them
    let that many :meth:`send` calls run at once (one connection by default).
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
        parallel: int = 1,
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
        self.parallel = max(1, parallel)
        self._lines: asyncio.Queue[_Line] = asyncio.Queue()
        for _ in range(self.parallel):
            self._lines.put_nowait(_Line())

    @classmethod
    def from_settings(cls, settings: Settings, *, lane: str = "", parallel: int = 1) -> SmtpSender:
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
            parallel=parallel,
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

    async def _usable_client(self, line: _Line) -> aiosmtplib.SMTP:
        client = line.client
        if client is not None and client.is_connected:
            if time.monotonic() - line.last_used < self.idle_check_seconds:
                return client
            try:  # servers drop idle connections; find out before we start a mail
                await client.noop()
                return client
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                pass
        _drop(line)
        line.client = await self._connect()
        return line.client

    async def send(
        self,
        *,
        mail_from: str,
        recipient: str,
        raw: bytes,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        line = await self._lines.get()
        try:
            client = await self._usable_client(line)
            if _PLAIN_ADDRESS.fullmatch(mail_from) and _PLAIN_ADDRESS.fullmatch(recipient):
                await self._send_plain(client, mail_from, recipient, raw, before_end)
            else:
                if before_end is not None:
                    await before_end()
                errors, _ = await client.sendmail(mail_from, [recipient], raw)
                if recipient in errors:  # only with several recipients; kept for completeness
                    raise _reply_error(errors[recipient].code, errors[recipient].message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0]
            raise _reply_error(refused.code, refused.message) from exc
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:  # the server is closing the connection
                _drop(line)
            raise _reply_error(exc.code, exc.message) from exc
        except (aiosmtplib.SMTPNotSupported, ValueError) as exc:
            raise PermanentDeliveryError(f"cannot be sent: {exc}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            _drop(line)
            raise TransientDeliveryError(f"SMTP connection failed: {exc}") from exc
        except BaseException:  # cancelled, or before_end refused: the dialogue is cut short
            _drop(line)
            raise
        finally:
            line.last_used = time.monotonic()
            self._lines.put_nowait(line)

    async def _send_plain(
        self,
        client: aiosmtplib.SMTP,
        mail_from: str,
        recipient: str,
        raw: bytes,
        before_end: Callable[[], Awaitable[None]] | None,
    ) -> None:
        """One mail, command by command: what ``sendmail`` does for plain addresses, with
        ``before_end`` awaited after DATA's 354, before the content and its final dot (the
        server takes the mail at that dot)."""
        if client.is_ehlo_or_helo_needed:
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()
        data, size = _data_bytes(raw)
        options = [b"SIZE=%d" % size] if client.supports_extension("size") else []
        reply = await client.execute_command(b"MAIL", f"FROM:<{mail_from}>".encode(), *options)
        if reply.code != 250:
            await _reset(client)
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
        reply = await client.execute_command(b"RCPT", f"TO:<{recipient}>".encode())
        if reply.code not in (250, 251):
            await _reset(client)
            raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
        reply = await client.execute_command(b"DATA")
        if reply.code != 354:
            await _reset(client)
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        if before_end is not None:
            await before_end()
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        protocol.write(data + b".\r\n")  # one write: the content is cheap, round trips are not
        try:
            reply = await protocol.read_response(timeout=self.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            client.close()  # a late reply would be taken for the next command's
            raise
        if reply.code != 250:
            await _reset(client)
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)

    async def close(self) -> None:
        """Say goodbye on every connection (waiting for mail in flight)."""
        lines = [await self._lines.get() for _ in range(self.parallel)]
        try:
            for line in lines:
                client, line.client = line.client, None
                if client is not None and client.is_connected:
                    try:
                        await asyncio.wait_for(client.quit(), timeout=min(self.timeout, 5.0))
                    except (aiosmtplib.SMTPException, OSError, TimeoutError):
                        client.close()
        finally:
            for line in lines:
                self._lines.put_nowait(line)


def _drop(line: _Line) -> None:
    if line.client is not None:
        line.client.close()
        line.client = None


async def _reset(client: aiosmtplib.SMTP) -> None:
    """RSET after a refusal, as ``sendmail`` does; a failure here is not the mail's."""
    try:
        await client.rset()
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


@dataclass(frozen=True, slots=True)
class _Update:
    """One shape of result UPDATE (which columns it sets), prepared for the recorder."""

    core: sa.Update
    sql: str  # compiled for the driver, with positional parameters...
    names: tuple[str, ...]  # ...in this order
    processors: dict[str, Callable[[Any], Any]]  # bind processing, by parameter name


_DRIVERS = ("aiosqlite", "asyncpg")


class _Recorder:
    """Records each send result on one connection held for the whole pass.

    Every ``record`` is one autocommitted UPDATE, durable before the next mail is sent (the
    at-most-one-duplicate-per-kill rule). It is the statement the outbox runs once a mail,
    so on aiosqlite and asyncpg it goes to the driver itself, compiled and with its bind
    processing looked up once per shape: through SQLAlchemy's adapter a statement costs
    aiosqlite three trips to its thread (cursor, execute, close) and the event loop several
    times the CPU (measured a record: ~270 -> ~50 us on SQLite, ~400 -> ~200 us on
    PostgreSQL). Any other driver takes the Core statement.
    """

    def __init__(self, session: AsyncSession, write_lock: asyncio.Lock | None) -> None:
        self._session = session
        self._write_lock = write_lock
        self._conn: AsyncConnection | None = None
        self._driver: Any = None  # the aiosqlite or asyncpg connection, when it is one
        self._statements: dict[tuple[str, ...], _Update] = {}
        self._busy = asyncio.Lock()  # one statement at a time on the connection (asyncpg)

    async def record(self, row_id: int, **values: object) -> None:
        async with self._busy:
            await self._record(row_id, values)

    async def _record(self, row_id: int, values: dict[str, object]) -> None:
        if self._conn is None:
            self._conn = await self._session.connection(
                execution_options={"isolation_level": "AUTOCOMMIT"}
            )
            if self._conn.dialect.driver in _DRIVERS:
                self._driver = (await self._conn.get_raw_connection()).driver_connection
        keys = tuple(sorted(values))
        prepared = self._statements.get(keys) or self._prepare(self._conn.dialect, keys)
        if self._write_lock is None:
            await self._execute(self._conn, prepared, row_id, values)
            return
        async with self._write_lock:
            await self._execute(self._conn, prepared, row_id, values)

    def _prepare(self, dialect: sa.Dialect, keys: tuple[str, ...]) -> _Update:
        core = (
            sa.update(OUTBOX_TABLE)
            .where(OUTBOX_TABLE.c.id == sa.bindparam("row_id"))
            .values(
                locked_by=None,
                locked_until=None,
                **{key: sa.bindparam(f"v_{key}") for key in keys},
            )
        )
        compiled = core.compile(dialect=dialect)
        processors: dict[str, Callable[[Any], Any]] = {}
        for key in keys:
            process = OUTBOX_TABLE.c[key].type.bind_processor(dialect)
            if process is not None:
                processors[f"v_{key}"] = process
        prepared = _Update(
            core=core,
            sql=compiled.string,
            names=tuple(compiled.positiontup or ()),
            processors=processors,
        )
        self._statements[keys] = prepared
        return prepared

    async def _execute(
        self, conn: AsyncConnection, prepared: _Update, row_id: int, values: dict[str, object]
    ) -> None:
        params: dict[str, Any] = {f"v_{key}": value for key, value in values.items()}
        params["row_id"] = row_id
        if self._driver is None:
            await conn.execute(prepared.core, params)
            return
        for name, process in prepared.processors.items():
            params[name] = process(params[name])
        args = [params.get(name) for name in prepared.names]  # locked_by/until: None
        if conn.dialect.driver == "asyncpg":
            await self._driver.execute(prepared.sql, *args)
        else:  # aiosqlite: one trip to its thread; the finished cursor is simply dropped
            await self._driver.execute(prepared.sql, args)


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
    run = _Pass(
        recorder=recorder,
        sender=sender,
        now=now,
        policy=policy,
        tried_again_later=tried_again_later,
        width=max(1, int(getattr(sender, "parallel", 1))),
    )
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
        untried = await run.batch(batch)
        if run.stop:
            if untried:
                await _release(sessions, worker_id, untried)
            return DeliveryReport(run.sent, run.retried, run.failed, stopped_early=True)
    return DeliveryReport(run.sent, run.retried, run.failed)


@dataclass(eq=False)
class _Pass:
    """The rows one :func:`deliver_due` call tries: ``width`` of them on the wire at once
    (the sender's ``parallel`` connections), each result recorded as soon as it is known.

    However many mails are on the wire, at most one has been handed over (SMTP's final
    dot) without its result recorded: ``accepting`` is held from that dot until the record
    is written, so a kill costs at most one duplicate, as with one mail at a time. The
    other connections meanwhile get their next mail ready up to that dot.
    """

    recorder: _Recorder
    sender: Sender
    now: Callable[[], datetime]
    policy: RetryPolicy
    tried_again_later: set[int]
    width: int
    sent: int = 0
    retried: int = 0
    failed: int = 0
    streak: int = 0  # transient failures in a row
    stop: bool = False  # the server seems down: start no more mail
    accepting: asyncio.Lock = field(default_factory=asyncio.Lock)
    broken: bool = False  # a mail may be out unrecorded: hand over no more

    async def batch(self, rows: Sequence[_Claimed]) -> list[int]:
        """Try ``rows`` in order; the ids of those not started because of ``stop``."""
        pending: set[asyncio.Task[None]] = set()
        try:
            for index, row in enumerate(rows):
                while len(pending) >= self.width:
                    pending = await self._settle(pending)
                if self.stop:
                    while pending:
                        pending = await self._settle(pending)
                    return [r.id for r in rows[index:]]
                pending.add(asyncio.create_task(self._one(row)))
            while pending:
                pending = await self._settle(pending)
        except BaseException:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        return []

    @staticmethod
    async def _settle(pending: set[asyncio.Task[None]]) -> set[asyncio.Task[None]]:
        """Wait for one of ``pending`` to finish; raise what it raised."""
        done, still = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        failures = [exc for exc in (task.exception() for task in done) if exc is not None]
        if failures:
            pending.clear()
            pending.update(still)  # the caller cancels these
            raise failures[0]
        return still

    async def _one(self, row: _Claimed) -> None:
        recorder = self.recorder
        attempts = row.attempts + 1
        if self.now() > row.deadline_at:
            await recorder.record(
                row.id,
                status=FAILED,
                last_error=_clip(f"deadline passed before delivery ({row.attempts} attempts)"),
            )
            self.failed += 1
            return
        holding = False

        async def before_end() -> None:
            nonlocal holding
            await self.accepting.acquire()
            holding = True
            if self.broken:
                raise TransientDeliveryError("stopped: an earlier result was not recorded")

        try:
            try:
                await self.sender.send(
                    mail_from=row.mail_from,
                    recipient=row.recipient,
                    raw=row.raw,
                    before_end=before_end if self.width > 1 else None,
                )
            except PermanentDeliveryError as exc:
                log.warning("outbox %s to %s failed: %s", row.id, row.recipient, exc)
                await recorder.record(
                    row.id, status=FAILED, attempts=attempts, last_error=_clip(str(exc))
                )
                self.failed += 1
                self.streak = 0
                return
            except Exception as exc:  # any other failure is retried too, bounded by the deadline
                if self.broken:  # the pass is ending with the error that broke it: leave it
                    return
                await self._retry_later(row, attempts, exc)
                return
            await recorder.record(
                row.id, status=SENT, attempts=attempts, sent_at=self.now(), last_error=None
            )
            self.sent += 1
            self.streak = 0
        except BaseException:
            if holding:
                self.broken = True  # set before the lock goes to the next mail
            raise
        finally:
            if holding:
                self.accepting.release()

    async def _retry_later(self, row: _Claimed, attempts: int, exc: Exception) -> None:
        if not isinstance(exc, TransientDeliveryError):
            log.exception("outbox %s: unexpected error from the sender", row.id)
        error = _clip(str(exc) or type(exc).__name__)
        retry_at = self.now() + timedelta(seconds=self.policy.delay(attempts, row.lane))
        if retry_at >= row.deadline_at:
            await self.recorder.record(
                row.id,
                status=FAILED,
                attempts=attempts,
                last_error=_clip(f"deadline reached after {attempts} attempts: {error}"),
            )
            self.failed += 1
        else:
            await self.recorder.record(
                row.id, attempts=attempts, next_attempt_at=retry_at, last_error=error
            )
            self.tried_again_later.add(row.id)
            self.retried += 1
        self.streak += 1
        if self.streak >= _TRANSIENT_STREAK_LIMIT:
            self.stop = True


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
