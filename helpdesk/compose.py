"""Compose our outgoing mail: values in, :class:`email.message.EmailMessage` out.

Pure: no settings, no clock, no network. The only I/O is reading the Jinja2 templates in
``templates/email/`` once (the environment is cached and never reloads).

Invariants (product requirements, each covered by ``tests/unit/test_compose.py``):
- an acknowledgement or crisis reply never contains the patient's words: not their subject,
  not their body, not their name (the name appears only in the ``To`` header);
- every mail to a patient ends with the 911/988 footer of its language;
- a crisis reply leads with safety, and says "a member of our team has been alerted" only
  when that is true (``oncall_alerted``): it never promises a call-back;
- an escalation notice carries the ticket reference, tier, category, received time, the
  ticket link, the acknowledge link and the level/round, and nothing else about the patient;
- no header can be injected: CR, LF or NUL in an address, a Message-ID of ours or a ticket
  reference raises :class:`~helpdesk.errors.InvalidInputError`; names and subjects (which
  come from patients) are folded onto one line. Message-IDs of *their* mail that are not
  clean (``In-Reply-To``/``References``) are dropped, never fatal: a malformed header in a
  patient's mail must not cost them their crisis reply;
- :func:`to_bytes` gives 7-bit CRLF bytes (non-ASCII bodies as quoted-printable, headers as
  RFC 2047 encoded words) with no line longer than 998 octets, fit for any SMTP server.
"""

from __future__ import annotations

import binascii
import functools
import random
import re
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.errors import HeaderParseError
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any

import jinja2

from helpdesk.errors import InvalidInputError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates" / "email"

DEFAULT_ACK_SUBJECT = "We received your message [{reference}]"
DEFAULT_ACK_SUBJECT_ES = "Hemos recibido su mensaje [{reference}]"
LANGUAGES = ("en", "es")

_FORBIDDEN = re.compile(r"[\r\n\x00]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_SPACES = re.compile(r"\s+")
_MSGID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")
_BARE_MSGID = re.compile(r"[^<>\s@]+@[^<>\s@]+")
_REPLY_PREFIX = re.compile(r"^\s*((re|aw|sv|fw|fwd|rv|res)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_DAYS_RANGE = re.compile(r"^\s*(\d+)\s*[–-]\s*(\d+)\s+days?\s*$", re.IGNORECASE)
_MAX_REFERENCES = 20
_MAX_SUBJECT_CHARS = 250
_MAX_NAME_CHARS = 200


@dataclass(frozen=True, slots=True)
class Identity:
    """Who our mail comes from."""

    address: str
    name: str
    message_id_domain: str
    base_url: str = ""


# --- header hygiene -------------------------------------------------------------------


def safe_header_value(value: str) -> str:
    """``value`` unchanged, or :class:`InvalidInputError` if it holds CR, LF or NUL.

    For values that must never be rewritten silently: addresses, Message-IDs, references.
    """
    if _FORBIDDEN.search(value):
        raise InvalidInputError(f"line break or NUL in a header value: {value[:80]!r}")
    return value


def fold_header_text(value: str) -> str:
    """Free text (a name, a subject) on one line: control characters become one space."""
    return _SPACES.sub(" ", _CONTROL.sub(" ", value)).strip()


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1].rstrip() + "…"


def _checked(addr_spec: str, display_name: str) -> tuple[str, str]:
    """``(addr_spec, display name)`` fit for a header, or InvalidInputError."""
    addr_spec = safe_header_value(addr_spec).strip()
    local, at, domain = addr_spec.rpartition("@")
    if not at or not local or not domain or any(c.isspace() or c in "<>," for c in addr_spec):
        raise InvalidInputError(f"not a mail address: {addr_spec[:80]!r}")
    if not local.isascii():
        # SMTPUTF8 is not something we can count on at the relay.
        raise InvalidInputError(f"non-ASCII local part in {addr_spec[:80]!r}")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InvalidInputError(f"bad domain in {addr_spec[:80]!r}") from exc
    return f"{local}@{domain}", _clip(fold_header_text(display_name), _MAX_NAME_CHARS)


def _address(addr_spec: str, display_name: str = "") -> Address:
    spec, name = _checked(addr_spec, display_name)
    try:
        return Address(display_name=name, addr_spec=spec)
    except (ValueError, IndexError, HeaderParseError) as exc:
        raise InvalidInputError(f"not a mail address: {addr_spec[:80]!r}") from exc


# An address whose local part and domain are dot-atoms of plain characters: the email
# package takes it as it is (no quoting, no defects), so it needs no Address to check it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def _mailbox(addr_spec: str, display_name: str = "") -> str:
    """``_mailbox_header(_address(addr_spec, display_name))``, several times cheaper for
    the plain addresses nearly all mail has (this runs for every acknowledgement)."""
    spec, name = _checked(addr_spec, display_name)
    if _PLAIN_ADDRESS.fullmatch(spec):
        return formataddr((name, spec), charset="utf-8")
    return _mailbox_header(_address(addr_spec, display_name))


@functools.lru_cache(maxsize=64)
def _own_mailbox(addr_spec: str, display_name: str) -> str:
    """:func:`_mailbox` for our own From, which is the same on every mail."""
    return _mailbox(addr_spec, display_name)


def _own_message_id(value: str) -> str:
    if not _MSGID.fullmatch(safe_header_value(value).strip()):
        raise InvalidInputError(f"not a Message-ID like <id@domain>: {value[:80]!r}")
    return value.strip()


def _their_message_id(value: str | None) -> str | None:
    """A clean ``<id@domain>`` from a patient's header, or None to leave it out."""
    if not value:
        return None
    value = value.strip()
    if _MSGID.fullmatch(value):
        return value
    if _BARE_MSGID.fullmatch(value):
        return f"<{value}>"
    return None


def _thread_ids(in_reply_to: str | None, references: Sequence[str]) -> tuple[str | None, str]:
    """``(In-Reply-To, References)`` of a reply: their clean Message-IDs only, the parent
    last in the chain, at most ``_MAX_REFERENCES`` of them ("" when there are none)."""
    parent = _their_message_id(in_reply_to)
    chain: list[str] = []
    for ref in [*references, *([parent] if parent else [])]:
        clean = _their_message_id(ref)
        if clean and clean not in chain:
            chain.append(clean)
    if len(chain) > _MAX_REFERENCES:  # RFC 5322 3.6.4: keep the root and the latest ones
        chain = [chain[0], *chain[-(_MAX_REFERENCES - 1) :]]
    return parent, " ".join(chain)


def _thread_headers(msg: EmailMessage, in_reply_to: str | None, references: Sequence[str]) -> None:
    parent, chain = _thread_ids(in_reply_to, references)
    if parent:
        msg["In-Reply-To"] = parent
    if chain:
        msg["References"] = chain


def new_message_id(domain: str) -> str:
    """A fresh Message-ID of ours: ``<{uuid4 hex}@{domain}>``."""
    domain = safe_header_value(domain).strip()
    if not domain or any(c.isspace() or c in "<>@" for c in domain):
        raise InvalidInputError(f"not a Message-ID domain: {domain[:80]!r}")
    return f"<{uuid.uuid4().hex}@{domain}>"


# --- templates ------------------------------------------------------------------------


@functools.cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html",), default_for_string=False, default=False
        ),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )


def _render(name: str, **values: Any) -> str:
    return _env().get_template(name).render(**values)


def _lang(language: str) -> str:
    code = (language or "").strip().lower().replace("_", "-").split("-")[0]
    return code if code in LANGUAGES else "en"


def _localised_window(reply_window: str, lang: str) -> str:
    """``"5–7 days"`` reads ``"5 a 7 días"`` in Spanish; other wording is used as given."""
    if lang == "es":
        m = _DAYS_RANGE.match(reply_window)
        if m:
            return f"{m.group(1)} a {m.group(2)} días"
    return fold_header_text(reply_window)


def _ack_subject(subject_template: str, reference: str, lang: str) -> str:
    template = subject_template
    if lang == "es" and subject_template == DEFAULT_ACK_SUBJECT:
        template = DEFAULT_ACK_SUBJECT_ES
    # str.replace, not str.format: the template is configuration, not code.
    return fold_header_text(template.replace("{reference}", reference))


def _aware_utc(value: datetime, what: str) -> datetime:
    if value.tzinfo is None:
        raise InvalidInputError(f"{what} must be timezone-aware")
    return value.astimezone(UTC)


# --- messages -------------------------------------------------------------------------


def _base(
    *,
    identity: Identity,
    to: Address,
    subject: str,
    message_id: str,
    now: datetime,
) -> EmailMessage:
    msg = EmailMessage(policy=policy.default)
    msg["From"] = _address(identity.address, identity.name)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(_aware_utc(now, "now"))
    msg["Message-ID"] = _own_message_id(message_id)
    return msg


def _set_body(
    msg: EmailMessage, text: str, html: str | None = None, *, lang: str | None = None
) -> None:
    """7-bit safe parts: 7bit when the text allows it, quoted-printable otherwise."""
    msg.set_content(text, subtype="plain", charset="utf-8", cte=_cte(text))
    if html is not None:
        msg.add_alternative(html, subtype="html", charset="utf-8", cte=_cte(html))
    if lang:  # after set_content, which clears every Content-* header
        msg["Content-Language"] = lang


def _cte(text: str) -> str:
    if text.isascii() and all(len(line) <= 78 for line in text.splitlines()):
        return "7bit"
    return "quoted-printable"


def _patient_values(
    identity: Identity, reference: str, lang: str, reply_window: str
) -> dict[str, Any]:
    return {
        "org_name": fold_header_text(identity.name),
        "reference": reference,
        "reply_window": _localised_window(reply_window, lang),
        "lang": lang,
    }


@dataclass(frozen=True, slots=True)
class Composed:
    """A mail ready for the outbox: SMTP bytes plus the headers the caller records."""

    raw: bytes
    message_id: str
    subject: str


def _encoded_header(name: str, value: str) -> str:
    """One header line (without CRLF): ASCII as is, anything else as RFC 2047 words."""
    if value.isascii() and len(value) + len(name) < 900:
        return f"{name}: {value}"
    return f"{name}: " + Header(value, "utf-8", header_name=name).encode(linesep="\r\n")


def _mailbox_header(address: Address) -> str:
    return formataddr((address.display_name, address.addr_spec), charset="utf-8")


def _qp_part(content_type: str, text: str) -> bytes:
    body = text.replace("\r\n", "\n")
    if _cte(body) == "7bit":
        encoded, cte = body.encode("ascii"), "7bit"
    else:
        encoded, cte = binascii.b2a_qp(body.encode("utf-8"), istext=True), "quoted-printable"
    encoded = encoded.replace(b"\n", b"\r\n")
    if not encoded.endswith(b"\r\n"):
        encoded += b"\r\n"
    head = (
        f'Content-Type: {content_type}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    )
    return head.encode("ascii") + encoded


def ack_bytes(
    *,
    identity: Identity,
    to_addr: str,
    to_name: str,
    reference: str,
    subject_template: str,
    reply_window: str,
    language: str,
    in_reply_to: str | None,
    references: Sequence[str],
    message_id: str,
    now: datetime,
    crisis: bool = False,
    oncall_alerted: bool = False,
) -> Composed:
    """The immediate answer to a patient: the routine acknowledgement, or the crisis reply.

    Neither quotes anything the patient wrote; both carry ``Auto-Submitted: auto-replied``.
    Serialised directly to bytes (no ``email`` policy machinery: this runs once per
    incoming mail and must stay cheap); :func:`ack_mail` gives the same mail parsed.
    """
    composed, _mentions = _ack(
        identity=identity,
        to_addr=to_addr,
        to_name=to_name,
        reference=reference,
        subject_template=subject_template,
        reply_window=reply_window,
        language=language,
        in_reply_to=in_reply_to,
        references=references,
        message_id=message_id,
        now=now,
        crisis=crisis,
        oncall_alerted=oncall_alerted,
    )
    return composed


def _ack(
    *,
    identity: Identity,
    to_addr: str,
    to_name: str,
    reference: str,
    subject_template: str,
    reply_window: str,
    language: str,
    in_reply_to: str | None,
    references: Sequence[str],
    message_id: str,
    now: datetime,
    crisis: bool,
    oncall_alerted: bool,
) -> tuple[Composed, int]:
    """:func:`ack_bytes`, and how often the reference occurs in the subject and the two
    bodies before they are encoded (what :func:`ack_draft` checks the bytes against)."""
    reference = safe_header_value(reference).strip()
    lang = _lang(language)
    sender = _own_mailbox(identity.address, identity.name)
    recipient = _mailbox(to_addr, to_name)
    subject = _ack_subject(subject_template, reference, lang)
    message_id = _own_message_id(message_id)
    values = _patient_values(identity, reference, lang, reply_window)
    values["oncall_alerted"] = oncall_alerted
    kind = "crisis" if crisis else "ack"
    text = _render(f"{kind}.{lang}.txt", **values)
    html = _render(f"{kind}.{lang}.html", **values)
    parent, chain = _thread_ids(in_reply_to, references)
    boundary = f"=_helpdesk_{uuid.uuid4().hex}"
    lines = [
        _encoded_header("From", sender),
        _encoded_header("To", recipient),
        _encoded_header("Subject", subject),
        f"Date: {format_datetime(_aware_utc(now, 'now'))}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "X-Auto-Response-Suppress: All",
    ]
    if parent:
        lines.append(f"In-Reply-To: {parent}")
    if chain:
        lines.append("References: " + "\r\n ".join(chain.split()))
    lines += [
        "MIME-Version: 1.0",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
        f"Content-Language: {lang}",
    ]
    raw = b"".join(
        [
            ("\r\n".join(lines) + f"\r\n\r\n--{boundary}\r\n").encode("ascii"),
            _qp_part("text/plain", text),
            f"--{boundary}\r\n".encode("ascii"),
            _qp_part("text/html", html),
            f"--{boundary}--\r\n".encode("ascii"),
        ]
    )
    mentions = subject.count(reference) + text.count(reference) + html.count(reference)
    return Composed(raw=raw, message_id=message_id, subject=subject), mentions


# Characters that no step of composing rewrites: not HTML escaping, not quoted-printable,
# not header encoding. A ticket reference (``HD-1042``) is made of them.
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9-]+")


@dataclass(frozen=True, slots=True)
class AckDraft:
    """A routine acknowledgement composed before its ticket has a reference.

    ``raw`` and ``subject`` hold ``slot`` wherever the reference goes. The slot is as long
    as the reference is expected to be and made of characters that no encoding step
    touches, so every line break and every encoded byte falls where it would for the
    reference itself: :meth:`fill` is a byte substitution that gives exactly what
    :func:`ack_bytes` makes for that reference.
    """

    raw: bytes
    message_id: str
    subject: str
    slot: str

    def fill(self, reference: str) -> Composed | None:
        """The finished mail, or None when ``reference`` does not fit the slot (another
        length, or characters an encoding would change): compose it afresh then."""
        if len(reference) != len(self.slot) or not _PLAIN_TOKEN.fullmatch(reference):
            return None
        return Composed(
            raw=self.raw.replace(self.slot.encode("ascii"), reference.encode("ascii")),
            message_id=self.message_id,
            subject=self.subject.replace(self.slot, reference),
        )


def ack_draft(
    *,
    reference_length: int,
    identity: Identity,
    to_addr: str,
    to_name: str,
    subject_template: str,
    reply_window: str,
    language: str,
    in_reply_to: str | None,
    references: Sequence[str],
    message_id: str,
    now: datetime,
) -> AckDraft | None:
    """The routine acknowledgement (not the crisis reply) with a slot for a reference of
    ``reference_length`` characters, or None when the reference would not come through
    as plain bytes (a subject template that needs RFC 2047 encoding, a line break that
    would fall inside it). Raises like :func:`ack_bytes` on bad addresses or ids.

    This lets the acknowledgement be composed away from the database work (in the
    prepare process) and finished there with a cheap :meth:`AckDraft.fill`.
    """
    if reference_length < 6:  # too short for a slot that cannot occur by chance
        return None
    # capitals only: our Message-IDs are lower-case hex, templates are words
    slot = "".join(random.choices(string.ascii_uppercase, k=reference_length))
    composed, mentions = _ack(
        identity=identity,
        to_addr=to_addr,
        to_name=to_name,
        reference=slot,
        subject_template=subject_template,
        reply_window=reply_window,
        language=language,
        in_reply_to=in_reply_to,
        references=references,
        message_id=message_id,
        now=now,
        crisis=False,
        oncall_alerted=False,
    )
    # Every mention must have come through whole and nothing else may look like the slot.
    if mentions == 0 or composed.raw.count(slot.encode("ascii")) != mentions:
        return None
    return AckDraft(
        raw=composed.raw, message_id=composed.message_id, subject=composed.subject, slot=slot
    )


def ack_mail(**kwargs: Any) -> EmailMessage:
    """:func:`ack_bytes`, parsed back into an :class:`EmailMessage` (same arguments)."""
    composed = ack_bytes(**kwargs)
    return message_from_bytes(composed.raw, policy=policy.default)


def _staff_subject(ticket_subject: str, reference: str) -> str:
    subject = _REPLY_PREFIX.sub("", fold_header_text(ticket_subject))
    tag = f"[{reference}]"
    subject = subject.replace(tag, "").strip() if tag in subject else subject
    subject = _clip(subject, _MAX_SUBJECT_CHARS)
    return f"Re: {subject} {tag}" if subject else f"Re: {tag}"


def staff_reply_mail(
    *,
    identity: Identity,
    to_addr: str,
    to_name: str,
    reference: str,
    ticket_subject: str,
    body_text: str,
    staff_name: str,
    language: str,
    in_reply_to: str | None,
    references: Sequence[str],
    message_id: str,
    now: datetime,
) -> EmailMessage:
    """A reply written by a member of staff: their text, a signature and the 911/988 footer.

    Threads under the patient's last mail; not auto-submitted (a person wrote it).
    """
    reference = safe_header_value(reference).strip()
    lang = _lang(language)
    msg = _base(
        identity=identity,
        to=_address(to_addr, to_name),
        subject=_staff_subject(ticket_subject, reference),
        message_id=message_id,
        now=now,
    )
    _thread_headers(msg, in_reply_to, references)
    body = body_text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").rstrip()
    text = _render(
        f"reply.{lang}.txt",
        body_text=body,
        staff_name=fold_header_text(staff_name),
        org_name=fold_header_text(identity.name),
        reference=reference,
        lang=lang,
    )
    _set_body(msg, text, lang=lang)
    return msg


def escalation_notice_mail(
    *,
    identity: Identity,
    to_addr: str,
    reference: str,
    tier: int,
    category: str,
    received_at: datetime,
    ticket_url: str,
    ack_url: str,
    level: int,
    round: int,  # shadows the builtin: the name is part of the API others code against
    message_id: str,
    now: datetime,
) -> EmailMessage:
    """A page to on-call staff. Minimal by design: no name, address, subject or text of the
    patient's mail; staff follow the link and sign in to read it."""
    reference = safe_header_value(reference).strip()
    for url in (ticket_url, ack_url):
        if _FORBIDDEN.search(url) or any(c.isspace() for c in url):
            raise InvalidInputError(f"not a URL: {url[:80]!r}")
    subject = f"[URGENT tier {int(tier)}] Crisis escalation {reference} (level {int(level)})"
    if round > 1:
        subject = subject[:-1] + f", round {int(round)})"
    msg = _base(
        identity=identity,
        to=_address(to_addr),
        subject=subject,
        message_id=message_id,
        now=now,
    )
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    msg["Importance"] = "high"
    msg["X-Priority"] = "1"
    text = _render(
        "escalation.txt",
        org_name=fold_header_text(identity.name),
        reference=reference,
        tier=int(tier),
        category=fold_header_text(category) or "unspecified",
        received_at=_aware_utc(received_at, "received_at").strftime("%Y-%m-%dT%H:%M:%SZ"),
        ticket_url=ticket_url,
        ack_url=ack_url,
        level=int(level),
        round=int(round),
    )
    _set_body(msg, text)
    return msg


def to_bytes(msg: EmailMessage) -> bytes:
    """The bytes to hand to SMTP: CRLF line ends, folded headers, 7-bit safe."""
    return msg.as_bytes(policy=policy.SMTP)


@functools.cache
def own_template_texts() -> tuple[str, ...]:
    """The plain-text bodies of every patient-facing template, with placeholder values.

    For the crisis detector: passages of our own words (a quoted acknowledgement, the
    footer) must not count as the patient's words.
    """
    texts: list[str] = []
    for lang in LANGUAGES:
        values = {
            "org_name": "Patient Support",
            "reference": "HD-0000",
            "reply_window": _localised_window("5–7 days", lang),
            "lang": lang,
        }
        texts.append(_render(f"ack.{lang}.txt", oncall_alerted=False, **values))
        texts.append(_render(f"crisis.{lang}.txt", oncall_alerted=False, **values))
        texts.append(_render(f"crisis.{lang}.txt", oncall_alerted=True, **values))
        texts.append(
            _render(
                f"reply.{lang}.txt",
                body_text="",
                staff_name="Staff",
                org_name="Patient Support",
                reference="HD-0000",
                lang=lang,
            )
        )
        texts.append(_render(f"_footer.{lang}.txt"))
    return tuple(texts)
