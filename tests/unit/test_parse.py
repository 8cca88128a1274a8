"""parse: bytes -> InboundEmail, on small original fixtures and hand-made broken mail."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from helpdesk import parse as parse_module
from helpdesk.parse import Address, InboundEmail, ParseError, html_to_text, parse, safe_filename

MAIL = Path(__file__).resolve().parents[1] / "data" / "mail"


def load(name: str) -> bytes:
    return (MAIL / name).read_bytes()


def test_spanish_quoted_printable_latin1() -> None:
    e = parse(load("spanish_qp.eml"))
    assert e.subject == "Consulta sobre mi cita de mañana"
    assert e.from_addr == Address("José Muñoz", "jose.munoz@pacientes.test")
    assert "¿Puedo cambiar la cita de mañana a la tarde? Tengo una reunión en el trabajo." in e.text
    assert e.text.endswith("José")
    assert e.date == datetime(2025, 3, 4, 9, 15, tzinfo=UTC)
    assert e.html is None and e.attachments == () and e.defects == ()


def test_html_only_mail_becomes_readable_text() -> None:
    e = parse(load("html_only.eml"))
    assert e.html is not None and "<script>" in e.html  # raw; sanitised at display time
    assert e.text == (
        "Hello,\n\nThe app crashes when I open Messages.\n\nSteps:\n\n- open app\n- tap Messages"
        "\n\nThanks & regards,\nAnn"
    )
    assert "alert" not in e.text and "color" not in e.text and "ignored title" not in e.text


def test_hostile_attachment_names_are_sanitised() -> None:
    e = parse(load("hostile_attachment.eml"))
    assert e.text == "Please see the attached files."
    names = [a.filename for a in e.attachments]
    assert names[0].endswith(".exe") and names[0].startswith("passwd")
    assert names[1] == "script.html"
    assert names[2] == "informe médico.pdf"
    assert names[3] == "attachment-4.png"
    for a in e.attachments:
        assert not set(a.filename) & set("/\\\r\n\x00\"'<>")
        assert not a.filename.startswith(".")
        assert a.size == len(a.content) and len(a.sha256) == 64
    assert e.attachments[0].content == b"MZ not really a program"
    assert e.attachments[2].content.startswith(b"%PDF-1.4")
    assert [a.inline for a in e.attachments] == [False, False, False, True]
    assert e.attachments[1].content_type == "text/html"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd\r\n.exe", "passwd.exe"),
        ("C:\\Users\\x\\report.pdf", "report.pdf"),
        ("...hidden", "hidden"),
        ("\u202egnp.exe", "gnp.exe"),
        ("a\"b'c`d.txt", "abcd.txt"),
        ("", "attachment-1.pdf"),
        ("../", "attachment-1.pdf"),
        ("CON.txt", "_CON.txt"),
        ("日本語の書類.pdf", "日本語の書類.pdf"),
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name, "application/pdf", 1) == expected


def test_safe_filename_keeps_extension_when_cut() -> None:
    name = safe_filename("x" * 400 + ".pdf")
    assert len(name) == 150 and name.endswith(".pdf")


def test_missing_message_id_gets_a_stable_synthetic_one() -> None:
    raw = load("no_message_id.eml")
    a, b = parse(raw), parse(raw)
    assert a.synthetic_message_id and a.message_id == b.message_id
    assert a.message_id.startswith("<") and a.message_id.endswith("@synthetic.helpdesk.invalid>")
    assert len(a.message_id.split("@")[0]) == 33
    assert "synthetic-message-id" in a.defects
    assert parse(raw + b"more\n").message_id != a.message_id
    assert a.date == datetime(2025, 3, 4, 17, 0, tzinfo=UTC)


def test_reply_threading_and_addresses() -> None:
    e = parse(load("reply.eml"))
    assert e.message_id == "<reply-7@patients.test>" and not e.synthetic_message_id
    assert e.in_reply_to == ("<ack-1042@clinic.test>",)
    assert e.references == ("<orig-1@patients.test>", "<ack-1042@clinic.test>")
    assert e.from_addr == Address("Lopez, Maria", "Maria.Lopez@Patients.test")
    assert e.from_addr is not None and e.from_addr.key == "maria.lopez@patients.test"
    assert e.reply_address == Address("Maria", "maria.alt@patients.test")
    assert [a.email for a in e.to] == ["help@clinic.test", "nurse@clinic.test"]
    assert e.cc == (Address("Jürgen Müller", "juergen@patients.test"),)
    assert e.text == "Thanks, the refill arrived. ¡Gracias!"  # text/plain wins
    assert e.html is not None and "&iexcl;" in e.html


@pytest.mark.parametrize(
    "name", ["spanish_qp.eml", "html_only.eml", "hostile_attachment.eml", "reply.eml"]
)
def test_bare_lf_and_crlf_give_equal_results(name: str) -> None:
    lf = load(name)
    assert b"\r" not in lf
    a, b = parse(lf), parse(lf.replace(b"\n", b"\r\n"))
    assert a.size != b.size
    assert a == InboundEmail(
        **{f: getattr(b, f) for f in b.__dataclass_fields__} | {"size": a.size}
    )


def test_cr_only_line_endings() -> None:
    a = parse(load("spanish_qp.eml"))
    b = parse(load("spanish_qp.eml").replace(b"\n", b"\r"))
    assert (b.subject, b.text, b.from_addr) == (a.subject, a.text, a.from_addr)


def test_unlisted_recipients_does_not_raise() -> None:
    e = parse(load("unlisted_recipients.eml"))
    assert e.to == () and e.subject == "Hidden recipients"


def test_mbox_from_line_and_bom_are_skipped() -> None:
    raw = b"\xef\xbb\xbfFrom someone@example.test Tue Mar  4 10:00:00 2025\n" + load("reply.eml")
    assert parse(raw).message_id == "<reply-7@patients.test>"


@pytest.mark.parametrize("raw", [b"", b"   \n\n", b"just some words\nand more words\n"])
def test_not_a_mail_raises_parse_error(raw: bytes) -> None:
    with pytest.raises(ParseError):
        parse(raw)


def test_max_size() -> None:
    with pytest.raises(ParseError):
        parse(load("reply.eml"), max_size=100)
    assert issubclass(ParseError, ValueError)


def test_bogus_charsets_and_8bit_headers() -> None:
    raw = (
        b"From: =?uft-8?B?Sm9zw6k=?= <j@x.test>\n"
        b"To: =?unicode-1-1-utf-7?Q?+AOk-t+AOk-?= <e@x.test>\n"
        b"Subject: Caf\xe9 \xe2\x82\xac =?x-bogus?Q?abc?= =?iso-gb2312?B?1tDOxA==?=\n"
        b"Cc: R\xe9mi <r@x.test>\n"
        b"Content-Type: text/plain; charset=uft-8\n\n"
        b"Ol\xc3\xa1\n"
    )
    e = parse(raw)
    assert e.from_addr == Address("José", "j@x.test")
    assert e.to[0].name == "été"
    assert e.subject.startswith("Caf")  # mixed 8-bit bytes never raise
    assert "中文" in e.subject and "abc" in e.subject
    assert e.cc[0].name == "Rémi"
    assert e.text == "Olá"
    assert "bad-charset:x-bogus" in e.defects


def test_latin1_body_labelled_utf8_falls_back() -> None:
    raw = b"From: a@x.test\nContent-Type: text/plain; charset=utf-8\n\nCaf\xe9 cr\xe8me\n"
    assert parse(raw).text == "Café crème"


def test_broken_base64_and_qp_do_not_raise() -> None:
    raw = (
        b'From: a@x.test\nContent-Type: multipart/mixed; boundary="b"\n\n'
        b"--b\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\naGVsbG8gd29ybGQ\n"
        b"--b\nContent-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\n"
        b"x=ZZ=4\n"
        b"--b\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n!!!*\n"
        b"--b--\n"
    )
    e = parse(raw)
    assert "hello world" in e.text and "x=ZZ" in e.text
    assert len(e.attachments) == 1


def test_no_from_and_bad_date_are_defects() -> None:
    e = parse(b"Subject: hi\nDate: yesterday-ish\n\nbody\n")
    assert e.from_addr is None and e.date is None
    assert {"missing-from", "bad-date"} <= set(e.defects)


def test_null_return_path_and_sender() -> None:
    e = parse(b"Return-Path: <>\nSender: list-owner@x.test\nFrom: a@x.test\n\nb\n")
    assert e.return_path == ""
    assert e.sender == Address("", "list-owner@x.test")
    assert parse(b"From: a@x.test\n\nb\n").return_path is None


def test_unbracketed_message_id_and_display_words_in_from() -> None:
    e = parse(b"From: Test test@example.test\nMessage-Id: abc.123@example.test\n\nb\n")
    assert e.message_id == "<abc.123@example.test>"
    assert e.from_addr == Address("Test", "test@example.test")


def test_nested_rfc822_is_an_attachment_and_its_id_is_embedded() -> None:
    e = parse(load("bounce_dsn.eml"))
    eml = [a for a in e.attachments if a.content_type == "message/rfc822"]
    assert len(eml) == 1 and b"Message-ID: <ack-1042@clinic.test>" in eml[0].content
    assert e.embedded_message_ids == ("<ack-1042@clinic.test>",)
    assert e.headers["content-type"].startswith("multipart/report")


def test_huge_header_block_is_fast_and_capped() -> None:
    words = " ".join(["=?utf-8?B?w6nDqcOp?="] * 20_000)
    to = ", ".join(f"user{i}@x.test" for i in range(10_000))
    raw = f"From: a@x.test\nSubject: {words}\nTo: {to}\n\nbody\n".encode()
    start = time.perf_counter()
    e = parse(raw)
    assert time.perf_counter() - start < 2.0
    assert len(e.subject) <= 998 and e.subject.startswith("ééé")
    assert 0 < len(e.to) <= 500


def test_headers_mapping_is_small_and_read_only() -> None:
    raw = b"From: a@x.test\nAuto-Submitted: auto-replied\nX-Spam: 1\nList-Id: <l.x.test>\n\nb\n"
    e = parse(raw)
    assert dict(e.headers) == {"auto-submitted": "auto-replied", "list-id": "<l.x.test>"}
    with pytest.raises(TypeError):
        e.headers["x"] = "y"  # type: ignore[index]


def test_fast_splitter_matches_the_stdlib_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    for path in sorted(MAIL.glob("*.eml")):
        fast = parse(path.read_bytes())
        monkeypatch.setattr(parse_module, "_FAST_PATH", False)
        slow = parse(path.read_bytes())
        monkeypatch.setattr(parse_module, "_FAST_PATH", True)
        assert fast == slow, path.name


def test_html_to_text() -> None:
    assert html_to_text("<p>one</p><p>two</p>") == "one\n\ntwo"
    assert html_to_text("a<br>b<br/>c") == "a\nb\nc"
    assert html_to_text("<td>x</td><td>y</td>") == "x y"
    assert html_to_text("<span>ab</span><span>cd</span>") == "abcd"
    assert html_to_text("5 &lt; 6 &amp;&amp; a < b") == "5 < 6 && a < b"
    assert html_to_text("<style>x{}</style><script>evil()</script><!-- c -->ok") == "ok"
    assert html_to_text("<script>never closed") == ""
    assert html_to_text("") == ""
