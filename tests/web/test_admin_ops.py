"""Administration pages, /healthz and /metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlmodel import select

from helpdesk.db import SessionFactory
from helpdesk.models import (
    AuditLog,
    CannedReply,
    OnCallMember,
    Outbox,
    RejectedMail,
    StaffUser,
    WorkerHeartbeat,
)
from tests.web.conftest import MakeTicket, csrf_of


async def test_admin_manages_staff(
    admin_client: httpx.AsyncClient, client: httpx.AsyncClient, db: SessionFactory
) -> None:
    token = await csrf_of(admin_client, "/admin/users")
    r = await admin_client.post(
        "/admin/users",
        data={
            "csrf_token": token,
            "email": "New@Clinic.test",
            "name": "Nia",
            "role": "agent",
            "password": "a long enough password",
        },
    )
    assert r.status_code == 303
    async with db() as session:
        user = (
            await session.exec(select(StaffUser).where(StaffUser.email == "new@clinic.test"))
        ).one()
        assert user.password_hash.startswith("$argon2id$")
    r = await admin_client.post(
        "/admin/users",
        data={"csrf_token": token, "email": "x@clinic.test", "role": "agent", "password": "short"},
    )
    assert "at least 10 characters" in (await admin_client.get(r.headers["location"])).text
    r = await admin_client.post(
        f"/admin/users/{user.id}/password",
        data={"csrf_token": token, "password": "another long password"},
    )
    assert r.status_code == 303
    r = await admin_client.post(
        f"/admin/users/{user.id}/active", data={"csrf_token": token, "active": "0"}
    )
    assert r.status_code == 303
    async with db() as session:
        fresh = await session.get(StaffUser, user.id)
        assert fresh is not None
        assert not fresh.active
        actions = set((await session.exec(select(AuditLog.action))).all())
        assert {"user-add", "user-password", "user-deactivate"} <= actions


async def test_admin_manages_rota_and_canned(
    admin_client: httpx.AsyncClient, db: SessionFactory
) -> None:
    token = await csrf_of(admin_client, "/admin/oncall")
    await admin_client.post(
        "/admin/oncall",
        data={"csrf_token": token, "email": "doc@clinic.test", "name": "Doc", "level": "2"},
    )
    async with db() as session:
        assert (await session.exec(select(OnCallMember.level))).all() == [2]
    assert "doc@clinic.test" in (await admin_client.get("/admin/oncall")).text
    await admin_client.post(
        "/admin/oncall/remove", data={"csrf_token": token, "email": "doc@clinic.test"}
    )
    async with db() as session:
        assert (await session.exec(select(OnCallMember))).all() == []
    await admin_client.post(
        "/admin/canned", data={"csrf_token": token, "title": "Hi", "body": "Hello there"}
    )
    async with db() as session:
        canned = (await session.exec(select(CannedReply))).one()
    await admin_client.post(
        "/admin/canned",
        data={"csrf_token": token, "title": "Hi", "body": "Changed", "canned_id": str(canned.id)},
    )
    assert "Changed" in (await admin_client.get("/admin/canned")).text
    await admin_client.post(f"/admin/canned/{canned.id}/delete", data={"csrf_token": token})
    async with db() as session:
        assert (await session.exec(select(CannedReply))).all() == []


async def test_health_panel(admin_client: httpx.AsyncClient, db: SessionFactory) -> None:
    now = datetime.now(UTC)
    async with db() as session:
        session.add(
            WorkerHeartbeat(
                worker_id="w1",
                hostname="box",
                last_seen_at=now,
                last_poll_ok_at=now - timedelta(minutes=2),
            )
        )
        session.add(
            Outbox(
                kind="reply",
                lane=1,
                recipient="a@p.test",
                mail_from="help@clinic.test",
                message_id="<o1@x>",
                status="failed",
                last_error="550 no such user",
            )
        )
        session.add(
            Outbox(
                kind="ack",
                lane=0,
                recipient="a@p.test",
                mail_from="help@clinic.test",
                message_id="<o2@x>",
            )
        )
        session.add(
            RejectedMail(sha256="0" * 64, raw=b"garbage", reason="unparseable", detail="no headers")
        )
        await session.commit()
    html = (await admin_client.get("/admin/health")).text
    assert "2m ago" in html
    assert "550 no such user" in html
    assert "unparseable" in html
    assert 'action="/admin/rejected/1/retry"' in html


async def test_healthz_and_metrics_are_public(
    client: httpx.AsyncClient, make_ticket: MakeTicket, db: SessionFactory
) -> None:
    await make_ticket(status="open")
    await make_ticket(crisis_tier=1)
    async with db() as session:
        session.add(
            WorkerHeartbeat(worker_id="w1", last_seen_at=datetime.now(UTC) - timedelta(seconds=30))
        )
        session.add(
            Outbox(
                kind="ack",
                lane=1,
                recipient="a@p.test",
                mail_from="h@c.test",
                message_id="<m@x>",
                status="sent",
            )
        )
        await session.commit()
    r = await client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["database"] == "ok"
    assert 25 < body["worker_heartbeat_age_seconds"] < 120
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'helpdesk_tickets{status="open"} 1.0' in text
    assert 'helpdesk_tickets{status="new"} 1.0' in text
    assert "helpdesk_acks_sent 1.0" in text
    assert 'helpdesk_escalations{state="open"} 1.0' in text
    assert 'helpdesk_outbox{lane="1",status="sent"} 1.0' in text
    assert "helpdesk_poll_age_seconds -1.0" in text
    assert 'helpdesk_processing_errors{status="pending"} 0.0' in text


async def test_healthz_503_when_database_is_down(tmp_path: object) -> None:
    from helpdesk.web import create_app
    from tests.web.conftest import web_settings_for

    app = create_app(web_settings_for(f"sqlite+aiosqlite:///{tmp_path}/missing/dir/x.db"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await c.get("/healthz")
    assert r.status_code == 503
    assert r.json()["database"] == "down"
