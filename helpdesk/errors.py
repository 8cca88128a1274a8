"""The exception tree of helpdesk. Routine outcomes (an auto-reply, a duplicate) are values,
not exceptions; these are for failures.

    HelpdeskError
    ├── ConfigError              bad or missing settings (one line per bad value)
    ├── NotFoundError            a ticket, user or rota member that does not exist
    ├── InvalidInputError        a value we refuse (e.g. CR/LF in a header)
    └── DeliveryError            SMTP delivery of one outbox item failed
        ├── TransientDeliveryError   connection errors, 4xx: retried with backoff
        └── PermanentDeliveryError   5xx: recorded with the reason, never retried

Mailbox (IMAP) failures live in :mod:`helpdesk.mailbox` (``MailboxError`` and children), and
unparseable bytes raise :class:`helpdesk.parse.ParseError`; both are edges of their own.
"""


class HelpdeskError(Exception):
    """Base of every error helpdesk raises on purpose."""


class ConfigError(HelpdeskError):
    """Settings are missing or invalid. ``str()`` is ready to show to an operator."""


class NotFoundError(HelpdeskError):
    """The thing asked for does not exist."""


class InvalidInputError(HelpdeskError, ValueError):
    """A value we refuse to use, e.g. a header value containing CR or LF."""


class DeliveryError(HelpdeskError):
    """Delivering one outbox item failed."""


class TransientDeliveryError(DeliveryError):
    """Worth retrying later: connection refused or reset, timeouts, 4xx replies."""


class PermanentDeliveryError(DeliveryError):
    """Not worth retrying: a 5xx reply such as an unknown recipient."""
