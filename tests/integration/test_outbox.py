"""outbox: real aiosmtpd receiver, real SQLite and (when reachable) PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import SQLModel, col, select

from helpdesk import (
    models,  # noqa: F401 - registers the tables on SQLModel.metadata
    outbox,
)
from helpdesk.compose import DEFAULT_ACK_SUBJECT, Identity, ack_mail, new_message_id
from helpdesk.config import load_settings
from helpdesk.db import SessionFactory, create_engine, session_factory
from helpdesk.errors import PermanentDeliveryError, TransientDeliveryError
from helpdesk.models import Outbox
from helpdesk.outbox import (
    DeliveryReport,
    RetryPolicy,
    SmtpSender,
    check_smtp,
    deliver_due,
    enqueue,
    outbox_backlog,
)
from helpdesk.testing.smtp import SmtpReceiver, free_port

PG_DSN = os.environ.get("HELPDESK_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
IDENTITY = Identity(
    address="help@clinic.test", name="Clinic Support", message_id_domain="clinic.test"
)
T0 = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)
NO_WAIT = RetryPolicy(base=0, cap=0)
SLOW = RetryPolicy(base=60, cap=600, priority_base=2, priority_cap=30, jitter=False)


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.value = start

    def __call__(self) -> datetime:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += timedelta(seconds=seconds)


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN, timeout=3)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionFactory]:
    """Fresh tables on SQLite (a temp file) or in a database of our own on PostgreSQL."""
    dbname = ""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}"
    else:
        dbname = f"hd_outbox_{uuid.uuid4().hex[:12]}"
        try:
            await _pg_admin(f'CREATE DATABASE "{dbname}"')
        except Exception as exc:  # any failure means "not reachable"
            if os.environ.get("CI"):
                raise
            pytest.skip(f"PostgreSQL not reachable: {exc}")
        url = f"{PG_DSN.rsplit('/', 1)[0]}/{dbname}".replace(
            "postgresql://", "postgresql+asyncpg://"
        )
    engine = create_engine(load_settings(database_url=url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.create_all)
        yield session_factory(engine)
    finally:
        await engine.dispose()
        if dbname:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


async def _sender(receiver: SmtpReceiver) -> AsyncIterator[SmtpSender]:
    s = SmtpSender(host=receiver.host, port=receiver.port, security="none", timeout=5)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def smtp(smtp_receiver: SmtpReceiver) -> AsyncIterator[SmtpSender]:
    async for s in _sender(smtp_receiver):
        yield s


async def add_mails(
    sessions: SessionFactory,
    n: int,
    *,
    lane: int = 1,
    now: datetime = T0,
    deadline: timedelta = timedelta(hours=48),
    recipients: list[str] | None = None,
) -> list[str]:
    """Enqueue ``n`` acknowledgements; returns their Message-IDs."""
    ids = []
    async with sessions() as session:
        for i in range(n):
            to = recipients[i] if recipients else f"patient{i}@example.test"
            mid = new_message_id("clinic.test")
            msg = ack_mail(
                identity=IDENTITY,
                to_addr=to,
                to_name=f"Patient {i}",
                reference=f"HD-{i}",
                subject_template=DEFAULT_ACK_SUBJECT,
                reply_window="5–7 days",
                language="en",
                in_reply_to=None,
                references=[],
                message_id=mid,
                now=now,
            )
            await enqueue(
                session,
                msg=msg,
                kind="ack",
                recipient=to,
                mail_from=IDENTITY.address,
                ticket_id=None,
                lane=lane,
                now=now,
                deadline=deadline,
            )
            ids.append(mid)
        await session.commit()
    return ids


async def rows(sessions: SessionFactory) -> list[Outbox]:
    async with sessions() as session:
        return list((await session.exec(select(Outbox).order_by(col(Outbox.id)))).all())


async def deliver(
    sessions: SessionFactory,
    sender: SmtpSender,
    clock: Clock,
    policy: RetryPolicy = NO_WAIT,
    **kwargs: object,
) -> DeliveryReport:
    return await deliver_due(
        sessions=sessions,
        sender=sender,
        worker_id=str(kwargs.pop("worker_id", "w1")),
        now=clock,
        policy=policy,
        **kwargs,  # type: ignore[arg-type]
    )


# --- the happy path ---------------------------------------------------------------------


async def test_delivers_everything_over_one_connection(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    routine = await add_mails(db, 15, lane=1)
    urgent = await add_mails(db, 5, lane=0)
    report = await deliver(db, smtp, Clock(), batch_size=7)
    assert report == DeliveryReport(sent=20, retried=0, failed=0)
    received = await smtp_receiver.wait_for(20)
    assert smtp_receiver.connections == 1
    assert [m.message_id for m in received[:5]] == urgent  # lane 0 first
    assert sorted(m.message_id for m in received) == sorted(routine + urgent)
    assert received[0].mail_from == IDENTITY.address
    assert received[0].rcpt_tos == ("patient0@example.test",)
    for row in await rows(db):
        assert (row.status, row.attempts, row.locked_by, row.locked_until) == (
            "sent",
            1,
            None,
            None,
        )
        assert row.sent_at == T0
    assert await deliver(db, smtp, Clock()) == DeliveryReport(0, 0, 0)


async def test_parallel_connections_hand_over_one_unrecorded_mail_at_a_time(
    db: SessionFactory, smtp_receiver: SmtpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several mails on the wire at once, but each is handed over (SMTP's final dot) only
    after the one before it is recorded: a kill costs at most one duplicate."""
    ids = await add_mails(db, 30)
    recorded_at: dict[int, float] = {}
    record = outbox._Recorder.record

    async def timed(self: outbox._Recorder, row_id: int, **values: object) -> None:
        await record(self, row_id, **values)
        recorded_at[row_id] = time.monotonic()

    monkeypatch.setattr(outbox._Recorder, "record", timed)
    sender = SmtpSender(
        host=smtp_receiver.host, port=smtp_receiver.port, security="none", parallel=3
    )
    try:
        assert await deliver(db, sender, Clock(), batch_size=10) == DeliveryReport(30, 0, 0)
    finally:
        await sender.close()
    assert smtp_receiver.connections == 3
    received = sorted(await smtp_receiver.wait_for(30), key=lambda m: m.received_at)
    assert sorted(m.message_id for m in received) == sorted(ids)
    row_of = {row.message_id: row.id for row in await rows(db)}
    assert all(row.status == "sent" for row in await rows(db))
    for before, after in itertools.pairwise(received):
        assert recorded_at[row_of[before.message_id]] < after.received_at


async def test_parallel_pass_stops_handing_over_when_a_result_cannot_be_recorded(
    db: SessionFactory, smtp_receiver: SmtpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_mails(db, 10)
    record = outbox._Recorder.record
    calls = 0

    async def failing(self: outbox._Recorder, row_id: int, **values: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("database went away")
        await record(self, row_id, **values)

    monkeypatch.setattr(outbox._Recorder, "record", failing)
    sender = SmtpSender(
        host=smtp_receiver.host, port=smtp_receiver.port, security="none", parallel=3
    )
    try:
        with pytest.raises(OSError, match="went away"):
            await deliver(db, sender, Clock())
    finally:
        await sender.close()
    # two recorded, the third handed over but not recorded, and nothing after it
    await asyncio.sleep(0.2)
    assert len(smtp_receiver.messages) == 3
    assert [r.status for r in await rows(db)].count("sent") == 2


async def test_unusual_addresses_go_through_sendmail(
    smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    raw = b"Subject: x\r\n\r\n.leading dot\r\nhi\r\n"
    await smtp.send(mail_from="help@clinic.test", recipient='"odd name"@example.test', raw=raw)
    await smtp.send(mail_from="help@clinic.test", recipient="plain@example.test", raw=raw)
    first, second = await smtp_receiver.wait_for(2)
    assert first.rcpt_tos == ('"odd name"@example.test',)
    assert first.raw == second.raw == raw  # dot-stuffed on the wire, unstuffed by the server


async def test_enqueue_is_part_of_the_callers_transaction(db: SessionFactory) -> None:
    async with db() as session:
        msg = ack_mail(
            identity=IDENTITY,
            to_addr="a@example.test",
            to_name="",
            reference="HD-1",
            subject_template=DEFAULT_ACK_SUBJECT,
            reply_window="5–7 days",
            language="en",
            in_reply_to=None,
            references=[],
            message_id="<fixed@clinic.test>",
            now=T0,
        )
        row = await enqueue(
            session,
            msg=msg,
            kind="ack",
            recipient="a@example.test",
            mail_from=IDENTITY.address,
            ticket_id=None,
            lane=0,
            now=T0,
            deadline=timedelta(hours=1),
        )
        assert row.message_id == "<fixed@clinic.test>"
        assert row.deadline_at == T0 + timedelta(hours=1)
        assert row.raw.startswith(b"From: Clinic Support <help@clinic.test>\r\n")
        await session.rollback()
    assert await rows(db) == []


# --- failures ---------------------------------------------------------------------------


async def test_tempfail_is_retried_later_and_lane_0_sooner(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    await add_mails(db, 1, lane=0)
    await add_mails(db, 1, lane=1)
    clock = Clock()
    smtp_receiver.set_mode("tempfail")
    assert await deliver(db, smtp, clock, SLOW) == DeliveryReport(sent=0, retried=2, failed=0)
    urgent, routine = await rows(db)
    for row in (urgent, routine):
        assert row.status == "pending"
        assert row.attempts == 1
        assert (row.last_error or "").startswith("451")
        assert row.locked_by is None
    assert urgent.next_attempt_at - T0 == timedelta(seconds=2)
    assert routine.next_attempt_at - T0 == timedelta(seconds=60)

    smtp_receiver.set_mode("ok")
    clock.advance(1)
    assert await deliver(db, smtp, clock, SLOW) == DeliveryReport(0, 0, 0)  # nothing due yet
    clock.advance(2)
    assert await deliver(db, smtp, clock, SLOW) == DeliveryReport(sent=1, retried=0, failed=0)
    clock.advance(60)
    assert await deliver(db, smtp, clock, SLOW) == DeliveryReport(sent=1, retried=0, failed=0)
    urgent, routine = await rows(db)
    assert (urgent.status, urgent.attempts) == ("sent", 2)
    assert (routine.status, routine.attempts) == ("sent", 2)
    assert len(smtp_receiver.messages) == 2


async def test_backoff_grows_per_attempt(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    await add_mails(db, 1, lane=1)
    clock = Clock()
    smtp_receiver.set_mode("tempfail")
    delays = []
    for _ in range(4):
        await deliver(db, smtp, clock, SLOW)
        (row,) = await rows(db)
        delays.append((row.next_attempt_at - clock()).total_seconds())
        clock.value = row.next_attempt_at
    assert delays == [60, 120, 240, 480]
    assert row.attempts == 4


async def test_one_rejected_recipient_does_not_block_the_others(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    smtp_receiver.reject_recipients({"gone@example.test": (550, "5.1.1 no such user")})
    await add_mails(db, 3, recipients=["a@example.test", "gone@example.test", "b@example.test"])
    assert await deliver(db, smtp, Clock()) == DeliveryReport(sent=2, retried=0, failed=1)
    first, gone, last = await rows(db)
    assert (first.status, last.status) == ("sent", "sent")
    assert gone.status == "failed"
    assert gone.last_error == "550 5.1.1 no such user"
    assert gone.locked_by is None
    assert sorted(m.rcpt_tos[0] for m in smtp_receiver.messages) == [
        "a@example.test",
        "b@example.test",
    ]
    assert smtp_receiver.connections == 1  # the connection survived the 550


async def test_5xx_at_data_fails_that_row(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    smtp_receiver.fail_next(1, code=554, text="5.7.1 rejected as spam")
    await add_mails(db, 2)
    assert await deliver(db, smtp, Clock()) == DeliveryReport(sent=1, retried=0, failed=1)
    bad, good = await rows(db)
    assert (bad.status, bad.last_error) == ("failed", "554 5.7.1 rejected as spam")
    assert good.status == "sent"


async def test_server_down_then_back(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    await add_mails(db, 5)
    clock = Clock()
    smtp_receiver.stop()
    report = await deliver(db, smtp, clock, SLOW)
    # three refused connections in a row stop the pass; the other two are given back
    assert report == DeliveryReport(sent=0, retried=3, failed=0)
    tried = [r for r in await rows(db) if r.attempts]
    untouched = [r for r in await rows(db) if not r.attempts]
    assert (len(tried), len(untouched)) == (3, 2)
    assert all("connect" in (r.last_error or "") for r in tried)
    assert all(r.locked_by is None and r.status == "pending" for r in await rows(db))

    smtp_receiver.start()
    clock.advance(3600)
    assert await deliver(db, smtp, clock, SLOW) == DeliveryReport(sent=5, retried=0, failed=0)
    assert len(await smtp_receiver.wait_for(5)) == 5


async def test_reconnects_after_the_server_drops_the_connection(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    clock = Clock()
    await add_mails(db, 1)
    assert (await deliver(db, smtp, clock)).sent == 1
    smtp_receiver.stop()  # cuts the open connection, like an idle timeout
    smtp_receiver.start()
    await add_mails(db, 1)
    assert await deliver(db, smtp, clock) == DeliveryReport(sent=1, retried=0, failed=0)
    assert smtp_receiver.connections == 2


async def test_past_deadline_fails_without_sending(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    await add_mails(db, 1, deadline=timedelta(seconds=10))
    clock = Clock()
    clock.advance(11)
    assert await deliver(db, smtp, clock) == DeliveryReport(sent=0, retried=0, failed=1)
    (row,) = await rows(db)
    assert row.status == "failed"
    assert "deadline" in (row.last_error or "")
    assert smtp_receiver.messages == []


async def test_retry_past_the_deadline_fails(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    await add_mails(db, 1, deadline=timedelta(seconds=100))
    smtp_receiver.set_mode("tempfail")
    clock = Clock()
    assert await deliver(db, smtp, clock, SLOW) == DeliveryReport(0, 1, 0)  # retry at +60
    clock.advance(60)
    assert await deliver(db, smtp, clock, SLOW) == DeliveryReport(0, 0, 1)  # +120 > deadline
    (row,) = await rows(db)
    assert row.status == "failed"
    assert row.attempts == 2
    assert row.last_error is not None
    assert row.last_error.startswith("deadline reached after 2 attempts: 451")


async def test_base_zero_retries_are_instant_but_once_per_call(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    await add_mails(db, 1)
    smtp_receiver.fail_next(1)
    clock = Clock()
    assert await deliver(db, smtp, clock) == DeliveryReport(sent=0, retried=1, failed=0)
    assert await deliver(db, smtp, clock) == DeliveryReport(sent=1, retried=0, failed=0)
    (row,) = await rows(db)
    assert row.attempts == 2


# --- lanes, locks, several workers ------------------------------------------------------


async def test_lane_filter_lets_two_loops_split_the_work(
    db: SessionFactory, smtp_receiver: SmtpReceiver
) -> None:
    await add_mails(db, 30, lane=1)
    await add_mails(db, 3, lane=0)
    clock = Clock()
    async for urgent_sender in _sender(smtp_receiver):
        async for routine_sender in _sender(smtp_receiver):
            urgent, routine = await asyncio.gather(
                deliver(db, urgent_sender, clock, lanes=(0,), worker_id="w1"),
                deliver(db, routine_sender, clock, lanes=(1,), worker_id="w1", batch_size=5),
            )
    assert urgent == DeliveryReport(sent=3, retried=0, failed=0)
    assert routine == DeliveryReport(sent=30, retried=0, failed=0)
    assert smtp_receiver.connections == 2
    lanes = {r.message_id: r.lane for r in await rows(db)}
    arrival = [lanes[m.message_id] for m in smtp_receiver.messages]
    # the priority loop did not wait behind the routine backlog
    assert max(i for i, lane in enumerate(arrival) if lane == 0) < 10


async def test_rows_locked_by_another_worker_are_skipped_until_the_lock_expires(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    await add_mails(db, 1)
    async with db() as session:
        (row,) = (await session.exec(select(Outbox))).all()
        row.locked_by, row.locked_until = "other", T0 + timedelta(seconds=120)
        session.add(row)
        await session.commit()
    clock = Clock()
    assert await deliver(db, smtp, clock) == DeliveryReport(0, 0, 0)
    clock.advance(121)
    assert await deliver(db, smtp, clock) == DeliveryReport(1, 0, 0)


@pytest.mark.postgres
async def test_two_workers_never_send_the_same_row(
    db: SessionFactory, smtp_receiver: SmtpReceiver
) -> None:
    async with db() as session:
        if session.bind.dialect.name != "postgresql":
            pytest.skip("SKIP LOCKED is a PostgreSQL feature; SQLite has a single writer")
    ids = await add_mails(db, 200)
    clock = Clock()
    async for one in _sender(smtp_receiver):
        async for two in _sender(smtp_receiver):
            reports = await asyncio.gather(
                deliver(db, one, clock, worker_id="w1", batch_size=10),
                deliver(db, two, clock, worker_id="w2", batch_size=10),
            )
    assert sum(r.sent for r in reports) == 200
    assert all(r.sent > 0 for r in reports), reports  # both took part
    received = [m.message_id for m in await smtp_receiver.wait_for(200)]
    assert len(received) == 200
    assert sorted(received) == sorted(ids)


async def test_backlog_counts(
    db: SessionFactory, smtp_receiver: SmtpReceiver, smtp: SmtpSender
) -> None:
    smtp_receiver.reject_recipients({"gone@example.test": (550, "no such user")})
    await add_mails(db, 2, recipients=["a@example.test", "gone@example.test"])
    await add_mails(db, 2, lane=0, now=T0 + timedelta(hours=1))
    await add_mails(db, 1, lane=1, now=T0 + timedelta(hours=1))
    await deliver(db, smtp, Clock())
    async with db() as session:
        assert await outbox_backlog(session) == {
            "pending": 3,
            "sent": 1,
            "failed": 1,
            "pending_lane_0": 2,
            "pending_lane_1": 1,
        }


# --- the sender on its own --------------------------------------------------------------


async def test_sender_raises_named_errors(smtp_receiver: SmtpReceiver, smtp: SmtpSender) -> None:
    smtp_receiver.reject_recipients({"gone@example.test": (550, "no such user")})
    raw = b"Subject: x\r\n\r\nhi\r\n"
    with pytest.raises(PermanentDeliveryError, match=r"^550 no such user$"):
        await smtp.send(mail_from="help@clinic.test", recipient="gone@example.test", raw=raw)
    smtp_receiver.fail_next(1, 452)
    with pytest.raises(TransientDeliveryError, match=r"^452"):
        await smtp.send(mail_from="help@clinic.test", recipient="a@example.test", raw=raw)
    await smtp.send(mail_from="help@clinic.test", recipient="a@example.test", raw=raw)
    assert smtp.connections == 1
    closed = SmtpSender(host="127.0.0.1", port=free_port(), security="none", timeout=2)
    with pytest.raises(TransientDeliveryError, match="cannot connect"):
        await closed.send(mail_from="help@clinic.test", recipient="a@example.test", raw=raw)
    await closed.close()


async def test_check_smtp(smtp_receiver: SmtpReceiver) -> None:
    settings = load_settings(
        smtp_host="127.0.0.1", smtp_port=smtp_receiver.port, smtp_security="none"
    )
    line = await check_smtp(settings)
    assert line.startswith(f"smtp ok: 127.0.0.1:{smtp_receiver.port} (none)")
    assert "\n" not in line
    smtp_receiver.stop()
    with pytest.raises(TransientDeliveryError, match="cannot connect"):
        await check_smtp(settings)


# --- the retry policy -------------------------------------------------------------------


def test_retry_policy() -> None:
    policy = RetryPolicy(base=30, cap=1800)
    for attempts in range(1, 20):
        assert 0 <= policy.delay(attempts, 0) <= min(30, 2 * 2 ** (attempts - 1))
        assert 0 <= policy.delay(attempts, 1) <= min(1800, 30 * 2 ** (attempts - 1))
    fixed = RetryPolicy(base=30, cap=1800, jitter=False)
    assert [fixed.delay(a, 1) for a in (1, 2, 3, 7, 100)] == [30, 60, 120, 1800, 1800]
    assert [fixed.delay(a, 0) for a in (1, 2, 5, 100)] == [2, 4, 30, 30]
    assert RetryPolicy(base=0, cap=0).delay(5, 0) == 0
    assert RetryPolicy(base=0, cap=0).delay(5, 1) == 0


# --- TLS and login ----------------------------------------------------------------------


@pytest.mark.parametrize("security", ["ssl", "starttls"])
async def test_tls_and_login(security: str) -> None:
    raw = b"Subject: x\r\n\r\nhi\r\n"
    with SmtpReceiver(tls=security, auth=("desk", "s3cret")) as receiver:  # type: ignore[arg-type]
        sender = SmtpSender(
            host=receiver.host,
            port=receiver.port,
            security=security,
            user="desk",
            password="s3cret",
            timeout=5,
            ssl_context=receiver.client_ssl_context(),
        )
        await sender.send(mail_from="help@clinic.test", recipient="a@example.test", raw=raw)
        await sender.send(mail_from="help@clinic.test", recipient="b@example.test", raw=raw)
        await sender.close()
        assert len(await receiver.wait_for(2)) == 2
        assert sender.connections == 1

        wrong = SmtpSender(
            host=receiver.host,
            port=receiver.port,
            security=security,
            user="desk",
            password="wrong",
            timeout=5,
            ssl_context=receiver.client_ssl_context(),
        )
        # a bad password is the operator's problem, not this mail's: retried, never failed
        with pytest.raises(TransientDeliveryError, match="login failed"):
            await wrong.send(mail_from="help@clinic.test", recipient="a@example.test", raw=raw)
        await wrong.close()

        untrusted = SmtpSender(host=receiver.host, port=receiver.port, security=security, timeout=5)
        with pytest.raises(TransientDeliveryError, match="cannot connect"):
            await untrusted.send(mail_from="help@clinic.test", recipient="a@example.test", raw=raw)
        await untrusted.close()


async def test_check_smtp_with_login() -> None:
    with SmtpReceiver(auth=("desk", "s3cret")) as receiver:
        settings = load_settings(
            smtp_host="127.0.0.1",
            smtp_port=receiver.port,
            smtp_security="none",
            smtp_user="desk",
            smtp_password="s3cret",
        )
        assert "logged in as desk" in await check_smtp(settings)
        bad = load_settings(
            smtp_host="127.0.0.1",
            smtp_port=receiver.port,
            smtp_security="none",
            smtp_user="desk",
            smtp_password="nope",
        )
        with pytest.raises(TransientDeliveryError, match="login failed: 535"):
            await check_smtp(bad)
