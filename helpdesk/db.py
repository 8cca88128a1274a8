"""The engine and session factory, built from Settings (never at import time).

SQLite is tuned for one writer and many readers (WAL, ``synchronous=NORMAL``, a busy
timeout so a web request waits for the worker's short transaction instead of failing).
PostgreSQL gets a pool with pre-ping, so a restarted server costs one failed checkout, not a
dead worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk.config import Settings

SessionFactory = async_sessionmaker[AsyncSession]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
        "PRAGMA busy_timeout=10000",
    ):
        cur.execute(pragma)
    cur.close()


def create_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    url = settings.async_database_url
    if url.startswith("sqlite"):
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_size", settings.database_pool_size)
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


def session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


@asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[tuple[AsyncEngine, SessionFactory]]:
    """An engine and its session factory for the length of a ``with`` block."""
    engine = create_engine(settings)
    try:
        yield engine, session_factory(engine)
    finally:
        await engine.dispose()
