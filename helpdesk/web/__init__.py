"""The staff web UI: ``create_app(settings)`` builds it, ``serve(settings, host, port)`` runs it.

Server-rendered Jinja2 over :mod:`helpdesk.desk`; no JavaScript is needed (one small static
script only spares a page reload when inserting a canned reply). Nothing happens at import
time: the engine is created in the lifespan and disposed of at shutdown.

Every page but ``/login``, ``/healthz``, ``/metrics`` and ``/static`` needs a session: an
anonymous GET is sent to ``/login?next=…``, an anonymous POST gets 401. Every POST needs
the session's CSRF token (403 otherwise). Every response carries the security headers of
:mod:`helpdesk.web.security`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware

from helpdesk import compose
from helpdesk.config import Settings
from helpdesk.db import create_engine, session_factory
from helpdesk.web import admin, auth, ops, pages
from helpdesk.web.render import render
from helpdesk.web.security import (
    SESSION_COOKIE,
    SESSION_MAX_AGE,
    LoginRequired,
    SecurityHeadersMiddleware,
    check_csrf,
)

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(settings: Settings) -> FastAPI:
    secret = settings.secret_key.get_secret_value()
    if not secret:
        # Sessions then die with the process and differ between processes: fine for a try-out.
        log.warning("HELPDESK_SECRET_KEY is not set: using a random key for this process")
        secret = secrets.token_urlsafe(32)
    https = settings.base_url.lower().startswith("https://")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(
        title="helpdesk",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(check_csrf)],
    )
    app.state.settings = settings
    app.state.identity = compose.Identity(
        address=settings.support_address,
        name=settings.support_name,
        message_id_domain=settings.message_id_domain_effective,
        base_url=settings.base_url,
    )
    app.include_router(auth.router)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _exc: LoginRequired) -> Response:
        if request.method in {"GET", "HEAD"}:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return JSONResponse({"detail": "Sign in first"}, status_code=401)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(("/healthz", "/metrics", "/static")):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        titles = {403: "Not allowed", 404: "Not found", 405: "Not allowed"}
        return render(
            request,
            "error.html",
            status_code=exc.status_code,
            title=titles.get(exc.status_code, "Something went wrong"),
            detail=str(exc.detail),
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_input(request: Request, _exc: RequestValidationError) -> Response:
        return render(
            request,
            "error.html",
            status_code=422,
            title="That did not look right",
            detail="A value in the request was missing or not valid.",
        )

    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie=SESSION_COOKIE,
        max_age=SESSION_MAX_AGE,
        same_site="lax",
        https_only=https,
    )
    app.add_middleware(SecurityHeadersMiddleware, hsts=https)
    return app


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the web UI with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        server_header=False,
        loop=settings.event_loop,  # uvicorn's "auto" also means uvloop when installed
    )
