"""robots: never acknowledge a robot, always acknowledge a person."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpdesk.parse import parse
from helpdesk.robots import RobotVerdict, bounced_message_ids, judge

MAIL = Path(__file__).resolve().parents[1] / "data" / "mail"
OWN = frozenset({"help@clinic.test"})


def mail(*headers: str, body: str = "Hello, I need help with my refill.\n") -> bytes:
    lines = ["From: Maria <maria@patients.test>", "To: help@clinic.test", *headers]
    return ("\n".join(lines) + "\n\n" + body).encode()


def verdict(raw: bytes) -> RobotVerdict:
    return judge(parse(raw), own_addresses=OWN)


@pytest.mark.parametrize(
    "name", ["spanish_qp.eml", "html_only.eml", "reply.eml", "hostile_attachment.eml"]
)
def test_people_are_answered(name: str) -> None:
    v = verdict((MAIL / name).read_bytes())
    assert v == RobotVerdict("human", "") and not v.suppress_reply


def test_fixtures_for_robots() -> None:
    assert verdict((MAIL / "out_of_office.eml").read_bytes()).kind == "auto-reply"
    bounce = parse((MAIL / "bounce_dsn.eml").read_bytes())
    v = judge(bounce, own_addresses=OWN)
    assert v.kind == "bounce" and v.suppress_reply
    assert v.reason == "multipart/report delivery-status"
    assert bounced_message_ids(bounce) == ("<ack-1042@clinic.test>",)


@pytest.mark.parametrize(
    ("headers", "kind", "reason"),
    [
        (["Auto-Submitted: auto-replied"], "auto-reply", "Auto-Submitted: auto-replied"),
        (["Auto-Submitted: auto-generated"], "auto-reply", "Auto-Submitted: auto-generated"),
        (["Precedence: bulk"], "list", "Precedence: bulk"),
        (["Precedence: list"], "list", "Precedence: list"),
        (["Precedence: junk"], "list", "Precedence: junk"),
        (["Precedence: auto_reply"], "auto-reply", "Precedence: auto_reply"),
        (["List-Id: <news.x.test>"], "list", "List-Id"),
        (["List-Unsubscribe: <mailto:u@x.test>"], "list", "List-Unsubscribe"),
        (["X-Autoreply: yes"], "auto-reply", "X-Autoreply"),
        (["X-Autorespond: yes"], "auto-reply", "X-Autorespond"),
        (["X-Auto-Response-Suppress: OOF"], "auto-reply", "X-Auto-Response-Suppress"),
        (["X-Failed-Recipients: a@x.test"], "bounce", "X-Failed-Recipients"),
        (["Return-Path: <>"], "bounce", "null Return-Path"),
        (["Subject: Automatic reply: my refill"], "auto-reply", "out-of-office subject"),
        (["Subject: Auto reply: hello"], "auto-reply", "out-of-office subject"),
        (["Subject: Out of Office"], "auto-reply", "out-of-office subject"),
        (["Subject: Abwesenheitsnotiz: Termin"], "auto-reply", "out-of-office subject"),
        (["Subject: Respuesta automática: cita"], "auto-reply", "out-of-office subject"),
        (["Subject: Fuera de la oficina"], "auto-reply", "out-of-office subject"),
        (["Subject: Undelivered Mail Returned to Sender"], "bounce", "delivery-report subject"),
        (["Subject: Delivery Status Notification (Failure)"], "bounce", "delivery-report subject"),
        (["Subject: Returned mail: see transcript"], "bounce", "delivery-report subject"),
        (["Feedback-ID: 1:2:3:esp"], "list", "Feedback-ID (bulk sender)"),
    ],
)
def test_header_rules(headers: list[str], kind: str, reason: str) -> None:
    assert verdict(mail(*headers)) == RobotVerdict(kind, reason)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "headers",
    [
        ["Auto-Submitted: no"],
        ["X-Auto-Response-Suppress: None"],
        ["Subject: Re: Out of office next week? Can I still book?"],
        ["Subject: Fwd: Undelivered Mail Returned to Sender"],
        ["Return-Path: <maria@patients.test>"],
        ["Subject: my newsletter subscription"],
    ],
)
def test_people_who_look_a_little_like_robots(headers: list[str]) -> None:
    assert verdict(mail(*headers)).kind == "human"


def test_mailer_daemon_and_postmaster() -> None:
    raw = b"From: MAILER-DAEMON (Mail Delivery System)\nTo: help@clinic.test\n\nx\n"
    assert verdict(raw) == RobotVerdict("bounce", "MAILER-DAEMON sender")
    raw = b"From: postmaster@mx.x.test\nTo: help@clinic.test\n\nx\n"
    assert verdict(raw) == RobotVerdict("bounce", "POSTMASTER sender")


def test_own_address_is_a_loop() -> None:
    raw = b"From: Clinic <HELP@clinic.test>\nAuto-Submitted: auto-replied\n\nx\n"
    assert verdict(raw) == RobotVerdict("loop", "own support address")
    assert judge(parse(raw)).kind == "auto-reply"  # no own addresses given
    looped = mail("X-Loop: help@clinic.test")
    assert verdict(looped) == RobotVerdict("loop", "X-Loop")


def report(report_type: str) -> bytes:
    return (
        "From: a@x.test\nTo: help@clinic.test\n"
        f'Content-Type: multipart/report; report-type={report_type}; boundary="b"\n\n'
        "--b\nContent-Type: text/plain\n\nreport\n--b--\n"
    ).encode()


def test_reports() -> None:
    assert verdict(report("delivery-status")).kind == "bounce"
    assert verdict(report("disposition-notification")).kind == "auto-reply"
    assert verdict(report("feedback-report")) == RobotVerdict(
        "bounce", "multipart/report feedback-report (ARF)"
    )


def test_bounce_without_headers_that_say_so() -> None:
    raw = (
        b"From: no-reply@isp.test\nTo: help@clinic.test\nSubject: Notice\n"
        b'Content-Type: multipart/mixed; boundary="b"\n\n'
        b"--b\nContent-Type: text/plain\n\nYour mail could not be delivered.\n"
        b"--b\nContent-Type: message/rfc822\n\nFrom: help@clinic.test\n"
        b"Message-ID: <ack-9@clinic.test>\n\nThanks\n--b--\n"
    )
    email = parse(raw)
    v = judge(email, own_addresses=OWN)
    assert v.kind == "bounce" and "original attached" in v.reason
    assert bounced_message_ids(email) == ("<ack-9@clinic.test>",)
    forwarded = raw.replace(b"Subject: Notice", b"Subject: Fwd: Notice")
    assert verdict(forwarded).kind == "human"  # a patient forwarding a bounce is a person


def test_bounced_ids_from_quoted_headers_and_raw() -> None:
    body = "Original message follows:\n  Message-ID: <ack-77@clinic.test>\n"
    email = parse(mail("Subject: Mail delivery failed", "Message-ID: <b@mx.test>", body=body))
    assert bounced_message_ids(email) == ("<ack-77@clinic.test>",)
    raw = mail("Message-ID: <b@mx.test>", body="nothing here\n")
    bare = parse(raw)
    assert bounced_message_ids(bare) == ()
    raw2 = raw + b"\n> Message-Id: <ack-78@clinic.test>\n"
    assert bounced_message_ids(parse(b"From: a@x.test\n\nx\n"), raw2) == ("<ack-78@clinic.test>",)


def test_verdict_is_frozen() -> None:
    v = RobotVerdict("list", "List-Id")
    with pytest.raises(AttributeError):
        v.kind = "human"  # type: ignore[misc]
