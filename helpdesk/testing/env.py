"""The HELPDESK_* environment for a worker subprocess talking to test servers on loopback."""

from __future__ import annotations

import os

from helpdesk.testing.dovecot import ImapAccount
from helpdesk.testing.smtp import SmtpReceiver


def worker_env(
    database_url: str,
    account: ImapAccount,
    smtp: SmtpReceiver,
    *,
    support_address: str,
    **extra: str,
) -> dict[str, str]:
    """This process's environment plus the settings that point a worker at ``account`` and
    ``smtp`` (plain text: loopback only). ``extra`` adds or overrides ``HELPDESK_*`` values,
    given without the prefix: ``log_level="WARNING"``."""
    env = dict(os.environ)
    env.update(
        HELPDESK_DATABASE_URL=database_url,
        HELPDESK_IMAP_HOST=account.host,
        HELPDESK_IMAP_PORT=str(account.port),
        HELPDESK_IMAP_USER=account.user,
        HELPDESK_IMAP_PASSWORD=account.password,
        HELPDESK_IMAP_SECURITY="none",
        HELPDESK_SMTP_HOST=smtp.host,
        HELPDESK_SMTP_PORT=str(smtp.port),
        HELPDESK_SMTP_SECURITY="none",
        HELPDESK_SUPPORT_ADDRESS=support_address,
    )
    env.update({f"HELPDESK_{name.upper()}": value for name, value in extra.items()})
    return env
