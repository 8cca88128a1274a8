"""Fixtures for the web tier: an app on a temp-file SQLite, factories, a signed-in client, and
a real browser (Chromium via Playwright) against the app served by uvicorn in a thread.

Reusable by the end-to-end tests: ``live_server(settings)`` serves any settings, and
``browser`` / ``page`` are plain Playwright objects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from argon2 import PasswordHasher
from fastapi import FastAPI
from sqlmodel import SQLModel

from helpdesk import desk, users
from helpdesk.config import Settings, load_settings
from helpdesk.db import SessionFactory, create_engine, session_factory
from helpdesk.models import Attachment, Escalation, EscalationEvent, Message, StaffUser, Ticket
from helpdesk.web import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2 with tiny parameters: the same code path, milliseconds instead of ~50 ms."""
    monkeypatch.setattr(
        users, "hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )
    monkeypatch.setattr(users, "_DUMMY_HASH", None)


def web_settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "support_address": "help@clinic.test",
        "support_name": "Clinic Support",
        "secret_key": "test-secret-key-not-for-production",
        "base_url": "http://127.0.0.1:8000",
    }
    values.update(overrides)
    return load_settings(**values)


async def create_schema(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.create_all)
            await desk.ensure_search_index(conn)
    finally:
        await engine.dispose()


@pytest.fixture
async def web_settings(tmp_path: Path) -> Settings:
    settings = web_settings_for(f"sqlite+aiosqlite:///{tmp_path / 'web.db'}")
    await create_schema(settings)
    return settings


@pytest.fixture
async def db(web_settings: Settings) -> AsyncIterator[SessionFactory]:
    """A session factory of the test's own, for seeding and for checking what the app stored."""
    engine = create_engine(web_settings)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def app(web_settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(web_settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


# --- factories -------------------------------------------------------------------------------

MakeUser = Callable[..., Awaitable[StaffUser]]


_counter = iter(range(1, 10_000_000))


async def new_user(
    db: SessionFactory,
    email: str | None = None,
    *,
    role: str = "agent",
    password: str = PASSWORD,
    name: str = "",
    active: bool = True,
) -> StaffUser:
    n = next(_counter)
    async with db() as session:
        user = await users.add_user(
            session,
            email=email or f"{role}{n}@clinic.test",
            role=role,
            password=password,
            name=name or f"{role.capitalize()} {n}",
        )
        user.active = active
        await session.commit()
        return user


@pytest.fixture
def make_user(db: SessionFactory) -> MakeUser:
    return functools.partial(new_user, db)


@dataclass
class MessageSpec:
    text: str = "Hello, I need help with my refill."
    html: str | None = None
    direction: str = "inbound"
    kind: str = "mail"
    message_id: str | None = None
    from_addr: str | None = None
    attachments: tuple[tuple[str, str, bytes], ...] = ()
    crisis_tier: int | None = None
    minutes_ago: int = 60


MakeTicket = Callable[..., Awaitable[Ticket]]


async def new_ticket(
    db: SessionFactory,
    subject: str = "Question about my refill",
    *,
    requester: str | None = None,
    requester_name: str = "Maria Lopez",
    status: str = "new",
    crisis_tier: int | None = None,
    crisis_category: str = "self-harm",
    assignee_id: int | None = None,
    messages: list[MessageSpec] | None = None,
    received_minutes_ago: int = 60,
    due_in_days: float = 7,
) -> Ticket:
    """A ticket with messages (``MessageSpec``s) and, for a crisis, an open escalation."""

    n = next(_counter)
    now = datetime.now(UTC)
    received = now - timedelta(minutes=received_minutes_ago)
    requester = requester or f"patient{n}@patients.test"
    specs = messages if messages is not None else [MessageSpec(minutes_ago=received_minutes_ago)]
    async with db() as session:
        ticket = Ticket(
            subject=subject,
            requester=requester,
            requester_name=requester_name,
            status=status,
            crisis_tier=crisis_tier,
            crisis_category=crisis_category if crisis_tier is not None else None,
            escalation_state="open" if crisis_tier is not None else None,
            assignee_id=assignee_id,
            created_at=received,
            updated_at=received,
            last_message_at=received,
            due_at=received + timedelta(days=due_in_days),
            message_count=len(specs),
        )
        session.add(ticket)
        await session.flush()
        assert ticket.id is not None
        ticket.reference = f"HD-{ticket.id + 1000}"
        for i, spec in enumerate(specs):
            msg = Message(
                ticket_id=ticket.id,
                direction=spec.direction,
                kind=spec.kind,
                message_id=spec.message_id or f"<m{n}.{i}.{time.time_ns()}@patients.test>",
                from_addr=spec.from_addr
                or (requester if spec.direction == "inbound" else "help@clinic.test"),
                from_name=requester_name if spec.direction == "inbound" else "",
                to_addrs="help@clinic.test" if spec.direction == "inbound" else requester,
                subject=subject,
                text_body=spec.text,
                html_body=spec.html,
                crisis_tier=spec.crisis_tier,
                created_at=now - timedelta(minutes=spec.minutes_ago),
            )
            session.add(msg)
            await session.flush()
            for filename, ctype, content in spec.attachments:
                session.add(
                    Attachment(
                        message_id=msg.id,  # type: ignore[arg-type]
                        filename=filename,
                        content_type=ctype,
                        size=len(content),
                        sha256="0" * 64,
                        content=content,
                    )
                )
        if crisis_tier is not None:
            esc = Escalation(
                ticket_id=ticket.id,
                tier=crisis_tier,
                category=crisis_category,
                state="open",
                level=1,
                received_at=received,
                created_at=received,
                next_action_at=now + timedelta(minutes=5),
            )
            session.add(esc)
            await session.flush()
            session.add(
                EscalationEvent(
                    escalation_id=esc.id,  # type: ignore[arg-type]
                    kind="notice",
                    level=1,
                    recipient="oncall1@clinic.test",
                    detail="escalation notice mailed",
                    created_at=received,
                )
            )
        await session.commit()
        return ticket


@pytest.fixture
def make_ticket(db: SessionFactory) -> MakeTicket:
    return functools.partial(new_ticket, db)


# --- signed-in clients -----------------------------------------------------------------------

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


async def login(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD, next_: str = "/"
) -> httpx.Response:
    page = await client.get("/login")
    token = csrf_from(page.text)
    return await client.post(
        "/login", data={"email": email, "password": password, "next": next_, "csrf_token": token}
    )


async def csrf_of(client: httpx.AsyncClient, path: str = "/") -> str:
    page = await client.get(path)
    assert page.status_code == 200, page.status_code
    return csrf_from(page.text)


@pytest.fixture
async def agent(make_user: MakeUser) -> StaffUser:
    return await make_user("agent@clinic.test", role="agent", name="Alex Agent")


@pytest.fixture
async def admin(make_user: MakeUser) -> StaffUser:
    return await make_user("admin@clinic.test", role="admin", name="Ada Admin")


@pytest.fixture
async def agent_client(client: httpx.AsyncClient, agent: StaffUser) -> httpx.AsyncClient:
    response = await login(client, agent.email)
    assert response.status_code == 303, response.text
    return client


@pytest.fixture
async def admin_client(client: httpx.AsyncClient, admin: StaffUser) -> httpx.AsyncClient:
    response = await login(client, admin.email)
    assert response.status_code == 303, response.text
    return client


# --- a real browser --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """The app served by uvicorn in a background thread on a free 127.0.0.1 port."""

    def __init__(self, settings: Settings, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-web", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the web server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server() -> Iterator[Callable[..., LiveServer]]:
    """``live_server(settings, port=None)``: a port chosen up front lets ``settings.base_url``
    (which the worker writes into links in mail) point at the server before it starts."""
    started: list[LiveServer] = []

    def _start(settings: Settings, port: int | None = None) -> LiveServer:
        server = LiveServer(settings, port).__enter__()
        started.append(server)
        return server

    yield _start
    for server in started:
        server.__exit__(None, None, None)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Chromium for one test: Playwright's sync API keeps an event loop running in this thread
    while it is open, which would stop the async tests that follow a session-wide browser."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing in CI (scripts/ensure-services.sh installs it)")
        pytest.skip("Chromium is not installed at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    try:
        yield pg
    finally:
        context.close()


def run(coro: Awaitable[Any]) -> Any:
    """Run a coroutine from a synchronous (browser) test, in a thread of its own: Playwright's
    sync API keeps an event loop running in the test's thread."""

    async def _wrap() -> Any:
        return await coro

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _wrap()).result()
