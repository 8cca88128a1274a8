"""The engine and session factory, built from Settings (never at import time).

SQLite is tuned for one writer and many readers (WAL, ``synchronous=NORMAL``, a busy
timeout so a web request waits for the worker's short transaction instead of failing).
PostgreSQL gets a pool with pre-ping, so a restarted server costs one failed checkout, not a
dead worker.

A SQLite connection that fails to open (a missing directory, no permission) is not finished
when aiosqlite raises: its worker thread still has to hand one last result to the event loop,
and dies with "RuntimeError: Event loop is closed" if the loop is gone by then — after a CLI
command that gives up, or a ``/healthz`` that found the database down just before shutdown.
``_open_sqlite`` waits for that thread, so a failed connect leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, cast

import aiosqlite
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from helpdesk.config import Settings

SessionFactory = async_sessionmaker[AsyncSession]

# How long a failed SQLite connect waits for aiosqlite's worker thread: it only has to run
# ``sqlite3.connect`` to its end and post one result, so this bounds a hung filesystem only.
_WORKER_EXIT_SECONDS = 5.0


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


async def _open_sqlite(*args: Any, **kwargs: Any) -> aiosqlite.Connection:
    """``aiosqlite.connect``, but a connect that fails returns only once its thread has ended.

    On failure aiosqlite calls ``stop()`` without awaiting it (``Connection._connect``); the
    thread then posts that future's result with ``loop.call_soon_threadsafe``, which raises in
    the thread if the loop has closed meanwhile. Waiting here, while the loop still runs, makes
    the post land. (aiosqlite has no public ``join()``: omnilib/aiosqlite#387.)
    """
    conn = aiosqlite.connect(*args, **kwargs)
    # The thread is ``_thread`` since aiosqlite 0.22; before, the connection was the thread.
    worker = cast("threading.Thread", getattr(conn, "_thread", conn))
    # As SQLAlchemy's own aiosqlite connect does: a connection nobody closed must not keep the
    # interpreter from exiting.
    worker.daemon = True
    try:
        return await conn
    except BaseException:
        await asyncio.to_thread(worker.join, _WORKER_EXIT_SECONDS)
        raise


def create_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    url = settings.async_database_url
    if url.startswith("sqlite"):
        # ``async_creator`` replaces the dialect's connect, so it must apply the arguments the
        # dialect derives from the URL (and any ``connect_args``) itself.
        connect_args = kwargs.pop("connect_args", {})

        def open_connection() -> Awaitable[aiosqlite.Connection]:
            args, params = engine.dialect.create_connect_args(engine.url)
            return _open_sqlite(*args, **{**params, **connect_args})

        engine = create_async_engine(url, async_creator=open_connection, **kwargs)
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
