"""Administration (role admin only): staff users, the on-call rota, canned replies, health."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from helpdesk import desk, oncall, users
from helpdesk.errors import HelpdeskError, InvalidInputError, NotFoundError
from helpdesk.models import utcnow
from helpdesk.web.render import render
from helpdesk.web.security import AdminUser, DbSession, flash, require_admin

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _back(request: Request, path: str, text: str, kind: str = "ok") -> Response:
    flash(request, text, kind)
    return RedirectResponse(path, status_code=303)


@router.get("")
async def admin_home() -> Response:
    return RedirectResponse("/admin/health", status_code=303)


# --- staff users -----------------------------------------------------------------------------


@router.get("/users")
async def users_page(request: Request, session: DbSession, user: AdminUser) -> Response:
    return render(request, "admin_users.html", user=user, staff=await users.list_users(session))


@router.post("/users")
async def add_user(
    request: Request,
    session: DbSession,
    user: AdminUser,
    email: Annotated[str, Form(max_length=320)] = "",
    name: Annotated[str, Form(max_length=200)] = "",
    role: Annotated[str, Form()] = "agent",
    password: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    try:
        added = await users.add_user(session, email=email, role=role, password=password, name=name)
    except InvalidInputError as exc:
        return _back(request, "/admin/users", str(exc), "error")
    desk.audit_admin(
        session, actor=user, action="user-add", detail=f"{added.email} ({added.role})", now=utcnow()
    )
    await session.commit()
    return _back(request, "/admin/users", f"Added {added.email}.")


@router.post("/users/{user_id}/active")
async def set_active(
    request: Request,
    user_id: int,
    session: DbSession,
    user: AdminUser,
    active: Annotated[str, Form()] = "0",
) -> Response:
    if user_id == user.id:
        return _back(request, "/admin/users", "You cannot deactivate yourself.", "error")
    try:
        changed = await users.set_active(session, user_id=user_id, active=active == "1")
    except NotFoundError as exc:
        return _back(request, "/admin/users", str(exc), "error")
    action = "user-activate" if changed.active else "user-deactivate"
    desk.audit_admin(session, actor=user, action=action, detail=changed.email, now=utcnow())
    await session.commit()
    state = "reactivated" if changed.active else "deactivated"
    return _back(request, "/admin/users", f"{changed.email} {state}.")


@router.post("/users/{user_id}/password")
async def reset_password(
    request: Request,
    user_id: int,
    session: DbSession,
    user: AdminUser,
    password: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    try:
        changed = await users.set_password(session, user_id=user_id, password=password)
    except (InvalidInputError, NotFoundError) as exc:
        return _back(request, "/admin/users", str(exc), "error")
    desk.audit_admin(
        session, actor=user, action="user-password", detail=changed.email, now=utcnow()
    )
    await session.commit()
    return _back(
        request, "/admin/users", f"Password of {changed.email} reset; their sessions ended."
    )


# --- on-call rota ----------------------------------------------------------------------------


@router.get("/oncall")
async def oncall_page(request: Request, session: DbSession, user: AdminUser) -> Response:
    members = await oncall.list_members(session)
    return render(request, "admin_oncall.html", user=user, members=members)


@router.post("/oncall")
async def add_member(
    request: Request,
    session: DbSession,
    user: AdminUser,
    email: Annotated[str, Form(max_length=320)] = "",
    name: Annotated[str, Form(max_length=200)] = "",
    level: Annotated[int, Form(ge=1, le=9)] = 1,
    phone: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    try:
        member = await oncall.add_member(session, email=email, level=level, name=name, phone=phone)
    except InvalidInputError as exc:
        return _back(request, "/admin/oncall", str(exc), "error")
    desk.audit_admin(
        session,
        actor=user,
        action="oncall-add",
        detail=f"{member.email} level {level}",
        now=utcnow(),
    )
    await session.commit()
    return _back(request, "/admin/oncall", f"{member.email} is on call at level {level}.")


@router.post("/oncall/remove")
async def remove_member(
    request: Request,
    session: DbSession,
    user: AdminUser,
    email: Annotated[str, Form(max_length=320)] = "",
) -> Response:
    try:
        await oncall.remove_member(session, email=email)
    except NotFoundError as exc:
        return _back(request, "/admin/oncall", str(exc), "error")
    desk.audit_admin(session, actor=user, action="oncall-remove", detail=email, now=utcnow())
    await session.commit()
    return _back(request, "/admin/oncall", f"{email} removed from the rota.")


# --- canned replies --------------------------------------------------------------------------


@router.get("/canned")
async def canned_page(request: Request, session: DbSession, user: AdminUser) -> Response:
    return render(request, "admin_canned.html", user=user, canned=await desk.list_canned(session))


@router.post("/canned")
async def save_canned(
    request: Request,
    session: DbSession,
    user: AdminUser,
    title: Annotated[str, Form(max_length=200)] = "",
    body: Annotated[str, Form(max_length=desk.MAX_BODY_CHARS)] = "",
    canned_id: Annotated[int | None, Form()] = None,
) -> Response:
    try:
        saved = await desk.save_canned(
            session, canned_id=canned_id, title=title, body=body, actor=user, now=utcnow()
        )
    except (InvalidInputError, NotFoundError) as exc:
        return _back(request, "/admin/canned", str(exc), "error")
    await session.commit()
    return _back(request, "/admin/canned", f"Saved “{saved.title}”.")


@router.post("/canned/{canned_id}/delete")
async def delete_canned(
    request: Request, canned_id: int, session: DbSession, user: AdminUser
) -> Response:
    try:
        await desk.delete_canned(session, canned_id=canned_id, actor=user, now=utcnow())
    except NotFoundError as exc:
        return _back(request, "/admin/canned", str(exc), "error")
    await session.commit()
    return _back(request, "/admin/canned", "Canned reply deleted.")


# --- health ----------------------------------------------------------------------------------


@router.get("/health")
async def health_page(request: Request, session: DbSession, user: AdminUser) -> Response:
    return render(request, "admin_health.html", user=user, health=await desk.health(session))


@router.post("/rejected/{rejected_id}/retry")
async def retry_rejected(
    request: Request, rejected_id: int, session: DbSession, user: AdminUser
) -> Response:
    from helpdesk import pipeline

    try:
        outcome = await pipeline.retry_rejected(
            sessions=request.app.state.sessions,
            rejected_id=rejected_id,
            settings=request.app.state.settings,
        )
    except HelpdeskError as exc:
        return _back(request, "/admin/health", f"Retry failed: {exc}", "error")
    desk.audit_admin(
        session,
        actor=user,
        action="rejected-retry",
        detail=f"rejected mail {rejected_id}: {outcome.action} {outcome.reference or ''}",
        now=utcnow(),
    )
    await session.commit()
    return _back(
        request,
        "/admin/health",
        f"Rejected mail {rejected_id}: {outcome.action} {outcome.reference or ''}.",
    )
