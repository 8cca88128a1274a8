"""The same migrations build the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from helpdesk import migrations
from helpdesk.config import load_settings
from helpdesk.db import create_engine


def _diff(conn: Any) -> list[Any]:
    context = MigrationContext.configure(
        conn, opts={"compare_type": True, "include_object": migrations.include_object}
    )
    return list(compare_metadata(context, SQLModel.metadata))


async def test_migrated_schema_matches_models(database_url: str) -> None:
    settings = load_settings(database_url=database_url)
    assert await migrations.current_revisions(settings) == migrations.heads(settings)
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()
    await migrations.require_current(settings)


def test_downgrade_to_base_and_back(database_url: str) -> None:
    settings = load_settings(database_url=database_url)
    from alembic import command

    cfg = migrations.alembic_config(settings)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
