"""Crash safety: SIGKILL the real worker process at random moments, restart it, count.

Exactly one ticket per mail, and every ticket acknowledged, with at most one duplicate
acknowledgement per kill (the worker may die between the SMTP server's 250 and recording it).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import func, select

from helpdesk.db import create_engine, session_factory
from helpdesk.models import Message, Ticket
from helpdesk.testing.dovecot import DovecotServer, ImapAccount
from helpdesk.testing.env import worker_env as subprocess_env
from helpdesk.testing.smtp import SmtpReceiver
from tests.conftest import make_settings
from tests.factories import SUPPORT, patient_mail

pytestmark = pytest.mark.dovecot

ROOT = Path(__file__).resolve().parents[2]


def worker_env(database_url: str, account: ImapAccount, smtp: SmtpReceiver) -> dict[str, str]:
    return subprocess_env(
        database_url,
        account,
        smtp,
        support_address=SUPPORT,
        imap_poll_interval="0.5",
        outbox_retry_base_seconds="0.2",
        outbox_retry_max_seconds="1",
        log_level="WARNING",
    )


def helpdesk_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "helpdesk.cli", *args]


async def count_rows(database_url: str) -> tuple[int, int]:
    engine = create_engine(make_settings(database_url))
    try:
        async with session_factory(engine)() as s:
            tickets = (await s.exec(select(func.count()).select_from(Ticket))).one()
            inbound = (
                await s.exec(
                    select(func.count()).select_from(Message).where(Message.direction == "inbound")
                )
            ).one()
            return int(tickets), int(inbound)
    finally:
        await engine.dispose()


@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    database_url: str,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
) -> None:
    n, kills = 300, 6
    rng = random.Random(int(os.environ.get("HELPDESK_CRASH_SEED", "20261124")))
    ids = [f"<crash-{i}@patients.test>" for i in range(n)]
    dovecot.append_many(
        imap_account.user,
        imap_account.password,
        [
            patient_mail(sender=f"P{i} <p{i}@patients.test>", message_id=ids[i], rng=rng)
            for i in range(n)
        ],
    )
    env = worker_env(database_url, imap_account, smtp_receiver)
    for _ in range(kills):
        proc = subprocess.Popen(helpdesk_cmd("worker"), env=env, cwd=ROOT)
        time.sleep(rng.uniform(0.8, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(
        helpdesk_cmd("worker", "--once"), env=env, cwd=ROOT, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    tickets, inbound = asyncio.run(count_rows(database_url))
    assert (tickets, inbound) == (n, n)
    acks = Counter(str(m.message["In-Reply-To"]) for m in smtp_receiver.messages)
    assert set(acks) == set(ids), "every mail acknowledged"
    duplicates = sum(c - 1 for c in acks.values())
    assert duplicates <= kills, acks.most_common(3)


def test_sigterm_finishes_in_flight_work_and_exits(
    database_url: str,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
) -> None:
    dovecot.append_many(
        imap_account.user,
        imap_account.password,
        [patient_mail(sender=f"P{i} <t{i}@patients.test>") for i in range(50)],
    )
    proc = subprocess.Popen(
        helpdesk_cmd("worker"), env=worker_env(database_url, imap_account, smtp_receiver), cwd=ROOT
    )
    smtp_receiver.wait_for_sync(50, timeout=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert asyncio.run(count_rows(database_url)) == (50, 50)
