"""Escalation webhooks: the same minimal page as the e-mail notice, as a PagerDuty Events
API v2 event, posted to ``HELPDESK_ESCALATION_WEBHOOK_URL`` and to members' own webhooks.

The ingest transaction never waits on HTTP: :mod:`helpdesk.escalation` records a
"webhook-pending" event (detail ``trigger`` or ``acknowledge``; recipient empty for the
generic webhook, the member's address for a member's webhook), and the worker's timer loop
calls :func:`deliver_webhooks`, which posts each pending event and rewrites it as a
"webhook" event whose detail is the outcome (``trigger: 202``, ``trigger: error 503``).

The PagerDuty routing key travels in the URL fragment, which is never sent over HTTP
(``https://events.pagerduty.com/v2/enqueue#R0UTINGKEY``); a receiver that needs none
gets an empty ``routing_key``.

Invariants:
- payloads hold the reference, tier, category, level and two links: no patient data;
- retries are bounded (connection errors, 429 and 5xx only) and the outcome of every post
  is recorded; a post that still fails is not retried again, since the e-mail notices are
  the primary channel;
- delivery is at least once: a worker that dies after posting posts again, which the
  ``dedup_key`` (``helpdesk-escalation-<id>``) makes harmless on PagerDuty. On PostgreSQL
  the event row is held ``FOR UPDATE SKIP LOCKED`` while it is posted (that transaction
  stays open for at most attempts x timeout), so two workers do not post the same event;
- per escalation, events are posted in order: an "acknowledge" waits for its "trigger".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import exists
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import aliased
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk import escalation, oncall
from helpdesk.config import Settings
from helpdesk.errors import ConfigError
from helpdesk.models import Escalation, EscalationEvent, Ticket

if TYPE_CHECKING:
    from helpdesk.compose import Identity

log = logging.getLogger(__name__)

GENERIC_RECIPIENT = "webhook"  # who an acknowledge link from the generic webhook names


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries of one post; ``wait=0`` makes them instant in tests."""

    attempts: int = 3
    wait: float = 0.5
    timeout: float = 5.0


def dedup_key(escalation_id: int) -> str:
    return f"helpdesk-escalation-{escalation_id}"


def split_routing_key(url: str) -> tuple[str, str]:
    """``(url without fragment, routing key from the fragment)``."""
    base, _, key = url.partition("#")
    return base, key


def pagerduty_event(
    *,
    routing_key: str,
    action: str,
    escalation_id: int,
    reference: str,
    tier: int,
    category: str,
    level: int,
    ticket_url: str,
    ack_url: str,
) -> dict[str, Any]:
    """A PagerDuty Events API v2 body; ``acknowledge`` carries only what closes the page."""
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key(escalation_id),
    }
    if action == escalation.WEBHOOK_TRIGGER:
        shown_category = f" ({category})" if category else ""
        body["payload"] = {
            "summary": f"Crisis escalation {reference} tier {tier}{shown_category}",
            "severity": "critical" if tier <= 1 else "error",
            "source": "helpdesk",
            "custom_details": {
                "reference": reference,
                "tier": tier,
                "category": category,
                "level": level,
                "ticket_url": ticket_url,
                "ack_url": ack_url,
            },
        }
    return body


async def post_event(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], policy: RetryPolicy
) -> str:
    """Post one event with bounded retries; the outcome as text (``"202"``, ``"error …"``)."""
    outcome = "error: not attempted"
    for attempt in range(1, max(policy.attempts, 1) + 1):
        try:
            response = await client.post(url, json=body, timeout=policy.timeout)
        except httpx.TransportError as exc:  # connect/read errors and timeouts
            outcome = f"error: {type(exc).__name__}"
        else:
            if response.is_success:
                return str(response.status_code)
            outcome = f"error {response.status_code}"
            if response.status_code != 429 and response.status_code < 500:
                return outcome  # the receiver refuses this body: retrying will not help
        if attempt < policy.attempts and policy.wait > 0:
            await asyncio.sleep(policy.wait * 2 ** (attempt - 1))
    return outcome


async def deliver_webhooks(
    *,
    sessions: async_sessionmaker[AsyncSession],
    now: datetime,
    identity: Identity,
    settings: Settings,
    client: httpx.AsyncClient | None = None,
    policy: RetryPolicy | None = None,
    limit: int = 50,
) -> int:
    """Post pending webhook events, oldest first; return how many were posted (or tried).

    The HTTP client is made on the first event to post: making one (its TLS context) costs
    ~0.1 s of CPU, and the worker asks every two seconds, nearly always for nothing."""
    policy = policy or RetryPolicy()
    made: list[httpx.AsyncClient] = []

    def http() -> httpx.AsyncClient:
        if client is not None:
            return client
        if not made:
            made.append(httpx.AsyncClient(follow_redirects=False))
        return made[0]

    done = 0
    try:
        for _ in range(limit):
            if not await _deliver_one(
                sessions, http, now=now, identity=identity, settings=settings, policy=policy
            ):
                break
            done += 1
    finally:
        for own in made:
            await own.aclose()
    return done


async def _deliver_one(
    sessions: async_sessionmaker[AsyncSession],
    http: Callable[[], httpx.AsyncClient],
    *,
    now: datetime,
    identity: Identity,
    settings: Settings,
    policy: RetryPolicy,
) -> bool:
    async with sessions() as session, session.begin():
        earlier = aliased(EscalationEvent)
        event = (
            await session.exec(
                select(EscalationEvent)
                .where(
                    EscalationEvent.kind == escalation.WEBHOOK_PENDING,
                    # In order per escalation: an "acknowledge" never overtakes its
                    # "trigger" that another worker is still posting.
                    ~exists().where(
                        col(earlier.escalation_id) == col(EscalationEvent.escalation_id),
                        col(earlier.kind) == escalation.WEBHOOK_PENDING,
                        col(earlier.id) < col(EscalationEvent.id),
                    ),
                )
                .order_by(col(EscalationEvent.id))
                .limit(1)
                .with_for_update(skip_locked=True, of=EscalationEvent)
            )
        ).first()
        if event is None:
            return False
        action = event.detail or escalation.WEBHOOK_TRIGGER
        target = await _target_url(session, event, settings)
        if not target:
            outcome = "error: no webhook URL configured"
        else:
            body = await _body(session, event, target, action, now, identity, settings)
            url, _ = split_routing_key(target)
            outcome = await post_event(http(), url, body, policy)
        event.kind = escalation.WEBHOOK_DONE
        event.detail = f"{action}: {outcome}"[:1000]
        session.add(event)
    level = logging.INFO if not outcome.startswith("error") else logging.WARNING
    log.log(
        level,
        "escalation webhook",
        extra={"escalation_id": event.escalation_id, "action": action, "outcome": outcome},
    )
    return True


async def _target_url(session: AsyncSession, event: EscalationEvent, settings: Settings) -> str:
    if not event.recipient:
        return settings.escalation_webhook_url
    member = await oncall.get_member(session, event.recipient)
    return member.webhook_url if member is not None else ""


async def _body(
    session: AsyncSession,
    event: EscalationEvent,
    target: str,
    action: str,
    now: datetime,
    identity: Identity,
    settings: Settings,
) -> dict[str, Any]:
    _, routing_key = split_routing_key(target)
    esc = await session.get(Escalation, event.escalation_id)
    ticket = await session.get(Ticket, esc.ticket_id) if esc is not None else None
    reference = (ticket.reference or f"#{ticket.id}") if ticket is not None else "?"
    base_url = identity.base_url or settings.base_url
    try:
        token = escalation.make_ack_token(
            settings.secret_key.get_secret_value(),
            event.escalation_id,
            event.recipient or GENERIC_RECIPIENT,
            now,
        )
        link = escalation.ack_url(base_url, token)
    except ConfigError:
        link = ""
    return pagerduty_event(
        routing_key=routing_key,
        action=action,
        escalation_id=event.escalation_id,
        reference=reference,
        tier=esc.tier if esc is not None else 1,
        category=esc.category if esc is not None else "",
        level=event.level,
        ticket_url=escalation.ticket_url(base_url, reference),
        ack_url=link,
    )
