"""Sessions, CSRF, login rate limit, safe redirects and security headers for the staff UI.

Invariants:
- the session is a signed cookie (Starlette ``SessionMiddleware``: itsdangerous, HttpOnly,
  SameSite=Lax, Secure when ``base_url`` is https), so any web process can serve any
  request; it carries the user id, a random nonce, the CSRF token and a fingerprint of the
  password hash; login *replaces* the whole session (new nonce, new CSRF token), so a
  cookie planted before login is worth nothing after it;
- a session is honoured only while its user is active and its password unchanged;
- every POST carries the session's CSRF token (form field ``csrf_token`` or header
  ``X-CSRF-Token``) or is refused with 403 before the route runs;
- failed logins are counted per account and client address in ``audit_log`` (action
  ``login-failed``), so the limit holds across web processes;
- ``next`` after login is only ever a local path.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from fastapi import Depends, HTTPException, Request
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helpdesk.models import AuditLog, StaffUser
from helpdesk.users import password_version

SESSION_COOKIE = "helpdesk_session"
SESSION_MAX_AGE = 12 * 3600
LOGIN_LIMIT = 5
LOGIN_WINDOW = timedelta(minutes=15)

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
]


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response (pages, errors, files, redirects)."""

    def __init__(self, app: ASGIApp, *, hsts: bool = False) -> None:
        self.app = app
        self.headers = list(SECURITY_HEADERS)
        if hsts:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- sessions --------------------------------------------------------------------------------


def csrf_token(request: Request) -> str:
    """This session's CSRF token, created on first use."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def start_session(request: Request, user: StaffUser) -> None:
    """Replace the session entirely: no value from before the login survives."""
    request.session.clear()
    request.session.update(
        {
            "uid": user.id,
            "nonce": secrets.token_urlsafe(16),
            "csrf": secrets.token_urlsafe(32),
            "pwv": password_version(user),
        }
    )


def end_session(request: Request) -> None:
    request.session.clear()


def flash(request: Request, text: str, kind: str = "ok") -> None:
    messages = list(request.session.get("flash", []))[-4:]
    messages.append([kind, text[:300]])
    request.session["flash"] = messages


def pop_flashes(request: Request) -> list[tuple[str, str]]:
    messages = request.session.pop("flash", [])
    return [(str(k), str(t)) for k, t in messages] if isinstance(messages, list) else []


async def check_csrf(request: Request) -> None:
    """Dependency on every route: a POST without this session's token is refused (403)."""
    if request.method in {"GET", "HEAD", "OPTIONS"}:
        return
    expected = request.session.get("csrf")
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get("csrf_token")
            sent = value if isinstance(value, str) else None
    if not isinstance(expected, str) or not sent or not hmac.compare_digest(expected, sent):
        raise HTTPException(status_code=403, detail="Missing or invalid CSRF token")


class LoginRequired(Exception):
    """Raised by ``current_user`` for an anonymous request; the app turns it into a redirect."""


async def get_session(request: Request) -> Any:
    async with request.app.state.sessions() as session:
        yield session


DbSession = Annotated[AsyncSession, Depends(get_session)]


async def current_user(request: Request, session: DbSession) -> StaffUser:
    uid = request.session.get("uid")
    if not isinstance(uid, int):
        raise LoginRequired
    user = await session.get(StaffUser, uid)
    if user is None or not user.active or request.session.get("pwv") != password_version(user):
        request.session.clear()
        raise LoginRequired
    return user


async def require_admin(user: Annotated[StaffUser, Depends(current_user)]) -> StaffUser:
    if user.role != "admin":
        raise HTTPException(status_code=403, detail="Administrators only")
    return user


CurrentUser = Annotated[StaffUser, Depends(current_user)]
AdminUser = Annotated[StaffUser, Depends(require_admin)]


def safe_next(value: str | None, default: str = "/") -> str:
    """``value`` when it is a path on this site, else ``default`` (no open redirect)."""
    if not value or len(value) > 2000:
        return default
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


# --- login rate limit ------------------------------------------------------------------------


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _attempt_key(ip: str) -> str:
    return f"ip={ip}"[:1000]


async def login_blocked(session: AsyncSession, *, email: str, ip: str, now: datetime) -> bool:
    """Whether this account has had too many failed logins from this address lately."""
    row = await session.exec(
        select(sa.func.count())
        .select_from(AuditLog)
        .where(
            col(AuditLog.action) == "login-failed",
            col(AuditLog.actor) == email.strip().lower()[:320],
            col(AuditLog.detail) == _attempt_key(ip),
            col(AuditLog.created_at) >= now - LOGIN_WINDOW,
        )
    )
    return int(row.one()) >= LOGIN_LIMIT


def record_login_failure(session: AsyncSession, *, email: str, ip: str, now: datetime) -> None:
    session.add(
        AuditLog(
            actor=email.strip().lower()[:320],
            action="login-failed",
            detail=_attempt_key(ip),
            created_at=now,
        )
    )
