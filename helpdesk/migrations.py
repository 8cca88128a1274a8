"""Running the alembic migrations from code (``helpdesk db upgrade``, the demo, tests).

The migration scripts live in the top-level ``alembic/`` folder of the source tree; the
same scripts run on SQLite (batch mode) and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from alembic import command
from helpdesk.config import Settings
from helpdesk.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """Leave out the full-text search objects, which the migration creates by hand."""
    return not (name or "").startswith(("message_fts", "ix_message_fts"))


def alembic_config(settings: Settings) -> Config:
    ini = ROOT / "alembic.ini"
    if not ini.exists():
        raise ConfigError(f"migrations not found at {ini}; install helpdesk from its source tree")
    cfg = Config(str(ini))
    cfg.set_main_option("script_location", str(ROOT / "alembic"))
    cfg.attributes["database_url"] = settings.async_database_url
    return cfg


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (must be called outside a running event loop)."""
    command.upgrade(alembic_config(settings), revision)


def heads(settings: Settings) -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config(settings)).get_heads())


async def current_revisions(settings: Settings) -> set[str]:
    """The revisions the database is at (empty for a database never migrated)."""
    from helpdesk.db import create_engine as create_async

    engine = create_async(settings)
    try:
        async with engine.connect() as conn:
            return set(
                await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_heads())
            )
    finally:
        await engine.dispose()


async def require_current(settings: Settings) -> None:
    """Raise ConfigError with the fix when the schema is not at the newest migration."""
    if await current_revisions(settings) != heads(settings):
        raise ConfigError(
            "the database schema is not up to date; run `helpdesk db upgrade` first"
            f" (database: {settings.database_url.split('@')[-1]})"
        )


__all__ = [
    "alembic_config",
    "current_revisions",
    "heads",
    "include_object",
    "require_current",
    "upgrade",
]
