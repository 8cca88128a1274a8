"""Failing IMAP/SMTP logins, as the worker records them, in /healthz, /metrics and the panel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from helpdesk.db import SessionFactory
from helpdesk.models import LoginState


async def seed(db: SessionFactory) -> None:
    now = datetime.now(UTC)
    async with db() as session:
        session.add(LoginState(service="imap", mailbox="billing", auth="password", last_ok_at=now))
        session.add(
            LoginState(
                service="imap",
                mailbox="default",
                auth="xoauth2",
                ok=False,
                failures=7,
                failing_since=now - timedelta(minutes=30),
                last_ok_at=now - timedelta(minutes=31),
                last_failure_at=now,
                last_error="login refused: [AUTHENTICATIONFAILED] Authentication failed.",
            )
        )
        await session.commit()


async def test_healthz_and_metrics_name_the_failing_login_without_its_error(
    client: httpx.AsyncClient, db: SessionFactory
) -> None:
    r = await client.get("/healthz")
    assert (r.status_code, r.json()["logins"], r.json()["failing_logins"]) == (200, "ok", [])

    await seed(db)
    r = await client.get("/healthz")
    assert r.status_code == 200  # the web UI works; a load balancer must keep it
    body = r.json()
    assert body["logins"] == "failing"
    [failing] = body["failing_logins"]
    since = datetime.fromisoformat(failing.pop("failing_since"))
    assert failing == {"service": "imap", "mailbox": "default", "auth": "xoauth2", "failures": 7}
    assert timedelta(minutes=29) < datetime.now(UTC) - since < timedelta(minutes=31)
    assert "AUTHENTICATIONFAILED" not in r.text  # public: no error text

    text = (await client.get("/metrics")).text
    assert 'helpdesk_login_ok{mailbox="default",service="imap"} 0.0' in text
    assert 'helpdesk_login_ok{mailbox="billing",service="imap"} 1.0' in text
    assert 'helpdesk_login_failures{mailbox="default",service="imap"} 7.0' in text
    assert 'helpdesk_login_failing_seconds{mailbox="billing",service="imap"} 0.0' in text
    failing_for = next(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('helpdesk_login_failing_seconds{mailbox="default"')
    )
    assert 1790 < failing_for < 1900
    assert "AUTHENTICATIONFAILED" not in text


async def test_admin_health_panel_shows_the_failing_login_and_why(
    admin_client: httpx.AsyncClient, db: SessionFactory
) -> None:
    html = (await admin_client.get("/admin/health")).text
    assert "No login recorded yet." in html
    await seed(db)
    html = (await admin_client.get("/admin/health")).text
    assert '<div class="tile bad"><span class="tile-label">Mail logins' in html
    assert "1 failing" in html and "IMAP default" in html
    assert "<strong>failing</strong>: 7 in a row, the first 30m ago" in html
    assert "login refused: [AUTHENTICATIONFAILED] Authentication failed." in html
