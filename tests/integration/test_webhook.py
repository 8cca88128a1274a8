"""Escalation webhooks posted to a real HTTP receiver on 127.0.0.1 (``http.server`` in a
thread), with the database on a SQLite file (and PostgreSQL when reachable)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from helpdesk import escalation, oncall
from helpdesk.config import Settings
from helpdesk.db import SessionFactory
from helpdesk.webhook import RetryPolicy, deliver_webhooks
from tests.integration.escalation_support import (  # the same rota, tickets, clock
    IDENTITY,
    PATIENT_ADDR,
    PATIENT_NAME,
    PATIENT_SUBJECT,
    SECRET,
    T0,
    add_rota,
    at,
    crisis_mail,
    esc_settings,
    new_ticket,
    tick,
)

FAST = RetryPolicy(attempts=3, wait=0, timeout=2.0)


class Receiver:
    """Records every POST; answers with the next status of ``statuses`` (then 202)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                receiver.requests.append((self.path, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 202
                payload = b'{"status":"success"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/enqueue"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [b for _, b in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()
        r.thread.join(timeout=5)


def free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nobody-listens"


async def deliver(db: SessionFactory, cfg: Settings, now: Any = T0) -> int:
    return await deliver_webhooks(
        sessions=db, now=now, identity=IDENTITY, settings=cfg, policy=FAST
    )


async def webhook_events(db: SessionFactory, tid: int) -> list[tuple[str, str]]:
    async with db() as s:
        evs = await escalation.escalation_events(s, tid)
    return [(e.kind, e.detail) for e in evs if e.kind.startswith("webhook")]


async def test_trigger_and_acknowledge_in_pagerduty_shape(
    db: SessionFactory, db_url: str, receiver: Receiver
) -> None:
    cfg = esc_settings(db_url, escalation_webhook_url=receiver.url + "#ROUTING-KEY-1")
    await add_rota(db, {1: ["primary@clinic.test"], 2: ["backup@clinic.test"]})
    tid = await new_ticket(db)
    outcome = await crisis_mail(db, tid, cfg, category="self_harm")

    # The ingest transaction only recorded the intent; nothing was posted yet.
    assert receiver.requests == []
    assert await webhook_events(db, tid) == [("webhook-pending", "trigger")]

    assert await deliver(db, cfg) == 1
    assert await deliver(db, cfg) == 0  # nothing left
    (path, body) = receiver.requests[0]
    assert path == "/v2/enqueue"  # the fragment (routing key) is not sent in the URL
    details = body["payload"].pop("custom_details")
    assert body == {
        "routing_key": "ROUTING-KEY-1",
        "event_action": "trigger",
        "dedup_key": f"helpdesk-escalation-{outcome.escalation_id}",
        "payload": {
            "summary": "Crisis escalation HD-1042 tier 1 (self_harm)",
            "severity": "critical",
            "source": "helpdesk",
        },
    }
    token = details.pop("ack_url").removeprefix("http://127.0.0.1:8000/ack/")
    assert details == {
        "reference": "HD-1042",
        "tier": 1,
        "category": "self_harm",
        "level": 1,
        "ticket_url": "http://127.0.0.1:8000/tickets/HD-1042",
    }
    claim = escalation.verify_ack_token(SECRET, token, T0, timedelta(hours=1))
    assert claim == escalation.AckClaim(outcome.escalation_id, "webhook")
    everything = json.dumps(receiver.bodies)
    for secret in (PATIENT_NAME, PATIENT_ADDR, PATIENT_SUBJECT):
        assert secret not in everything
    assert await webhook_events(db, tid) == [("webhook", "trigger: 202")]

    # The next level is posted too (same dedup key: PagerDuty folds it into one incident).
    assert await tick(db, cfg, at(300)) == 1
    assert await deliver(db, cfg, at(300)) == 1
    assert receiver.bodies[-1]["payload"]["custom_details"]["level"] == 2

    async with db() as s:
        await escalation.acknowledge(
            s, escalation_id=outcome.escalation_id, by="backup@clinic.test", now=at(310)
        )
        await s.commit()
    assert await deliver(db, cfg, at(310)) == 1
    assert receiver.bodies[-1] == {
        "routing_key": "ROUTING-KEY-1",
        "event_action": "acknowledge",
        "dedup_key": f"helpdesk-escalation-{outcome.escalation_id}",
    }
    assert await webhook_events(db, tid) == [
        ("webhook", "trigger: 202"),
        ("webhook", "trigger: 202"),
        ("webhook", "acknowledge: 202"),
    ]


async def test_server_errors_are_retried_a_bounded_number_of_times(
    db: SessionFactory, db_url: str, receiver: Receiver
) -> None:
    cfg = esc_settings(db_url, escalation_webhook_url=receiver.url)
    await add_rota(db, {1: ["primary@clinic.test"]})
    tid = await new_ticket(db)
    await crisis_mail(db, tid, cfg)

    receiver.statuses = [503, 502]
    assert await deliver(db, cfg) == 1
    assert len(receiver.requests) == 3
    assert await webhook_events(db, tid) == [("webhook", "trigger: 202")]
    assert receiver.bodies[0]["routing_key"] == ""


async def test_persistent_failure_is_recorded_not_retried_forever(
    db: SessionFactory, db_url: str, receiver: Receiver
) -> None:
    cfg = esc_settings(db_url, escalation_webhook_url=receiver.url)
    await add_rota(db, {1: ["primary@clinic.test"]})
    tid = await new_ticket(db)
    await crisis_mail(db, tid, cfg)
    receiver.statuses = [500, 500, 500, 500]
    assert await deliver(db, cfg) == 1
    assert len(receiver.requests) == 3
    assert await webhook_events(db, tid) == [("webhook", "trigger: error 500")]
    assert await deliver(db, cfg) == 0


async def test_client_error_is_not_retried(
    db: SessionFactory, db_url: str, receiver: Receiver
) -> None:
    cfg = esc_settings(db_url, escalation_webhook_url=receiver.url)
    await add_rota(db, {1: ["primary@clinic.test"]})
    tid = await new_ticket(db)
    await crisis_mail(db, tid, cfg)
    receiver.statuses = [400]
    assert await deliver(db, cfg) == 1
    assert len(receiver.requests) == 1
    assert await webhook_events(db, tid) == [("webhook", "trigger: error 400")]


async def test_connection_refused_is_recorded(db: SessionFactory, db_url: str) -> None:
    cfg = esc_settings(db_url, escalation_webhook_url=free_port_url())
    await add_rota(db, {1: ["primary@clinic.test"]})
    tid = await new_ticket(db)
    outcome = await crisis_mail(db, tid, cfg)
    assert outcome.paged == ("primary@clinic.test",)  # the e-mail page does not wait
    assert await deliver(db, cfg) == 1
    assert await webhook_events(db, tid) == [("webhook", "trigger: error: ConnectError")]


async def test_member_webhook_and_no_generic_webhook(
    db: SessionFactory, db_url: str, receiver: Receiver
) -> None:
    cfg = esc_settings(db_url)  # no generic webhook
    async with db() as s:
        await oncall.add_member(
            s, email="p@clinic.test", level=1, webhook_url=receiver.url + "#MEMBER"
        )
        await oncall.add_member(s, email="q@clinic.test", level=1)
        await s.commit()
    tid = await new_ticket(db)
    outcome = await crisis_mail(db, tid, cfg)
    assert await deliver(db, cfg) == 1
    (body,) = receiver.bodies
    assert body["routing_key"] == "MEMBER"
    token = body["payload"]["custom_details"]["ack_url"].rsplit("/", 1)[1]
    assert (
        escalation.verify_ack_token(SECRET, token, T0, timedelta(hours=1)).recipient
        == "p@clinic.test"
    )
    async with db() as s:
        await escalation.acknowledge(
            s, escalation_id=outcome.escalation_id, by="q@clinic.test", now=at(5)
        )
        await s.commit()
    assert await deliver(db, cfg) == 1
    assert receiver.bodies[-1]["event_action"] == "acknowledge"
    assert receiver.bodies[-1]["routing_key"] == "MEMBER"


async def test_no_webhook_configured_records_nothing(db: SessionFactory, cfg: Settings) -> None:
    await add_rota(db, {1: ["primary@clinic.test"]})
    tid = await new_ticket(db)
    await crisis_mail(db, tid, cfg)
    assert await webhook_events(db, tid) == []
    assert await deliver(db, cfg) == 0
