"""A real SMTP receiver for tests, the demo and benchmarks (aiosmtpd in a thread).

It accepts mail on 127.0.0.1, records every accepted message, and can be told to fail:
``fail_next(n, code)`` answers the next ``n`` messages with ``code`` at DATA,
``set_mode("tempfail")`` answers every message with 451, ``reject_recipients({...})``
refuses chosen recipients at RCPT, and ``stop()``/``start()`` take the server away and bring
it back on the same port. ``connections`` counts SMTP sessions (each EHLO/HELO'd
connection once), so a test can check that a sender reuses its connection. With
``xoauth2=(user, token)`` it also offers ``AUTH XOAUTH2`` and accepts exactly that user and
access token; ``logins`` lists every AUTH attempt as ``(mechanism, user, accepted)``.

Thread-safety: the server runs in its own thread; everything shared is behind one lock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

Mode = Literal["ok", "tempfail"]
Tls = Literal["none", "ssl", "starttls"]


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    received_at: float  # time.monotonic()

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=policy.default)

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"] or "")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throwaway certificate and key for ``host`` (an IP address), made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is needed to make a test certificate")
    subprocess.run(  # noqa: S603 - fixed arguments, a test helper
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={host}",
         "-addext", f"subjectAltName=IP:{host}"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: list[ReceivedMessage] = field(default_factory=list)
    connections: int = 0
    fail_next: int = 0
    fail_code: int = 451
    fail_text: str = "4.3.0 try again later"
    mode: Mode = "ok"
    rejected: dict[str, tuple[int, str]] = field(default_factory=dict)
    xoauth2: tuple[str, str] | None = None  # the (user, access token) AUTH XOAUTH2 accepts
    logins: list[tuple[str, str, bool]] = field(default_factory=list)


def parse_xoauth2(blob: bytes) -> tuple[str, str] | None:
    """``(user, token)`` from a decoded XOAUTH2 response, None when it is malformed.

    The format (Google's XOAUTH2 protocol): ``user=USER ^A auth=Bearer TOKEN ^A ^A``.
    """
    parts = blob.split(b"\x01")
    if len(parts) != 4 or parts[2:] != [b"", b""]:
        return None
    user, auth = parts[0], parts[1]
    if not user.startswith(b"user=") or not auth.startswith(b"auth=Bearer "):
        return None
    return user[5:].decode("utf-8", "replace"), auth[12:].decode("utf-8", "replace")


class _Handler:
    """aiosmtpd hooks; runs in the server's thread."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def _count(self, session: Any) -> None:
        if not getattr(session, "_hd_counted", False):
            session._hd_counted = True
            with self.state.lock:
                self.state.connections += 1

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self._count(session)
        return responses

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        self._count(session)
        return f"250 {server.hostname}"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self.state.lock:
            rejected = self.state.rejected.get(address.lower())
        if rejected:
            return f"{rejected[0]} {rejected[1]}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.state.lock:
            if self.state.mode == "tempfail":
                return "451 4.3.0 temporarily unavailable"
            if self.state.fail_next > 0:
                self.state.fail_next -= 1
                return f"{self.state.fail_code} {self.state.fail_text}"
            raw = envelope.original_content or envelope.content
            self.state.messages.append(
                ReceivedMessage(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    raw=bytes(raw),
                    received_at=time.monotonic(),
                )
            )
        return "250 2.0.0 OK"


class _OAuthHandler(_Handler):
    """Adds AUTH XOAUTH2: aiosmtpd offers every ``auth_<MECHANISM>`` method of a handler."""

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 2:  # the usual initial response: AUTH XOAUTH2 <base64>
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            answer = await server.challenge_auth("")
            if answer is MISSING:  # challenge_auth has answered already
                return AuthResult(success=False, handled=True)
            blob = answer
        credentials = parse_xoauth2(blob)
        with self.state.lock:
            ok = credentials is not None and credentials == self.state.xoauth2
            self.state.logins.append(("XOAUTH2", credentials[0] if credentials else "", ok))
        if ok:
            return AuthResult(success=True, auth_data=credentials)
        # As Gmail does: the error as a challenge, the 535 only after the client's empty reply.
        error = {"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"}
        if await server.challenge_auth(json.dumps(error)) is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False)  # aiosmtpd answers 535


class _ImplicitTlsSMTP(SMTP):
    """aiosmtpd only knows about TLS it negotiated itself (STARTTLS); with implicit TLS it
    would refuse to offer AUTH over a connection that is in fact encrypted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if transport.get_extra_info("sslcontext") is not None:
            self._tls_protocol = transport  # type: ignore[assignment]  # only tested for truth


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _ImplicitTlsSMTP(self.handler, **self.SMTP_kwargs)


class SmtpReceiver:
    """``with SmtpReceiver() as smtp: ... smtp.port ... await smtp.wait_for(3)``.

    ``tls="ssl"`` (implicit TLS) or ``"starttls"`` serve a throwaway self-signed certificate;
    clients trust it through :meth:`client_ssl_context`. ``auth=(user, password)`` requires
    that login over TLS; with ``tls="none"`` it is offered and checked, but not required.
    ``xoauth2=(user, token)`` does the same for AUTH XOAUTH2 with that access token.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: Tls = "none",
        auth: tuple[str, str] | None = None,
        xoauth2: tuple[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls
        self.auth = auth
        self.xoauth2 = xoauth2
        self._state = _State(xoauth2=xoauth2)
        self._controller: _Controller | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server_ctx: ssl.SSLContext | None = None
        self.cert_file: Path | None = None
        if tls != "none":
            self._tmp = tempfile.TemporaryDirectory(prefix="hd-smtp-")
            self.cert_file, key = self_signed_cert(Path(self._tmp.name), host)
            self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._server_ctx.load_cert_chain(self.cert_file, key)

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this receiver's certificate."""
        if self.cert_file is None:
            raise RuntimeError("this receiver does not use TLS")
        return ssl.create_default_context(cafile=str(self.cert_file))

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            self.auth is not None
            and isinstance(data, LoginPassword)
            and (data.login.decode(), data.password.decode()) == self.auth
        )
        login = data.login.decode(errors="replace") if isinstance(data, LoginPassword) else ""
        with self._state.lock:
            self._state.logins.append((mechanism, login, ok))
        # handled=False: aiosmtpd answers the failure (535) itself
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    # lifecycle
    def start(self) -> None:
        """Start serving (again) on the same port."""
        if self._controller is not None:
            return
        kwargs: dict[str, Any] = {}
        if self.tls == "ssl":
            kwargs["ssl_context"] = self._server_ctx
        elif self.tls == "starttls":
            kwargs.update(tls_context=self._server_ctx, require_starttls=True)
        if self.auth is not None or self.xoauth2 is not None:
            kwargs.update(
                authenticator=self._authenticate,
                # without TLS, aiosmtpd warns when AUTH is required: offer it, don't enforce it
                auth_required=self.tls != "none",
                auth_require_tls=self.tls != "none",
            )
        handler = (_OAuthHandler if self.xoauth2 is not None else _Handler)(self._state)
        controller = _Controller(
            handler, hostname=self.host, port=self.port, ready_timeout=5.0, **kwargs
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop serving; open connections are cut. ``start()`` brings it back."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop, and remove the throwaway certificate."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # what arrived
    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._state.lock:
            return list(self._state.messages)

    @property
    def connections(self) -> int:
        with self._state.lock:
            return self._state.connections

    @property
    def logins(self) -> list[tuple[str, str, bool]]:
        """Every AUTH attempt so far: ``(mechanism, user, accepted)``."""
        with self._state.lock:
            return list(self._state.logins)

    def clear(self) -> None:
        with self._state.lock:
            self._state.messages.clear()
            self._state.connections = 0
            self._state.logins.clear()

    async def wait_for(
        self,
        count: int,
        timeout: float = 5.0,  # noqa: ASYNC109 - a polling test helper; the timeout is its API
    ) -> list[ReceivedMessage]:
        """The messages once at least ``count`` have arrived; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(messages)} of {count} messages after {timeout}s")
            await asyncio.sleep(0.01)

    def wait_for_sync(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(messages)} of {count} messages after {timeout}s")
            time.sleep(0.01)

    # faults
    def fail_next(self, n: int, code: int = 451, text: str = "") -> None:
        """Answer the next ``n`` messages with ``code`` at the end of DATA."""
        with self._state.lock:
            self._state.fail_next = n
            self._state.fail_code = code
            self._state.fail_text = text or (
                "4.3.0 try again later" if code < 500 else "5.7.1 message refused"
            )

    def reject_recipients(self, rejected: Mapping[str, tuple[int, str]]) -> None:
        """Refuse these recipients at RCPT, e.g. ``{"x@example.org": (550, "no such user")}``."""
        with self._state.lock:
            self._state.rejected = {addr.lower(): reply for addr, reply in rejected.items()}

    def set_mode(self, mode: Mode) -> None:
        if mode not in ("ok", "tempfail"):
            raise ValueError(f"mode must be 'ok' or 'tempfail', not {mode!r}")
        with self._state.lock:
            self._state.mode = mode
