"""Session fixtures that start real servers for the integration tests.

Each server section is owned by one module of helpdesk; add new sections below, keep them
independent. Dovecot (``dovecot``, ``imap_account``) lives in ``tests/fixtures_dovecot.py``
and the SMTP receiver in ``tests/fixtures_smtp.py``: both are registered in
``tests/conftest.py`` so that the web tier's end-to-end test can use them too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from helpdesk.config import Settings
from helpdesk.db import SessionFactory, create_engine, session_factory
from tests.integration.escalation_support import esc_settings

# -- escalation and webhook tests ---------------------------------------------------------


@pytest.fixture
def db_url(database_url: str) -> str:
    """A fresh migrated database per test, on SQLite and PostgreSQL (tests/conftest.py)."""
    return database_url


@pytest.fixture
def cfg(db_url: str) -> Settings:
    return esc_settings(db_url)


@pytest.fixture
async def db(cfg: Settings) -> AsyncIterator[SessionFactory]:
    engine = create_engine(cfg)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()
