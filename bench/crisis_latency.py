"""Benchmark crisis latency: crisis mail landing in IMAP -> escalation notice accepted by SMTP.

    .venv/bin/python bench/crisis_latency.py [--rounds 20] [--backlog 1000]

Starts a throwaway Dovecot, an aiosmtpd receiver standing in for the on-call SMTP server
and a real ``helpdesk worker`` process (SQLite, one on-call member). Each round APPENDs
``--backlog`` routine mails and then one crisis mail, and measures from the moment the
crisis APPEND completed to the moment the escalation notice was accepted by the receiver.
Routine mail keeps piling up ahead of the worker, so later rounds see a growing backlog.
Prints p50 / p99 / max. Dovecot itself adds ~0.5 s before its IDLE push.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpdesk import migrations, oncall  # noqa: E402
from helpdesk.config import load_settings  # noqa: E402
from helpdesk.db import open_database  # noqa: E402
from helpdesk.testing.dovecot import DovecotServer  # noqa: E402
from helpdesk.testing.env import worker_env  # noqa: E402
from helpdesk.testing.smtp import SmtpReceiver  # noqa: E402
from tests.factories import SUPPORT, patient_mail  # noqa: E402

ONCALL = "oncall@clinic.test"
CRISIS_LINES = [
    "I have the pills in front of me and I am going to take all of them tonight.",
    "I can't do this anymore, I want to kill myself.",
    "My chest has been crushing for 20 minutes and my left arm is numb.",
    "Me quiero morir, ya no aguanto más.",
    "My husband has a knife and said he will kill me, I'm hiding in the bathroom.",
]


async def _add_oncall(url: str) -> None:
    settings = load_settings(database_url=url)
    async with open_database(settings) as (_e, sessions), sessions() as session, session.begin():
        await oncall.add_member(session, email=ONCALL, level=1, name="On call")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument(
        "--backlog", type=int, default=1000, help="routine mails queued before each crisis mail"
    )
    args = ap.parse_args()
    rng = random.Random(11)
    tmp = Path(tempfile.mkdtemp(prefix="hd-latency-"))
    url = f"sqlite+aiosqlite:///{tmp / 'latency.db'}"
    migrations.upgrade(load_settings(database_url=url))
    asyncio.run(_add_oncall(url))
    latencies: list[float] = []
    with DovecotServer() as dovecot, SmtpReceiver() as smtp:
        account = dovecot.new_account("latency")
        env = worker_env(
            url,
            account,
            smtp,
            support_address=SUPPORT,
            secret_key="bench-secret",
            log_level="ERROR",
        )
        worker = subprocess.Popen([sys.executable, "-m", "helpdesk.cli", "worker"], env=env)
        try:
            time.sleep(2.0)  # connect, select, enter IDLE
            for round_no in range(args.rounds):
                routine = [
                    patient_mail(
                        sender=f"P <r{round_no}-{i}-{uuid.uuid4().hex[:6]}@patients.test>",
                        subject=f"Question {i}",
                        size_hint=rng.randint(1800, 3200),
                        rng=rng,
                    )
                    for i in range(args.backlog)
                ]
                dovecot.append_many(account.user, account.password, routine)
                crisis = patient_mail(
                    sender=f"Patient <crisis{round_no}@patients.test>",
                    subject="please read",
                    body=rng.choice(CRISIS_LINES),
                )
                dovecot.append(account.user, account.password, crisis)
                landed = time.monotonic()
                deadline = landed + 60
                notice = None
                while time.monotonic() < deadline and notice is None:
                    notices = [m for m in smtp.messages if ONCALL in m.rcpt_tos]
                    if len(notices) > round_no:
                        notice = notices[round_no]
                    else:
                        time.sleep(0.005)
                if notice is None:
                    print(f"round {round_no}: no notice within 60 s", file=sys.stderr)
                    continue
                latency = notice.received_at - landed
                latencies.append(latency)
                print(
                    f"round {round_no + 1:>2}: {latency * 1000:7.0f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
    if latencies:
        p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
        print(
            f"crisis latency over {len(latencies)} rounds, {args.backlog} routine mails queued"
            f" ahead each: p50 {p50:.3f} s, p99 {p99:.3f} s, max {max(latencies):.3f} s"
        )
    else:
        print("no crisis notice arrived")
        sys.exit(1)


if __name__ == "__main__":
    main()
