"""Quoted replies and our own templates never fire."""

from __future__ import annotations

import pytest

from helpdesk.crisis import detect, strip_quoted
from helpdesk.crisis.quotes import mask, quoted_spans

OUR_CRISIS_REPLY = """Thank you for writing to us.

If you are thinking about suicide or self-harm, or you are in danger, call 911 or call or
text the 988 Suicide & Crisis Lifeline now. Our on-call clinician has been paged.

Si tiene pensamientos suicidas, llame o envíe un mensaje de texto al 988.
"""


@pytest.mark.parametrize(
    "mail",
    [
        "Thanks, all good now.\n\n> I want to kill myself\n> please help",
        "Thanks!\n\nOn Mon, 3 Jun 2024 at 09:12, Help Desk <help@example.org> wrote:\n"
        "I want to kill myself",
        "Thanks!\n\nOn Mon, 3 Jun 2024 at 09:12, Help Desk\n<help@example.org> wrote:\n"
        "I want to kill myself",
        "Gracias\n\nEl lun, 3 jun 2024 a las 9:12, Ayuda <help@example.org> escribió:\n"
        "me quiero morir",
        "ok\n\n-----Original Message-----\nFrom: me\nSent: Monday\nTo: help\n\nchest pain",
        "ok\n\nFrom: Help Desk <help@example.org>\nSent: Monday, June 3, 2024 9:12 AM\n"
        "To: Jane\nSubject: RE: chest pain\n\nI have chest pain",
        "vale\n\nDe: Ayuda\nEnviado: lunes\nPara: Juana\nAsunto: dolor en el pecho\n\n"
        "tengo dolor en el pecho",
        '<div>Thanks</div><div class="gmail_quote"><blockquote>I want to kill myself'
        "</blockquote></div>",
        "<p>ok</p><blockquote type=cite><p>no puedo respirar</p></blockquote>",
    ],
)
def test_quoted_crisis_words_do_not_fire(mail: str) -> None:
    assert detect("Re: hello", mail).tier is None


def test_text_above_the_quote_still_fires() -> None:
    mail = "I want to kill myself\n\nOn Mon, 3 Jun 2024, Help <h@x.org> wrote:\n> hi"
    res = detect("", mail)
    assert res.tier == 1
    assert mail[res.hits[0].start : res.hits[0].end] == "kill myself"


def test_strip_quoted_returns_the_new_text() -> None:
    mail = "See you Tuesday.\n\nOn Mon, 3 Jun 2024, Help <h@x.org> wrote:\n> old text"
    assert strip_quoted(mail) == "See you Tuesday."
    assert strip_quoted("a\n> b\nc") == "a\nc"
    assert strip_quoted("no quotes here") == "no quotes here"


def test_mask_keeps_offsets() -> None:
    text = "abc\n> def\nghi"
    masked = mask(text, quoted_spans(text))
    assert len(masked) == len(text)
    assert masked.startswith("abc\n")
    assert masked.endswith("ghi")
    assert "def" not in masked


def test_pasted_template_is_ignored() -> None:
    mail = "I got this email from you, what does it mean?\n\n" + OUR_CRISIS_REPLY
    assert detect("", mail, own_templates=[OUR_CRISIS_REPLY]).tier is None


def test_rewrapped_template_is_ignored() -> None:
    rewrapped = " ".join(OUR_CRISIS_REPLY.split())
    mail = "ok thanks\n" + rewrapped.replace("Our on-call", "\nOur on-call")
    assert detect("", mail, own_templates=[OUR_CRISIS_REPLY]).tier is None


def test_reply_above_template_still_fires() -> None:
    mail = "i took all my pills an hour ago\n\n" + OUR_CRISIS_REPLY
    res = detect("", mail, own_templates=[OUR_CRISIS_REPLY])
    assert res.tier == 1
    assert res.category == "overdose"


@pytest.mark.parametrize(
    "signature",
    [
        "Please update my card.\n--\nIf you are in crisis call 988.",
        "Refill please.\n\nNational Suicide Prevention Lifeline: 988",
        "Linea Nacional de Prevencion del Suicidio: 988",
    ],
)
def test_hotline_in_signature_does_not_fire(signature: str) -> None:
    assert detect("", signature).tier is None
