"""Server time of the staff UI's pages over a large desk (100,000 tickets by default).

Builds the schema with the alembic migrations (the real indexes: the partial
``ix_ticket_open_due``, FTS5 with its triggers on SQLite, the GIN index on PostgreSQL), seeds
tickets and messages with Core ``executemany`` (fast), then times in-process ASGI calls (no
network) of the queue, a filtered queue, a ticket page and a search, and prints p50/p95.
Targets: p95 < 100 ms for pages, < 200 ms for search.

``--database`` must name an empty database or one an earlier run of this script filled: the
script downgrades it to an empty schema first, so never point it at one whose data you want.

    .venv/bin/python bench/web.py                       # SQLite in a temp folder
    .venv/bin/python bench/web.py --tickets 20000
    .venv/bin/python bench/web.py --database postgresql+asyncpg://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa
from argon2 import PasswordHasher

from alembic import command

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpdesk import migrations, users
from helpdesk.config import load_settings
from helpdesk.db import create_engine, session_factory
from helpdesk.models import Message, Ticket
from helpdesk.web import create_app

WORDS = [
    "refill", "prescription", "pharmacy", "appointment", "video", "visit", "insurance",
    "billing", "charged", "twice", "rash", "photo", "upload", "app", "login", "password",
    "iphone", "android", "reschedule", "monday", "doctor", "nurse", "lab", "results", "dosage",
    "allergy", "clinic", "portal", "message", "reminder", "invoice", "refund",
]  # fmt: skip
NAMES = ["Maria Lopez", "John Smith", "Priya Patel", "Chen Wei", "Fatima Khan", "Luis García"]
STATUSES = ["closed"] * 45 + ["solved"] * 25 + ["new"] * 10 + ["open"] * 12 + ["pending"] * 8
PASSWORD = "bench password 123"


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + f" ref{rng.randrange(10**6)}"


def build_schema(url: str) -> None:
    """An empty schema at the newest migration (outside an event loop: alembic runs its own)."""
    settings = load_settings(database_url=url)
    command.downgrade(migrations.alembic_config(settings), "base")
    migrations.upgrade(settings)


async def seed(url: str, n_tickets: int, *, batch: int = 5000) -> None:
    """Tickets and messages; the migration's triggers (SQLite) or GIN index (PostgreSQL) keep
    the full-text index current as rows go in, as they do in production."""
    settings = load_settings(database_url=url)
    engine = create_engine(settings)
    rng = random.Random(42)
    now = datetime.now(UTC)
    try:
        users.hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        async with session_factory(engine)() as session:
            await users.add_user(
                session, email="bench@clinic.test", role="agent", password=PASSWORD
            )
            await session.commit()
        mid = 0
        for start in range(1, n_tickets + 1, batch):
            tickets, messages = [], []
            for tid in range(start, min(start + batch, n_tickets + 1)):
                received = now - timedelta(minutes=(n_tickets - tid) * 5 + rng.randrange(5))
                name = rng.choice(NAMES)
                addr = f"{name.split()[0].lower()}.{tid}@patients.test"
                crisis = rng.random() < 0.002
                status = rng.choice(STATUSES)
                subject = _text(rng, 5)
                tickets.append(
                    {
                        "id": tid,
                        "reference": f"HD-{tid + 1000}",
                        "subject": subject,
                        "requester": addr,
                        "requester_name": name,
                        "status": status,
                        "priority": "normal",
                        "language": "en",
                        "mailbox": "default",
                        "assignee_id": 1 if rng.random() < 0.2 else None,
                        "message_count": 2,
                        "crisis_tier": rng.choice([1, 2]) if crisis else None,
                        "crisis_category": "self-harm" if crisis else None,
                        "escalation_state": "open" if crisis else None,
                        "created_at": received,
                        "updated_at": received,
                        "last_message_at": received,
                        "due_at": received + timedelta(days=7),
                    }
                )
                for direction, kind, body in (
                    ("inbound", "mail", _text(rng, 60)),
                    ("outbound", "ack", "(automatic acknowledgement)"),
                ):
                    mid += 1
                    messages.append(
                        {
                            "id": mid,
                            "ticket_id": tid,
                            "direction": direction,
                            "kind": kind,
                            "message_id": f"<{mid}.{tid}@bench.test>",
                            "in_reply_to": "",
                            "references": "",
                            "from_addr": addr if direction == "inbound" else "help@clinic.test",
                            "from_name": name if direction == "inbound" else "",
                            "to_addrs": "",
                            "subject": subject,
                            "text_body": body,
                            "html_body": None,
                            "size": len(body),
                            "crisis_rules": "",
                            "created_at": received,
                        }
                    )
            async with engine.begin() as conn:
                await conn.execute(sa.insert(Ticket), tickets)
                await conn.execute(sa.insert(Message), messages)
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # the rows came with explicit ids: move the sequences past them
                for table in ("ticket", "message"):
                    await conn.execute(
                        sa.text(
                            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                            f" (SELECT max(id) FROM {table}))"
                        )
                    )
        async with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # What autovacuum does to a table after this many inserts (PostgreSQL >= 13):
                # without the visibility map, the queue counts cannot use index-only scans.
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(sa.text("VACUUM (ANALYZE)"))
            else:
                await conn.execute(sa.text("ANALYZE"))
                await conn.commit()
    finally:
        await engine.dispose()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(url: str, n_tickets: int, rounds: int) -> dict[str, tuple[float, float]]:
    users.hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    settings = load_settings(
        database_url=url, secret_key="bench-secret", support_address="help@clinic.test"
    )

    app = create_app(settings)
    results: dict[str, tuple[float, float]] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            page = await client.get("/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
            r = await client.post(
                "/login",
                data={"email": "bench@clinic.test", "password": PASSWORD, "csrf_token": token},
            )
            assert r.status_code == 303, r.text
            first = await client.get("/")
            cursor = re.search(r'rel="next" href="/\?after=([^"&]+)"', first.text)
            rng = random.Random(7)
            cases = {
                "queue": lambda: "/",
                "queue page 2": lambda: f"/?after={cursor.group(1) if cursor else ''}",
                "queue filtered": lambda: "/?assignee=unassigned&overdue=1&sort=due",
                "queue status=open": lambda: "/?status=open",
                "queue all": lambda: "/?status=all",
                "ticket": lambda: f"/tickets/HD-{rng.randrange(1, n_tickets) + 1000}",
                "search word": lambda: f"/search?q={rng.choice(WORDS)}+{rng.choice(WORDS)}",
                "search rare": lambda: f"/search?q=ref{rng.randrange(10**6)}",
                "search requester": lambda: (
                    f"/search?q=maria.{rng.randrange(1, n_tickets)}@patients.test"
                ),
            }
            for name, path in cases.items():
                times = []
                for _ in range(3):  # warm up
                    await client.get(path())
                for _ in range(rounds):
                    p = path()
                    t0 = time.perf_counter()
                    r = await client.get(p)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200, (p, r.status_code)
                results[name] = (statistics.median(times), _pct(times, 95))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", help="database URL (default: a temp-file SQLite)")
    parser.add_argument("--tickets", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    url = args.database or f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='hd-bench-')}/bench.db"
    t0 = time.perf_counter()
    build_schema(url)
    asyncio.run(seed(url, args.tickets))
    took = time.perf_counter() - t0
    print(f"seeded {args.tickets:,} tickets / {2 * args.tickets:,} messages in {took:.1f} s")
    results = asyncio.run(measure(url, args.tickets, args.rounds))
    print(f"{'case':<20} {'p50 ms':>8} {'p95 ms':>8}  target")
    for name, (p50, p95) in results.items():
        target = 200 if name.startswith("search") else 100
        flag = "ok" if p95 < target else "SLOW"
        print(f"{name:<20} {p50:8.1f} {p95:8.1f}  <{target} {flag}")


if __name__ == "__main__":
    main()
