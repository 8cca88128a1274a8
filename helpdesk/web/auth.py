"""Login, logout and the one-click acknowledge link from an escalation notice."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from helpdesk import desk, users
from helpdesk.errors import ConfigError, NotFoundError
from helpdesk.models import utcnow
from helpdesk.web.render import render
from helpdesk.web.security import (
    CurrentUser,
    DbSession,
    client_ip,
    end_session,
    flash,
    login_blocked,
    record_login_failure,
    safe_next,
    start_session,
)

router = APIRouter()


@router.get("/login")
async def login_page(request: Request, next: str = "/") -> Response:
    if isinstance(request.session.get("uid"), int):
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", next=safe_next(next), email="", error=None)


@router.post("/login")
async def login(
    request: Request,
    session: DbSession,
    email: Annotated[str, Form(max_length=320)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    now = utcnow()
    target = safe_next(next)
    ip = client_ip(request)
    if await login_blocked(session, email=email, ip=ip, now=now):
        return render(
            request,
            "login.html",
            status_code=429,
            next=target,
            email=email,
            error="Too many failed attempts. Wait 15 minutes and try again.",
        )
    user = await users.authenticate(session, email=email, password=password)
    if user is None:
        record_login_failure(session, email=email, ip=ip, now=now)
        await session.commit()
        return render(
            request,
            "login.html",
            status_code=401,
            next=target,
            email=email,
            error="Wrong e-mail address or password.",
        )
    await session.commit()
    start_session(request, user)
    return RedirectResponse(target, status_code=303)


@router.post("/logout")
async def logout(request: Request) -> Response:
    end_session(request)
    return RedirectResponse("/login", status_code=303)


@router.get("/ack/{token}")
async def ack_link(request: Request, token: str, session: DbSession, user: CurrentUser) -> Response:
    """Verify the signed link, acknowledge its escalation as the signed-in user, show the ticket."""
    from helpdesk import escalation

    settings = request.app.state.settings
    now = utcnow()
    try:
        claim = escalation.verify_ack_token(
            settings.secret_key.get_secret_value(),
            token,
            now,
            timedelta(hours=settings.escalation_token_hours),
        )
        ticket = await desk.ticket_for_escalation(session, escalation_id=claim.escalation_id)
    except (escalation.InvalidTokenError, NotFoundError, ConfigError) as exc:
        return render(
            request,
            "error.html",
            user=user,
            status_code=400,
            title="This acknowledge link does not work",
            detail=f"{exc}. Open the ticket from the queue and press Acknowledge there.",
        )
    assert ticket.reference is not None
    await desk.acknowledge(session, reference=ticket.reference, actor=user, now=now)
    await session.commit()
    flash(request, f"Escalation of {ticket.reference} acknowledged — paging stopped.")
    return RedirectResponse(f"/tickets/{quote(ticket.reference)}", status_code=303)
