"""Fixtures shared by every tier: databases (SQLite and PostgreSQL), settings, sessions.

PostgreSQL is the server at 127.0.0.1:5432 (trust auth) that the development and CI
machines run (``scripts/ensure-services.sh`` starts one); each test that uses it gets a
database of its own, dropped afterwards, so tests never see each other's rows.

Every test must leave no SQLite connection open behind it (``_no_open_sqlite_connections``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpdesk import migrations
from helpdesk.config import Settings, load_settings
from helpdesk.db import SessionFactory, create_engine, session_factory
from helpdesk.testing.dovecot import ImapAccount
from helpdesk.testing.smtp import SmtpReceiver

pytest_plugins = ["tests.fixtures_smtp", "tests.fixtures_dovecot"]

PG_ADMIN_DSN = os.environ.get("HELPDESK_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def sqlite_worker_threads() -> set[threading.Thread]:
    # aiosqlite runs each connection in a thread of its own, named after its target function.
    return {t for t in threading.enumerate() if t.name.endswith("(_connection_worker_thread)")}


@pytest.fixture(autouse=True)
def _no_open_sqlite_connections() -> Iterator[None]:
    """Fail the test that leaves an aiosqlite connection open (an engine not disposed, a
    connection never returned, a server thread not stopped) or still finishing its work.

    Such a thread outlives the test's event loop and, when it next posts a result to that
    closed loop, dies with "RuntimeError: Event loop is closed", which pytest pins on
    whichever later test is running then. Joining here, after the loop has closed, makes the
    leak, or that error, belong to the test that caused it.
    """
    before = sqlite_worker_threads()
    yield
    deadline = time.monotonic() + 5
    left = sqlite_worker_threads() - before
    for thread in left:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = sorted(t.name for t in left if t.is_alive())
    assert not alive, f"this test left {len(alive)} SQLite connection(s) open: {alive}"


def _pg_available() -> bool:
    try:
        asyncio.run(_pg_admin("select 1"))
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def pg_available() -> bool:
    ok = _pg_available()
    if not ok and os.environ.get("CI"):
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_DSN} (scripts/ensure-services.sh starts one)"
        )
    return ok


class PgDatabases:
    """Creates throwaway databases on the shared server and drops them at the end."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def create(self) -> str:
        name = f"hd_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        return f"{base}/{name}"

    def drop_all(self) -> None:
        for name in self.created:
            with contextlib.suppress(Exception):
                asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    dbs = PgDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, pg_databases: PgDatabases, pg_available: bool
) -> str:
    """A fresh, migrated database: every test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'helpdesk.db'}"
    else:
        if not pg_available:
            pytest.skip("PostgreSQL not reachable")
        url = pg_databases.create()
    migrations.upgrade(load_settings(database_url=url))
    return url


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "support_address": "help@clinic.test",
        "support_name": "Clinic Support",
        "secret_key": "test-secret-key-not-for-production",
        "base_url": "http://127.0.0.1:8000",
        "outbox_retry_base_seconds": 0,
        "outbox_retry_max_seconds": 0,
    }
    values.update(overrides)
    return load_settings(**values)


def server_settings(
    database_url: str, account: ImapAccount, smtp: SmtpReceiver, **overrides: Any
) -> Settings:
    """``make_settings`` for a worker reading a test Dovecot account and sending to a test
    SMTP receiver, both plain on loopback."""
    values: dict[str, Any] = {
        "imap_host": account.host,
        "imap_port": account.port,
        "imap_user": account.user,
        "imap_password": account.password,
        "imap_security": "none",
        "smtp_host": smtp.host,
        "smtp_port": smtp.port,
        "smtp_security": "none",
    }
    values.update(overrides)
    return make_settings(database_url, **values)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
async def sessions(settings: Settings) -> AsyncIterator[SessionFactory]:
    engine = create_engine(settings)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def corpus_dir() -> Path:
    if not (CORPUS / "MANIFEST.tsv").exists():
        pytest.skip("the mail corpus (../shared/corpus) is not present")
    return CORPUS
