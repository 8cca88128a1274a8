"""A stand-in OAuth2 token introspection endpoint (RFC 7662) for tests of XOAUTH2 logins.

Dovecot's ``oauth2`` passdb (``introspection_mode = post``) POSTs ``token=…`` here and reads
``{"active": true, "username": …}`` back; an unknown or revoked token gets
``{"active": false}``. It runs ``http.server`` in a thread on 127.0.0.1 and a free port.

Thread-safety: the server runs in its own thread; the grants are behind one lock. Nothing is
logged (the request line and body would carry the token).
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

_MAX_BODY = 64 * 1024


class IntrospectionServer:
    """``with IntrospectionServer() as idp: idp.grant(token, user) … idp.url``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._lock = threading.Lock()
        self._grants: dict[str, str] = {}
        self._asked: list[str] = []
        self._server = ThreadingHTTPServer((host, 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}/introspect"

    def grant(self, token: str, username: str) -> None:
        """Answer ``token`` as active, belonging to ``username``."""
        with self._lock:
            self._grants[token] = username

    def revoke(self, token: str) -> None:
        with self._lock:
            self._grants.pop(token, None)

    @property
    def asked(self) -> list[str]:
        """The tokens introspected so far, in order (what the mail server was shown)."""
        with self._lock:
            return list(self._asked)

    def answer(self, token: str) -> dict[str, object]:
        with self._lock:
            self._asked.append(token)
            user = self._grants.get(token)
        return {"active": False} if user is None else {"active": True, "username": user}

    # lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="introspection", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._server.shutdown()
            thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _handler_for(owner: IntrospectionServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = min(int(self.headers.get("Content-Length") or 0), _MAX_BODY)
            form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            body = json.dumps(owner.answer(form.get("token", [""])[0])).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler
