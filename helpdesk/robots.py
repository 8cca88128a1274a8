"""Pure robot detection: an ``InboundEmail`` -> a ``RobotVerdict`` (never answer a robot).

RFC 3834 says an automatic responder must not answer mail that is itself automatic:
``Auto-Submitted`` other than ``no``, mailing-list traffic, delivery reports. We go a little
further, because a ticket acknowledgement sent to a robot is at best noise and at worst a
mail loop. The rules, in the order they are tried (the first match wins):

1. **loop** — From, Sender, Reply-To or Return-Path is one of our own addresses, or an
   ``X-Loop`` header names one.
2. **bounce** — ``multipart/report`` (delivery-status or ARF ``feedback-report``; an MDN
   ``disposition-notification`` is an auto-reply instead), a top-level
   ``message/delivery-status``, ``Feedback-Type``, ``X-Failed-Recipients``, a
   MAILER-DAEMON / postmaster / "Mail Delivery System" sender, or a delivery-report subject.
3. **auto-reply** — ``Auto-Submitted`` other than ``no``, ``Precedence: auto_reply``,
   ``X-Autoreply``/``X-Autorespond``/``X-Auto-Reply``, ``X-Auto-Response-Suppress`` (any
   value but ``none``), an out-of-office subject (en/de/es/fr/it/nl/pt/nordic).
4. **list** — ``List-Id`` / ``List-Unsubscribe`` (and the other RFC 2369 ``List-*``
   headers), ``Precedence: bulk|list|junk``, ``Mailing-List``, the fingerprints of bulk
   senders (``Feedback-ID``, a campaign id, a bulk verdict from an upstream filter) and a
   sender that calls itself a newsletter.
5. **bounce** — a null ``Return-Path: <>`` that matched nothing above.

Invariants: ``judge`` is total (never raises) and pure; the reason names the rule that
matched, so a suppressed acknowledgement can always be explained. Per-sender rate limits
need the database and live in the pipeline, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from helpdesk.parse import InboundEmail

__all__ = ["RobotKind", "RobotVerdict", "bounced_message_ids", "judge"]

RobotKind = Literal["human", "auto-reply", "bounce", "list", "loop"]


@dataclass(frozen=True, slots=True)
class RobotVerdict:
    kind: RobotKind
    reason: str  # the rule that matched; "" for a human

    @property
    def suppress_reply(self) -> bool:
        """True when no acknowledgement may be sent."""
        return self.kind != "human"


HUMAN = RobotVerdict("human", "")

_MAILER_LOCALPART = re.compile(
    r"^(?:mailer-daemon|mailer_daemon|mailerdaemon|postmaster|post_master|mail-daemon|mmdf|"
    r"bounces?|mdaemon|smtp-?gateway|mail-?delivery(?:-system|-subsystem)?)$",
    re.IGNORECASE,
)
_MAILER_NAME = re.compile(
    r"^(?:mail delivery (?:system|subsystem|service)|mailer[- ]daemon|"
    r"mail administrator|internet mail delivery|postmaster)\b",
    re.IGNORECASE,
)
# Subjects only delivery reports carry; anchored at the start so "Fwd: ..." is not one.
_DSN_SUBJECT = re.compile(
    r"^\s*(?:\[postmaster\]\s*)?(?:"
    r"undelivered mail returned to sender|undeliver(?:ed|able)\b|"
    r"delivery status notification\b|delivery notification: delivery has failed|"
    r"returned mail\b|mail delivery failed|failure notice\b|delivery failure\b|"
    r"mail system error\b|email delivery failure|non remis|unzustellbar|"
    r"nicht zustellbar|no se puede entregar|message not delivered|"
    r"delivery (?:has )?failed|benachrichtung zum übermittlungsstatus|"
    r"benachrichtigung zum übermittlungsstatus|warning: could not send message|"
    r"notice: mail delivery status|mail could not be delivered)",
    re.IGNORECASE,
)
_OOO_SUBJECT = re.compile(
    r"^\s*(?:\[[^\]]{0,40}\]\s*)?(?:"
    r"automatic reply|auto[- ]?reply|auto[- ]?respon(?:se|s\b|der)|autosvar|"
    r"out of (?:the )?office|away from (?:the )?office|on vacation|vacation reply|"
    r"abwesenheitsnotiz|automatische antwort|abwesend|"
    r"respuesta autom[aá]tica|fuera de la oficina|fuera de oficina|"
    r"r[ée]ponse automatique|absence du bureau|absent du bureau|"
    r"risposta automatica|fuori sede|fuori ufficio|"
    r"automatisch antwoord|afwezig|resposta autom[aá]tica|fora do escrit[oó]rio|"
    r"automaattinen vastaus|automatisk svar|poza biurem|odpowied[zź] automatyczna)",
    re.IGNORECASE,
)
# Phrases of delivery-failure reports, looked for only when the mail carries the original.
_FAILURE_TEXT = re.compile(
    r"could not be delivered|couldn't be delivered|was not delivered|undeliverable|"
    r"delivery (?:to the following recipients? )?(?:has )?failed|permanent(?:ly)? (?:fatal )?"
    r"error|unable to deliver|mailbox (?:is )?full|user unknown|no such user|"
    r"returned to sender|message you sent|delivery status notification",
    re.IGNORECASE,
)
_FORWARD_SUBJECT = re.compile(r"^\s*(?:fwd?|wg|tr|rv|enc|doorst|vs)\s*:", re.IGNORECASE)
_NEWSLETTER = re.compile(r"newsletter|infomail|mailing", re.IGNORECASE)
_AUTOREPLY_HEADERS = (
    ("x-autoreply", "X-Autoreply"),
    ("x-autorespond", "X-Autorespond"),
    ("x-auto-reply", "X-Auto-Reply"),
    ("x-mail-autoreply", "X-Mail-Autoreply"),
)
_LIST_HEADERS = (
    ("list-id", "List-Id"),
    ("list-unsubscribe", "List-Unsubscribe"),
    ("list-post", "List-Post"),
    ("list-help", "List-Help"),
    ("list-subscribe", "List-Subscribe"),
    ("list-owner", "List-Owner"),
    ("list-archive", "List-Archive"),
    ("mailing-list", "Mailing-List"),
    ("x-mailing-list", "X-Mailing-List"),
)
_BULK_HEADERS = (
    ("feedback-id", "Feedback-ID"),
    ("x-campaign", "X-Campaign"),
    ("x-campaignid", "X-Campaignid"),
    ("x-mc-user", "X-MC-User"),
)
_FALSY = frozenset({"", "no", "false", "0", "none", "off"})


def _first_token(value: str) -> str:
    return re.split(r"[\s;]", value.strip(), maxsplit=1)[0].lower()


def _report_type(content_type_header: str) -> str:
    match = re.search(r"report-type\s*=\s*\"?([\w.-]+)", content_type_header, re.IGNORECASE)
    return match.group(1).lower() if match else ""


def _loop(email: InboundEmail, own: frozenset[str]) -> RobotVerdict | None:
    if not own:
        return None
    candidates = [email.from_addr, email.sender, *email.reply_to]
    if any(a is not None and a.key in own for a in candidates):
        return RobotVerdict("loop", "own support address")
    if email.return_path and email.return_path.lower() in own:
        return RobotVerdict("loop", "own support address in Return-Path")
    x_loop = email.headers.get("x-loop", "").lower()
    if x_loop and any(addr in x_loop for addr in own):
        return RobotVerdict("loop", "X-Loop")
    return None


def _bounce(email: InboundEmail) -> RobotVerdict | None:
    h = email.headers
    ctype = email.content_type
    if ctype == "multipart/report":
        report = _report_type(h.get("content-type", ""))
        if report == "disposition-notification":
            return RobotVerdict("auto-reply", "multipart/report disposition-notification (MDN)")
        if report == "feedback-report":
            return RobotVerdict("bounce", "multipart/report feedback-report (ARF)")
        return RobotVerdict("bounce", f"multipart/report {report or 'without report-type'}")
    if ctype == "message/delivery-status":
        return RobotVerdict("bounce", "message/delivery-status")
    if ctype == "message/disposition-notification":
        return RobotVerdict("auto-reply", "message/disposition-notification (MDN)")
    if "feedback-type" in h:
        return RobotVerdict("bounce", "Feedback-Type (ARF)")
    if h.get("x-failed-recipients"):
        return RobotVerdict("bounce", "X-Failed-Recipients")
    for addr in (email.from_addr, email.sender):
        if addr is None:
            continue
        local = addr.key.rsplit("@", 1)[0]
        if _MAILER_LOCALPART.match(local):
            return RobotVerdict("bounce", f"{local.upper()} sender")
        if _MAILER_NAME.match(addr.name):
            return RobotVerdict("bounce", "MAILER-DAEMON sender")
    if _DSN_SUBJECT.match(email.subject):
        return RobotVerdict("bounce", "delivery-report subject")
    if (
        email.embedded_message_ids
        and not _FORWARD_SUBJECT.match(email.subject)
        and _FAILURE_TEXT.search(email.text[:8000])
    ):
        # A report that returns the original without saying so in its headers. A patient
        # forwarding a bounce to us says "Fwd:", and gets an acknowledgement.
        return RobotVerdict("bounce", "delivery-failure text with the original attached")
    return None


def _auto_reply(email: InboundEmail) -> RobotVerdict | None:
    h = email.headers
    auto_submitted = h.get("auto-submitted")
    if auto_submitted is not None and _first_token(auto_submitted) != "no":
        return RobotVerdict("auto-reply", f"Auto-Submitted: {_first_token(auto_submitted)}")
    precedence = _first_token(h.get("precedence", "") or h.get("x-precedence", ""))
    if precedence in ("auto_reply", "auto-reply"):
        return RobotVerdict("auto-reply", f"Precedence: {precedence}")
    for key, label in _AUTOREPLY_HEADERS:
        value = h.get(key)
        if value is not None and _first_token(value) not in _FALSY - {""}:
            return RobotVerdict("auto-reply", label)
    suppress = h.get("x-auto-response-suppress")
    if suppress is not None and _first_token(suppress) not in ("none", ""):
        return RobotVerdict("auto-reply", "X-Auto-Response-Suppress")
    if _OOO_SUBJECT.match(email.subject):
        return RobotVerdict("auto-reply", "out-of-office subject")
    return None


def _list(email: InboundEmail) -> RobotVerdict | None:
    h = email.headers
    precedence = _first_token(h.get("precedence", "") or h.get("x-precedence", ""))
    if precedence in ("bulk", "list", "junk"):
        return RobotVerdict("list", f"Precedence: {precedence}")
    for key, label in _LIST_HEADERS:
        if key in h:
            return RobotVerdict("list", label)
    for key, label in _BULK_HEADERS:
        if h.get(key):
            return RobotVerdict("list", f"{label} (bulk sender)")
    if _first_token(h.get("x-antispameurope-detected-infomail", "")) == "yes":
        return RobotVerdict("list", "bulk verdict from upstream filter")
    bcl = _first_token(h.get("x-ms-exchange-organization-bcl", ""))
    if bcl.isdigit() and int(bcl) >= 7:
        return RobotVerdict("list", f"bulk complaint level {bcl}")
    for addr in (email.from_addr, email.sender):
        if addr is not None and (_NEWSLETTER.search(addr.name) or _NEWSLETTER.search(addr.key)):
            return RobotVerdict("list", "newsletter sender")
    return None


def judge(email: InboundEmail, *, own_addresses: frozenset[str] = frozenset()) -> RobotVerdict:
    """Decide whether ``email`` came from a robot; ``own_addresses`` are lowercased."""
    own = frozenset(a.lower() for a in own_addresses)
    verdict = _loop(email, own) or _bounce(email) or _auto_reply(email) or _list(email)
    if verdict is not None:
        return verdict
    if email.return_path == "":
        return RobotVerdict("bounce", "null Return-Path")
    return HUMAN


_QUOTED_MSGID = re.compile(rb"^[ \t>]*Message-ID:[ \t]*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)


def bounced_message_ids(email: InboundEmail, raw: bytes | None = None) -> tuple[str, ...]:
    """The Message-IDs of the mail(s) a bounce reports on, most likely first.

    They come from parsing (``InboundEmail.embedded_message_ids``: attached message/rfc822
    and text/rfc822-headers parts, and "Message-ID:" lines quoted in a text body). When
    parsing found none and ``raw`` is given, the raw bytes after the first header block are
    searched the same way. The bounce's own Message-ID is never returned.
    """
    ids = [m for m in email.embedded_message_ids if m != email.message_id]
    if not ids and raw:
        split = raw.find(b"\n\n")
        crlf = raw.find(b"\r\n\r\n")
        start = min(x for x in (split, crlf, len(raw)) if x >= 0)
        for found in _QUOTED_MSGID.findall(raw, start):
            mid = found.decode("ascii", "replace")
            if mid != email.message_id and mid not in ids:
                ids.append(mid)
    return tuple(ids)
