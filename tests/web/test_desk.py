"""The desk through HTTP: queue, filters, paging, ticket, reply, note, assign, status, search."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta

import httpx
from sqlmodel import select

from helpdesk import desk
from helpdesk.db import SessionFactory
from helpdesk.escalation import make_ack_token
from helpdesk.models import AuditLog, Escalation, Message, Outbox, StaffUser, Ticket
from tests.web.conftest import MakeTicket, MakeUser, MessageSpec, csrf_of, login


def _refs(html: str) -> list[str]:
    return re.findall(r'href="/tickets/(HD-\d+)"', html)


async def test_queue_pins_crisis_on_top(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket
) -> None:
    newer = await make_ticket("Newest routine", received_minutes_ago=1)
    crisis = await make_ticket("I can't go on", crisis_tier=1, received_minutes_ago=500)
    solved_crisis = await make_ticket(
        "Old crisis", crisis_tier=1, status="solved", received_minutes_ago=900
    )
    page = await agent_client.get("/")
    assert page.status_code == 200
    refs = _refs(page.text)
    assert refs[0] == crisis.reference
    assert refs.count(crisis.reference) == 1
    assert newer.reference in refs
    assert solved_crisis.reference not in refs
    assert "Crisis — handle first" in page.text
    assert "Crisis · Tier 1" in page.text


async def test_queue_filters_and_counts(
    agent_client: httpx.AsyncClient, agent: StaffUser, make_ticket: MakeTicket, make_user: MakeUser
) -> None:
    other = await make_user("other@clinic.test")
    mine = await make_ticket("Mine", assignee_id=agent.id, status="open")
    theirs = await make_ticket("Theirs", assignee_id=other.id, status="open")
    unassigned = await make_ticket("Nobody's")
    overdue = await make_ticket("Late one", received_minutes_ago=60 * 24 * 10, due_in_days=7)
    closed = await make_ticket("Done", status="closed")
    crisis = await make_ticket("Crisis", crisis_tier=2)

    def refs(html: str) -> set[str]:
        return set(_refs(html))

    assert refs((await agent_client.get("/?assignee=me")).text) == {mine.reference}
    got = refs((await agent_client.get("/?assignee=unassigned")).text)
    assert got == {unassigned.reference, overdue.reference, crisis.reference}
    assert refs((await agent_client.get("/?overdue=1")).text) == {overdue.reference}
    assert refs((await agent_client.get("/?crisis=1")).text) == {crisis.reference}
    assert refs((await agent_client.get("/?status=closed")).text) == {closed.reference}
    assert closed.reference not in refs((await agent_client.get("/")).text)
    assert theirs.reference in refs((await agent_client.get("/?status=open")).text)

    async with agent_client._transport.app.state.sessions() as session:  # type: ignore[attr-defined]
        counts = await desk.queue_counts(session, me_id=agent.id, now=datetime.now(UTC))  # type: ignore[arg-type]
    assert (counts.active, counts.mine, counts.unassigned, counts.overdue, counts.crisis) == (
        5,
        1,
        3,
        1,
        1,
    )
    assert counts.by_status == {"open": 2, "new": 3, "closed": 1}
    page = (await agent_client.get("/")).text
    assert re.search(r"Mine <span class=\"n\">1</span>", page)


async def test_keyset_pagination_visits_every_ticket_once(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket
) -> None:
    made = {(await make_ticket(f"T{i}", received_minutes_ago=i % 7)).reference for i in range(120)}
    for sort in ("received", "due"):
        seen: list[str] = []
        url = f"/?sort={sort}"
        while url:
            html = (await agent_client.get(url)).text
            seen += _refs(html)
            nxt = re.search(r'rel="next" href="([^"]+)"', html)
            url = nxt.group(1).replace("&amp;", "&") if nxt else ""
        assert len(seen) == len(made) == len(set(seen)), sort
        assert set(seen) == made


async def test_ticket_page_shows_thread_in_order_and_distinct(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket
) -> None:
    ticket = await make_ticket(
        messages=[
            MessageSpec(text="first from patient", minutes_ago=30),
            MessageSpec(text="our ack", direction="outbound", kind="ack", minutes_ago=29),
            MessageSpec(text="a staff note", direction="note", kind="note", minutes_ago=20),
            MessageSpec(text="second from patient", minutes_ago=10),
        ]
    )
    html = (await agent_client.get(f"/tickets/{ticket.reference}")).text
    order = [
        html.index(t)
        for t in ("first from patient", "our ack", "a staff note", "second from patient")
    ]
    assert order == sorted(order)
    assert html.count('class="msg msg-inbound') == 2
    assert 'class="msg msg-outbound' in html
    assert 'class="msg msg-note' in html
    assert "Internal note" in html


async def test_reply_is_threaded_and_queued(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket, db: SessionFactory
) -> None:
    ticket = await make_ticket(
        "Refill please",
        requester="maria@patients.test",
        messages=[
            MessageSpec(text="first", message_id="<first@patients.test>", minutes_ago=60),
            MessageSpec(
                text="ack",
                direction="outbound",
                kind="ack",
                message_id="<ack1@clinic.test>",
                minutes_ago=59,
            ),
            MessageSpec(text="second", message_id="<second@patients.test>", minutes_ago=30),
        ],
    )
    token = await csrf_of(agent_client, f"/tickets/{ticket.reference}")
    response = await agent_client.post(
        f"/tickets/{ticket.reference}/reply",
        data={"body": "Your refill has been sent to the pharmacy.", "csrf_token": token},
    )
    assert response.status_code == 303
    async with db() as session:
        rows = (await session.exec(select(Outbox))).all()
        assert len(rows) == 1
        row = rows[0]
        assert (row.kind, row.lane, row.recipient, row.status) == (
            "reply",
            1,
            "maria@patients.test",
            "pending",
        )
        mail = email.message_from_bytes(row.raw, policy=email.policy.default)
        assert mail["In-Reply-To"] == "<second@patients.test>"
        assert "<second@patients.test>" in mail["References"]
        assert ticket.reference in mail["Subject"]
        assert "Your refill has been sent" in mail.get_body(("plain",)).get_content()
        stored = (
            await session.exec(select(Message).where(Message.message_id == row.message_id))
        ).one()
        assert (stored.direction, stored.kind, stored.ticket_id) == ("outbound", "reply", ticket.id)
        fresh = await session.get(Ticket, ticket.id)
        assert fresh is not None
        assert fresh.status == "pending"
        actions = (
            await session.exec(select(AuditLog.action).where(AuditLog.ticket_id == ticket.id))
        ).all()
        assert "reply" in actions
    html = (await agent_client.get(f"/tickets/{ticket.reference}")).text
    assert "Reply queued for sending." in html
    assert "Your refill has been sent to the pharmacy." in html


async def test_empty_reply_is_refused(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket, db: SessionFactory
) -> None:
    ticket = await make_ticket()
    token = await csrf_of(agent_client)
    response = await agent_client.post(
        f"/tickets/{ticket.reference}/reply", data={"body": "  ", "csrf_token": token}
    )
    assert response.status_code == 303
    async with db() as session:
        assert (await session.exec(select(Outbox))).all() == []
    assert "the text is empty" in (await agent_client.get(response.headers["location"])).text


async def test_note_assign_status_are_audited(
    agent_client: httpx.AsyncClient, agent: StaffUser, make_ticket: MakeTicket, db: SessionFactory
) -> None:
    ticket = await make_ticket()
    token = await csrf_of(agent_client)
    base = f"/tickets/{ticket.reference}"
    for path, data in (
        ("/note", {"body": "Called the pharmacy."}),
        ("/assign", {"assignee": str(agent.id)}),
        ("/status", {"status": "open"}),
        ("/status", {"status": "bogus"}),
    ):
        response = await agent_client.post(base + path, data={**data, "csrf_token": token})
        assert response.status_code == 303, path
    async with db() as session:
        fresh = await session.get(Ticket, ticket.id)
        assert fresh is not None
        assert fresh.assignee_id == agent.id
        assert fresh.status == "open"
        notes = (await session.exec(select(Message).where(Message.direction == "note"))).all()
        assert [n.text_body for n in notes] == ["Called the pharmacy."]
        assert (await session.exec(select(Outbox))).all() == []
    html = (await agent_client.get(base)).text
    for action in ("note", "assign", "status"):
        assert f"<strong>{action}</strong>" in html
    assert "agent@clinic.test" in html
    assert "new → open" in html


async def test_acknowledge_button(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket, db: SessionFactory
) -> None:
    ticket = await make_ticket("Crisis", crisis_tier=1)
    html = (await agent_client.get(f"/tickets/{ticket.reference}")).text
    assert "Acknowledge</button>" in html
    assert "oncall1@clinic.test" in html
    token = await csrf_of(agent_client)
    response = await agent_client.post(
        f"/tickets/{ticket.reference}/acknowledge", data={"csrf_token": token}
    )
    assert response.status_code == 303
    async with db() as session:
        esc = (
            await session.exec(select(Escalation).where(Escalation.ticket_id == ticket.id))
        ).one()
        assert esc.state == "acknowledged"
        assert esc.acknowledged_by == "agent@clinic.test"
    html = (await agent_client.get(f"/tickets/{ticket.reference}")).text
    assert "Acknowledge</button>" not in html
    assert "by agent@clinic.test" in html


async def test_ack_link_logs_in_first_then_acknowledges(
    client: httpx.AsyncClient, agent: StaffUser, make_ticket: MakeTicket, db: SessionFactory
) -> None:
    ticket = await make_ticket("Crisis", crisis_tier=1)
    async with db() as session:
        esc = (
            await session.exec(select(Escalation).where(Escalation.ticket_id == ticket.id))
        ).one()
    token = make_ack_token(
        "test-secret-key-not-for-production", esc.id, "oncall1@clinic.test", datetime.now(UTC)
    )  # type: ignore[arg-type]
    response = await client.get(f"/ack/{token}")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=%2Fack%2F")
    response = await login(client, agent.email, next_=f"/ack/{token}")
    assert response.headers["location"] == f"/ack/{token}"
    response = await client.get(f"/ack/{token}")
    assert response.status_code == 303
    assert response.headers["location"] == f"/tickets/{ticket.reference}"
    html = (await client.get(response.headers["location"])).text
    assert "acknowledged — paging stopped" in html
    async with db() as session:
        esc2 = await session.get(Escalation, esc.id)
        assert esc2 is not None
        assert esc2.state == "acknowledged"


async def test_bad_ack_link(agent_client: httpx.AsyncClient) -> None:
    response = await agent_client.get("/ack/not-a-token")
    assert response.status_code == 400
    old = make_ack_token(
        "test-secret-key-not-for-production",
        1,
        "x@clinic.test",
        datetime.now(UTC) - timedelta(days=3),
    )
    assert (await agent_client.get(f"/ack/{old}")).status_code == 400


async def test_search_subject_body_requester_reference(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket
) -> None:
    a = await make_ticket(
        "Lisinopril refill",
        requester="maria.lopez@patients.test",
        messages=[MessageSpec(text="my prescription ran out")],
    )
    b = await make_ticket(
        "Billing question",
        requester="john@patients.test",
        messages=[MessageSpec(text="charged twice for the video visit")],
    )

    async def found(q: str) -> set[str]:
        return set(_refs((await agent_client.get("/search", params={"q": q})).text))

    assert await found("lisinopril") == {a.reference}
    assert await found("charged twice") == {b.reference}
    assert await found("prescrip") == {a.reference}  # prefix of the last word
    assert await found("maria.lopez@patients.test") == {a.reference}
    assert await found("john@") == {b.reference}
    assert await found(b.reference) == {b.reference}
    assert await found('"; DROP TABLE message; --') == set()
    assert await found("NEAR(a b) OR *") == set()
    assert (await agent_client.get("/search?q=")).status_code == 200


async def test_search_falls_back_to_like_without_the_index(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket, db: SessionFactory
) -> None:
    import sqlalchemy as sa

    a = await make_ticket("Rash photo", messages=[MessageSpec(text="upload the photo of my rash")])
    async with db() as session:
        for name in ("message_fts_ai", "message_fts_ad", "message_fts_au"):
            await session.exec(sa.text(f"DROP TRIGGER {name}"))  # type: ignore[call-overload]
        await session.exec(sa.text("DROP TABLE message_fts"))  # type: ignore[call-overload]
        await session.commit()
    html = (await agent_client.get("/search", params={"q": "rash"})).text
    assert _refs(html) == [a.reference]


async def test_canned_reply_prefills_the_reply_box(
    agent_client: httpx.AsyncClient, agent: StaffUser, make_ticket: MakeTicket, db: SessionFactory
) -> None:
    async with db() as session:
        canned = await desk.save_canned(
            session,
            canned_id=None,
            title="Refill sent",
            body="We sent your refill <today>.",
            actor=agent,
            now=datetime.now(UTC),
        )
        await session.commit()
    ticket = await make_ticket()
    html = (await agent_client.get(f"/tickets/{ticket.reference}?canned={canned.id}")).text
    assert ">We sent your refill &lt;today&gt;.</textarea>" in html
    assert 'data-body="We sent your refill &lt;today&gt;."' in html


async def test_unknown_filter_values_fall_back(agent_client: httpx.AsyncClient) -> None:
    for q in ("?status=<x>", "?assignee=zzz&sort=nope", "?after=garbage", "?after=" + "A" * 150):
        assert (await agent_client.get("/" + q)).status_code == 200
    assert (await agent_client.get("/?overdue=maybe")).status_code == 422
