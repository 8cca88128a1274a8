"""compose: what our mail says, what it never says, and headers nobody can inject into."""

from __future__ import annotations

import email
import re
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest

from helpdesk import compose
from helpdesk.compose import (
    DEFAULT_ACK_SUBJECT,
    Identity,
    ack_mail,
    escalation_notice_mail,
    fold_header_text,
    new_message_id,
    own_template_texts,
    safe_header_value,
    staff_reply_mail,
    to_bytes,
)
from helpdesk.errors import InvalidInputError

NOW = datetime(2025, 3, 4, 15, 30, tzinfo=UTC)
ID = Identity(
    address="help@clinic.test",
    name="Clinic Support",
    message_id_domain="clinic.test",
    base_url="https://desk.clinic.test",
)
HEALTH_SUBJECT = "my HIV test results and my oxycodone dose"
PATIENT_NAME = "Maria Lopez-Garcia"


def ack_values(**overrides: Any) -> dict[str, Any]:
    """The acknowledgement's arguments, all but its reference."""
    values: dict[str, Any] = {
        "identity": ID,
        "to_addr": "maria@patient.test",
        "to_name": PATIENT_NAME,
        "subject_template": DEFAULT_ACK_SUBJECT,
        "reply_window": "5–7 days",
        "language": "en",
        "in_reply_to": "<their-1@patient.test>",
        "references": ["<root@patient.test>"],
        "message_id": "<ack-1@clinic.test>",
        "now": NOW,
    }
    values.update(overrides)
    return values


def ack(**overrides: Any) -> EmailMessage:
    return ack_mail(**ack_values(**{"reference": "HD-1042", **overrides}))


def reply(**overrides: Any) -> EmailMessage:
    values: dict[str, Any] = {
        "identity": ID,
        "to_addr": "maria@patient.test",
        "to_name": PATIENT_NAME,
        "reference": "HD-1042",
        "ticket_subject": "Question about my refill",
        "body_text": "Hello Maria,\n\nYour refill was sent to the pharmacy.",
        "staff_name": "Sam Rivera",
        "language": "en",
        "in_reply_to": "<their-2@patient.test>",
        "references": ["<their-1@patient.test>", "<ack-1@clinic.test>"],
        "message_id": "<reply-1@clinic.test>",
        "now": NOW,
    }
    values.update(overrides)
    return staff_reply_mail(**values)


def notice(**overrides: Any) -> EmailMessage:
    values: dict[str, Any] = {
        "identity": ID,
        "to_addr": "oncall@clinic.test",
        "reference": "HD-1042",
        "tier": 1,
        "category": "suicide_risk",
        "received_at": datetime(2025, 3, 4, 15, 29, 12, tzinfo=timezone(timedelta(hours=-5))),
        "ticket_url": "https://desk.clinic.test/tickets/1042",
        "ack_url": "https://desk.clinic.test/ack/abc.def",
        "level": 1,
        "round": 1,
        "message_id": "<esc-1@clinic.test>",
        "now": NOW,
    }
    values.update(overrides)
    return escalation_notice_mail(**values)


def roundtrip(msg: EmailMessage) -> EmailMessage:
    raw = to_bytes(msg)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n")), "a line longer than 998"
    assert raw.isascii(), "not 7-bit"
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert not parsed.defects
    return parsed


def texts(msg: EmailMessage) -> list[str]:
    """Every text part and every header, decoded."""
    out = [f"{k}: {v}" for k, v in msg.items()]
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            out.append(str(part.get_content()).replace("\r\n", "\n"))
    return out


def body(msg: EmailMessage, subtype: str = "plain") -> str:
    part = msg.get_body((subtype,))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


# --- acknowledgement --------------------------------------------------------------------


def test_ack_en_states_reference_window_and_footer() -> None:
    msg = roundtrip(ack())
    assert msg["Subject"] == "We received your message [HD-1042]"
    for subtype in ("plain", "html"):
        text = body(msg, subtype)
        assert "HD-1042" in text
        assert "5–7 days" in text
        assert "911" in text
        assert "988" in text
    assert "(Suicide &amp; Crisis Lifeline)" in body(msg, "html")
    assert "If this is an emergency, call 911." in body(msg, "plain")


def test_ack_es_is_spanish_with_localised_window_and_988_press_2() -> None:
    msg = roundtrip(ack(language="es"))
    assert msg["Subject"] == "Hemos recibido su mensaje [HD-1042]"
    assert msg["Content-Language"] == "es"
    text = body(msg)
    assert "5 a 7 días" in text
    assert "HD-1042" in text
    assert "911" in text
    assert "marque 2" in text
    assert "AYUDA" in text


def test_ack_es_keeps_a_custom_subject_template() -> None:
    msg = ack(language="es-MX", subject_template="Ticket {reference} opened")
    assert msg["Subject"] == "Ticket HD-1042 opened"
    assert "5 a 7 días" in body(msg)


@pytest.mark.parametrize("crisis", [False, True])
@pytest.mark.parametrize("language", ["en", "es"])
def test_patient_mail_never_echoes_the_patient(crisis: bool, language: str) -> None:
    msg = roundtrip(
        ack(
            crisis=crisis,
            language=language,
            oncall_alerted=crisis,
            subject_template=DEFAULT_ACK_SUBJECT,
        )
    )
    everything = "\n".join(texts(msg))
    assert "HIV" not in everything
    assert "oxycodone" not in everything
    bodies = "\n".join(texts(msg)[len(msg.items()) :])
    assert "Maria" not in bodies  # the name appears in the To header only
    assert msg["To"].addresses[0].display_name == PATIENT_NAME


def test_ack_headers() -> None:
    msg = roundtrip(ack())
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["Precedence"] is None
    assert msg["Message-ID"] == "<ack-1@clinic.test>"
    assert msg["In-Reply-To"] == "<their-1@patient.test>"
    assert msg["References"] == "<root@patient.test> <their-1@patient.test>"
    assert msg["From"] == "Clinic Support <help@clinic.test>"
    assert msg["To"].addresses[0].addr_spec == "maria@patient.test"
    assert email.utils.parsedate_to_datetime(msg["Date"]) == NOW
    assert msg.get_content_type() == "multipart/alternative"


def test_ack_html_escapes_everything() -> None:
    evil = Identity(address="help@clinic.test", name="<script>x</script>", message_id_domain="c")
    msg = ack(identity=evil, reference="HD-<b>1</b>")
    html = body(msg, "html")
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert "<b>1</b>" not in html


# --- crisis reply -----------------------------------------------------------------------


@pytest.mark.parametrize("language", ["en", "es"])
def test_crisis_reply_leads_with_safety(language: str) -> None:
    msg = roundtrip(ack(crisis=True, language=language))
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"].endswith("[HD-1042]")
    for subtype in ("plain", "html"):
        text = body(msg, subtype)
        assert "911" in text
        assert "988" in text
        assert "Poison Control" in text
        assert "1-800-222-1222" in text
        assert "HD-1042" in text
        # safety comes before the routine reply window
        assert text.index("911") < text.index("5")
    if language == "es":
        assert "AYUDA" in body(msg)
        assert "marque 2" in body(msg)


@pytest.mark.parametrize("language", ["en", "es"])
def test_crisis_reply_mentions_the_team_only_when_alerted(language: str) -> None:
    word = {"en": "alerted", "es": "alertado"}[language]
    alerted = ack(crisis=True, oncall_alerted=True, language=language)
    silent = ack(crisis=True, oncall_alerted=False, language=language)
    for subtype in ("plain", "html"):
        assert word in body(alerted, subtype)
        assert word not in body(silent, subtype)
        for promise in ("call you", "call-back", "callback", "le llamaremos"):
            assert promise not in body(alerted, subtype).lower()
            assert promise not in body(silent, subtype).lower()


def test_crisis_reply_is_not_the_bare_routine_promise() -> None:
    text = body(ack(crisis=True))
    assert "will reply within" not in text
    assert "not urgent" in text


# --- staff reply ------------------------------------------------------------------------


def test_staff_reply_subject_threading_and_footer() -> None:
    msg = roundtrip(reply())
    assert msg["Subject"] == "Re: Question about my refill [HD-1042]"
    assert msg["In-Reply-To"] == "<their-2@patient.test>"
    assert msg["References"] == (
        "<their-1@patient.test> <ack-1@clinic.test> <their-2@patient.test>"
    )
    assert msg["Auto-Submitted"] is None
    assert msg["X-Auto-Response-Suppress"] is None
    text = body(msg)
    assert text.startswith("Hello Maria,\n\nYour refill was sent to the pharmacy.")
    assert "Sam Rivera" in text
    assert "If this is an emergency, call 911." in text
    assert "988" in text


def test_staff_reply_does_not_duplicate_reference_or_re() -> None:
    msg = reply(ticket_subject="RE: Re: Question about my refill [HD-1042]")
    assert msg["Subject"] == "Re: Question about my refill [HD-1042]"
    assert reply(ticket_subject="")["Subject"] == "Re: [HD-1042]"


def test_staff_reply_es_footer_and_non_ascii_body() -> None:
    msg = roundtrip(reply(language="es", body_text="Señora, su receta está lista. ¿Algo más?"))
    text = body(msg)
    assert "Señora, su receta está lista." in text
    assert "AYUDA" in text


def test_staff_reply_long_lines_and_long_subject_stay_under_998() -> None:
    msg = reply(body_text="x" * 5000, ticket_subject="y" * 3000, staff_name="S " * 300)
    parsed = roundtrip(msg)
    assert body(parsed).startswith("x" * 5000)


# --- escalation notice ------------------------------------------------------------------


def test_escalation_notice_is_minimal() -> None:
    msg = roundtrip(notice(round=2, level=3))
    assert msg["Subject"] == "[URGENT tier 1] Crisis escalation HD-1042 (level 3, round 2)"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["In-Reply-To"] is None
    text = body(msg)
    assert "HD-1042" in text
    assert "Tier:       1" in text
    assert "suicide_risk" in text
    assert "2025-03-04T20:29:12Z" in text  # received time in UTC
    assert "https://desk.clinic.test/tickets/1042" in text
    assert "https://desk.clinic.test/ack/abc.def" in text
    assert "level 3, round 2" in text
    everything = "\n".join(texts(msg))
    for private in ("Maria", "maria@patient.test", "HIV", "oxycodone", "patient.test"):
        assert private not in everything
    assert msg.get_content_type() == "text/plain"


def test_escalation_subject_first_round() -> None:
    assert notice()["Subject"] == "[URGENT tier 1] Crisis escalation HD-1042 (level 1)"


# --- header injection -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a\r\nBcc: x@evil.test", "a\nBcc: x@evil.test", "a\rb", "a\x00b"])
def test_names_and_subjects_are_folded(bad: str) -> None:
    msg = roundtrip(reply(to_name=bad, ticket_subject=bad, staff_name=bad))
    assert msg["Bcc"] is None
    assert "\n" not in msg["Subject"]
    assert "\r" not in msg["Subject"]
    assert msg["To"].addresses[0].addr_spec == "maria@patient.test"
    msg = roundtrip(ack(to_name=bad))
    assert msg["Bcc"] is None
    assert len(msg["To"].addresses) == 1


@pytest.mark.parametrize("field", ["to_addr", "message_id", "reference"])
@pytest.mark.parametrize("suffix", ["\r\nBcc: x@evil.test", "\nX: y", "\x00"])
def test_addresses_ids_and_references_are_rejected(field: str, suffix: str) -> None:
    base = {"to_addr": "maria@patient.test", "message_id": "<a@clinic.test>", "reference": "HD-1"}
    with pytest.raises(InvalidInputError):
        ack(**{field: base[field] + suffix})
    with pytest.raises(InvalidInputError):
        reply(**{field: base[field] + suffix})


def test_escalation_rejects_injection() -> None:
    with pytest.raises(InvalidInputError):
        notice(to_addr="oncall@clinic.test\r\nBcc: x@evil.test")
    with pytest.raises(InvalidInputError):
        notice(ack_url="https://x/ack\r\nBcc: y")
    with pytest.raises(InvalidInputError):
        notice(reference="HD-1\nBcc: y")


@pytest.mark.parametrize("addr", ["", "no-at-sign", "a@b@", "two@x.test, three@y.test", "é@x.test"])
def test_bad_addresses_are_rejected(addr: str) -> None:
    with pytest.raises(InvalidInputError):
        ack(to_addr=addr)


def test_their_unclean_message_ids_are_dropped_not_fatal() -> None:
    msg = roundtrip(
        ack(
            in_reply_to="<their-1@patient.test>\r\nBcc: x@evil.test",
            references=["<ok@patient.test>", "bad id with spaces", "bare@patient.test"],
        )
    )
    assert msg["In-Reply-To"] is None
    assert msg["References"] == "<ok@patient.test> <bare@patient.test>"
    assert msg["Bcc"] is None


def test_long_reference_chains_keep_root_and_latest() -> None:
    refs = [f"<r{i}@x.test>" for i in range(50)]
    msg = ack(references=refs, in_reply_to="<last@x.test>")
    chain = msg["References"].split()
    assert len(chain) == 20
    assert chain[0] == "<r0@x.test>"
    assert chain[-1] == "<last@x.test>"


def same_but_boundary(first: bytes, second: bytes) -> bool:
    def boundary(raw: bytes) -> bytes:
        found = re.search(rb'boundary="([^"]+)"', raw)
        assert found is not None
        return found.group(1)

    return first.replace(boundary(first), b"B") == second.replace(boundary(second), b"B")


@pytest.mark.parametrize("language", ["en", "es"])
@pytest.mark.parametrize("name", ["", PATIENT_NAME, "Lopez, Maria", 'Zoë "Z" Wong'])
@pytest.mark.parametrize("reference", ["HD-1001", "HD-99999", "HD-1000000", "HD-1234567890"])
def test_ack_draft_filled_is_the_ack(language: str, name: str, reference: str) -> None:
    values = ack_values(language=language, to_name=name)
    draft = compose.ack_draft(reference_length=len(reference), **values)
    assert draft is not None
    assert reference.encode() not in draft.raw
    filled = draft.fill(reference)
    assert filled is not None
    made = compose.ack_bytes(reference=reference, **values)
    assert same_but_boundary(filled.raw, made.raw)
    assert (filled.subject, filled.message_id) == (made.subject, made.message_id)


def test_ack_draft_refuses_what_it_cannot_fill_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    draft = compose.ack_draft(reference_length=7, **ack_values())
    assert draft is not None
    assert draft.fill("HD-10000") is None  # another length: composed afresh instead
    assert draft.fill("HD 1001") is None  # a character an encoding could change
    # a subject template that needs RFC 2047 encoding hides the slot: no draft
    encoded = ack_values(subject_template="Reçu [{reference}]")
    assert compose.ack_draft(reference_length=7, **encoded) is None
    # a patient's Message-ID that holds the slot would be rewritten by fill: no draft
    monkeypatch.setattr(compose.random, "choices", lambda population, k: ["Q"] * k)
    assert compose.ack_draft(reference_length=7, **ack_values()) is not None
    clash = ack_values(references=["<QQQQQQQ@patient.test>"])
    assert compose.ack_draft(reference_length=7, **clash) is None


@pytest.mark.parametrize(
    "addr",
    [
        "maria@patient.test",
        "Maria.Lopez+tag@Patient.Test",
        "o'brien@x.test",
        "weird!#$%&'*+/=?^_`{|}~-@x.test",
        "a..b@x.test",
        ".a@x.test",
        "a@[192.0.2.1]",
        '"quoted"@x.test',
        "a@bücher.test",
        "a(comment)@x.test",
    ],
)
@pytest.mark.parametrize("name", ["", PATIENT_NAME, "Lopez, Maria", "x" * 300])
def test_mailbox_header_shortcut_matches_the_email_package(addr: str, name: str) -> None:
    try:
        expected = compose._mailbox_header(compose._address(addr, name))
    except InvalidInputError:
        with pytest.raises(InvalidInputError):
            compose._mailbox(addr, name)
        return
    assert compose._mailbox(addr, name) == expected


def test_safe_header_value_and_fold() -> None:
    assert safe_header_value("plain value") == "plain value"
    with pytest.raises(InvalidInputError):
        safe_header_value("a\r\nb")
    assert fold_header_text("  a\r\n b\tc\x00d  ") == "a b c d"


def test_naive_now_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        ack(now=datetime(2025, 1, 1))  # naive on purpose


# --- helpers ----------------------------------------------------------------------------


def test_new_message_id() -> None:
    first, second = new_message_id("clinic.test"), new_message_id("clinic.test")
    assert first != second
    assert first.startswith("<")
    assert first.endswith("@clinic.test>")
    assert len(first) == len("<@clinic.test>") + 32
    with pytest.raises(InvalidInputError):
        new_message_id("clinic.test>\r\nBcc: x")


def test_own_template_texts_cover_every_patient_template() -> None:
    own = own_template_texts()
    joined = "\n".join(own)
    assert "If this is an emergency, call 911." in joined
    assert "Si se trata de una emergencia, llame al 911." in joined
    assert "Poison Control at 1-800-222-1222" in joined
    assert "has been alerted" in joined
    assert "ha sido alertado" in joined
    assert "will reply within 5–7 days" in joined
    assert "5 a 7 días" in joined
    assert all(isinstance(t, str) and t.strip() for t in own)
    # The ack a patient receives is made of these passages.
    ack_text = body(ack())
    assert any(line.strip() in joined for line in ack_text.splitlines() if "911" in line)


def test_templates_live_at_the_repo_root() -> None:
    assert compose.TEMPLATE_DIR.name == "email"
    assert compose.TEMPLATE_DIR.parent.name == "templates"
    assert (compose.TEMPLATE_DIR / "ack.en.txt").is_file()
