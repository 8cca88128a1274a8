"""Builders of realistic patient mail for tests and benchmarks (all addresses *.test)."""

from __future__ import annotations

import email.policy
import random
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

SUPPORT = "help@clinic.test"

_QUESTIONS = [
    "My prescription for lisinopril runs out next week. Can the doctor renew it in the app?",
    "I was charged twice for my video visit on the 3rd. Could you refund one of them?",
    "How do I upload the photo of my rash that the nurse asked for?",
    "The app logs me out every time I open the messages tab. I am on an older iPhone.",
    "Can I move my appointment from Thursday to next Monday morning?",
    "Does my insurance cover the lab work my doctor ordered last week?",
]


def patient_mail(
    *,
    sender: str = "Maria Lopez <maria.lopez@patients.test>",
    subject: str = "Question about my refill",
    body: str | None = None,
    to: str = SUPPORT,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    headers: dict[str, str] | None = None,
    html: str | None = None,
    attachment: tuple[str, bytes, str] | None = None,
    size_hint: int = 0,
    rng: random.Random | None = None,
) -> bytes:
    rng = rng or random.Random(0)
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id or make_msgid(domain="patients.test")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    for name, value in (headers or {}).items():
        msg[name] = value
    text = body if body is not None else rng.choice(_QUESTIONS)
    while len(text) < size_hint:
        text += "\n" + rng.choice(_QUESTIONS)
    msg.set_content(text + "\n\nThank you,\n" + sender.split("<")[0].strip() + "\n")
    if html is not None:
        msg.add_alternative(html, subtype="html")
    if attachment is not None:
        name, content, ctype = attachment
        maintype, subtype = ctype.split("/", 1)
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


def bounce_for(original_message_id: str, recipient: str) -> bytes:
    """A real-shaped DSN (multipart/report) for a mail we sent."""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.patients.test>\r\n"
        f"To: {SUPPORT}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: {make_msgid(domain='mx.patients.test')}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r\n'
        "\r\n--B1\r\nContent-Type: text/plain\r\n\r\n"
        f"This is the mail system. Your message could not be delivered to {recipient}.\r\n"
        "--B1\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.patients.test\r\n\r\nFinal-Recipient: rfc822; {recipient}\r\n"
        "Action: failed\r\nStatus: 5.1.1\r\n"
        "--B1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Clinic Support <{SUPPORT}>\r\nTo: {recipient}\r\n"
        f"Message-ID: {original_message_id}\r\nSubject: We received your message\r\n"
        "--B1--\r\n"
    ).encode()
