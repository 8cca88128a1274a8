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
    # spans in any order, overlapping or not (detect blanks dismissed hits this way)
    assert mask("no chest pain here", [(8, 13), (3, 9)]) == "no " + " " * 10 + " here"


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


def test_text_below_a_quote_is_new() -> None:
    # bottom-posting: the attribution quotes only the > lines under it
    mail = (
        "On Tue, Nov 5, 2024 at 2:52 PM Help Desk <help@example.org> wrote:\n"
        "> If you are thinking about suicide, call or text 988.\n"
        ">\n"
        "> On Mon, Nov 4, 2024 Pat <pat@example.com> wrote:\n"
        "> > What dose did the doctor decide on?\n"
        "\n"
        "I took five of the 1 mg tablets an hour ago and I'm slurring my words.\n"
    )
    res = detect("Re: dose", mail)
    assert res.tier == 1
    assert all(mail.index("I took") <= h.start for h in res.hits)
    assert quoted_spans(mail)[0] == (0, mail.index("I took"))


def test_a_forward_from_a_person_is_read() -> None:
    gmail = (
        "My dad texted me this from his truck and now he isn't answering.\n\n"
        "---------- Forwarded message ---------\n"
        "From: Dad <dad@example.net>\nDate: Wed, Dec 18, 2024 at 1:39 PM\n"
        "Subject: Re: dinner\nTo: Nadia <n@example.net>\n\n"
        "pulling over. chest real tight cant catch breath. sweating bad\n"
    )
    assert detect("Fwd: Re: dinner", gmail).tier == 1
    outlook = (
        "My girlfriend sent me this a few minutes ago. She's alone.\n\n"
        "________________________________\n"
        "From: Noor <noor@example.net>\nSent: Friday, May 31, 2024 5:52 PM\n"
        "To: Marnie <m@example.net>\nSubject: sorry\n\n"
        "i want to kill myself tonight. don't be mad at me.\n"
    )
    assert detect("FW: sorry", outlook).tier == 1
    # the same block under a reply's subject is the quoted original
    assert detect("RE: sorry", outlook).tier is None


def test_a_forwarded_bulletin_and_older_replies_in_a_forward_stay_quoted() -> None:
    leaflet = (
        "Is this still right for me?\n\n"
        "---------- Forwarded message ---------\n"
        "From: ValleyRx Pharmacy <noreply@valleyrx.example>\n"
        "Date: Wed, Jul 16, 2025\nSubject: oxycodone\n\n"
        "Call 911 if someone taking this medicine won't wake up or is barely breathing.\n"
    )
    assert detect("Fwd: Important information", leaflet).tier is None
    older = (
        "See below, all fine now.\n\n"
        "---------- Forwarded message ---------\n"
        "From: Sam <sam@example.net>\nDate: Mon\nSubject: Re: hi\n\n"
        "glad to hear it!\n\n"
        "On Sun, Jun 1, 2025 at 9:00 AM Pat <pat@example.com> wrote:\n"
        "I want to kill myself\n"
    )
    assert detect("Fwd: Re: hi", older).tier is None
