"""The IMAP edge: raw message bytes and their UIDs out of one mail folder. Network only.

The pipeline sees the :class:`Mailbox` protocol; :class:`ImapMailbox` implements it with
aioimaplib. Rules this module keeps (after nylas sync-engine's IMAP design notes):

- **By UID, never by sequence number.** The caller stores ``(folder, uidvalidity, last_uid)``;
  :meth:`Mailbox.batches` runs ``UID SEARCH UID last+1:*`` and then ``UID FETCH`` of those
  UIDs in chunks, dropping the echo of the highest existing UID that servers return for
  ``N:*`` when nothing is newer. :func:`plan_fetch` decides where to start, and re-scans from
  zero when UIDVALIDITY changed (Message-ID uniqueness downstream prevents duplicates).
- **Read without side effects.** ``BODY.PEEK[]`` does not set ``\\Seen``; the caller marks
  mail seen or moves it only after its own transaction has committed.
- **Never delete mail.** :meth:`Mailbox.move` uses ``UID MOVE``; without the MOVE capability it
  only copies and leaves the original where it was (no ``\\Deleted``, no EXPUNGE).
- **Small FETCH batches.** aioimaplib's FETCH parser rescans the response for every chunk
  it receives, so one FETCH costs O(n²) in its size: 50 messages a batch is the measured
  sweet spot (see FACTS.md).
- **IDLE is re-issued within 25 minutes** (RFC 2177 allows servers to drop an IDLE after 29).

Errors, all raised as :class:`MailboxError`::

    MailboxError
    ├── MailboxConnectionError   refused, reset, timed out, kicked: reconnect with Backoff
    ├── MailboxAuthError         login refused: permanent, tell a human
    ├── MailboxSecurityError     TLS certificate not trusted / STARTTLS not offered: permanent
    └── MailboxProtocolError     the server said NO/BAD, or an answer we cannot read
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import aioimaplib

from helpdesk.oauth import TokenProvider, token_source

if TYPE_CHECKING:
    from helpdesk.config import Settings

Security = Literal["ssl", "starttls", "none"]

DEFAULT_BATCH_SIZE = 50
IDLE_MAX_SECONDS = 25 * 60.0  # RFC 2177: re-issue IDLE at least every 29 minutes
_LOGOUT_TIMEOUT = 2.0

_T = TypeVar("_T")


# -- errors -------------------------------------------------------------------------------


class MailboxError(Exception):
    """Talking to the mail server failed."""


class MailboxConnectionError(MailboxError):
    """Transient: the connection was refused, reset, timed out or closed. Reconnect later."""


class MailboxAuthError(MailboxError):
    """Permanent: the server refused our credentials. Retrying will not help; say so loudly."""


class MailboxSecurityError(MailboxError):
    """Permanent: TLS cannot be set up safely (untrusted certificate, no STARTTLS offered)."""


class MailboxProtocolError(MailboxError):
    """The server answered NO or BAD, or with something we cannot read."""


# -- values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchedMail:
    """One message as the server stores it: its UID, raw RFC 5322 bytes and flags."""

    uid: int
    raw: bytes
    flags: frozenset[str]


class Mailbox(Protocol):
    """The seam between the pipeline and a mail server."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def select(self, folder: str) -> int:
        """Open ``folder`` and return its UIDVALIDITY."""
        ...

    def batches(
        self, after_uid: int, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> AsyncIterator[list[FetchedMail]]:
        """Messages with UID > ``after_uid``, in UID order, at most ``batch_size`` at a time."""
        ...

    async def mark_seen(self, uids: Sequence[int]) -> None: ...

    async def move(self, uids: Sequence[int], folder: str) -> None: ...

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - IDLE needs the deadline
        """Wait for new mail; True if some may have arrived, False on a quiet timeout."""
        ...

    @property
    def has_idle(self) -> bool: ...


async def wait_or_stop(mailbox: Mailbox, timeout: float, stop: asyncio.Event) -> bool:  # noqa: ASYNC109 - IDLE needs the deadline
    """``mailbox.wait(timeout)`` that returns early (False) once ``stop`` is set. A failure of
    the wait itself (a dropped connection) is raised, so the caller reconnects."""
    waiter = asyncio.ensure_future(mailbox.wait(timeout))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if waiter.done():
        return waiter.result()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await waiter
    return False


def plan_fetch(
    stored_uidvalidity: int | None, server_uidvalidity: int, last_uid: int
) -> tuple[int, bool]:
    """Where to resume: ``(after_uid, rescan)``.

    With no stored cursor, start at the beginning. With the same UIDVALIDITY, continue after
    ``last_uid``. When UIDVALIDITY changed, the stored UIDs mean nothing any more: re-scan
    from zero (``rescan=True``); already-imported mail is recognised by its Message-ID.
    """
    if last_uid < 0:
        raise ValueError(f"last_uid must be >= 0, not {last_uid}")
    if stored_uidvalidity is None:
        return 0, False
    if stored_uidvalidity != server_uidvalidity:
        return 0, True
    return last_uid, False


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base·2ⁿ)).

    ``Backoff(base=0)`` (or :meth:`instant`) never waits: the switch tests use.
    """

    base: float = 1.0
    cap: float = 60.0

    @classmethod
    def instant(cls) -> Backoff:
        return cls(base=0.0, cap=0.0)

    def delay(self, attempt: int) -> float:
        if self.base <= 0 or self.cap <= 0:
            return 0.0
        ceiling = min(self.cap, self.base * 2.0 ** min(max(attempt, 0), 32))
        return random.uniform(0.0, ceiling)

    async def sleep(self, attempt: int) -> None:
        await asyncio.sleep(self.delay(attempt))


def reconnect_delay(attempt: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (full jitter, capped)."""
    return Backoff(base=base, cap=cap).delay(attempt)


def uid_set(uids: Sequence[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1:3,7,9:10"``: a compact IMAP sequence set of UIDs."""
    ordered = sorted(set(uids))
    if not ordered or ordered[0] < 1:
        raise ValueError(f"need UIDs >= 1, got {list(uids)[:5]}")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in [*ordered[1:], 0]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = uid
    return ",".join(parts)


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- parsing aioimaplib responses -----------------------------------------------------------

_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_EXISTS_RE = re.compile(rb"(?:\* )?(\d+) EXISTS\b")
_UID_RE = re.compile(rb"\bUID (\d+)")
_FLAGS_RE = re.compile(rb"\bFLAGS \(([^)]*)\)")


_SEARCH_RE = re.compile(rb"^(?:\* )?(?:SEARCH)?((?: ?\d+)*) *$")


def _parse_search(lines: Sequence[Any]) -> list[int]:
    """UIDs in a SEARCH response. aioimaplib strips ``* SEARCH`` from the untagged line, so
    it is ``b"1 2 3"`` (or ``b""``); the prefix is accepted too, in case that changes."""
    uids: list[int] = []
    for line in lines[:-1]:  # the last line is the tagged status text
        if isinstance(line, bytes) and (match := _SEARCH_RE.match(line)):
            uids.extend(int(tok) for tok in match.group(1).split())
    return uids


def parse_fetch(lines: Sequence[Any]) -> list[FetchedMail]:
    """Messages in an aioimaplib ``UID FETCH (UID FLAGS BODY.PEEK[])`` response.

    aioimaplib gives each literal (a message body) as a ``bytearray`` item between the line
    that announces it (``1 FETCH (UID 5 FLAGS (\\Seen) BODY[] {N}``) and the line that closes
    it (``)``). Servers differ in where UID and FLAGS go (Dovecot: before the literal; pymap:
    after it), so each is looked for in the line before, then in the line after.
    """
    mails: list[FetchedMail] = []
    for i, item in enumerate(lines):
        if not isinstance(item, bytearray):
            continue
        before = lines[i - 1] if i > 0 and isinstance(lines[i - 1], bytes) else b""
        after = lines[i + 1] if i + 1 < len(lines) and isinstance(lines[i + 1], bytes) else b""
        uid_match = _UID_RE.search(before) or _UID_RE.search(after)
        if uid_match is None:
            raise MailboxProtocolError(f"FETCH item without a UID: {before[:80]!r}")
        flags_match = _FLAGS_RE.search(before) or _FLAGS_RE.search(after)
        flags = (
            frozenset(flags_match.group(1).decode("ascii", "replace").split())
            if (flags_match)
            else frozenset()
        )
        mails.append(FetchedMail(uid=int(uid_match.group(1)), raw=bytes(item), flags=flags))
    return mails


def quote_mailbox(name: str) -> str:
    """A folder name as an IMAP quoted string. Non-ASCII names (modified UTF-7) are refused."""
    if not name.isascii() or any(c in name for c in "\r\n\0"):
        raise ValueError(f"unsupported folder name {name!r} (ASCII only)")
    return aioimaplib.quoted(name)  # type: ignore[no-any-return]


# -- aioimaplib plumbing ------------------------------------------------------------------


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]  # untyped library
    """aioimaplib's protocol, plus two things it does not tell us: EXISTS and a lost link.

    aioimaplib drops untagged ``EXISTS`` that arrive during most commands, so a message that
    arrives just as we search could otherwise go unnoticed until the next one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, None)
        self.exists_event = asyncio.Event()
        self.lost = asyncio.Event()

    def _untagged_response(self, line: bytes) -> Any:
        if _EXISTS_RE.match(line):
            self.exists_event.set()
        return super()._untagged_response(line)

    def _continuation(self, line: bytes) -> None:
        command = self.pending_sync_command
        if command is not None and command.name == "AUTHENTICATE" and self.transport is not None:
            # A refused XOAUTH2 token is answered with a challenge (a JSON error) and the
            # tagged NO only comes after the client's empty reply (Google's XOAUTH2 protocol,
            # RFC 7628 3.2.3). aioimaplib would wait for the NO until its timeout, and a
            # refused token would look like a network problem.
            self.transport.write(b"\r\n")
            return
        super()._continuation(line)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        super().connection_lost(exc)


class _Client(aioimaplib.IMAP4):  # type: ignore[misc]  # untyped library
    """aioimaplib.IMAP4 (or IMAP4_SSL when given a context) using :class:`_Protocol`."""

    def create_client(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop | None,
        conn_lost_cb: Callable[[Exception | None], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop)
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        )


class ImapMailbox:
    """:class:`Mailbox` over one aioimaplib connection; one command at a time.

    ``security``: ``"ssl"`` (implicit TLS, port 993), ``"starttls"`` (port 143, upgraded
    before login; refused if the server does not offer it) or ``"none"``. ``ssl_context``
    defaults to the system trust store. ``xoauth2_token``, when given, is awaited at each
    connect and used for ``AUTHENTICATE XOAUTH2`` instead of LOGIN with ``password``; a
    token the server refuses is handed back to its ``invalidate``.

    After a :class:`MailboxConnectionError` the connection is unusable: ``close()`` it and
    ``connect()`` again (the worker does, with :class:`Backoff`).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str = "",
        security: Security = "ssl",
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        xoauth2_token: TokenProvider | None = None,
    ) -> None:
        if security not in ("ssl", "starttls", "none"):
            raise ValueError(f"security must be ssl, starttls or none, not {security!r}")
        self.host = host
        self.port = port
        self.user = user
        self.security: Security = security
        self.timeout = timeout
        self._password = password
        self._ssl_context = ssl_context
        self._xoauth2_token = xoauth2_token
        self._client: _Client | None = None
        self._folder: str | None = None
        self.message_count: int | None = None  # EXISTS from the last SELECT

    def __repr__(self) -> str:
        return f"ImapMailbox({self.user}@{self.host}:{self.port}, {self.security})"

    # -- connection ---------------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[str]:
        if self._client is None:
            return frozenset()
        return frozenset(str(c).upper() for c in self._client.protocol.capabilities)

    @property
    def has_idle(self) -> bool:
        return "IDLE" in self.capabilities

    @property
    def has_move(self) -> bool:
        return "MOVE" in self.capabilities

    async def connect(self) -> None:
        """Connect, (upgrade to TLS,) log in and learn the capabilities."""
        if self._client is not None:
            await self.close()
        context = self._context() if self.security != "none" else None
        client = _Client(
            host=self.host,
            port=self.port,
            timeout=self.timeout,
            ssl_context=context if self.security == "ssl" else None,
        )
        self._client = client
        try:
            await self._greeting(client)
            if self.security == "starttls":
                assert context is not None
                await self._starttls(client, context)
            await self._login(client)
            await self._call(client.protocol.capability(), "CAPABILITY")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Log out politely (briefly) and close the transport. Safe to call twice."""
        client, self._client = self._client, None
        self._folder = None
        if client is None:
            return
        protocol = client.protocol
        try:
            if not protocol.lost.is_set() and protocol.state in ("AUTH", "SELECTED", "NONAUTH"):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(protocol.logout(), _LOGOUT_TIMEOUT)
        finally:
            transport = protocol.transport
            if transport is not None:
                transport.close()
                # A TLS close waits for the server's close_notify; do not let it outlive us
                # (the socket would be left for the garbage collector).
                try:
                    await asyncio.wait_for(protocol.lost.wait(), _LOGOUT_TIMEOUT)
                except TimeoutError:
                    transport.abort()
            for task in (*client.tasks, *protocol.tasks, client._client_task):
                if not task.done():
                    task.cancel()

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is not None:
            return self._ssl_context
        return ssl.create_default_context()

    async def _greeting(self, client: _Client) -> None:
        try:
            await client.wait_hello_from_server()
        except ssl.SSLCertVerificationError as exc:
            raise MailboxSecurityError(f"{self}: TLS certificate not trusted: {exc}") from exc
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            raise MailboxConnectionError(f"{self}: cannot connect: {_describe(exc)}") from exc

    async def _starttls(self, client: _Client, context: ssl.SSLContext) -> None:
        """STARTTLS, which aioimaplib lacks: send the command, then wrap the transport."""
        protocol = client.protocol
        if "STARTTLS" not in self.capabilities:
            raise MailboxSecurityError(f"{self}: server does not offer STARTTLS")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        response = await self._call(protocol.execute(command), "STARTTLS")
        _check(response, "STARTTLS")
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(protocol.transport, protocol, context, server_hostname=self.host),
                self.timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise MailboxSecurityError(f"{self}: TLS certificate not trusted: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise MailboxConnectionError(f"{self}: STARTTLS failed: {_describe(exc)}") from exc
        # start_tls hands back a new transport; the old one must not be used again.
        protocol.transport = transport
        # Capabilities from before TLS must be forgotten (RFC 3501 6.2.1).
        await self._call(protocol.capability(), "CAPABILITY")

    async def _login(self, client: _Client) -> None:
        token: str | None = None
        if self._xoauth2_token is not None:
            token = await self._xoauth2_token()
            response = await self._call(client.xoauth2(self.user, token), "AUTHENTICATE")
        else:
            response = await self._call(client.login(self.user, self._password), "LOGIN")
        if response.result != "OK":
            text = _last_text(response)
            # Dovecot says NO [UNAVAILABLE] for "Temporary authentication failure".
            if "[UNAVAILABLE]" in text or "TEMPORARY" in text.upper():
                raise MailboxConnectionError(f"{self}: login failed temporarily: {text}")
            if self._xoauth2_token is not None and token is not None:
                # Refused (revoked early, say): fetch a new one at the next connect rather
                # than repeat this one until its expiry.
                self._xoauth2_token.invalidate(token)
            raise MailboxAuthError(f"{self}: login refused: {text}")

    # -- commands -----------------------------------------------------------------------

    def _require(self) -> _Client:
        client = self._client
        if client is None:
            raise MailboxConnectionError(f"{self}: not connected")
        if client.protocol.lost.is_set():
            raise MailboxConnectionError(f"{self}: connection closed by the server")
        return client

    async def _call(
        self,
        awaitable: Awaitable[_T],
        what: str,
        *,
        limit: float | Literal["default"] | None = "default",
    ) -> _T:
        """Await one aioimaplib call, failing fast if the connection drops meanwhile.

        aioimaplib itself would only notice a dropped connection at its command timeout, and
        some of its calls (CAPABILITY, STORE, COPY, MOVE, the IDLE handshake) have none: they
        get ``limit`` (``self.timeout`` by default). FETCH passes ``limit=None`` because its
        own timer restarts with every chunk received, so a large but moving FETCH may take
        longer than ``self.timeout`` in all.
        """
        client = self._require()
        lost = client.protocol.lost
        task = asyncio.ensure_future(awaitable)
        lost_waiter = asyncio.ensure_future(lost.wait())
        try:
            done, _ = await asyncio.wait(
                {task, lost_waiter},
                timeout=self.timeout if limit == "default" else limit,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            lost_waiter.cancel()
            if not task.done():
                task.cancel()
        if task not in done:
            # Keep the command from dangling: wait for its cancellation to land.
            await asyncio.wait({task})
            if lost.is_set():
                raise MailboxConnectionError(f"{self}: connection lost during {what}")
            raise MailboxConnectionError(f"{self}: {what} timed out after {self.timeout}s")
        try:
            return task.result()
        except (TimeoutError, aioimaplib.CommandTimeout) as exc:
            raise MailboxConnectionError(f"{self}: {what} timed out") from exc
        except OSError as exc:
            raise MailboxConnectionError(f"{self}: {what}: {_describe(exc)}") from exc
        except aioimaplib.AioImapException as exc:
            if lost.is_set():
                raise MailboxConnectionError(f"{self}: connection lost during {what}") from exc
            raise MailboxProtocolError(f"{self}: {what}: {_describe(exc)}") from exc

    async def select(self, folder: str) -> int:
        client = self._require()
        response = await self._call(client.select(quote_mailbox(folder)), f"SELECT {folder}")
        _check(response, f"SELECT {folder}")
        uidvalidity: int | None = None
        for line in response.lines:
            if not isinstance(line, bytes):
                continue
            if match := _UIDVALIDITY_RE.search(line):
                uidvalidity = int(match.group(1))
            elif match := _EXISTS_RE.match(line):
                self.message_count = int(match.group(1))
        if uidvalidity is None:
            raise MailboxProtocolError(f"{self}: SELECT {folder} gave no UIDVALIDITY")
        self._folder = folder
        client.protocol.exists_event.clear()
        return uidvalidity

    async def search_after(self, after_uid: int) -> list[int]:
        """UIDs greater than ``after_uid``, ascending (without the ``N:*`` echo)."""
        client = self._require()
        # Cleared before asking: an EXISTS that comes with or after the answer is kept.
        client.protocol.exists_event.clear()
        # Dovecot answers SEARCH from its view as of the end of the previous command, so
        # mail delivered since then would be missed; NOOP brings the view up to date.
        _check(await self._call(client.noop(), "NOOP"), "NOOP")
        response = await self._call(
            client.uid_search("UID", f"{after_uid + 1}:*", charset=None), "UID SEARCH"
        )
        _check(response, "UID SEARCH")
        return sorted({uid for uid in _parse_search(response.lines) if uid > after_uid})

    async def fetch(self, uids: Sequence[int]) -> list[FetchedMail]:
        """These UIDs (``BODY.PEEK[]``: nothing is marked), ascending; expunged ones are
        simply absent."""
        if not uids:
            return []
        client = self._require()
        response = await self._call(
            client.uid("fetch", uid_set(uids), "(UID FLAGS BODY.PEEK[])"),
            "UID FETCH",
            limit=None,
        )
        _check(response, "UID FETCH")
        wanted = set(uids)
        return sorted(
            (m for m in parse_fetch(response.lines) if m.uid in wanted), key=lambda m: m.uid
        )

    async def batches(
        self, after_uid: int, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> AsyncIterator[list[FetchedMail]]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        uids = await self.search_after(after_uid)
        for chunk in _chunks(uids, batch_size):
            mails = await self.fetch(chunk)
            if mails:  # an empty chunk means those messages were expunged meanwhile
                yield mails

    async def mark_seen(self, uids: Sequence[int]) -> None:
        if not uids:
            return
        client = self._require()
        response = await self._call(
            client.uid("store", uid_set(uids), "+FLAGS.SILENT", r"(\Seen)"), "UID STORE"
        )
        _check(response, "UID STORE")

    async def move(self, uids: Sequence[int], folder: str) -> None:
        """UID MOVE to ``folder``; without MOVE, UID COPY only (the original stays: we
        never set ``\\Deleted`` or expunge)."""
        if not uids:
            return
        client = self._require()
        command = "move" if self.has_move else "copy"
        response = await self._call(
            client.uid(command, uid_set(uids), quote_mailbox(folder)), f"UID {command.upper()}"
        )
        _check(response, f"UID {command.upper()} to {folder}")

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - IDLE needs the deadline
        """IDLE until the server announces new mail (True) or ``timeout`` passes (False).

        Without IDLE, sleep ``timeout`` and return True (the caller then polls). The
        timeout is capped at 25 minutes so IDLE is re-issued well within RFC 2177's 29.
        """
        if not self.has_idle:
            await asyncio.sleep(timeout)
            return True
        client = self._require()
        protocol = client.protocol
        if protocol.exists_event.is_set():
            return True  # announced since the last search: no need to idle at all
        timeout = max(0.0, min(timeout, IDLE_MAX_SECONDS))
        idle = await self._call(client.idle_start(timeout=timeout + self.timeout), "IDLE")
        pushed = asyncio.ensure_future(protocol.exists_event.wait())
        lost = asyncio.ensure_future(protocol.lost.wait())
        try:
            await asyncio.wait({pushed, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pushed.cancel()
            lost.cancel()
            await self._end_idle(client, idle)
        return protocol.exists_event.is_set()

    async def _end_idle(self, client: _Client, idle: asyncio.Future[Any]) -> None:
        protocol = client.protocol
        if not protocol.lost.is_set() and not idle.done():
            client.idle_done()
            await asyncio.wait({idle}, timeout=self.timeout)
        # Pushes are read from exists_event; drop aioimaplib's copy so it does not pile up.
        while not protocol.idle_queue.empty():
            protocol.idle_queue.get_nowait()
        if not idle.done():
            idle.cancel()
            await asyncio.wait({idle})
            raise MailboxConnectionError(f"{self}: IDLE did not end after DONE")
        if protocol.lost.is_set():
            raise MailboxConnectionError(f"{self}: connection lost during IDLE")
        if not idle.cancelled() and idle.exception() is None:
            _check(idle.result(), "IDLE")


def _check(response: Any, what: str) -> None:
    if response.result != "OK":
        raise MailboxProtocolError(f"{what} failed: {response.result} {_last_text(response)}")


def _last_text(response: Any) -> str:
    for line in reversed(response.lines):
        if isinstance(line, bytes) and line:
            return line.decode("utf-8", "replace")[:200]
    return ""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def check_imap(settings: Settings) -> str:
    """One line for ``helpdesk check``: connect, log in, select; raise MailboxError if not
    (OAuthTokenError when XOAUTH2 is configured and no token can be had)."""
    mailbox = ImapMailbox(
        host=settings.imap_host,
        port=settings.imap_port_effective,
        user=settings.imap_user,
        password=settings.imap_password.get_secret_value(),
        security=settings.imap_security,
        timeout=settings.imap_timeout,
        xoauth2_token=token_source(settings) if settings.imap_auth == "xoauth2" else None,
    )
    return await describe_mailbox(mailbox, settings.imap_folder)


async def describe_mailbox(mailbox: ImapMailbox, folder: str = "INBOX") -> str:
    """Connect, select ``folder`` and summarise it in one line; always closes."""
    try:
        await mailbox.connect()
        uidvalidity = await mailbox.select(folder)
        return (
            f"{mailbox.user}@{mailbox.host}:{mailbox.port} ({mailbox.security}) {folder}: "
            f"{mailbox.message_count} messages, UIDVALIDITY {uidvalidity}, "
            f"IDLE {'yes' if mailbox.has_idle else 'no'}, "
            f"MOVE {'yes' if mailbox.has_move else 'no'}"
        )
    finally:
        await mailbox.close()
