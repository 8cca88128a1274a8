"""The staff UI in a real browser: Chromium driven by Playwright against uvicorn.

Screenshots of the queue and a ticket, at laptop and phone widths, go to ``test-artifacts/``.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from helpdesk.config import Settings
from helpdesk.db import create_engine, session_factory
from helpdesk.models import Escalation, Outbox
from tests.web.conftest import (
    ARTIFACTS,
    PASSWORD,
    LiveServer,
    MessageSpec,
    create_schema,
    new_ticket,
    new_user,
    run,
    web_settings_for,
)

pytestmark = pytest.mark.browser

CRISIS_TEXT = "I don't think I can keep going. I have been thinking about ending it."


async def _seed(settings: Settings) -> str:
    await create_schema(settings)
    engine = create_engine(settings)
    try:
        db = session_factory(engine)
        await new_user(db, "ana@clinic.test", role="admin", name="Ana Ruiz")
        await new_user(db, "sam@clinic.test", role="agent", name="Sam Lee")
        subjects = [
            ("Refill for lisinopril", "Maria Lopez", "open"),
            ("Charged twice for my video visit", "John Smith", "new"),
            ("How do I upload a photo of my rash?", "Priya Patel", "pending"),
            ("App logs me out on iPhone", "Chen Wei", "new"),
            ("Move my appointment to Monday", "Fatima Khan", "open"),
            ("Insurance question about lab work", "Luis García", "new"),
        ]
        for i, (subject, name, status) in enumerate(subjects):
            await new_ticket(
                db,
                subject,
                requester_name=name,
                requester=f"{name.split()[0].lower()}@patients.test",
                status=status,
                received_minutes_ago=15 + i * 97,
                due_in_days=7 if i != 3 else 0.01,
            )
        crisis = await new_ticket(
            db,
            "please help",
            requester="jordan@patients.test",
            requester_name="Jordan Miles",
            crisis_tier=1,
            received_minutes_ago=4,
            messages=[
                MessageSpec(
                    text=CRISIS_TEXT,
                    message_id="<crisis-1@patients.test>",
                    crisis_tier=1,
                    minutes_ago=4,
                ),
                MessageSpec(
                    text="(automatic crisis reply)",
                    direction="outbound",
                    kind="crisis_ack",
                    message_id="<ack-1@clinic.test>",
                    minutes_ago=4,
                ),
            ],
        )
        assert crisis.reference is not None
        return crisis.reference
    finally:
        await engine.dispose()


async def _outbox_and_escalation(settings: Settings) -> tuple[list[Outbox], Escalation]:
    engine = create_engine(settings)
    try:
        async with session_factory(engine)() as session:
            rows = list((await session.exec(select(Outbox))).all())
            esc = (await session.exec(select(Escalation))).one()
            return rows, esc
    finally:
        await engine.dispose()


def _login(page: Any, base: str, email_addr: str) -> None:
    page.goto(base + "/")
    assert "/login" in page.url
    page.get_by_label("E-mail address").fill(email_addr)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + "/")


def test_crisis_flow_in_a_real_browser(
    page: Any, browser: Any, tmp_path: Path, live_server: Callable[[Settings], LiveServer]
) -> None:
    settings = web_settings_for(f"sqlite+aiosqlite:///{tmp_path / 'browser.db'}")
    reference = run(_seed(settings))
    server = live_server(settings)
    ARTIFACTS.mkdir(exist_ok=True)

    _login(page, server.url, "sam@clinic.test")
    pinned = page.locator("section.pinned")
    assert pinned.locator(f'a[href="/tickets/{reference}"]').count() == 1
    badge = pinned.locator(".badge.crisis").first
    assert badge.inner_text().startswith("⚠ Crisis · Tier 1")
    assert badge.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(179, 38, 30)"
    page.screenshot(path=str(ARTIFACTS / "queue-desktop.png"), full_page=True)

    pinned.locator(f'a[href="/tickets/{reference}"]').click()
    page.wait_for_url(f"{server.url}/tickets/{reference}")
    assert CRISIS_TEXT in page.content().replace("&#39;", "'").replace("&#x27;", "'")
    page.screenshot(path=str(ARTIFACTS / "ticket-desktop.png"), full_page=True)

    page.get_by_role("button", name="Acknowledge").click()
    page.wait_for_load_state()
    assert "paging stopped" in page.locator(".flashes").inner_text()
    assert page.get_by_role("button", name="Acknowledge").count() == 0

    page.get_by_label("Reply text").fill(
        "Jordan, thank you for telling us. A clinician will call you within the hour."
    )
    page.get_by_role("button", name="Send reply").click()
    page.wait_for_load_state()
    assert "Reply queued for sending." in page.locator(".flashes").inner_text()
    assert (
        page.locator("article.msg-outbound").filter(has_text="A clinician will call you").count()
        == 1
    )

    rows, esc = run(_outbox_and_escalation(settings))
    assert esc.state == "acknowledged"
    assert esc.acknowledged_by == "sam@clinic.test"
    replies = [r for r in rows if r.kind == "reply"]
    assert len(replies) == 1
    assert replies[0].lane == 1
    mail = email.message_from_bytes(replies[0].raw, policy=email.policy.default)
    assert mail["In-Reply-To"] == "<crisis-1@patients.test>"
    assert mail["To"].addresses[0].addr_spec == "jordan@patients.test"

    # The same pages on a phone.
    phone = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    try:
        mobile = phone.new_page()
        _login(mobile, server.url, "ana@clinic.test")
        mobile.screenshot(path=str(ARTIFACTS / "queue-phone.png"), full_page=True)
        mobile.goto(f"{server.url}/tickets/{reference}")
        mobile.screenshot(path=str(ARTIFACTS / "ticket-phone.png"), full_page=True)
        width = mobile.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
        mobile.goto(f"{server.url}/admin/health")
        mobile.screenshot(path=str(ARTIFACTS / "admin-phone.png"), full_page=True)
    finally:
        phone.close()
    page.goto(f"{server.url}/admin/health")
    assert page.locator("h1").inner_text() == "Not allowed"


def test_canned_reply_inserted_by_script(
    page: Any, tmp_path: Path, live_server: Callable[[Settings], LiveServer]
) -> None:
    settings = web_settings_for(f"sqlite+aiosqlite:///{tmp_path / 'browser.db'}")
    reference = run(_seed(settings))
    server = live_server(settings)
    _login(page, server.url, "ana@clinic.test")
    page.goto(f"{server.url}/admin/canned")
    page.locator("#title-new").fill("Refill sent")
    page.locator("#body-new").fill("We have sent your refill to the pharmacy.")
    page.get_by_role("button", name="Add", exact=True).click()
    page.wait_for_load_state()
    page.goto(f"{server.url}/tickets/{reference}")
    page.screenshot(path=str(ARTIFACTS / "ticket-desktop-admin.png"), full_page=False)
    page.get_by_label("Reply text").fill("Hello. ")
    page.get_by_role("button", name="Insert").click()
    assert (
        page.get_by_label("Reply text").input_value()
        == "Hello. We have sent your refill to the pharmacy."
    )
    assert page.url.endswith(f"/tickets/{reference}")  # no reload: the script did it
