"""Crisis escalation: page the on-call rota, level by level, until someone acknowledges.

The schedule is a pure function, :func:`decide`: given an escalation's state, the levels
that have members, the per-level delays and an explicit ``now``, it says what to do now
(page a level, mark the escalation exhausted, or nothing) and when to look again. The rest
of this module applies decisions to the database:

- :func:`open_or_update` runs inside the pipeline's ingest transaction (it never commits):
  the first crisis mail of a ticket opens its escalation and enqueues level-1 notices in
  the priority lane of the outbox, so the page commits with the ticket or not at all;
- :func:`run_due` is the re-escalation timer the worker calls every few seconds; each
  escalation is handled in its own short transaction;
- :func:`acknowledge` stops the paging.

Schedule (``delays`` = ``settings.escalation_level_delays``, default ``[0, 300, 600]``):
level N is paged ``delays[N-1]`` seconds after the previous level (the last delay applies
to higher levels and to the wait before the next round). Levels without members are
skipped: their slot in the schedule goes to the next non-empty level, so an empty level 2
means level 3 is paged 300 s after level 1. The whole sequence runs ``repeats`` rounds;
after the last level of the last round has had its wait, the escalation is "exhausted"
(still open in the queue, pinned on top, but nobody is paged any more).

Invariants:
- one escalation per ticket (``Escalation.ticket_id`` is unique); follow-up crisis mail on
  an open escalation updates its tier but never pages again;
- a *new* tier-1 crisis after an acknowledgement, or any crisis after the escalation was
  exhausted, re-opens it with a fresh round of paging: a new crisis must reach someone;
- with no rota the escalation is still opened (and shown in the web queue) with a
  "no-rota" event and a WARNING; :func:`run_due` keeps checking, and pages as soon as a
  rota exists;
- each re-escalation fires once, even with several workers: PostgreSQL rows are taken with
  ``FOR UPDATE SKIP LOCKED`` and every step is a compare-and-set on (state, level, round),
  which also protects SQLite;
- logs carry the reference, tier, category, rule ids and counts, never a patient's name,
  address or words.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, or_, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk import compose, oncall, outbox
from helpdesk.config import Settings
from helpdesk.errors import ConfigError, HelpdeskError, NotFoundError
from helpdesk.models import Escalation, EscalationEvent, Ticket

if TYPE_CHECKING:
    from helpdesk.compose import Identity
    from helpdesk.crisis import CrisisResult

log = logging.getLogger(__name__)

OPEN, ACKNOWLEDGED, EXHAUSTED = "open", "acknowledged", "exhausted"
NOTICE_KIND = "escalation"  # Outbox.kind of a page
NOTICE_LANE = 0  # the priority lane
NOTICE_DEADLINE = timedelta(hours=1)  # a page older than this is useless: the next level is due
NO_ROTA_RECHECK = timedelta(seconds=60)  # how often an escalation without a rota looks again
DUE_BATCH = 100

# Event kinds of the webhook hand-off (see helpdesk.webhook): the ingest transaction only
# records the intent; the worker's timer loop posts it and rewrites the row with the result.
WEBHOOK_PENDING = "webhook-pending"
WEBHOOK_DONE = "webhook"
WEBHOOK_TRIGGER = "trigger"
WEBHOOK_ACKNOWLEDGE = "acknowledge"


class InvalidTokenError(HelpdeskError):
    """An acknowledge link that is malformed, forged or signed with another key."""


class ExpiredTokenError(InvalidTokenError):
    """A genuine acknowledge link that is older than its maximum age."""


# --------------------------------------------------------------------------- the schedule


class Action(StrEnum):
    PAGE = "page"
    EXHAUST = "exhaust"
    NOTHING = "nothing"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one escalation now, and when to look at it again.

    For ``PAGE``, ``level``/``round`` are the level to page and its round; for ``NOTHING``
    and ``EXHAUST`` they repeat the escalation's current values. ``next_action_at`` is None
    when nothing more will ever happen (acknowledged or exhausted).
    """

    action: Action
    level: int
    round: int
    next_action_at: datetime | None


def delay_for(level: int, delays: Sequence[int]) -> timedelta:
    """The wait before paging ``level`` (1-based); levels past the list use the last delay."""
    if not delays:
        raise ValueError("escalation delays must not be empty")
    return timedelta(seconds=delays[min(max(level, 1), len(delays)) - 1])


def decide(
    *,
    state: str,
    level: int,
    round: int,  # named after the column it mirrors, as compose does
    next_action_at: datetime | None,
    levels: Sequence[int],
    delays: Sequence[int],
    repeats: int,
    now: datetime,
) -> Decision:
    """The next step of an escalation at ``now``.

    ``level`` is the last level paged (0 = none yet), ``levels`` the non-empty levels of the
    rota in ascending order, ``next_action_at`` None means "due now".
    """
    if state != OPEN:
        return Decision(Action.NOTHING, level, round, None)
    if next_action_at is not None and now < next_action_at:
        return Decision(Action.NOTHING, level, round, next_action_at)
    ordered = sorted(set(levels))
    if not ordered:
        return Decision(Action.NOTHING, level, round, now + NO_ROTA_RECHECK)

    higher = [lv for lv in ordered if lv > level] if level > 0 else ordered
    if higher:
        target, target_round = higher[0], max(round, 1)
    elif round < repeats:
        target, target_round = ordered[0], round + 1
    else:
        return Decision(Action.EXHAUST, level, round, None)
    # The wait this page gets before the next step is the slot of the level after it,
    # whether or not that level has members (empty levels are skipped, not waited for).
    return Decision(Action.PAGE, target, target_round, now + delay_for(target + 1, delays))


# --------------------------------------------------------------------------- ack tokens


@dataclass(frozen=True, slots=True)
class AckClaim:
    escalation_id: int
    recipient: str


_TOKEN_CONTEXT = b"helpdesk escalation ack v1\x00"
_CLOCK_SKEW = timedelta(minutes=5)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, body: bytes) -> bytes:
    # 128 bits of HMAC-SHA256 are ample for a link that expires, and keep the URL short.
    return hmac.new(secret.encode("utf-8"), _TOKEN_CONTEXT + body, hashlib.sha256).digest()[:16]


def _require_secret(secret: str) -> None:
    if not secret:
        raise ConfigError("HELPDESK_SECRET_KEY must be set for escalation links")


def make_ack_token(secret: str, escalation_id: int, recipient: str, now: datetime) -> str:
    """A URL-safe token that lets ``recipient`` acknowledge one escalation with one click.

    HMAC-SHA256 over (escalation id, recipient, issue time); it is signed, not encrypted,
    so it carries only the staff address and a number, never patient data.
    """
    _require_secret(secret)
    body = json.dumps(
        [escalation_id, recipient, int(now.timestamp())], separators=(",", ":")
    ).encode("utf-8")
    return f"{_b64(body)}.{_b64(_sign(secret, body))}"


def verify_ack_token(secret: str, token: str, now: datetime, max_age: timedelta) -> AckClaim:
    """The claim in a token, or ``InvalidTokenError`` (``ExpiredTokenError`` if too old)."""
    _require_secret(secret)
    try:
        body_part, sig_part = token.split(".")
        body, signature = _unb64(body_part), _unb64(sig_part)
    except (ValueError, UnicodeEncodeError):
        raise InvalidTokenError("malformed acknowledge link") from None
    if not hmac.compare_digest(signature, _sign(secret, body)):
        raise InvalidTokenError("acknowledge link has a bad signature")
    try:
        escalation_id, recipient, issued = json.loads(body)
    except (ValueError, TypeError):
        raise InvalidTokenError("malformed acknowledge link") from None
    if not (
        isinstance(escalation_id, int) and isinstance(recipient, str) and isinstance(issued, int)
    ):
        raise InvalidTokenError("malformed acknowledge link")
    issued_at = datetime.fromtimestamp(issued, now.tzinfo)
    if issued_at > now + _CLOCK_SKEW:
        raise InvalidTokenError("acknowledge link issued in the future")
    if now - issued_at > max_age:
        raise ExpiredTokenError("acknowledge link has expired")
    return AckClaim(escalation_id=escalation_id, recipient=recipient)


def token_max_age(settings: Settings) -> timedelta:
    """How long an acknowledge link stays valid (``HELPDESK_ESCALATION_TOKEN_HOURS``)."""
    return timedelta(hours=settings.escalation_token_hours)


def ack_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/ack/{token}"


def ticket_url(base_url: str, reference: str) -> str:
    return f"{base_url.rstrip('/')}/tickets/{reference}"


# --------------------------------------------------------------------------- opening


@dataclass(frozen=True, slots=True)
class EscalationOutcome:
    escalation_id: int
    created: bool
    paged: tuple[str, ...]
    oncall_configured: bool
    reopened: bool = False


def _reference(ticket: Ticket) -> str:
    return ticket.reference or f"#{ticket.id}"


def _event(
    session: AsyncSession,
    esc: Escalation,
    kind: str,
    now: datetime,
    *,
    level: int = 0,
    recipient: str = "",
    detail: str = "",
) -> None:
    session.add(
        EscalationEvent(
            escalation_id=_id(esc),
            kind=kind,
            level=level,
            recipient=recipient[:1000],
            detail=detail[:1000],
            created_at=now,
        )
    )


async def open_or_update(
    session: AsyncSession,
    *,
    ticket: Ticket,
    result: CrisisResult,
    received_at: datetime,
    now: datetime,
    identity: Identity,
    settings: Settings,
) -> EscalationOutcome:
    """Open the ticket's escalation and page its first level, or update the open one.

    Runs inside the caller's transaction and never commits: the escalation, its events and
    its notices commit with the mail that caused them.
    """
    if result.tier is None:
        raise ValueError("open_or_update needs a crisis result (tier is None)")
    tier = result.tier
    category = result.category or ""
    rules = ",".join(result.rule_ids)[:500]
    if ticket.id is None:
        await session.flush()
    if ticket.id is None:
        raise ValueError("open_or_update needs a ticket that is in the session")

    _update_ticket(ticket, tier=tier, category=category)
    ticket.priority = "urgent"
    rota = await oncall.levels(session)

    esc = (
        await session.exec(
            select(Escalation).where(Escalation.ticket_id == ticket.id).with_for_update()
        )
    ).first()
    created = reopened = False
    if esc is None:
        esc = Escalation(
            ticket_id=ticket.id,
            tier=tier,
            category=category,
            rule_ids=rules,
            state=OPEN,
            level=0,
            round=1,
            received_at=received_at,
            created_at=now,
            next_action_at=now + delay_for(1, settings.escalation_level_delays),
        )
        session.add(esc)
        await session.flush()
        created = True
        _event(session, esc, "opened", now, detail=f"tier {tier} {category} rules {rules}")
    else:
        previous_tier, previous_state = esc.tier, esc.state
        if tier < esc.tier:
            esc.tier, esc.category = tier, category
        if rules:
            esc.rule_ids = _merge_rules(esc.rule_ids, rules)[:500]
        if esc.state == EXHAUSTED or (esc.state == ACKNOWLEDGED and tier == 1):
            # A new crisis after the last page went unanswered, or a new tier-1 crisis after
            # someone acknowledged: either way a person must look again, so page afresh.
            esc.state, esc.level, esc.round = OPEN, 0, 1
            esc.received_at = received_at
            esc.next_action_at = now + delay_for(1, settings.escalation_level_delays)
            esc.acknowledged_at, esc.acknowledged_by = None, None
            reopened = True
            _event(
                session,
                esc,
                "reopened",
                now,
                detail=f"tier {tier} {category} after {previous_state}",
            )
        else:
            _event(
                session,
                esc,
                "updated",
                now,
                detail=f"tier {tier} {category} (was tier {previous_tier}, {previous_state})",
            )
    ticket.escalation_state = esc.state

    paged: tuple[str, ...] = ()
    if created or reopened:
        if not rota:
            _event(session, esc, "no-rota", now, detail="no on-call member to page")
            log.warning(
                "CRISIS ESCALATION WITH NO ON-CALL ROTA: nobody was paged; add staff with"
                " `helpdesk oncall add`",
                extra=_log_fields(ticket, esc),
            )
        decision = decide(
            state=esc.state,
            level=esc.level,
            round=esc.round,
            next_action_at=esc.next_action_at,
            levels=rota,
            delays=settings.escalation_level_delays,
            repeats=settings.escalation_repeats,
            now=now,
        )
        if decision.action is Action.PAGE:
            paged = await _page(
                session, esc, ticket, decision, now=now, identity=identity, settings=settings
            )
        esc.next_action_at = decision.next_action_at
    what = "opened" if created else "reopened" if reopened else "updated"
    log.info(f"escalation {what}", extra={**_log_fields(ticket, esc), "paged": len(paged)})
    return EscalationOutcome(
        escalation_id=_id(esc),
        created=created,
        paged=paged,
        oncall_configured=bool(rota),
        reopened=reopened,
    )


def _merge_rules(old: str, new: str) -> str:
    merged = dict.fromkeys(r for r in (*old.split(","), *new.split(",")) if r)
    return ",".join(merged)


def _update_ticket(ticket: Ticket, *, tier: int, category: str) -> None:
    if ticket.crisis_tier is None or tier <= ticket.crisis_tier:
        ticket.crisis_category = category or ticket.crisis_category
    if ticket.crisis_tier is None or tier < ticket.crisis_tier:
        ticket.crisis_tier = tier


def _id(esc: Escalation) -> int:
    if esc.id is None:
        raise RuntimeError("escalation has no id: it was not flushed")
    return esc.id


def _log_fields(ticket: Ticket, esc: Escalation) -> dict[str, object]:
    return {
        "escalation_id": esc.id,
        "reference": _reference(ticket),
        "tier": esc.tier,
        "category": esc.category,
        "rules": esc.rule_ids,
        "level": esc.level,
        "round": esc.round,
        "state": esc.state,
    }


async def _page(
    session: AsyncSession,
    esc: Escalation,
    ticket: Ticket,
    decision: Decision,
    *,
    now: datetime,
    identity: Identity,
    settings: Settings,
) -> tuple[str, ...]:
    """Enqueue one notice per member of ``decision.level``; record the events."""
    members = await oncall.members_at_level(session, decision.level)
    esc.level, esc.round = decision.level, decision.round
    reference = _reference(ticket)
    secret = settings.secret_key.get_secret_value()
    base_url = identity.base_url or settings.base_url
    if not secret:
        # Without a secret there is no one-click link; the page itself matters more.
        log.error(
            "escalation notices go out without an acknowledge link:"
            " HELPDESK_SECRET_KEY must be set for escalation links",
            extra={"escalation_id": esc.id},
        )
    paged: list[str] = []
    for member in members:
        link = (
            ack_url(base_url, make_ack_token(secret, _id(esc), member.email, now)) if secret else ""
        )
        msg = compose.escalation_notice_mail(
            identity=identity,
            to_addr=member.email,
            reference=reference,
            tier=esc.tier,
            category=esc.category,
            received_at=esc.received_at,
            ticket_url=ticket_url(base_url, reference),
            ack_url=link,
            level=decision.level,
            round=decision.round,
            message_id=compose.new_message_id(identity.message_id_domain),
            now=now,
        )
        await outbox.enqueue(
            session,
            msg=msg,
            kind=NOTICE_KIND,
            recipient=member.email,
            mail_from=identity.address,
            ticket_id=ticket.id,
            lane=NOTICE_LANE,
            now=now,
            deadline=NOTICE_DEADLINE,
        )
        _event(
            session,
            esc,
            "notice",
            now,
            level=decision.level,
            recipient=member.email,
            detail=f"round {decision.round}",
        )
        if member.webhook_url:
            _event(
                session,
                esc,
                WEBHOOK_PENDING,
                now,
                level=decision.level,
                recipient=member.email,
                detail=WEBHOOK_TRIGGER,
            )
        paged.append(member.email)
    if settings.escalation_webhook_url:
        _event(session, esc, WEBHOOK_PENDING, now, level=decision.level, detail=WEBHOOK_TRIGGER)
    log.info(
        "escalation paged",
        extra={**_log_fields(ticket, esc), "paged": len(paged)},
    )
    return tuple(paged)


# --------------------------------------------------------------------------- the timer


def _due(now: datetime) -> ColumnElement[bool]:
    # NULL counts as due: an open escalation must never sit unpaged for want of a time.
    return or_(col(Escalation.next_action_at).is_(None), col(Escalation.next_action_at) <= now)


async def run_due(
    *,
    sessions: async_sessionmaker[AsyncSession],
    now: datetime,
    identity: Identity,
    settings: Settings,
    worker_id: str,
) -> int:
    """Fire every escalation step due at ``now``; return the number of pages and exhaustions.

    Each escalation is handled in its own transaction. On PostgreSQL the row is locked
    with ``FOR UPDATE SKIP LOCKED`` (a row another worker holds is left to it); on every
    database the step is a compare-and-set on (state, level, round), so a step that
    another worker already took is skipped rather than repeated.
    """
    async with sessions() as session:
        due_ids = list(
            (
                await session.exec(
                    select(Escalation.id)
                    .where(Escalation.state == OPEN, _due(now))
                    .order_by(col(Escalation.next_action_at))
                    .limit(DUE_BATCH)
                )
            ).all()
        )
    actions = 0
    for esc_id in due_ids:
        if esc_id is None:
            continue
        try:
            actions += await _run_one(
                sessions, esc_id, now=now, identity=identity, settings=settings, worker_id=worker_id
            )
        except Exception:
            # One broken escalation must not stop the others from being paged.
            log.exception("escalation step failed", extra={"escalation_id": esc_id})
    return actions


async def _run_one(
    sessions: async_sessionmaker[AsyncSession],
    esc_id: int,
    *,
    now: datetime,
    identity: Identity,
    settings: Settings,
    worker_id: str,
) -> int:
    async with sessions() as session, session.begin():
        esc = (
            await session.exec(
                select(Escalation)
                .where(
                    Escalation.id == esc_id,
                    Escalation.state == OPEN,
                    _due(now),
                )
                .with_for_update(skip_locked=True)
            )
        ).first()
        if esc is None:
            return 0  # taken by another worker, acknowledged, or no longer due
        ticket = await session.get(Ticket, esc.ticket_id)
        if ticket is None:
            raise NotFoundError(f"escalation {esc_id} points to a missing ticket")
        rota = await oncall.levels(session)
        decision = decide(
            state=esc.state,
            level=esc.level,
            round=esc.round,
            next_action_at=esc.next_action_at,
            levels=rota,
            delays=settings.escalation_level_delays,
            repeats=settings.escalation_repeats,
            now=now,
        )
        new_state = EXHAUSTED if decision.action is Action.EXHAUST else OPEN
        claimed = await session.exec(
            update(Escalation)
            .where(
                col(Escalation.id) == esc_id,
                col(Escalation.state) == OPEN,
                col(Escalation.level) == esc.level,
                col(Escalation.round) == esc.round,
                _due(now),
            )
            .values(
                state=new_state,
                level=decision.level,
                round=decision.round,
                next_action_at=decision.next_action_at,
                locked_by=worker_id[:128] or None,
            )
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:
            return 0  # another worker took this step first; our transaction changed nothing
        previous_level, previous_round = esc.level, esc.round
        await session.refresh(esc)

        if decision.action is Action.NOTHING:
            return 0
        if previous_level > 0:
            _event(
                session,
                esc,
                "timeout",
                now,
                level=previous_level,
                detail=f"round {previous_round}: not acknowledged",
            )
        if decision.action is Action.EXHAUST:
            ticket.escalation_state = EXHAUSTED
            session.add(ticket)
            _event(
                session,
                esc,
                "exhausted",
                now,
                level=previous_level,
                detail=f"{previous_round} round(s) paged, nobody acknowledged",
            )
            log.error("escalation exhausted: nobody acknowledged", extra=_log_fields(ticket, esc))
            return 1
        if previous_level > 0:
            log.warning(
                "escalation not acknowledged in time: paging the next level",
                extra={**_log_fields(ticket, esc), "timed_out_level": previous_level},
            )
        # _page sets level/round again (same values) and adds the notices.
        await _page(session, esc, ticket, decision, now=now, identity=identity, settings=settings)
        return 1


# --------------------------------------------------------------------------- acknowledging


async def acknowledge(
    session: AsyncSession, *, escalation_id: int, by: str, now: datetime
) -> Escalation:
    """Mark the escalation acknowledged by ``by`` and stop paging; idempotent.

    Runs in the caller's transaction (the caller commits). Acknowledging twice keeps the
    first acknowledgement and records nothing new.
    """
    esc = await session.get(Escalation, escalation_id, with_for_update=True)
    if esc is None:
        raise NotFoundError(f"no escalation {escalation_id}")
    if esc.state == ACKNOWLEDGED:
        return esc
    esc.state = ACKNOWLEDGED
    esc.acknowledged_at = now
    esc.acknowledged_by = by[:320]
    esc.next_action_at = None
    session.add(esc)
    ticket = await session.get(Ticket, esc.ticket_id)
    if ticket is not None:
        ticket.escalation_state = ACKNOWLEDGED
        session.add(ticket)
    _event(session, esc, "acknowledged", now, level=esc.level, recipient=by, detail=f"by {by}")
    # Close the incident wherever a trigger was (or will be) posted.
    webhook_recipients = (
        await session.exec(
            select(EscalationEvent.recipient)
            .where(
                EscalationEvent.escalation_id == escalation_id,
                col(EscalationEvent.kind).in_((WEBHOOK_PENDING, WEBHOOK_DONE)),
            )
            .distinct()
        )
    ).all()
    for recipient in webhook_recipients:
        _event(
            session,
            esc,
            WEBHOOK_PENDING,
            now,
            level=esc.level,
            recipient=recipient,
            detail=WEBHOOK_ACKNOWLEDGE,
        )
    log.info(
        "escalation acknowledged",
        extra=_log_fields(ticket, esc) if ticket is not None else {"escalation_id": esc.id},
    )
    return esc


async def acknowledge_ticket(
    session: AsyncSession, *, ticket_id: int, by: str, now: datetime
) -> Escalation:
    """:func:`acknowledge` the escalation of a ticket; ``NotFoundError`` if it has none."""
    esc_id = (
        await session.exec(select(Escalation.id).where(Escalation.ticket_id == ticket_id))
    ).first()
    if esc_id is None:
        raise NotFoundError(f"ticket {ticket_id} has no escalation")
    return await acknowledge(session, escalation_id=esc_id, by=by, now=now)


async def get_for_ticket(session: AsyncSession, ticket_id: int) -> Escalation | None:
    return (await session.exec(select(Escalation).where(Escalation.ticket_id == ticket_id))).first()


async def escalation_events(session: AsyncSession, ticket_id: int) -> list[EscalationEvent]:
    """The audit trail of a ticket's escalation, oldest first (empty if it has none)."""
    rows = await session.exec(
        select(EscalationEvent)
        .join(Escalation, col(Escalation.id) == col(EscalationEvent.escalation_id))
        .where(Escalation.ticket_id == ticket_id)
        .order_by(col(EscalationEvent.created_at), col(EscalationEvent.id))
    )
    return list(rows.all())
