"""EmbeddedImap: pymap in-process, spoken to over real IMAP with aioimaplib."""

from __future__ import annotations

import asyncio
import gc
import re
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aioimaplib
import pytest
from pymap.exceptions import MailboxNotFound

from helpdesk.embedded_imap import PROCESSED_FOLDER, EmbeddedImap

USER = "help@demo.test"
PASSWORD = "s3cret-demo"


def _mail(n: int, *, eol: bytes = b"\r\n") -> bytes:
    lines = [
        b"From: Patient %d <patient%d@example.org>" % (n, n),
        b"To: help@demo.test",
        b"Subject: question %d" % n,
        b"Message-ID: <q%d@example.org>" % n,
        b"Date: Mon, 06 Jan 2025 10:00:00 +0000",
        b"",
        b"Hello, this is question number %d." % n,
        b"",
    ]
    return eol.join(lines)


@asynccontextmanager
async def _client(
    imap: EmbeddedImap, *, select: str | None = "INBOX"
) -> AsyncIterator[aioimaplib.IMAP4]:
    client = aioimaplib.IMAP4(host=imap.host, port=imap.port, timeout=10)
    await client.wait_hello_from_server()
    try:
        resp = await client.login(imap.user, imap.password)
        assert resp.result == "OK", resp
        if select is not None:
            resp = await client.select(select)
            assert resp.result == "OK", resp
        yield client
    finally:
        await client.logout()


def _fetched(lines: list[bytes | bytearray]) -> dict[int, tuple[bytes, bytes]]:
    """UID → (flags, body) from a UID FETCH response, UID/FLAGS before or after the literal."""
    out: dict[int, tuple[bytes, bytes]] = {}
    for i, item in enumerate(lines):
        if not isinstance(item, bytearray):
            continue
        around = bytes(lines[i - 1]) + b" " + bytes(lines[i + 1])
        uid = re.search(rb"UID (\d+)", around)
        flags = re.search(rb"FLAGS \(([^)]*)\)", around)
        assert uid is not None, around
        assert flags is not None, around
        out[int(uid.group(1))] = (flags.group(1), bytes(item))
    return out


async def _uid_fetch_all(client: aioimaplib.IMAP4) -> dict[int, tuple[bytes, bytes]]:
    resp = await client.uid("fetch", "1:*", "(UID FLAGS BODY.PEEK[])")
    assert resp.result == "OK", resp
    return _fetched(resp.lines)


async def test_append_then_fetch_over_imap() -> None:
    async with EmbeddedImap(user=USER, password=PASSWORD) as imap:
        assert imap.host == "127.0.0.1"
        assert imap.port > 0
        mails = [_mail(n) for n in (1, 2, 3)]
        for raw in mails:
            await imap.append(raw)
        async with _client(imap, select=None) as client:
            resp = await client.select("INBOX")
            assert resp.result == "OK"
            text = b"\n".join(bytes(x) for x in resp.lines)
            assert re.search(rb"UIDVALIDITY \d+", text), text
            assert re.search(rb"\b3 EXISTS", text), text
            got = await _uid_fetch_all(client)
        assert sorted(got) == [101, 102, 103]  # pymap's UIDs start at 101
        assert [got[uid][1] for uid in sorted(got)] == mails
        assert all(b"\\Seen" not in flags for flags, _ in got.values())


async def test_inbox_starts_empty_and_processed_exists() -> None:
    async with EmbeddedImap(user=USER, password=PASSWORD) as imap, _client(imap) as client:
        resp = await client.uid("fetch", "1:*", "(UID)")
        assert resp.result == "OK"
        assert not any(re.match(rb"\d+ FETCH", bytes(x)) for x in resp.lines), resp.lines
        resp = await client.list('""', "*")
        names = b"\n".join(bytes(x) for x in resp.lines)
        assert b"INBOX" in names
        assert PROCESSED_FOLDER.encode() in names
        assert not await _login_ok(imap, "demouser", "demopass")  # no pymap demo user


async def test_wrong_password_is_refused() -> None:
    async with EmbeddedImap(user=USER, password=PASSWORD) as imap:
        assert not await _login_ok(imap, USER, "wrong")
        assert await _login_ok(imap, USER, PASSWORD)


async def test_move_to_processed_and_trycreate() -> None:
    async with EmbeddedImap(user=USER, password=PASSWORD) as imap:
        await imap.append(_mail(1))
        await imap.create_folder(PROCESSED_FOLDER)  # idempotent
        async with _client(imap) as client:
            resp = await client.uid("move", "101", "Missing")
            assert resp.result == "NO"
            assert any(b"TRYCREATE" in bytes(x) for x in resp.lines), resp.lines
            resp = await client.uid("move", "101", PROCESSED_FOLDER)
            assert resp.result == "OK", resp
            assert await _uid_fetch_all(client) == {}
            await imap.create_folder("Archive/2025")
            await imap.append(_mail(2), folder="Archive/2025")
            resp = await client.select("Archive/2025")
            assert resp.result == "OK"
            assert len(await _uid_fetch_all(client)) == 1
            resp = await client.select(PROCESSED_FOLDER)
            assert resp.result == "OK"
            assert [b for _, b in (await _uid_fetch_all(client)).values()] == [_mail(1)]


async def test_bare_lf_is_stored_as_crlf() -> None:
    async with EmbeddedImap(user=USER, password=PASSWORD) as imap:
        await imap.append(_mail(1, eol=b"\n"))
        async with _client(imap) as client:
            got = await _uid_fetch_all(client)
        assert got[101][1] == _mail(1)


async def test_idle_push_on_append() -> None:
    async with EmbeddedImap(user=USER, password=PASSWORD) as imap, _client(imap) as client:
        await client.protocol.capability()
        assert client.has_capability("IDLE")
        idle = await client.idle_start(timeout=10)
        start = time.monotonic()
        await imap.append(_mail(1))
        push = await client.wait_server_push(timeout=5)
        elapsed = time.monotonic() - start
        client.idle_done()
        await asyncio.wait_for(idle, 5)
        assert any(b"EXISTS" in bytes(x) for x in push), push
        assert elapsed < 1.0, elapsed
        # An APPEND from another IMAP connection is pushed too.
        idle = await client.idle_start(timeout=10)
        async with _client(imap, select=None) as other:
            resp = await other.append(_mail(2), mailbox="INBOX")
            assert resp.result == "OK", resp
        push = await client.wait_server_push(timeout=5)
        client.idle_done()
        await asyncio.wait_for(idle, 5)
        assert any(b"2 EXISTS" in bytes(x) for x in push), push


async def test_two_instances_at_once() -> None:
    async with (
        EmbeddedImap(user="a@demo.test", password="pa") as one,
        EmbeddedImap(user="b@demo.test", password="pb") as two,
    ):
        assert one.port != two.port
        await one.append(_mail(1))
        async with _client(one) as c1, _client(two) as c2:
            assert len(await _uid_fetch_all(c1)) == 1
            assert await _uid_fetch_all(c2) == {}
        assert not await _login_ok(two, "a@demo.test", "pa")


async def _login_ok(imap: EmbeddedImap, user: str, password: str) -> bool:
    client = aioimaplib.IMAP4(host=imap.host, port=imap.port, timeout=10)
    await client.wait_hello_from_server()
    try:
        resp = await client.login(user, password)
    finally:
        await client.logout()
    return bool(resp.result == "OK")


async def test_restart_on_the_same_port_starts_empty() -> None:
    async with EmbeddedImap(user=USER, password=PASSWORD) as imap:
        port = imap.port
        await imap.append(_mail(1))
    async with EmbeddedImap(user=USER, password=PASSWORD, port=port) as again, _client(again) as c:
        assert again.port == port
        assert await _uid_fetch_all(c) == {}


async def test_clean_shutdown_with_clients_still_connected() -> None:
    """Stopping with an idle and a plain client connected: no leaked tasks or transports."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = asyncio.all_tasks()
        imap = EmbeddedImap(user=USER, password=PASSWORD)
        async with imap:
            lost = {"idler": asyncio.Event(), "plain": asyncio.Event()}
            idler = aioimaplib.IMAP4(
                host=imap.host,
                port=imap.port,
                timeout=10,
                conn_lost_cb=lambda _: lost["idler"].set(),
            )
            await idler.wait_hello_from_server()
            await idler.login(USER, PASSWORD)
            await idler.select("INBOX")
            await idler.idle_start(timeout=10)
            plain = aioimaplib.IMAP4(
                host=imap.host,
                port=imap.port,
                timeout=10,
                conn_lost_cb=lambda _: lost["plain"].set(),
            )
            await plain.wait_hello_from_server()
            await plain.login(USER, PASSWORD)
            await asyncio.sleep(0.05)
        # The server closed both connections.
        await asyncio.wait_for(lost["idler"].wait(), 2)
        await asyncio.wait_for(lost["plain"].wait(), 2)
        await asyncio.sleep(0.05)
        leftover = [t for t in asyncio.all_tasks() - before if not _is_client_task(t)]
        assert not leftover, leftover
        for client in (idler, plain):  # aioimaplib leaves its own IDLE task pending
            for task in client.tasks:
                task.cancel()
            client.protocol.transport.close()
        await asyncio.sleep(0)
        del idler, plain, imap
        gc.collect()
    resource = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not resource, [str(w.message) for w in resource]


def _is_client_task(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and "aioimaplib" in code.co_filename


async def test_append_needs_a_running_server_and_an_existing_folder() -> None:
    imap = EmbeddedImap()
    with pytest.raises(RuntimeError):
        await imap.append(_mail(1))
    async with imap:
        with pytest.raises(MailboxNotFound):
            await imap.append(_mail(1), folder="Missing")
    with pytest.raises(RuntimeError):
        await imap.append(_mail(1))


async def test_port_in_use_fails_cleanly() -> None:
    async with EmbeddedImap() as first:
        with pytest.raises(OSError, match="in use"):
            await EmbeddedImap(port=first.port).__aenter__()


def test_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedImap(host="0.0.0.0")
