"""The engine factory: a SQLite database that cannot be opened leaves nothing running."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from helpdesk.db import create_engine
from tests.conftest import make_settings, sqlite_worker_threads


async def test_failed_sqlite_connect_leaves_no_thread_behind(tmp_path: Path) -> None:
    # aiosqlite stops the thread of a failed connect without waiting for it; had the error
    # reached us first, a loop closed right now would make that thread die with "Event loop
    # is closed" (once in four runs of the suite, pinned on the next test).
    before = sqlite_worker_threads()
    engine = create_engine(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'x.db'}"))
    try:
        with pytest.raises(OperationalError, match="unable to open database file"):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    assert sqlite_worker_threads() - before == set()
