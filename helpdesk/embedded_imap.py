"""An in-process IMAP server for ``helpdesk demo``, built on pymap's in-memory dict backend.

``EmbeddedImap`` starts pymap inside the running event loop (plain text, loopback only) with
one user, an empty INBOX and a ``Processed`` folder, and stops it cleanly on exit::

    async with EmbeddedImap(user="help@demo.test", password="demo") as imap:
        await imap.append(raw_mail)
        ...  # connect an IMAP client to imap.host / imap.port

Everything lives in memory and is gone when the context manager exits.

How pymap is embedded (pymap 0.36.7):

* The config comes from pymap's own argument parser (``IMAPService.add_arguments`` +
  ``DictBackend.add_subparser``) fed an argv list; a hand-built ``Namespace`` misses fields
  (``tls``, ``inherited_sockets``, ``passlib_cfg`` ...). ``DictBackend.init(args, ...)`` then
  creates the backend and registers its "demo user", which we make *our* user by passing
  ``--demo-user``/``--demo-password``. Without ``--demo-data`` no demo mail is loaded, so
  the INBOX starts empty.
* Overrides passed to ``DictBackend.init``: ``hash_context=Cleartext()`` (the default
  hash is 500,000 PBKDF2 rounds per login, run on a thread pool) and
  ``cpu_subsystem=Subsystem.for_asyncio()`` (the default is a ``ThreadPoolExecutor`` that
  is never shut down). The password never leaves the process.
* ``IMAPService.start`` cannot listen on port 0 and report the chosen port, and it leaves
  open connections running when it stops. So we run pymap's own connection handler
  (``IMAPServer`` behind ``ProxyProtocolReader(...).get_callback``, exactly as
  ``IMAPService.start`` does) on a socket we bind ourselves, and keep track of connection
  tasks so ``__aexit__`` can cancel them (pymap answers ``* BYE [UNAVAILABLE]``).
* Mail is delivered through the backend API (``Identity.new_session()`` →
  ``session.append_messages``), the same call an IMAP APPEND ends in, so IDLE clients are
  woken at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from argparse import ArgumentParser
from contextlib import AsyncExitStack, suppress
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from proxyprotocol.reader import ProxyProtocolReader
from pymap.backend.dict import DictBackend, Identity
from pymap.concurrent import Subsystem
from pymap.imap import IMAPServer, IMAPService
from pymap.parsing.message import AppendMessage
from pysasl.hashing import Cleartext

__all__ = ["PROCESSED_FOLDER", "EmbeddedImap"]

PROCESSED_FOLDER = "Processed"
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_BARE_LF = re.compile(rb"(?<!\r)\n")
_STOP_TIMEOUT = 5.0
_log = logging.getLogger(__name__)


def _quiet_pymap_logs() -> None:
    """pymap logs only for debugging; keep it off stderr (Python's last-resort handler)."""
    logger = logging.getLogger("pymap")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)


def _pymap_args(user: str, password: str) -> Any:
    """Build pymap's config namespace with pymap's own parser (as ``pymap`` ``main`` does)."""
    parser = ArgumentParser(prog="pymap", add_help=False, exit_on_error=False)
    parser.set_defaults(debug=False, passlib_cfg=None, skip_services=[])
    subparsers = parser.add_subparsers(dest="backend", required=True)
    DictBackend.add_subparser("dict", subparsers)
    IMAPService.add_arguments(parser)
    # --host/--port are unused (we listen on our own socket) but must parse; no --demo-data
    # means an empty INBOX.
    argv = ["--host", "127.0.0.1", "--port", "0", "--no-tls", "dict"]
    argv += ["--demo-user", user, "--demo-password", password]
    return parser.parse_args(argv)


class EmbeddedImap:
    """pymap's in-memory IMAP server, running in the current event loop.

    ``port=0`` picks a free port; the bound port is in ``.port`` after ``__aenter__``.
    Plain text only (no TLS, LOGIN/AUTHENTICATE PLAIN allowed), loopback only.
    """

    def __init__(
        self,
        *,
        user: str = "help@demo.test",
        password: str = "demo",  # noqa: S107 - demo-only, in-process server
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if host not in _LOOPBACK:
            raise ValueError(f"EmbeddedImap listens on loopback only, not {host!r}")
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self._stack: AsyncExitStack | None = None
        self._backend: Any = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> EmbeddedImap:
        if self._stack is not None:
            raise RuntimeError("EmbeddedImap is already running")
        _quiet_pymap_logs()
        try:
            await self._start()
        except BaseException:
            self._backend = None
            raise
        return self

    async def _start(self) -> None:
        async with AsyncExitStack() as stack:
            backend, config = await DictBackend.init(
                _pymap_args(self.user, self.password),
                hash_context=Cleartext(),
                cpu_subsystem=Subsystem.for_asyncio(),
            )
            self._backend = backend
            await backend.start(stack)
            await self.create_folder(PROCESSED_FOLDER)

            imap_server = IMAPServer(backend.login, config)

            async def serve(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: Any
            ) -> None:
                task = asyncio.current_task()
                if task is not None:
                    self._connections.add(task)
                try:
                    await imap_server(reader, writer, info)
                except Exception:  # a pymap bug: log it instead of "exception never retrieved"
                    _log.exception("embedded IMAP connection failed")
                finally:
                    if task is not None:
                        self._connections.discard(task)

            callback = ProxyProtocolReader(config.proxy_protocol).get_callback(serve)
            sock = self._bind()
            try:
                self._server = await asyncio.start_server(callback, sock=sock)
            except BaseException:
                sock.close()
                raise
            stack.push_async_callback(self._stop_server)
            self.port = int(sock.getsockname()[1])
            self._stack = stack.pop_all()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._backend = None
        if stack is not None:
            await stack.aclose()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(100)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()  # stop accepting; open connections keep running until cancelled
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)
        await server.wait_closed()
        # Let the transports closed by pymap's handlers finish closing.
        await asyncio.sleep(0)

    def _identity(self) -> Any:
        if self._backend is None:
            raise RuntimeError("EmbeddedImap is not running (use 'async with')")
        return Identity(self.user, self._backend.login, None, frozenset())

    async def append(self, raw: bytes, folder: str = "INBOX") -> None:
        """Deliver one mail to ``folder``, flagged \\Recent and unseen.

        Bare LF line endings are stored as CRLF, as Dovecot does. A missing folder raises
        pymap's ``MailboxNotFound`` (use :meth:`create_folder` first).
        """
        literal = _BARE_LF.sub(b"\r\n", raw)
        message = AppendMessage(literal, datetime.now(UTC), frozenset())
        async with self._identity().new_session() as session:
            await session.append_messages(folder, [message])

    async def create_folder(self, name: str) -> None:
        """Create a folder; a folder that already exists is left as it is."""
        if name.upper() == "INBOX":
            return  # always there (the dict backend would add a second, shadowed one)
        async with self._identity().new_session() as session:
            with suppress(ValueError):  # pymap's "already exists"
                await session.mailbox_set.add_mailbox(name)
