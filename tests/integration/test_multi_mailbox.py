"""Several mailboxes (HELPDESK_MAILBOXES): each has its own cursor, lease and From address."""

from __future__ import annotations

from email.utils import parseaddr

import pytest
from sqlmodel import col, select

from helpdesk.db import create_engine, session_factory
from helpdesk.models import MailboxState, Ticket
from helpdesk.testing.dovecot import DovecotServer, ImapAccount
from helpdesk.testing.smtp import SmtpReceiver
from helpdesk.worker import Worker
from tests.conftest import server_settings
from tests.factories import SUPPORT, patient_mail

pytestmark = pytest.mark.dovecot


async def test_two_mailboxes_are_watched_separately(
    database_url: str,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
) -> None:
    billing = dovecot.new_account("billing")
    settings = server_settings(
        database_url,
        imap_account,
        smtp_receiver,
        support_address=SUPPORT,
        mailboxes=[
            {
                "name": "billing",
                "imap_user": billing.user,
                "imap_password": billing.password,
                "support_address": "billing@clinic.test",
                "support_name": "Clinic Billing",
            }
        ],
    )
    dovecot.append_many(
        imap_account.user,
        imap_account.password,
        [patient_mail(sender=f"P{i} <help{i}@patients.test>") for i in range(2)],
    )
    dovecot.append_many(
        billing.user,
        billing.password,
        [patient_mail(sender=f"B{i} <bill{i}@patients.test>", subject="invoice") for i in range(3)],
    )
    engine = create_engine(settings)
    try:
        sessions = session_factory(engine)
        report = await Worker(settings, sessions).run_once()
        assert (report.poll.created, report.sent) == (5, 5)
        async with sessions() as s:
            tickets = list((await s.exec(select(Ticket).order_by(col(Ticket.id)))).all())
            states = {st.mailbox: st.last_uid for st in (await s.exec(select(MailboxState))).all()}
        by_box = {t.requester: t.mailbox for t in tickets}
        assert by_box == {
            "help0@patients.test": "default",
            "help1@patients.test": "default",
            "bill0@patients.test": "billing",
            "bill1@patients.test": "billing",
            "bill2@patients.test": "billing",
        }
        assert states["default"] >= 2 and states["billing"] >= 3
        senders = {
            m.rcpt_tos[0]: parseaddr(str(m.message["From"]))[1] for m in smtp_receiver.messages
        }
        assert senders["help0@patients.test"] == SUPPORT
        assert senders["bill0@patients.test"] == "billing@clinic.test"

        again = await Worker(settings, sessions).run_once()
        assert (again.poll.fetched, again.sent) == (0, 0)
    finally:
        await engine.dispose()
