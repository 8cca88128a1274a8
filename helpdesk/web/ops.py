"""Machine endpoints: ``/healthz`` for load balancers, ``/metrics`` for Prometheus.

Both are stateless: numbers are read from the database on every request and exposed through
a fresh ``CollectorRegistry``, so any number of web processes report the same values.

A failing IMAP or SMTP login (``login_state``, written by the worker) shows in both, but
``/healthz`` still answers 200 for it: the web UI itself works, and a load balancer must not
take it away from the staff. Both endpoints are public, so they name the mailbox and the
service but never carry the error text (the admin health panel shows it).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from helpdesk import desk, logins
from helpdesk.models import TICKET_STATUSES, utcnow

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> Response:
    now = utcnow()
    try:
        async with request.app.state.sessions() as session:
            await session.exec(text("SELECT 1"))
            age = await desk.heartbeat_age(session, now=now)
            failing = [s for s in await logins.login_states(session) if not s.ok]
    except (SQLAlchemyError, OSError) as exc:
        log.warning("healthz: database unreachable: %s", type(exc).__name__)
        return JSONResponse(
            {"database": "down", "worker_heartbeat_age_seconds": None, "logins": "unknown"},
            status_code=503,
        )
    return JSONResponse(
        {
            "database": "ok",
            "worker_heartbeat_age_seconds": age,
            "logins": "failing" if failing else "ok",
            "failing_logins": [
                {
                    "service": s.service,
                    "mailbox": s.mailbox,
                    "auth": s.auth,
                    "failures": s.failures,
                    "failing_since": s.failing_since.isoformat() if s.failing_since else None,
                }
                for s in failing
            ],
        }
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    now = utcnow()
    async with request.app.state.sessions() as session:
        n = await desk.numbers(session, now=now)
    reg = CollectorRegistry()
    tickets = Gauge("helpdesk_tickets", "Tickets by status.", ["status"], registry=reg)
    for status in TICKET_STATUSES:
        tickets.labels(status).set(n.tickets_by_status.get(status, 0))
    Gauge("helpdesk_acks_sent", "Acknowledgements (routine and crisis) sent.", registry=reg).set(
        n.acks_sent
    )
    esc = Gauge("helpdesk_escalations", "Escalations by state.", ["state"], registry=reg)
    for state in ("open", "acknowledged", "exhausted"):
        esc.labels(state).set(n.escalations_by_state.get(state, 0))
    out = Gauge(
        "helpdesk_outbox", "Outbox items by lane and status.", ["lane", "status"], registry=reg
    )
    for lane in (0, 1):
        for status in ("pending", "sent", "failed"):
            out.labels(str(lane), status).set(n.outbox.get((lane, status), 0))
    for (lane, status), count in n.outbox.items():
        out.labels(str(lane), status).set(count)
    poll = Gauge(
        "helpdesk_poll_age_seconds",
        "Seconds since the last successful mailbox poll (-1: never).",
        registry=reg,
    )
    poll.set(-1 if n.poll_age_seconds is None else n.poll_age_seconds)
    beat = Gauge(
        "helpdesk_worker_heartbeat_age_seconds",
        "Seconds since a worker last reported (-1: never).",
        registry=reg,
    )
    beat.set(-1 if n.heartbeat_age_seconds is None else n.heartbeat_age_seconds)
    errors = Gauge(
        "helpdesk_processing_errors", "Mails set aside as rejected.", ["status"], registry=reg
    )
    errors.labels("pending").set(n.rejected_pending)
    errors.labels("all").set(n.rejected_total)
    labels = ["service", "mailbox"]
    login_ok = Gauge(
        "helpdesk_login_ok",
        "1 when the worker's last login to this IMAP mailbox / the SMTP relay worked, else 0.",
        labels,
        registry=reg,
    )
    login_failures = Gauge(
        "helpdesk_login_failures",
        "Failed logins in a row (bad password, refused or unavailable OAuth token).",
        labels,
        registry=reg,
    )
    login_failing = Gauge(
        "helpdesk_login_failing_seconds",
        "Seconds since logins started failing (0 while they work).",
        labels,
        registry=reg,
    )
    for login in n.logins:
        key, since = (login.service, login.mailbox), login.failing_since
        login_ok.labels(*key).set(1 if login.ok else 0)
        login_failures.labels(*key).set(login.failures)
        login_failing.labels(*key).set(
            0 if login.ok or since is None else max((now - since).total_seconds(), 0.0)
        )
    return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)
