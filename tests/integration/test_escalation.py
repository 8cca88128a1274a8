"""Escalation against real databases: a SQLite file and, when reachable, PostgreSQL.

Each test gets its own migrated database (``database_url`` in tests/conftest.py: a SQLite
file, or a throwaway database on the shared PostgreSQL, dropped afterwards). Time is an
explicit fake ``now`` that the tests move forward.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
from email.message import EmailMessage
from pathlib import Path

import pytest
import typer
from sqlmodel import select
from typer.testing import CliRunner

from helpdesk import cli_oncall, escalation, migrations, oncall
from helpdesk.config import Settings
from helpdesk.db import SessionFactory, create_engine, session_factory
from helpdesk.errors import InvalidInputError, NotFoundError
from helpdesk.models import Escalation, EscalationEvent, OnCallMember, Outbox, Ticket
from tests.integration.escalation_support import (
    BASE_URL,
    IDENTITY,
    PATIENT_ADDR,
    PATIENT_NAME,
    PATIENT_SUBJECT,
    ROTA,
    SECRET,
    T0,
    Crisis,
    add_rota,
    at,
    crisis_mail,
    esc_settings,
    events,
    load,
    new_ticket,
    notices,
    tick,
)

# --------------------------------------------------------------------------- opening


async def test_first_crisis_mail_opens_and_pages_level_one(
    db: SessionFactory, cfg: Settings
) -> None:
    await add_rota(
        db, {1: ["primary@clinic.test", "second@clinic.test"], 2: ["backup@clinic.test"]}
    )
    tid = await new_ticket(db)

    outcome = await crisis_mail(db, tid, cfg)

    assert outcome.created
    assert outcome.oncall_configured
    assert not outcome.reopened
    assert outcome.paged == ("primary@clinic.test", "second@clinic.test")
    ticket, esc = await load(db, tid)
    assert (ticket.crisis_tier, ticket.crisis_category) == (1, "overdose")
    assert (ticket.escalation_state, ticket.priority) == ("open", "urgent")
    assert (esc.id, esc.state, esc.level, esc.round, esc.tier) == (
        outcome.escalation_id,
        "open",
        1,
        1,
        1,
    )
    assert esc.rule_ids == "en.overdose.took_pills"
    assert esc.next_action_at == at(300)

    mails = await notices(db)
    assert [(m.kind, m.lane, m.recipient) for m in mails] == [
        ("escalation", 0, "primary@clinic.test"),
        ("escalation", 0, "second@clinic.test"),
    ]
    assert all(m.ticket_id == tid and m.deadline_at == at(3600) for m in mails)
    assert await events(db, tid) == [
        ("opened", 0, ""),
        ("notice", 1, "primary@clinic.test"),
        ("notice", 1, "second@clinic.test"),
    ]


async def test_notice_holds_no_patient_data_and_a_working_ack_link(
    db: SessionFactory, cfg: Settings
) -> None:
    await add_rota(db, {1: ["primary@clinic.test"]})
    tid = await new_ticket(db)
    outcome = await crisis_mail(db, tid, cfg)

    (mail,) = await notices(db)
    parsed = email.message_from_bytes(mail.raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    body_part = parsed.get_body(("plain",))
    assert body_part is not None
    text = str(body_part.get_content())
    whole = mail.raw.decode("ascii", "replace") + text
    for secret in (PATIENT_NAME, PATIENT_ADDR, PATIENT_SUBJECT, "Patientname", "jane.patient"):
        assert secret not in whole
    assert "HD-1042" in str(parsed["Subject"])
    assert f"{BASE_URL}/tickets/HD-1042" in text
    link = next(line for line in text.splitlines() if "/ack/" in line).strip()
    token = link.rsplit("/ack/", 1)[1]
    claim = escalation.verify_ack_token(SECRET, token, T0, escalation.token_max_age(cfg))
    assert claim == escalation.AckClaim(outcome.escalation_id, "primary@clinic.test")


async def test_follow_up_crisis_mail_does_not_page_again(db: SessionFactory, cfg: Settings) -> None:
    await add_rota(db, ROTA)
    tid = await new_ticket(db)
    first = await crisis_mail(db, tid, cfg, tier=2, category="self_harm")

    second = await crisis_mail(db, tid, cfg, now=at(30), tier=1, category="overdose")
    third = await crisis_mail(db, tid, cfg, now=at(60), tier=3, category="distress")

    assert second.escalation_id == third.escalation_id == first.escalation_id
    assert not second.created
    assert not second.reopened
    assert second.paged == ()
    assert third.paged == ()
    assert len(await notices(db)) == 1
    ticket, esc = await load(db, tid)
    assert (esc.tier, esc.category, ticket.crisis_tier, ticket.crisis_category) == (
        1,
        "overdose",
        1,
        "overdose",
    )
    assert esc.next_action_at == at(300)  # the schedule is not restarted
    kinds = [k for k, _, _ in await events(db, tid)]
    assert kinds == ["opened", "notice", "updated", "updated"]
    async with db() as s:
        count = len((await s.exec(select(Escalation))).all())
    assert count == 1


async def test_no_rota_opens_pinned_escalation_and_warns(
    db: SessionFactory, cfg: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    tid = await new_ticket(db)
    with caplog.at_level(logging.WARNING, logger="helpdesk.escalation"):
        outcome = await crisis_mail(db, tid, cfg)

    assert outcome.created
    assert not outcome.oncall_configured
    assert outcome.paged == ()
    ticket, esc = await load(db, tid)
    assert (ticket.escalation_state, ticket.crisis_tier, esc.state, esc.level) == (
        "open",
        1,
        "open",
        0,
    )
    assert [k for k, _, _ in await events(db, tid)] == ["opened", "no-rota"]
    assert await notices(db) == []
    warning = next(r for r in caplog.records if "NO ON-CALL ROTA" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert getattr(warning, "reference", None) == "HD-1042"
    for record in caplog.records:  # identifiers only, never the patient
        text = record.getMessage() + repr(record.__dict__)
        assert PATIENT_NAME not in text
        assert PATIENT_ADDR not in text
        assert PATIENT_SUBJECT not in text

    # Someone adds a rota: the timer pages it on its next look.
    await add_rota(db, {1: ["late@clinic.test"]})
    assert await tick(db, cfg, at(59)) == 0
    assert await tick(db, cfg, at(60)) == 1
    assert [m.recipient for m in await notices(db)] == ["late@clinic.test"]


async def test_open_needs_a_crisis(db: SessionFactory, cfg: Settings) -> None:
    tid = await new_ticket(db)
    async with db() as s:
        ticket = await s.get(Ticket, tid)
        assert ticket is not None
        with pytest.raises(ValueError, match="tier is None"):
            await escalation.open_or_update(
                s,
                ticket=ticket,
                result=Crisis(tier=None),  # type: ignore[arg-type]
                received_at=T0,
                now=T0,
                identity=IDENTITY,
                settings=cfg,
            )


async def test_missing_secret_still_pages_without_a_link(db: SessionFactory, db_url: str) -> None:
    cfg = esc_settings(db_url, secret_key="")
    await add_rota(db, {1: ["primary@clinic.test"]})
    tid = await new_ticket(db)
    outcome = await crisis_mail(db, tid, cfg)
    assert outcome.paged == ("primary@clinic.test",)
    (mail,) = await notices(db)
    assert b"/ack/" not in mail.raw


# --------------------------------------------------------------------------- the timer


async def test_timer_walks_the_whole_schedule_then_exhausts(
    db: SessionFactory, cfg: Settings
) -> None:
    await add_rota(db, ROTA)
    tid = await new_ticket(db)
    await crisis_mail(db, tid, cfg)

    def recipients(rows: list[Outbox]) -> list[str]:
        return [r.recipient for r in rows]

    # (seconds, actions expected, recipients newly paged)
    script = [
        (299, 0, []),
        (300, 1, ["backup@clinic.test"]),
        (301, 0, []),
        (899, 0, []),
        (900, 1, ["a@clinic.test", "b@clinic.test"]),
        (1500, 1, ["primary@clinic.test"]),  # round 2
        (1800, 1, ["backup@clinic.test"]),
        (2400, 1, ["a@clinic.test", "b@clinic.test"]),
        (2999, 0, []),
        (3000, 1, []),  # exhausted: nobody more is paged
        (9999, 0, []),
    ]
    seen = 1
    for seconds, actions, paged in script:
        assert await tick(db, cfg, at(seconds)) == actions, seconds
        rows = await notices(db)
        assert recipients(rows[seen:]) == paged, seconds
        seen = len(rows)
    assert all(r.kind == "escalation" and r.lane == 0 for r in await notices(db))

    ticket, esc = await load(db, tid)
    assert (esc.state, esc.level, esc.round, esc.next_action_at) == ("exhausted", 3, 2, None)
    assert (ticket.escalation_state, ticket.crisis_tier) == ("exhausted", 1)
    kinds = [k for k, _, _ in await events(db, tid)]
    assert kinds.count("timeout") == 6
    assert kinds.count("notice") == 8
    assert kinds[-2:] == ["timeout", "exhausted"]


async def test_timer_skips_an_empty_level(db: SessionFactory, db_url: str) -> None:
    cfg = esc_settings(db_url, escalation_repeats=1)
    await add_rota(db, {1: ["primary@clinic.test"], 3: ["everyone@clinic.test"]})
    tid = await new_ticket(db)
    await crisis_mail(db, tid, cfg)
    assert await tick(db, cfg, at(300)) == 1
    assert [m.recipient for m in await notices(db)][-1] == "everyone@clinic.test"
    assert await tick(db, cfg, at(899)) == 0
    assert await tick(db, cfg, at(900)) == 1
    _, esc = await load(db, tid)
    assert esc.state == "exhausted"


async def test_acknowledge_stops_paging_and_is_idempotent(
    db: SessionFactory, cfg: Settings
) -> None:
    await add_rota(db, ROTA)
    tid = await new_ticket(db)
    outcome = await crisis_mail(db, tid, cfg)
    assert await tick(db, cfg, at(300)) == 1

    async with db() as s:
        esc = await escalation.acknowledge(
            s, escalation_id=outcome.escalation_id, by="backup@clinic.test", now=at(320)
        )
        await s.commit()
    assert (esc.state, esc.acknowledged_by, esc.acknowledged_at, esc.next_action_at) == (
        "acknowledged",
        "backup@clinic.test",
        at(320),
        None,
    )
    async with db() as s:  # again, by someone else: the first acknowledgement stands
        again = await escalation.acknowledge_ticket(
            s, ticket_id=tid, by="a@clinic.test", now=at(400)
        )
        await s.commit()
    assert (again.acknowledged_by, again.acknowledged_at) == ("backup@clinic.test", at(320))

    sent = len(await notices(db))
    for seconds in (900, 1500, 5000):
        assert await tick(db, cfg, at(seconds)) == 0
    assert len(await notices(db)) == sent
    ticket, _ = await load(db, tid)
    assert ticket.escalation_state == "acknowledged"
    ack_events = [e for e in await events(db, tid) if e[0] == "acknowledged"]
    assert ack_events == [("acknowledged", 2, "backup@clinic.test")]


async def test_acknowledge_unknown_is_not_found(db: SessionFactory) -> None:
    tid = await new_ticket(db)
    async with db() as s:
        with pytest.raises(NotFoundError):
            await escalation.acknowledge(s, escalation_id=999, by="x@clinic.test", now=T0)
        with pytest.raises(NotFoundError):
            await escalation.acknowledge_ticket(s, ticket_id=tid, by="x@clinic.test", now=T0)


async def test_new_tier_one_after_acknowledgement_reopens(
    db: SessionFactory, cfg: Settings
) -> None:
    await add_rota(db, ROTA)
    tid = await new_ticket(db)
    outcome = await crisis_mail(db, tid, cfg)
    async with db() as s:
        await escalation.acknowledge(
            s, escalation_id=outcome.escalation_id, by="primary@clinic.test", now=at(60)
        )
        await s.commit()

    # A tier-2 follow-up after the acknowledgement is recorded, nobody is paged.
    lesser = await crisis_mail(db, tid, cfg, now=at(600), tier=2, category="distress")
    assert not lesser.reopened
    assert lesser.paged == ()
    ticket, _ = await load(db, tid)
    assert ticket.escalation_state == "acknowledged"

    # A new tier-1 crisis must reach someone again: a fresh round from level 1.
    again = await crisis_mail(db, tid, cfg, now=at(1200), tier=1)
    assert again.reopened
    assert not again.created
    assert again.escalation_id == outcome.escalation_id
    assert again.paged == ("primary@clinic.test",)
    ticket, esc = await load(db, tid)
    assert (esc.state, esc.level, esc.round, esc.acknowledged_by) == ("open", 1, 1, None)
    assert esc.next_action_at == at(1500)
    assert ticket.escalation_state == "open"
    assert await tick(db, cfg, at(1500)) == 1
    assert [m.recipient for m in await notices(db)][-1] == "backup@clinic.test"
    kinds = [k for k, _, _ in await events(db, tid)]
    assert kinds[:5] == ["opened", "notice", "acknowledged", "updated", "reopened"]


async def test_crisis_after_exhaustion_reopens(db: SessionFactory, db_url: str) -> None:
    cfg = esc_settings(db_url, escalation_repeats=1)
    await add_rota(db, {1: ["primary@clinic.test"]})
    tid = await new_ticket(db)
    await crisis_mail(db, tid, cfg)
    assert await tick(db, cfg, at(300)) == 1  # exhausted
    _, esc = await load(db, tid)
    assert esc.state == "exhausted"
    again = await crisis_mail(db, tid, cfg, now=at(1000), tier=3)
    assert again.reopened
    assert again.paged == ("primary@clinic.test",)


async def test_concurrent_timers_page_each_step_once(db: SessionFactory, cfg: Settings) -> None:
    """Several workers fire the same due escalations: every step happens exactly once."""
    await add_rota(db, ROTA)
    tids = [await new_ticket(db, f"HD-{n}") for n in range(12)]
    for tid in tids:
        await crisis_mail(db, tid, cfg)
    engines = [create_engine(cfg) for _ in range(3)]
    try:
        factories = [session_factory(e) for e in engines]
        for seconds in (300, 900):
            results = await asyncio.gather(
                *(tick(f, cfg, at(seconds), worker=f"w{i}") for i, f in enumerate(factories))
            )
            assert sum(results) == len(tids), (seconds, results)
    finally:
        for e in engines:
            await e.dispose()
    rows = await notices(db)
    # level 1 (1 each) + level 2 (1 each) + level 3 (2 each)
    assert len(rows) == len(tids) * 4
    per_ticket = {tid: sorted(r.recipient for r in rows if r.ticket_id == tid) for tid in tids}
    assert all(
        v == sorted(["primary@clinic.test", "backup@clinic.test", "a@clinic.test", "b@clinic.test"])
        for v in per_ticket.values()
    )


async def test_events_for_a_ticket_without_escalation_are_empty(db: SessionFactory) -> None:
    tid = await new_ticket(db)
    async with db() as s:
        assert await escalation.escalation_events(s, tid) == []


# --------------------------------------------------------------------------- rota


async def test_rota_data_access(db: SessionFactory) -> None:
    async with db() as s:
        assert not await oncall.rota_configured(s)
        await oncall.add_member(s, email=" Primary@Clinic.TEST ", level=1, name="Pat")
        await oncall.add_member(s, email="backup@clinic.test", level=3)
        again = await oncall.add_member(s, email="primary@clinic.test", level=2, phone="+1 555")
        await s.commit()
        assert (again.email, again.level, again.phone, again.name) == (
            "primary@clinic.test",
            2,
            "+1 555",
            "",
        )
        assert await oncall.levels(s) == [2, 3]
        assert await oncall.rota_configured(s)
        assert [m.email for m in await oncall.members_at_level(s, 2)] == ["primary@clinic.test"]
        assert [m.email for m in await oncall.list_members(s)] == [
            "primary@clinic.test",
            "backup@clinic.test",
        ]
        for bad in ("nobody", "a@b", "a b@c.d", "x@y.z\r\nBcc: evil@x.y", ""):
            with pytest.raises(InvalidInputError):
                await oncall.add_member(s, email=bad, level=1)
        with pytest.raises(InvalidInputError):
            await oncall.add_member(s, email="ok@clinic.test", level=0)
        await oncall.remove_member(s, email="BACKUP@clinic.test")
        with pytest.raises(NotFoundError):
            await oncall.remove_member(s, email="backup@clinic.test")
        await s.commit()
        assert await oncall.levels(s) == [2]


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(tmp_path: Path) -> tuple[typer.Typer, Settings]:
    cfg = esc_settings(f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")
    migrations.upgrade(cfg)
    parent = typer.Typer()

    @parent.callback()
    def _root() -> None:
        """The lead's root command stands here."""

    cli_oncall.register(parent, lambda: cfg)
    return parent, cfg


def test_cli_add_list_remove(cli: tuple[typer.Typer, Settings]) -> None:
    app, cfg = cli
    runner = CliRunner()

    r = runner.invoke(app, ["oncall", "list"])
    assert r.exit_code == 0
    assert "no on-call members" in r.output

    r = runner.invoke(
        app, ["oncall", "add", "Primary@Clinic.test", "--level", "1", "--name", "Pat Doe"]
    )
    assert r.exit_code == 0, r.output
    assert "primary@clinic.test" in r.output
    r = runner.invoke(
        app, ["oncall", "add", "backup@clinic.test", "--level", "2", "--phone", "+1 555 0100"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["oncall", "add", "primary@clinic.test", "--level", "3", "--name", "Pat D."]
    )
    assert r.exit_code == 0, r.output  # existing address: updated

    r = runner.invoke(app, ["oncall", "list"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split() == ["LEVEL", "EMAIL", "NAME", "PHONE", "WEBHOOK"]
    assert lines[1].split()[:2] == ["2", "backup@clinic.test"]
    assert lines[2].split()[:2] == ["3", "primary@clinic.test"]

    r = runner.invoke(app, ["oncall", "list", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.output) == [
        {
            "email": "backup@clinic.test",
            "level": 2,
            "name": "",
            "phone": "+1 555 0100",
            "webhook": False,
            "active": True,
        },
        {
            "email": "primary@clinic.test",
            "level": 3,
            "name": "Pat D.",
            "phone": "",
            "webhook": False,
            "active": True,
        },
    ]

    r = runner.invoke(app, ["oncall", "remove", "backup@clinic.test"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["oncall", "remove", "backup@clinic.test"])
    assert r.exit_code == 1
    assert "no on-call member" in r.output

    async def _members() -> list[OnCallMember]:
        engine = create_engine(cfg)
        try:
            async with session_factory(engine)() as s:
                return await oncall.list_members(s)
        finally:
            await engine.dispose()

    assert [m.email for m in asyncio.run(_members())] == ["primary@clinic.test"]


@pytest.mark.parametrize("bad", ["not-an-address", "a@b", "two@@clinic.test", "x y@clinic.test"])
def test_cli_bad_email_is_one_line_exit_2(cli: tuple[typer.Typer, Settings], bad: str) -> None:
    app, _ = cli
    r = CliRunner().invoke(app, ["oncall", "add", bad, "--level", "1"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [f"error: not a valid e-mail address: {bad!r}"]


def test_cli_level_must_be_positive(cli: tuple[typer.Typer, Settings]) -> None:
    app, _ = cli
    r = CliRunner().invoke(app, ["oncall", "add", "ok@clinic.test", "--level", "0"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: on-call level must be 1 or more, not 0"
    r = CliRunner().invoke(app, ["oncall", "add", "ok@clinic.test"])
    assert r.exit_code == 2  # --level is required


def test_cli_bad_webhook_is_exit_2(cli: tuple[typer.Typer, Settings]) -> None:
    app, _ = cli
    r = CliRunner().invoke(
        app, ["oncall", "add", "ok@clinic.test", "--level", "1", "--webhook", "ftp://x"]
    )
    assert r.exit_code == 2
    assert "webhook URL" in r.output


async def test_events_are_ordered(db: SessionFactory, cfg: Settings) -> None:
    await add_rota(db, {1: ["p@clinic.test"]})
    tid = await new_ticket(db)
    await crisis_mail(db, tid, cfg)
    async with db() as s:
        evs = await escalation.escalation_events(s, tid)
        assert all(isinstance(e, EscalationEvent) for e in evs)
        assert [e.created_at for e in evs] == sorted(e.created_at for e in evs)
