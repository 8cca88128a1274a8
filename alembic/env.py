"""Alembic environment: runs the migrations on the async engine built from Settings.

The URL comes from ``config.attributes["database_url"]`` (set by ``helpdesk db upgrade``)
or else from the settings (``HELPDESK_DATABASE_URL``). ``render_as_batch`` lets the same
migrations alter tables on SQLite.
"""

import asyncio

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import helpdesk.models  # noqa: F401  (registers the tables)
from alembic import context
from helpdesk.config import load_settings
from helpdesk.migrations import include_object

target_metadata = SQLModel.metadata


def _url() -> str:
    url = context.config.attributes.get("database_url")
    if url:
        return str(url)
    return load_settings().async_database_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    asyncio.run(_run_async())


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
