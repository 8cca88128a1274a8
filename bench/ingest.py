"""Benchmark the whole ingest path: IMAP (Dovecot) -> ticket committed -> ack accepted by SMTP.

    .venv/bin/python bench/ingest.py                      # N = 1,000 and 5,000 on SQLite
    .venv/bin/python bench/ingest.py --n 2000 --database postgresql+asyncpg://postgres@127.0.0.1:5432/test

For each N it starts a throwaway Dovecot and an aiosmtpd receiver, APPENDs N realistic
2-4 KB patient mails (a fifth with an HTML part, a tenth with an attachment, every sender
distinct so no ack is rate-limited), runs ``helpdesk worker --once`` as a subprocess and
prints messages/second for the whole path, acks delivered and the worker's peak RSS.

The rate is over the worker's run (its own ``elapsed``: from the start of ``run_once``
until the last ack is accepted by the receiver), not its process start-up (imports and
warming up the crisis detector, ~2-3 s; ``worker_wall_s`` includes them). CPU is given
per mail for the worker with its prepare process (over the same run) and for the SMTP
receiver (a thread of this process, which otherwise only waits): they share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpdesk import migrations  # noqa: E402
from helpdesk.config import load_settings  # noqa: E402
from helpdesk.testing.dovecot import DovecotServer  # noqa: E402
from helpdesk.testing.env import worker_env  # noqa: E402
from helpdesk.testing.smtp import SmtpReceiver  # noqa: E402
from tests.factories import SUPPORT, patient_mail  # noqa: E402

PROFILE = ""


def make_mails(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    mails = []
    for i in range(n):
        html = None
        if i % 5 == 0:
            html = (
                "<html><body><p>Hello,</p><p>"
                + "I have a question about my visit. " * 20
                + "</p></body></html>"
            )
        attachment = None
        if i % 10 == 3:
            attachment = (
                "insurance-card.pdf",
                bytes(rng.getrandbits(8) for _ in range(600)),
                "application/pdf",
            )
        mails.append(
            patient_mail(
                sender=f"Patient {i} <patient{i}.{uuid.uuid4().hex[:6]}@patients.test>",
                subject=f"Question {i} about my account",
                html=html,
                attachment=attachment,
                size_hint=rng.randint(1800, 3200),
                rng=rng,
            )
        )
    return mails


async def _pg_admin(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _create_pg_db(admin_url: str) -> str:
    name = f"hd_bench_{uuid.uuid4().hex[:8]}"
    await _pg_admin(admin_url, f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def run_one(n: int, database: str | None, workers: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="hd-bench-"))
    if database and database.startswith("postgres"):
        url = asyncio.run(_create_pg_db(database))
    else:
        url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    mails = make_mails(n)
    with DovecotServer() as dovecot, SmtpReceiver() as smtp:
        account = dovecot.new_account("bench")
        t0 = time.perf_counter()
        dovecot.append_many(account.user, account.password, mails)
        append_s = time.perf_counter() - t0
        env = worker_env(url, account, smtp, support_address=SUPPORT, log_level="WARNING")
        migrations.upgrade(load_settings(database_url=url))
        cmd = [sys.executable, "-m", "helpdesk.cli", "worker", "--once"]
        if PROFILE:
            cmd[1:1] = ["-m", "cProfile", "-o", PROFILE]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # this process's other threads: the receiver (the main thread only waits below)
        receiver_before = time.process_time() - time.thread_time()
        t0 = time.perf_counter()
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE) for _ in range(workers)]
        outputs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - t0
        receiver_cpu = time.process_time() - time.thread_time() - receiver_before
        rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if any(p.returncode for p in procs):
            raise SystemExit(f"worker failed: {[p.returncode for p in procs]}")
        reports = [json.loads(o.decode().strip().splitlines()[-1]) for o in outputs]
        acks = len(smtp.messages)
        distinct = len({m.message_id for m in smtp.messages})
    if database and database.startswith("postgres"):
        asyncio.run(
            _pg_admin(database, f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        )
    elapsed = max(float(r.get("elapsed", wall)) for r in reports)
    cpu = sum(float(r.get("cpu", 0.0)) for r in reports)
    return {
        "n": n,
        "database": url.split("://")[0],
        "workers": workers,
        "append_per_s": round(n / append_s),
        "worker_wall_s": round(wall, 2),
        "ingest_s": round(elapsed, 2),
        "msg_per_s": round(n / elapsed),
        # CPU (user + system) per mail over the run: steadier than wall time on a shared
        # machine; with Dovecot (~0.1 ms) this is what has to fit on the cores
        "worker_cpu_ms_per_msg": round(cpu * 1000 / n, 2),
        "receiver_cpu_ms_per_msg": round(receiver_cpu * 1000 / n, 2),
        "tickets": sum(r["poll"]["created"] for r in reports),
        "acks_delivered": acks,
        "acks_distinct": distinct,
        "peak_rss_mb": round(max(rss_kb, before) / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", default="1000,5000", help="comma-separated mail counts")
    ap.add_argument(
        "--database", default=None, help="postgresql+asyncpg://… admin URL (default: SQLite)"
    )
    ap.add_argument("--workers", default="1", help="comma-separated worker counts (PostgreSQL)")
    ap.add_argument("--profile", default="", help="write a cProfile of the worker to this file")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    for workers in [int(w) for w in args.workers.split(",")]:
        for n in [int(x) for x in args.n.split(",")]:
            print(f"ingesting {n} mails with {workers} worker(s)…", file=sys.stderr, flush=True)
            print(json.dumps(run_one(n, args.database, workers)), flush=True)


if __name__ == "__main__":
    main()
