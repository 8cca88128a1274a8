"""The whole desk end to end, on real servers: Dovecot -> worker -> database -> SMTP receiver,
and a staff member in Chromium in the middle.

A patient's crisis mail arrives in Dovecot with two routine mails; one worker pass escalates it
(crisis reply to the patient, notice to the on-call member). The on-call agent signs in, finds
the crisis pinned above the queue, acknowledges it and replies; the next worker pass delivers
the reply, threaded to the patient's mail. A second test follows the acknowledge link from the
notice instead: signed out -> sign-in page -> the ticket, acknowledged.

Screenshots of the queue and the ticket go to ``test-artifacts/e2e-*.png``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
from sqlmodel import select

from helpdesk import oncall, users
from helpdesk.config import Settings
from helpdesk.db import create_engine, session_factory
from helpdesk.models import Escalation, Ticket
from helpdesk.testing.dovecot import DovecotServer, ImapAccount
from helpdesk.testing.smtp import ReceivedMessage, SmtpReceiver
from helpdesk.worker import RunReport, Worker
from tests.conftest import server_settings
from tests.factories import SUPPORT, patient_mail
from tests.web.conftest import ARTIFACTS, PASSWORD, LiveServer, free_port, run

pytestmark = [pytest.mark.browser, pytest.mark.dovecot]

CRISIS_ID = "<e2e-crisis@patients.test>"
CRISIS_TEXT = "I took all my pills tonight and I don't want to wake up"
PATIENT = "jordan.miles@patients.test"
AGENT = "sam@clinic.test"  # staff user and the only member of the on-call rota
REPLY_TEXT = "Jordan, thank you for writing to us. A clinician is calling you right now."
ACK_LINK = re.compile(r"http://\S+/ack/[A-Za-z0-9_.-]+")


def text_of(mail: EmailMessage) -> str:
    body = mail.get_body(preferencelist=("plain",))
    assert body is not None, "no text/plain part"
    return str(body.get_content())  # type: ignore[attr-defined]


def addressed_to(messages: list[ReceivedMessage], address: str) -> list[ReceivedMessage]:
    return [m for m in messages if address in m.rcpt_tos]


@dataclass
class Desk:
    settings: Settings
    server: LiveServer
    reference: str
    routine: list[str]
    notice: ReceivedMessage
    crisis_reply: ReceivedMessage


async def _seed_staff(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        async with session_factory(engine)() as session:
            await users.add_user(
                session, email=AGENT, role="agent", password=PASSWORD, name="Sam Lee"
            )
            await oncall.add_member(session, email=AGENT, level=1, name="Sam Lee")
            await session.commit()
    finally:
        await engine.dispose()


async def _worker_once(settings: Settings) -> RunReport:
    engine = create_engine(settings)
    try:
        return await Worker(settings, session_factory(engine)).run_once()
    finally:
        await engine.dispose()


async def _tickets(settings: Settings) -> list[Ticket]:
    engine = create_engine(settings)
    try:
        async with session_factory(engine)() as session:
            return list((await session.exec(select(Ticket))).all())
    finally:
        await engine.dispose()


async def _escalation(settings: Settings) -> Escalation:
    engine = create_engine(settings)
    try:
        async with session_factory(engine)() as session:
            return (await session.exec(select(Escalation))).one()
    finally:
        await engine.dispose()


@pytest.fixture
def desk(
    database_url: str,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
    live_server: Callable[..., LiveServer],
    browser: Any,  # so that without Chromium the test skips (fails in CI) before mail moves
) -> Desk:
    """Crisis and routine mail delivered to Dovecot, one worker pass done, the app served."""
    port = free_port()
    settings = server_settings(
        database_url,
        imap_account,
        smtp_receiver,
        support_address=SUPPORT,
        base_url=f"http://127.0.0.1:{port}",  # the links in the notice point at the live app
    )
    run(_seed_staff(settings))
    dovecot.append_many(
        imap_account.user,
        imap_account.password,
        [
            patient_mail(
                sender="Maria Lopez <maria.lopez@patients.test>",
                subject="Refill for lisinopril",
                message_id="<e2e-routine-1@patients.test>",
            ),
            patient_mail(
                sender=f"Jordan Miles <{PATIENT}>",
                subject="tonight",
                body=CRISIS_TEXT,
                message_id=CRISIS_ID,
            ),
            patient_mail(
                sender="John Smith <john.smith@patients.test>",
                subject="Charged twice for my video visit",
                message_id="<e2e-routine-2@patients.test>",
            ),
        ],
    )

    report = run(_worker_once(settings))
    assert (report.poll.fetched, report.poll.created, report.poll.crisis) == (3, 3, 1)
    assert report.failed == 0
    # two acknowledgements, the crisis reply and the on-call notice
    received = smtp_receiver.wait_for_sync(4)
    assert len(received) == 4, [m.rcpt_tos for m in received]
    tickets = run(_tickets(settings))
    [crisis] = [t for t in tickets if t.crisis_tier is not None]
    assert crisis.requester == PATIENT
    assert crisis.crisis_tier == 1 and crisis.escalation_state == "open"
    assert crisis.reference is not None

    [notice] = addressed_to(received, AGENT)
    assert crisis.reference in text_of(notice.message)
    assert "pills" not in text_of(notice.message)  # no patient details in a page
    [crisis_reply] = addressed_to(received, PATIENT)
    assert crisis_reply.message["In-Reply-To"] == CRISIS_ID
    assert "988" in text_of(crisis_reply.message) and "911" in text_of(crisis_reply.message)

    server = live_server(settings, port)
    return Desk(
        settings=settings,
        server=server,
        reference=crisis.reference,
        routine=[t.reference for t in tickets if t.crisis_tier is None and t.reference],
        notice=notice,
        crisis_reply=crisis_reply,
    )


def _sign_in(page: Any) -> None:
    assert "/login" in page.url
    page.get_by_label("E-mail address").fill(AGENT)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()


def test_crisis_from_mailbox_to_threaded_staff_reply(
    desk: Desk, page: Any, smtp_receiver: SmtpReceiver, database_url: str
) -> None:
    base, ref = desk.server.url, desk.reference
    dialect = database_url.split(":", 1)[0].split("+", 1)[0]
    ARTIFACTS.mkdir(exist_ok=True)

    page.goto(base + "/")
    _sign_in(page)
    page.wait_for_url(base + "/")

    # The crisis is pinned above the queue, before every other ticket, with its badge.
    pinned = page.locator("section.pinned")
    assert pinned.locator(f'a[href="/tickets/{ref}"]').count() == 1
    first = page.locator('main a[href^="/tickets/"]').first
    assert first.get_attribute("href") == f"/tickets/{ref}"
    assert pinned.locator(".badge.crisis").first.inner_text().startswith("⚠ Crisis · Tier 1")
    for routine in desk.routine:
        assert page.locator(f'a[href="/tickets/{routine}"]').count() == 1
        assert pinned.locator(f'a[href="/tickets/{routine}"]').count() == 0
    page.screenshot(path=str(ARTIFACTS / f"e2e-queue-{dialect}.png"), full_page=True)

    pinned.locator(f'a[href="/tickets/{ref}"]').click()
    page.wait_for_url(f"{base}/tickets/{ref}")
    assert CRISIS_TEXT in page.locator("article.msg-inbound").first.inner_text()

    page.get_by_role("button", name="Acknowledge").click()
    page.wait_for_url(f"{base}/tickets/{ref}")
    assert "paging stopped" in page.locator(".flashes").inner_text()
    assert page.get_by_role("button", name="Acknowledge").count() == 0
    assert f"by {AGENT}" in page.locator("dd").filter(has_text=AGENT).first.inner_text()
    assert "ack'd" in page.locator("h1 .badge.crisis").inner_text()
    esc = run(_escalation(desk.settings))
    assert (esc.state, esc.acknowledged_by) == ("acknowledged", AGENT)

    page.get_by_label("Reply text").fill(REPLY_TEXT)
    page.get_by_role("button", name="Send reply").click()
    page.wait_for_url(f"{base}/tickets/{ref}")
    assert "Reply queued for sending." in page.locator(".flashes").inner_text()
    assert page.locator("article.msg-outbound").filter(has_text=REPLY_TEXT).count() == 1
    page.screenshot(path=str(ARTIFACTS / f"e2e-ticket-{dialect}.png"), full_page=True)

    before = len(smtp_receiver.messages)
    report = run(_worker_once(desk.settings))
    assert (report.poll.fetched, report.sent, report.failed) == (0, 1, 0)
    [staff_reply] = smtp_receiver.wait_for_sync(before + 1)[before:]
    assert staff_reply.rcpt_tos == (PATIENT,)
    mail = staff_reply.message
    assert mail["To"].addresses[0].addr_spec == PATIENT
    assert mail["From"].addresses[0].addr_spec == SUPPORT
    assert mail["In-Reply-To"] == CRISIS_ID
    assert CRISIS_ID in str(mail["References"]).split()
    assert ref in str(mail["Subject"])
    assert REPLY_TEXT in text_of(mail)
    # acknowledged: the next pass pages nobody again
    assert addressed_to(smtp_receiver.messages[before:], AGENT) == []


def test_acknowledge_link_in_the_notice_signs_in_and_acknowledges(desk: Desk, page: Any) -> None:
    base, ref = desk.server.url, desk.reference
    links = ACK_LINK.findall(text_of(desk.notice.message))
    assert len(links) == 1, text_of(desk.notice.message)
    [link] = links
    assert link.startswith(base + "/ack/")

    page.goto(link)  # signed out: the sign-in page, which remembers where to go
    assert page.url.startswith(base + "/login?next=")
    _sign_in(page)
    page.wait_for_url(f"{base}/tickets/{ref}")
    assert "acknowledged — paging stopped" in page.locator(".flashes").inner_text()
    assert page.get_by_role("button", name="Acknowledge").count() == 0
    assert "ack'd" in page.locator("h1 .badge.crisis").inner_text()
    esc = run(_escalation(desk.settings))
    assert (esc.state, esc.acknowledged_by) == ("acknowledged", AGENT)
