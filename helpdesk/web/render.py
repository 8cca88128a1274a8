"""Jinja2 for the staff pages: one autoescaping environment over ``templates/web``.

Every page gets the signed-in user, this session's CSRF token and the pending flash messages,
so no template can forget the token on a form.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

import helpdesk
from helpdesk.models import StaffUser
from helpdesk.web.sanitize import sanitize_html
from helpdesk.web.security import csrf_token, pop_flashes

TEMPLATE_DIR = Path(helpdesk.__file__).resolve().parent.parent / "templates" / "web"


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)}{unit}"
            break
    else:
        return "just now" if not future else "now"
    return f"in {amount}" if future else f"{amount} ago"


def _size(value: int) -> str:
    size = float(value)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _query(params: dict[str, Any], **changes: Any) -> str:
    merged = {**params, **changes}
    clean = {k: v for k, v in merged.items() if v not in (None, "", False)}
    return "?" + urlencode(clean) if clean else "?"


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.filters["size"] = _size
    env.filters["safe_html"] = sanitize_html
    env.globals["query"] = _query
    return env


def render(
    request: Request,
    name: str,
    *,
    user: StaffUser | None = None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    template = environment().get_template(name)
    html = template.render(
        request=request,
        user=user,
        csrf_token=csrf_token(request),
        flashes=pop_flashes(request),
        now=datetime.now(UTC),
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})
