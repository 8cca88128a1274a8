"""Shared pieces of the escalation and webhook tests: a fixed clock, a stand-in crisis
result, settings, and helpers that build a rota, a ticket and a crisis mail."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import col, select

from helpdesk import escalation, oncall
from helpdesk.compose import Identity
from helpdesk.config import Settings, load_settings
from helpdesk.db import SessionFactory
from helpdesk.models import Escalation, Outbox, Ticket

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "test-secret-key-not-for-production"
BASE_URL = "http://127.0.0.1:8000"
IDENTITY = Identity(
    address="help@clinic.test",
    name="Clinic Support",
    message_id_domain="clinic.test",
    base_url=BASE_URL,
)
PATIENT_NAME = "Jane Q. Patientname"
PATIENT_ADDR = "jane.patient@home.test"
PATIENT_SUBJECT = "I took all my pills tonight"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Crisis:
    """Stands in for helpdesk.crisis.CrisisResult: the attributes escalation reads."""

    tier: int | None
    category: str | None = "overdose"
    rule_ids: tuple[str, ...] = ("en.overdose.took_pills",)


def esc_settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "support_address": "help@clinic.test",
        "secret_key": SECRET,
        "base_url": BASE_URL,
        "escalation_repeats": 2,
    }
    values.update(overrides)
    return load_settings(**values)


# --------------------------------------------------------------------------- helpers


async def add_rota(db: SessionFactory, rota: dict[int, list[str]]) -> None:
    async with db() as s:
        for level, emails in rota.items():
            for email in emails:
                await oncall.add_member(s, email=email, level=level)
        await s.commit()


ROTA = {
    1: ["primary@clinic.test"],
    2: ["backup@clinic.test"],
    3: ["a@clinic.test", "b@clinic.test"],
}


async def new_ticket(db: SessionFactory, reference: str = "HD-1042") -> int:
    async with db() as s:
        ticket = Ticket(
            reference=reference,
            subject=PATIENT_SUBJECT,
            requester=PATIENT_ADDR,
            requester_name=PATIENT_NAME,
            created_at=T0,
            updated_at=T0,
            last_message_at=T0,
            due_at=T0,
        )
        s.add(ticket)
        await s.commit()
        assert ticket.id is not None
        return ticket.id


async def crisis_mail(
    db: SessionFactory,
    ticket_id: int,
    cfg: Settings,
    *,
    now: datetime = T0,
    tier: int = 1,
    category: str = "overdose",
) -> escalation.EscalationOutcome:
    """What the pipeline does for one crisis mail: open_or_update inside its transaction."""
    async with db() as s:
        ticket = await s.get(Ticket, ticket_id)
        assert ticket is not None
        outcome = await escalation.open_or_update(
            s,
            ticket=ticket,
            result=Crisis(tier=tier, category=category),  # type: ignore[arg-type]
            received_at=now,
            now=now,
            identity=IDENTITY,
            settings=cfg,
        )
        await s.commit()
        return outcome


async def tick(db: SessionFactory, cfg: Settings, now: datetime, worker: str = "w1") -> int:
    return await escalation.run_due(
        sessions=db, now=now, identity=IDENTITY, settings=cfg, worker_id=worker
    )


async def notices(db: SessionFactory) -> list[Outbox]:
    async with db() as s:
        rows = await s.exec(select(Outbox).order_by(col(Outbox.id)))
        return list(rows.all())


async def events(db: SessionFactory, ticket_id: int) -> list[tuple[str, int, str]]:
    async with db() as s:
        return [
            (e.kind, e.level, e.recipient) for e in await escalation.escalation_events(s, ticket_id)
        ]


async def load(db: SessionFactory, ticket_id: int) -> tuple[Ticket, Escalation]:
    async with db() as s:
        ticket = await s.get(Ticket, ticket_id)
        esc = await escalation.get_for_ticket(s, ticket_id)
        assert ticket is not None
        assert esc is not None
        return ticket, esc
