"""OAuth2 access tokens for XOAUTH2 logins (Gmail and Microsoft 365 have turned basic auth off).

helpdesk does not run an OAuth flow itself: an operator's tool (e.g. a small script around
the provider's SDK, or a sidecar that keeps a file fresh) hands us an access token, either
as the output of ``HELPDESK_OAUTH_TOKEN_COMMAND`` or the content of
``HELPDESK_OAUTH_TOKEN_FILE``. Either may be the bare token or JSON with ``access_token``
and ``expires_in`` (seconds).

Invariants: a token is reused until ``refresh_margin`` seconds before it expires (a token
without ``expires_in`` is assumed to live 50 minutes), then fetched again; a failure raises
``OAuthTokenError`` with a one-line reason, is remembered in ``last_error`` for the health
signals, and is retried on the next call. A token the server refuses is dropped at once
(``invalidate``), so the next login runs the command / reads the file again instead of
repeating the refused token until it expires. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from helpdesk.errors import HelpdeskError

if TYPE_CHECKING:
    from helpdesk.config import Settings

DEFAULT_LIFETIME = 50 * 60


class OAuthTokenError(HelpdeskError):
    """No usable access token could be obtained."""


def parse_token(output: str) -> tuple[str, float | None]:
    """``(token, expires_in)`` from a bare token or a JSON object. Pure."""
    text = output.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OAuthTokenError(f"token JSON is invalid: {exc.msg}") from None
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise OAuthTokenError("token JSON has no access_token")
        expires = data.get("expires_in")
        return token.strip(), float(expires) if isinstance(expires, int | float) else None
    if not text or any(c.isspace() for c in text):
        raise OAuthTokenError("token source gave no token (empty or several words)")
    return text, None


class TokenProvider(Protocol):
    """What an XOAUTH2 login needs: a token now, and a way to say the server refused it."""

    async def __call__(self) -> str: ...

    def invalidate(self, token: str) -> None: ...


class TokenSource:
    """An async callable giving a fresh access token (see the module docstring)."""

    def __init__(
        self,
        *,
        command: str = "",
        file: str = "",
        refresh_margin: float = 300.0,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if bool(command) == bool(file):
            raise OAuthTokenError(
                "set exactly one of HELPDESK_OAUTH_TOKEN_COMMAND or HELPDESK_OAUTH_TOKEN_FILE"
            )
        self.command, self.file = command, file
        self.refresh_margin, self.timeout, self.clock = refresh_margin, timeout, clock
        self._token: str | None = None
        self._valid_until = 0.0
        self._file_mtime: float | None = None
        self._lock = asyncio.Lock()
        self.last_error: str | None = None
        self.refreshed_at: float | None = None

    async def __call__(self) -> str:
        async with self._lock:
            if (
                self._token is not None
                and self.clock() < self._valid_until
                and not self._file_changed()
            ):
                return self._token
            try:
                output = await (self._run_command() if self.command else self._read_file())
                token, expires_in = parse_token(output)
            except OAuthTokenError as exc:
                self.last_error = str(exc)
                raise
            lifetime = expires_in if expires_in is not None else DEFAULT_LIFETIME
            self._token = token
            self._valid_until = self.clock() + max(lifetime - self.refresh_margin, 30.0)
            self.refreshed_at = self.clock()
            self.last_error = None
            return token

    def invalidate(self, token: str) -> None:
        """Forget ``token`` if it is still the cached one: a server refused it.

        Only that token: when another login has fetched a new one meanwhile, a late
        refusal of the old one must not throw the new one away.
        """
        if token == self._token:  # no await, so no lock: a fetch under way still lands
            self._token = None
            self._valid_until = 0.0

    def _file_changed(self) -> bool:
        if not self.file:
            return False
        try:
            return Path(self.file).stat().st_mtime != self._file_mtime
        except OSError:
            return True

    async def _read_file(self) -> str:
        return await asyncio.to_thread(self._read_file_sync)

    def _read_file_sync(self) -> str:
        path = Path(self.file)
        try:
            self._file_mtime = path.stat().st_mtime
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise OAuthTokenError(f"cannot read token file {path}: {exc.strerror}") from None

    async def _run_command(self) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *shlex.split(self.command),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise OAuthTokenError(f"cannot run token command: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise OAuthTokenError(f"token command timed out after {self.timeout:g} s") from None
        if proc.returncode != 0:
            detail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            raise OAuthTokenError(f"token command exited {proc.returncode}: {detail[0][:200]}")
        return out.decode("utf-8", "replace")


def token_source(settings: Settings) -> TokenSource | None:
    """The token source when any login uses XOAUTH2 (one for all: they share the token)."""
    if "xoauth2" not in (settings.imap_auth, settings.smtp_auth):
        return None
    return TokenSource(command=settings.oauth_token_command, file=settings.oauth_token_file)
