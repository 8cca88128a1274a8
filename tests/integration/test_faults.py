"""Fault tests: real Dovecot, aiosmtpd and SQLite/PostgreSQL, broken on purpose, then counted.

Each scenario prints one line ``scenario=<name> mails=N tickets=N acks=N duplicates=N
lost=N`` (``pytest -s`` shows it; ``detail scenario=<name> …`` lines add measurements):

- *mails*: delivered to the IMAP folder; *tickets*: tickets in the database;
- *acks*: mails that got at least one acknowledgement (or crisis reply) through SMTP;
- *duplicates*: acknowledgements beyond the first for a mail;
- *lost*: mails that have no stored message or no acknowledgement at the end.

The fast variants run by default; ``@pytest.mark.slow`` ones are the long versions (CI runs
them too). The worker runs as a real process (``python -m helpdesk.cli worker``, helpers
from ``test_crash``) except where a fault is injected into our own code (the poison mail)
or a single pass is enough (the UIDVALIDITY change).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import imaplib
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlmodel import col, func, select

from helpdesk import desk, migrations, oncall, pipeline, tickets, users
from helpdesk.config import Settings, load_settings
from helpdesk.db import create_engine, session_factory
from helpdesk.models import Message, Outbox, RejectedMail, Ticket
from helpdesk.presence import _mailbox_key
from helpdesk.testing.dovecot import DovecotServer, ImapAccount
from helpdesk.testing.smtp import SmtpReceiver, free_port
from helpdesk.web import create_app
from helpdesk.worker import Worker
from tests.conftest import PgDatabases, make_settings, server_settings
from tests.factories import patient_mail
from tests.integration.test_crash import ROOT, count_rows, helpdesk_cmd, worker_env
from tests.web.conftest import PASSWORD, login

pytestmark = pytest.mark.dovecot

SEED = int(os.environ.get("HELPDESK_FAULT_SEED", "20261125"))
PG_BIN = Path("/usr/lib/postgresql/15/bin")


# --- counting ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tally:
    mails: int
    tickets: int
    acks: int
    duplicates: int
    lost: int
    max_per_mail: int

    def line(self, name: str) -> str:
        return (
            f"scenario={name} mails={self.mails} tickets={self.tickets} acks={self.acks}"
            f" duplicates={self.duplicates} lost={self.lost}"
        )


def report(name: str, tally: Tally, **detail: object) -> None:
    print(f"\n{tally.line(name)}", flush=True)
    if detail:
        extra = " ".join(f"{key}={value}" for key, value in detail.items())
        print(f"detail scenario={name} {extra}", flush=True)


async def _stored(database_url: str) -> tuple[int, Counter[str], dict[str, int]]:
    """Tickets, inbound Message-IDs (with counts) and outbox rows by status."""
    engine = create_engine(make_settings(database_url))
    try:
        async with session_factory(engine)() as s:
            n_tickets = (await s.exec(select(func.count()).select_from(Ticket))).one()
            inbound = Counter(
                (
                    await s.exec(select(Message.message_id).where(Message.direction == "inbound"))
                ).all()
            )
            by_status = dict(
                (
                    await s.exec(select(Outbox.status, func.count()).group_by(col(Outbox.status)))
                ).all()
            )
            return int(n_tickets), inbound, {str(k): int(v) for k, v in by_status.items()}
    finally:
        await engine.dispose()


def count_what_arrived(
    stored: tuple[int, Counter[str], dict[str, int]], smtp: SmtpReceiver, ids: Sequence[str]
) -> tuple[Tally, dict[str, int]]:
    """Count what arrived for the mails ``ids``; also return the outbox rows by status."""
    n_tickets, inbound, outbox = stored
    acked = Counter(str(m.message["In-Reply-To"]) for m in smtp.messages)
    per_mail = [acked[i] for i in ids]
    lost = sum(1 for i in ids if inbound[i] == 0 or acked[i] == 0)
    result = Tally(
        mails=len(ids),
        tickets=n_tickets,
        acks=sum(1 for c in per_mail if c),
        duplicates=sum(c - 1 for c in per_mail if c > 1),
        lost=lost,
        max_per_mail=max(per_mail, default=0),
    )
    return result, outbox


def tally(
    database_url: str, smtp: SmtpReceiver, ids: Sequence[str]
) -> tuple[Tally, dict[str, int]]:
    return count_what_arrived(asyncio.run(_stored(database_url)), smtp, ids)


def wait_until(what: str, check: Callable[[], bool], timeout: float, every: float = 0.2) -> float:
    """Poll ``check`` until true; return the seconds it took, or fail naming ``what``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def tickets_at_least(database_url: str, n: int) -> Callable[[], bool]:
    def check() -> bool:
        with contextlib.suppress(Exception):  # the database may be restarting
            return asyncio.run(count_rows(database_url))[0] >= n
        return False

    return check


def acked_all(smtp: SmtpReceiver, ids: Iterable[str]) -> Callable[[], bool]:
    wanted = set(ids)

    def check() -> bool:
        return wanted <= {str(m.message["In-Reply-To"]) for m in smtp.messages}

    return check


def backlog(n: int, tag: str, *, size_hint: int = 0) -> tuple[list[str], list[bytes]]:
    rng = random.Random(SEED)
    ids = [f"<{tag}-{i}@patients.test>" for i in range(n)]
    raws = [
        patient_mail(
            sender=f"P{i} <{tag}{i}@patients.test>", message_id=ids[i], rng=rng, size_hint=size_hint
        )
        for i in range(n)
    ]
    return ids, raws


@contextlib.contextmanager
def worker_process(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A ``helpdesk worker`` process, stopped (SIGTERM, then SIGKILL) when the block ends."""
    proc = subprocess.Popen(helpdesk_cmd("worker"), env=env, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stop_cleanly(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def migrated(url: str) -> str:
    migrations.upgrade(load_settings(database_url=url))
    return url


def fresh_pg(pg_databases: PgDatabases, pg_available: bool) -> str:
    if not pg_available:
        pytest.skip("PostgreSQL not reachable")
    return migrated(pg_databases.create())


# --- 1. SIGKILL at random moments during a backlog --------------------------------------------


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("n", "kills"),
    [pytest.param(300, 5, id="fast"), pytest.param(1000, 20, id="slow", marks=pytest.mark.slow)],
)
def test_sigkill_during_backlog(
    database_url: str,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
    n: int,
    kills: int,
) -> None:
    rng = random.Random(SEED + n)
    ids, raws = backlog(n, f"kill{n}")
    dovecot.append_many(imap_account.user, imap_account.password, raws)
    env = worker_env(database_url, imap_account, smtp_receiver)
    started = time.monotonic()
    for _ in range(kills):
        proc = subprocess.Popen(helpdesk_cmd("worker"), env=env, cwd=ROOT)
        time.sleep(rng.uniform(0.8, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(
        helpdesk_cmd("worker", "--once"), env=env, cwd=ROOT, capture_output=True, timeout=180
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    result, outbox = tally(database_url, smtp_receiver, ids)
    dialect = make_url(database_url).get_backend_name()
    report(
        f"sigkill-{n}x{kills}-{dialect}",
        result,
        seconds=round(time.monotonic() - started, 1),
        outbox=outbox,
    )
    assert (result.tickets, result.acks, result.lost) == (n, n, 0)
    assert result.max_per_mail <= 1 + kills and result.duplicates <= kills
    assert outbox == {"sent": n}, "everything in the outbox delivered"


# --- 2. two workers on PostgreSQL, the lease holder killed -------------------------------------


async def _lease_holders(database_url: str) -> int:
    """How many sessions hold this database's mailbox lease (an advisory lock) right now."""
    unsigned = _mailbox_key("default") & 0xFFFF_FFFF_FFFF_FFFF
    url = make_url(database_url).set(drivername="postgresql")
    conn = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1"
            # advisory locks are per database: other tests' workers hold 'default' too
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            unsigned >> 32,
            unsigned & 0xFFFF_FFFF,
        )
        return int(count)
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_lease_holder_killed_survivor_takes_over(
    pg_databases: PgDatabases,
    pg_available: bool,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
) -> None:
    url = fresh_pg(pg_databases, pg_available)
    n = 800
    ids, raws = backlog(n, "lease")
    dovecot.append_many(imap_account.user, imap_account.password, raws)
    env = worker_env(url, imap_account, smtp_receiver)
    a = subprocess.Popen(helpdesk_cmd("worker"), env={**env, "HELPDESK_WORKER_ID": "A"}, cwd=ROOT)
    try:
        wait_until("worker A to store mail", tickets_at_least(url, 50), timeout=60)
        with worker_process({**env, "HELPDESK_WORKER_ID": "B"}) as b:
            time.sleep(2.0)  # B is up and polling for the lease
            assert asyncio.run(_lease_holders(url)) == 1
            at_kill = asyncio.run(count_rows(url))[0]
            a.send_signal(signal.SIGKILL)
            a.wait()
            takeover = wait_until(
                "worker B to take the lease",
                lambda: asyncio.run(_lease_holders(url)) == 1,
                timeout=15,
                every=0.1,
            )
            wait_until("every mail acknowledged", acked_all(smtp_receiver, ids), timeout=120)
            assert b.poll() is None, "the survivor still runs"
            time.sleep(1.5)  # let B record the last deliveries
            assert stop_cleanly(b) == 0
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    result, outbox = tally(url, smtp_receiver, ids)
    report(
        "lease-takeover-postgresql",
        result,
        tickets_at_kill=at_kill,
        takeover_s=round(takeover, 2),
        outbox=outbox,
    )
    assert (result.tickets, result.acks, result.lost) == (n, n, 0)
    assert result.max_per_mail <= 2 and result.duplicates <= 1
    assert outbox == {"sent": n}


# --- 3. Dovecot restarted; IMAP connections cut mid-FETCH --------------------------------------


@pytest.mark.timeout(180)
def test_dovecot_restart_mid_run(tmp_path: Path, smtp_receiver: SmtpReceiver) -> None:
    url = migrated(f"sqlite+aiosqlite:///{tmp_path / 'helpdesk.db'}")
    n = 600
    ids, raws = backlog(n, "restart")
    # A Dovecot of our own: the session one is shared with tests that may run alongside.
    with DovecotServer() as server:
        account = server.new_account()
        server.append_many(account.user, account.password, raws)
        with worker_process(worker_env(url, account, smtp_receiver)) as proc:
            wait_until("the first tickets", tickets_at_least(url, 60), timeout=60, every=0.05)
            at_restart = asyncio.run(count_rows(url))[0]
            server.restart()
            wait_until("every mail acknowledged", acked_all(smtp_receiver, ids), timeout=120)
            time.sleep(1.0)
            assert stop_cleanly(proc) == 0
    result, outbox = tally(url, smtp_receiver, ids)
    report("dovecot-restart-sqlite", result, tickets_at_restart=at_restart, outbox=outbox)
    assert at_restart < n, "the restart came mid-run"
    assert (result.tickets, result.acks, result.lost, result.duplicates) == (n, n, 0, 0)


@pytest.mark.timeout(180)
def test_imap_connection_cut_mid_fetch(
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
) -> None:
    url = migrated(f"sqlite+aiosqlite:///{tmp_path / 'helpdesk.db'}")
    n, cuts = 1000, 3
    ids, raws = backlog(n, "cut", size_hint=8000)  # ~10 KB each: a batch takes a while to fetch
    dovecot.append_many(imap_account.user, imap_account.password, raws)
    at_cut: list[int] = []
    with worker_process(worker_env(url, imap_account, smtp_receiver)) as proc:
        for k in range(1, cuts + 1):
            wait_until(f"cut {k}", tickets_at_least(url, k * n // (cuts + 2)), 60, every=0.05)
            at_cut.append(asyncio.run(count_rows(url))[0])
            dovecot.kill_connections(imap_account.user)
        wait_until("every mail acknowledged", acked_all(smtp_receiver, ids), timeout=120)
        time.sleep(1.0)
        assert stop_cleanly(proc) == 0
    result, outbox = tally(url, smtp_receiver, ids)
    report("imap-cut-mid-fetch-sqlite", result, tickets_at_cuts=at_cut, outbox=outbox)
    assert at_cut[-1] < n, "the last cut came mid-run"
    assert (result.tickets, result.acks, result.lost, result.duplicates) == (n, n, 0, 0)


# --- 4. SMTP down, then 4xx, then back; one recipient refused with 5xx -------------------------

ONCALL = "oncall.nurse@clinic.test"
CRISIS_BODY = "I want to kill myself tonight. I have the pills here and I can't go on."


async def _add_oncall(database_url: str) -> None:
    engine = create_engine(make_settings(database_url))
    try:
        async with session_factory(engine)() as s:
            await oncall.add_member(s, email=ONCALL, level=1, name="Night Nurse")
            await s.commit()
    finally:
        await engine.dispose()


def lane_delays(settings: Settings) -> tuple[list[float], list[float]]:
    """The retry waits (without jitter) after attempts 1..7 of the policy the worker uses,
    for lane 0 and lane 1."""
    engine = create_engine(settings)  # never connects: the worker is only built
    policy = dataclasses.replace(Worker(settings, session_factory(engine)).policy, jitter=False)
    return [policy.delay(k, 0) for k in range(1, 8)], [policy.delay(k, 1) for k in range(1, 8)]


async def _attempts_by_lane(database_url: str) -> dict[int, list[int]]:
    engine = create_engine(make_settings(database_url))
    try:
        async with session_factory(engine)() as s:
            rows = (await s.exec(select(Outbox.lane, Outbox.attempts))).all()
    finally:
        await engine.dispose()
    lanes: dict[int, list[int]] = {0: [], 1: []}
    for lane, attempts in rows:
        lanes[int(lane)].append(int(attempts))
    return lanes


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "down",
    [
        pytest.param(5.0, id="fast"),
        pytest.param(
            60.0,
            id="slow",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_smtp_down_then_tempfail_then_back(
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
    down: float,
) -> None:
    base, cap = 4.0, 8.0  # routine lane; the priority lane must never wait longer
    url = migrated(f"sqlite+aiosqlite:///{tmp_path / 'helpdesk.db'}")
    asyncio.run(_add_oncall(url))
    n = 20
    ids, raws = backlog(n, "smtp")
    refused = "smtp7@patients.test"
    crisis_id = "<smtp-crisis@patients.test>"
    raws.append(
        patient_mail(
            sender="Sam Rivera <sam.rivera@patients.test>",
            subject="please",
            body=CRISIS_BODY,
            message_id=crisis_id,
        )
    )
    env = {
        **worker_env(url, imap_account, smtp_receiver),
        "HELPDESK_OUTBOX_RETRY_BASE_SECONDS": str(base),
        "HELPDESK_OUTBOX_RETRY_MAX_SECONDS": str(cap),
    }
    priority, routine = lane_delays(
        make_settings(url, outbox_retry_base_seconds=base, outbox_retry_max_seconds=cap)
    )

    smtp_receiver.reject_recipients({refused: (550, "5.1.1 no such user")})
    smtp_receiver.stop()
    dovecot.append_many(imap_account.user, imap_account.password, raws)
    with worker_process(env) as proc:
        wait_until("all tickets", tickets_at_least(url, n + 1), timeout=60)
        time.sleep(down)
        smtp_receiver.set_mode("tempfail")
        smtp_receiver.start()
        time.sleep(3.0)
        attempts_while_failing = asyncio.run(_attempts_by_lane(url))
        smtp_receiver.set_mode("ok")
        back = time.monotonic()
        expected_ids = [i for i in ids if i != "<smtp-7@patients.test>"] + [crisis_id]
        wait_until("acks and the crisis reply", acked_all(smtp_receiver, expected_ids), 90)
        wait_until(
            "the escalation notice",
            lambda: any(ONCALL in m.rcpt_tos for m in smtp_receiver.messages),
            timeout=60,
        )
        time.sleep(1.5)  # the refused row is recorded as failed
        assert stop_cleanly(proc) == 0

    messages = smtp_receiver.messages
    lane0_after = max(
        m.received_at - back
        for m in messages
        if ONCALL in m.rcpt_tos or str(m.message["In-Reply-To"]) == crisis_id
    )
    lane1_after = max(
        m.received_at - back for m in messages if str(m.message["In-Reply-To"]) in set(ids)
    )
    result, outbox = tally(url, smtp_receiver, [*ids, crisis_id])
    report(
        f"smtp-down-{down:g}s-sqlite",
        result,
        lane0_s_after_back=round(lane0_after, 2),
        lane1_s_after_back=round(lane1_after, 2),
        attempts_while_failing={k: sorted(v) for k, v in attempts_while_failing.items()},
        outbox=outbox,
    )
    # every ack (but the refused one), the crisis reply and the escalation notice arrived
    assert (result.tickets, result.acks, result.lost) == (n + 1, n, 1)
    assert sum(ONCALL in m.rcpt_tos for m in messages) == 1
    assert outbox == {"sent": n + 1, "failed": 1}, "only the refused recipient failed"
    assert not any(refused in m.rcpt_tos for m in messages)
    # lane 0 retries sooner: never a longer wait than lane 1, and arrives within its cap
    assert all(p <= r for p, r in zip(priority, routine, strict=True)), (priority, routine)
    assert priority[0] < routine[0], (priority, routine)
    assert lane0_after <= max(priority) + 2.5


# --- 5. PostgreSQL restarted under a running worker -------------------------------------------


class ThrowawayPostgres:
    """A PostgreSQL cluster of the test's own (the shared one on 5432 must not restart)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hd-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        user = pwd.getpwnam("postgres")
        os.chown(self.dir, user.pw_uid, user.pw_gid)

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode:
            pytest.fail(f"{args[0]} failed: {done.stderr.decode()[-1000:]}")

    def _ctl(self, *args: str) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), *args)

    def start(self) -> None:
        if not self.data.exists():
            self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                      "--auth=trust")  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"
        self._ctl("-w", "start", "-o", options)

    def restart(self) -> None:
        self._ctl("-w", "restart", "-m", "fast")

    def stop(self) -> None:
        self._ctl("-w", "stop", "-m", "fast")

    def destroy(self) -> None:
        with contextlib.suppress(BaseException):
            self._ctl("-w", "stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self, name: str) -> str:
        async def create() -> None:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres")
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return migrated(f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}")


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    why = None
    if os.geteuid() != 0:
        why = "a throwaway PostgreSQL cluster needs root (to run as the postgres user)"
    elif not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        why = f"PostgreSQL binaries missing in {PG_BIN}"
    else:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            why = "no postgres OS user"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    cluster = ThrowawayPostgres()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.mark.postgres
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "outage",
    [
        pytest.param(0.0, id="fast"),
        pytest.param(
            8.0,
            id="slow",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_postgres_restart_mid_run(
    throwaway_postgres: ThrowawayPostgres,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
    outage: float,
) -> None:
    """``outage == 0``: ``pg_ctl restart -m fast``; otherwise stopped that long, then started
    (longer than the worker's 5 s presence check, so the check runs while it is down)."""
    url = throwaway_postgres.create_database("helpdesk")
    n = 800
    ids, raws = backlog(n, f"pgrestart{outage:g}")
    dovecot.append_many(imap_account.user, imap_account.password, raws)
    with worker_process(worker_env(url, imap_account, smtp_receiver)) as proc:
        wait_until("the first tickets", tickets_at_least(url, 60), timeout=60, every=0.05)
        at_restart = asyncio.run(count_rows(url))[0]
        if outage:
            throwaway_postgres.stop()
            time.sleep(outage)
            throwaway_postgres.start()
        else:
            throwaway_postgres.restart()
        wait_until("every mail acknowledged", acked_all(smtp_receiver, ids), timeout=60)
        time.sleep(1.5)
        assert proc.poll() is None, "the worker survived the restart"
        assert stop_cleanly(proc) == 0
    result, outbox = tally(url, smtp_receiver, ids)
    name = "postgres-restart" if not outage else f"postgres-down-{outage:g}s"
    report(name, result, tickets_at_restart=at_restart, outbox=outbox)
    assert at_restart < n, "the restart came mid-run"
    assert (result.tickets, result.acks, result.lost) == (n, n, 0)
    assert result.max_per_mail <= 2 and result.duplicates <= 1
    assert outbox == {"sent": n}


# --- 6. a poison mail is set aside, visible, retryable ------------------------------------------


async def test_poison_mail_set_aside_visible_and_retryable(
    database_url: str,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 12
    ids, raws = backlog(n, "poison")
    poison = ids[3]
    dovecot.append_many(imap_account.user, imap_account.password, raws)

    real = tickets.add_inbound_message

    def exploding(*args: Any, **kwargs: Any) -> Any:
        if kwargs["email"].message_id == poison:
            raise RuntimeError("injected fault for the poison mail")
        return real(*args, **kwargs)

    monkeypatch.setattr(tickets, "add_inbound_message", exploding)
    settings = server_settings(database_url, imap_account, smtp_receiver)
    engine = create_engine(settings)
    sessions = session_factory(engine)
    try:
        first = await Worker(settings, sessions).run_once()
        assert (first.poll.fetched, first.poll.created, first.poll.rejected) == (n, n - 1, 1)
        async with sessions() as s:
            rejected = (await s.exec(select(RejectedMail))).all()
            assert len(rejected) == 1
            row = rejected[0]
            assert row.raw.replace(b"\r\n", b"\n") == raws[3].replace(b"\r\n", b"\n")
            assert "injected fault" in row.detail and row.status == "pending"
            health = await desk.health(s)
            assert [r.id for r in health.rejected] == [row.id]
            await users.add_user(s, email="admin@clinic.test", role="admin", password=PASSWORD)
            await s.commit()
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                assert (await login(c, "admin@clinic.test")).status_code == 303
                page = await c.get("/admin/health")
                assert page.status_code == 200
                assert "injected fault for the poison mail" in page.text
                assert f"/admin/rejected/{row.id}/retry" in page.text

        monkeypatch.undo()  # the fault is fixed
        assert row.id is not None
        outcome = await pipeline.retry_rejected(
            sessions=sessions, rejected_id=row.id, settings=settings
        )
        assert (outcome.action, outcome.reply) == ("created", "ack")
        await Worker(settings, sessions).run_once()
        async with sessions() as s:
            assert (await s.get(RejectedMail, row.id)).status == "retried"  # type: ignore[union-attr]
            assert (await desk.health(s)).rejected == []
    finally:
        await engine.dispose()
    await smtp_receiver.wait_for(n, timeout=10)
    result, outbox = count_what_arrived(await _stored(database_url), smtp_receiver, ids)
    report(f"poison-mail-{make_url(database_url).get_backend_name()}", result, outbox=outbox)
    assert (result.tickets, result.acks, result.lost, result.duplicates) == (n, n, 0, 0)


# --- 7. UIDVALIDITY changes (folder deleted and recreated) --------------------------------------


def _imap(account: ImapAccount) -> imaplib.IMAP4:
    client = imaplib.IMAP4(account.host, account.port)
    client.login(account.user, account.password)
    return client


def _uidvalidity(client: imaplib.IMAP4, folder: str) -> int:
    status, data = client.status(folder, "(UIDVALIDITY)")
    assert status == "OK", data
    match = re.search(rb"UIDVALIDITY (\d+)", data[0] or b"")
    assert match, data
    return int(match.group(1))


async def test_uidvalidity_change_creates_no_duplicates(
    database_url: str,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    smtp_receiver: SmtpReceiver,
) -> None:
    folder = "Support"
    ids, raws = backlog(25, "uidv")
    client = _imap(imap_account)
    try:
        assert client.create(folder)[0] == "OK"
        before = _uidvalidity(client, folder)
    finally:
        client.logout()
    dovecot.append_many(imap_account.user, imap_account.password, raws[:20], folder)
    settings = server_settings(database_url, imap_account, smtp_receiver, imap_folder=folder)
    engine = create_engine(settings)
    sessions = session_factory(engine)
    try:
        first = await Worker(settings, sessions).run_once()
        assert (first.poll.created, first.sent) == (20, 20)

        await asyncio.sleep(1.1)  # Dovecot derives UIDVALIDITY from the clock
        client = _imap(imap_account)
        try:
            assert client.delete(folder)[0] == "OK"
            assert client.create(folder)[0] == "OK"
            after = _uidvalidity(client, folder)
        finally:
            client.logout()
        assert after != before
        dovecot.append_many(imap_account.user, imap_account.password, raws, folder)
        second = await Worker(settings, sessions).run_once()
        assert (second.poll.fetched, second.poll.created, second.poll.duplicates) == (25, 5, 20)
        result, outbox = count_what_arrived(await _stored(database_url), smtp_receiver, ids)
    finally:
        await engine.dispose()
    report(
        f"uidvalidity-change-{make_url(database_url).get_backend_name()}",
        result,
        uidvalidity=f"{before}->{after}",
        outbox=outbox,
    )
    assert (result.tickets, result.acks, result.lost, result.duplicates) == (25, 25, 0, 0)
    assert outbox == {"sent": 25}
