"""Copy every row from one helpdesk database to another (SQLite -> PostgreSQL).

Both databases must be at the same schema revision (``helpdesk db upgrade`` on each first)
and the target must be empty: the copy refuses to merge. Tables are copied in dependency
order in chunks, then PostgreSQL's id sequences are moved past the copied ids, so new
tickets continue the same ``HD-`` numbering.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import SQLModel

from helpdesk import migrations
from helpdesk.config import Settings
from helpdesk.db import create_engine
from helpdesk.errors import ConfigError

log = logging.getLogger(__name__)
CHUNK = 1000


async def copy_database(
    source: Settings, target: Settings, *, progress: Callable[[str, int], None] | None = None
) -> dict[str, int]:
    """Copy all rows; return the row count per table."""
    for settings in (source, target):
        await migrations.require_current(settings)
    src, dst = create_engine(source), create_engine(target)
    counts: dict[str, int] = {}
    try:
        async with src.connect() as read, dst.begin() as write:
            for table in SQLModel.metadata.sorted_tables:
                if (await write.execute(sa.select(sa.func.count()).select_from(table))).scalar():
                    raise ConfigError(f"the target database is not empty (table {table.name})")
            for table in SQLModel.metadata.sorted_tables:
                copied = 0
                result = await read.stream(sa.select(table))
                async for rows in result.partitions(CHUNK):
                    await write.execute(table.insert(), [dict(r._mapping) for r in rows])
                    copied += len(rows)
                    if progress:
                        progress(table.name, copied)
                counts[table.name] = copied
            if write.dialect.name == "postgresql":
                for table in SQLModel.metadata.sorted_tables:
                    if "id" in table.c and isinstance(table.c.id.type, sa.Integer):
                        # table names come from our own metadata, never from input
                        name = table.name
                        sql = (
                            f"SELECT setval(pg_get_serial_sequence('{name}', 'id'),"  # noqa: S608
                            f" COALESCE((SELECT MAX(id) FROM {name}), 0) + 1, false)"
                        )
                        await write.execute(sa.text(sql))
    finally:
        await src.dispose()
        await dst.dispose()
    return counts
