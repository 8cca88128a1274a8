"""helpdesk.logins: the login outcomes the worker records, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from helpdesk import desk, logins
from helpdesk.db import SessionFactory
from helpdesk.models import LoginState
from tests.conftest import make_settings

T0 = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


async def stored(sessions: SessionFactory, service: str, mailbox: str) -> LoginState:
    async with sessions() as session:
        state = await session.get(LoginState, (service, mailbox))
    assert state is not None
    return state


async def test_failures_count_in_a_row_and_a_good_login_clears_them(
    sessions: SessionFactory,
) -> None:
    clock = Clock()
    recorder = logins.LoginRecorder(sessions, worker_id="w1", clock=clock)
    await recorder.ok("imap", "default", auth="xoauth2")
    first = await stored(sessions, "imap", "default")
    assert (first.ok, first.failures, first.last_ok_at, first.failing_since) == (True, 0, T0, None)

    clock.now = T0 + timedelta(minutes=1)
    await recorder.failed("imap", "default", auth="xoauth2", reason="login refused: NO")
    clock.now = T0 + timedelta(minutes=3)
    await recorder.failed("imap", "default", auth="xoauth2", reason="x" * 900)
    failing = await stored(sessions, "imap", "default")
    assert (failing.ok, failing.failures) == (False, 2)
    assert failing.failing_since == T0 + timedelta(minutes=1)  # the first of the streak
    assert failing.last_failure_at == T0 + timedelta(minutes=3)
    assert failing.last_error is not None and len(failing.last_error) == 500
    assert failing.last_ok_at == T0  # the last good one is kept for the panel

    clock.now = T0 + timedelta(minutes=4)  # within OK_REFRESH of the last ok, but it changed
    await recorder.ok("imap", "default", auth="xoauth2")
    healed = await stored(sessions, "imap", "default")
    assert (healed.ok, healed.failures, healed.failing_since) == (True, 0, None)
    assert healed.last_ok_at == T0 + timedelta(minutes=4)

    async with sessions() as session:
        numbers = await desk.numbers(session, now=clock.now)
    assert [(s.service, s.mailbox, s.ok) for s in numbers.logins] == [("imap", "default", True)]


async def test_a_healthy_worker_rewrites_its_good_login_only_now_and_then(
    sessions: SessionFactory,
) -> None:
    clock = Clock()
    recorder = logins.LoginRecorder(sessions, worker_id="w1", clock=clock)
    await recorder.ok("smtp", "relay", auth="password")
    clock.now = T0 + logins.OK_REFRESH - timedelta(seconds=1)
    await recorder.ok("smtp", "relay", auth="password")
    assert (await stored(sessions, "smtp", "relay")).updated_at == T0
    clock.now = T0 + logins.OK_REFRESH
    await recorder.ok("smtp", "relay", auth="password")
    assert (await stored(sessions, "smtp", "relay")).updated_at == clock.now


async def test_concurrent_failures_lose_no_count(sessions: SessionFactory) -> None:
    # the two delivery lanes of a worker (or two workers) record the relay at the same time
    recorders = [logins.LoginRecorder(sessions, worker_id=f"w{i}") for i in range(4)]
    await asyncio.gather(
        *(r.failed("smtp", "relay", auth="xoauth2", reason="535") for r in recorders)
    )
    assert (await stored(sessions, "smtp", "relay")).failures == 4


async def test_a_database_problem_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from helpdesk.db import create_engine, session_factory

    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/missing/dir/x.db")
    engine = create_engine(settings)
    try:
        recorder = logins.LoginRecorder(session_factory(engine), worker_id="w1")
        with caplog.at_level(logging.WARNING, logger="helpdesk.logins"):
            await recorder.failed("imap", "default", auth="password", reason="refused")
    finally:
        await engine.dispose()
    assert "cannot record a login outcome" in caplog.text
