"""`helpdesk db copy`: SQLite to PostgreSQL keeps every row and the ticket numbering."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlmodel import col, select

from helpdesk import migrations, tickets
from helpdesk.config import Settings, load_settings
from helpdesk.db import create_engine, session_factory
from helpdesk.dbcopy import copy_database
from helpdesk.errors import ConfigError
from helpdesk.models import Message, Ticket, utcnow
from tests.conftest import PgDatabases


@pytest.mark.postgres
def test_copy_sqlite_to_postgresql(
    tmp_path: Path, pg_databases: PgDatabases, pg_available: bool
) -> None:
    if not pg_available:
        pytest.skip("PostgreSQL not reachable")
    source = load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'src.db'}")
    target = load_settings(database_url=pg_databases.create())
    migrations.upgrade(source)
    migrations.upgrade(target)
    asyncio.run(_copy_and_check(source, target))


async def _copy_and_check(source: Settings, target: Settings) -> None:
    engine = create_engine(source)
    async with session_factory(engine)() as s, s.begin():
        for i in range(3):
            t = await tickets.create_ticket(
                s,
                subject=f"q{i}",
                requester=f"p{i}@x.test",
                requester_name="",
                language="en",
                mailbox="default",
                now=utcnow(),
                due_days=7,
            )
            s.add(
                Message(ticket_id=t.id, direction="inbound", message_id=f"<m{i}@x>", text_body="hi")
            )  # type: ignore[arg-type]
    await engine.dispose()

    counts = await copy_database(source, target)
    assert counts["ticket"] == 3 and counts["message"] == 3

    engine = create_engine(target)
    async with session_factory(engine)() as s, s.begin():
        refs = list((await s.exec(select(Ticket.reference).order_by(col(Ticket.id)))).all())
        assert refs == ["HD-1001", "HD-1002", "HD-1003"]
        new = await tickets.create_ticket(
            s,
            subject="after",
            requester="n@x.test",
            requester_name="",
            language="en",
            mailbox="default",
            now=utcnow(),
            due_days=7,
        )
        assert new.reference == "HD-1004"  # the sequence continues past the copied ids
    await engine.dispose()
    with pytest.raises(ConfigError, match="not empty"):
        await copy_database(source, target)
