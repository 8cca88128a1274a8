"""The desk: queue, search, a ticket and what staff do to it (reply, note, assign, status)."""

from __future__ import annotations

import re
import unicodedata
from datetime import timedelta
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response

from helpdesk import desk
from helpdesk.errors import InvalidInputError, NotFoundError
from helpdesk.models import TICKET_STATUSES, utcnow
from helpdesk.web.render import render
from helpdesk.web.security import CurrentUser, DbSession, flash

router = APIRouter()

# Types a browser would render or run rather than save: always served as a download of bytes.
_ACTIVE_TYPES = re.compile(
    r"html|xml|svg|javascript|ecmascript|x-sh|x-shellscript|pdf|flash|x-msdownload|wasm|css",
    re.I,
)
_SAFE_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$", re.I)


def _ticket_url(reference: str) -> str:
    return f"/tickets/{quote(reference)}"


@router.get("/")
async def queue_page(
    request: Request,
    session: DbSession,
    user: CurrentUser,
    status: str = "active",
    assignee: str = "anyone",
    overdue: bool = False,
    crisis: bool = False,
    sort: str = "received",
    after: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    assert user.id is not None
    filt = desk.QueueFilter.parse(
        status=status, assignee=assignee, overdue=overdue, crisis=crisis, sort=sort
    )
    page = await desk.queue(session, filt=filt, me_id=user.id, now=utcnow(), cursor=after)
    params = {
        "status": filt.status if filt.status != "active" else None,
        "assignee": filt.assignee if filt.assignee != "anyone" else None,
        "overdue": "1" if filt.overdue else None,
        "crisis": "1" if filt.crisis else None,
        "sort": filt.sort if filt.sort != "received" else None,
    }
    return render(
        request,
        "queue.html",
        user=user,
        page=page,
        filt=filt,
        params=params,
        after=after,
        statuses=desk.STATUS_FILTERS,
    )


@router.get("/search")
async def search_page(
    request: Request,
    session: DbSession,
    user: CurrentUser,
    q: Annotated[str, Query(max_length=200)] = "",
) -> Response:
    rows = await desk.search(session, q=q, now=utcnow()) if q.strip() else []
    return render(request, "search.html", user=user, q=q, rows=rows)


@router.get("/tickets/{reference}")
async def ticket_page(
    request: Request,
    reference: str,
    session: DbSession,
    user: CurrentUser,
    canned: int | None = None,
) -> Response:
    try:
        view = await desk.ticket_view(session, reference=reference, now=utcnow())
    except NotFoundError:
        raise HTTPException(status_code=404, detail="No such ticket") from None
    draft = ""
    if canned is not None:
        draft = next((c.body for c in view.canned if c.id == canned), "")
    return render(
        request,
        "ticket.html",
        user=user,
        view=view,
        t=view.ticket,
        draft=draft,
        statuses=TICKET_STATUSES,
    )


async def _act(request: Request, reference: str, action: str, session: DbSession) -> Response:
    await session.commit()
    flash(request, action)
    return RedirectResponse(_ticket_url(reference), status_code=303)


def _fail(request: Request, reference: str, exc: Exception) -> Response:
    if isinstance(exc, NotFoundError):
        raise HTTPException(status_code=404, detail="No such ticket") from None
    flash(request, str(exc), "error")
    return RedirectResponse(_ticket_url(reference), status_code=303)


@router.post("/tickets/{reference}/reply")
async def reply(
    request: Request,
    reference: str,
    session: DbSession,
    user: CurrentUser,
    body: Annotated[str, Form(max_length=desk.MAX_BODY_CHARS + 1000)] = "",
    status_after: Annotated[str, Form()] = "pending",
) -> Response:
    settings = request.app.state.settings
    try:
        await desk.reply(
            session,
            reference=reference,
            body=body,
            author=user,
            identity=request.app.state.identity,
            now=utcnow(),
            deadline=timedelta(hours=settings.outbox_deadline_hours),
            status_after=status_after or None,
        )
    except (InvalidInputError, NotFoundError) as exc:
        return _fail(request, reference, exc)
    return await _act(request, reference, "Reply queued for sending.", session)


@router.post("/tickets/{reference}/note")
async def note(
    request: Request,
    reference: str,
    session: DbSession,
    user: CurrentUser,
    body: Annotated[str, Form(max_length=desk.MAX_BODY_CHARS + 1000)] = "",
) -> Response:
    try:
        await desk.add_note(
            session,
            reference=reference,
            body=body,
            author=user,
            message_id_domain=request.app.state.identity.message_id_domain,
            now=utcnow(),
        )
    except (InvalidInputError, NotFoundError) as exc:
        return _fail(request, reference, exc)
    return await _act(request, reference, "Internal note added.", session)


@router.post("/tickets/{reference}/assign")
async def assign(
    request: Request,
    reference: str,
    session: DbSession,
    user: CurrentUser,
    assignee: Annotated[str, Form()] = "",
) -> Response:
    assert user.id is not None
    try:
        if assignee == "me":
            target: int | None = user.id
        elif assignee in ("", "none"):
            target = None
        else:
            target = int(assignee)
        await desk.assign(
            session, reference=reference, assignee_id=target, actor=user, now=utcnow()
        )
    except ValueError:
        return _fail(request, reference, InvalidInputError("choose a member of staff"))
    except (InvalidInputError, NotFoundError) as exc:
        return _fail(request, reference, exc)
    return await _act(request, reference, "Assignment saved.", session)


@router.post("/tickets/{reference}/status")
async def set_status(
    request: Request,
    reference: str,
    session: DbSession,
    user: CurrentUser,
    status: Annotated[str, Form()] = "",
) -> Response:
    try:
        await desk.set_status(session, reference=reference, status=status, actor=user, now=utcnow())
    except (InvalidInputError, NotFoundError) as exc:
        return _fail(request, reference, exc)
    return await _act(request, reference, f"Status set to {status}.", session)


@router.post("/tickets/{reference}/acknowledge")
async def acknowledge(
    request: Request, reference: str, session: DbSession, user: CurrentUser
) -> Response:
    try:
        await desk.acknowledge(session, reference=reference, actor=user, now=utcnow())
    except NotFoundError as exc:
        return _fail(request, reference, InvalidInputError(str(exc)))
    return await _act(request, reference, "Escalation acknowledged — paging stopped.", session)


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback and the RFC 5987 UTF-8 name; no path, no CR/LF."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip(" .")
    name = name or "attachment"
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = re.sub(r"[^A-Za-z0-9._ -]", "_", ascii_name).strip(" .") or "attachment"
    encoded = quote(name[:150], safe="")
    return f"attachment; filename=\"{ascii_name[:150]}\"; filename*=UTF-8''{encoded}"


def download_type(content_type: str) -> str:
    ctype = content_type.split(";", 1)[0].strip().lower()
    if not _SAFE_TYPE.match(ctype) or _ACTIVE_TYPES.search(ctype) or ctype.startswith("text/"):
        return "application/octet-stream"
    return ctype


@router.get("/attachments/{attachment_id}")
async def attachment(
    attachment_id: int,
    session: DbSession,
    user: CurrentUser,
    ticket: Annotated[str, Query(max_length=32)],
) -> Response:
    """One attachment, only through the ticket it belongs to; always a download."""
    try:
        att = await desk.get_attachment(session, reference=ticket, attachment_id=attachment_id)
    except NotFoundError:
        raise HTTPException(status_code=404, detail="No such attachment") from None
    return Response(
        content=att.content,
        media_type=download_type(att.content_type),
        headers={
            "Content-Disposition": content_disposition(att.filename),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )
