"""helpdesk.mailbox against a real Dovecot (and its pure helpers, which need no server)."""

from __future__ import annotations

import asyncio
import imaplib
import ssl
import time
from collections.abc import AsyncIterator, Callable

import pytest

from helpdesk.mailbox import (
    Backoff,
    FetchedMail,
    ImapMailbox,
    MailboxAuthError,
    MailboxConnectionError,
    MailboxSecurityError,
    describe_mailbox,
    parse_fetch,
    plan_fetch,
    uid_set,
)
from helpdesk.testing.dovecot import DovecotServer, ImapAccount, free_port

dovecot_test = pytest.mark.dovecot


def make_mail(i: int, body_size: int = 200) -> bytes:
    """A small mail with bare-LF line ends (Dovecot stores them as CRLF)."""
    body = (f"line {i} " * (body_size // 8 + 1))[:body_size]
    return (
        f"From: patient{i}@example.org\nTo: help@example.com\nSubject: question {i}\n"
        f"Message-ID: <m{i}@example.org>\n\n{body}\n"
    ).encode()


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def imap_mailbox(account: ImapAccount, **kwargs: object) -> ImapMailbox:
    options: dict[str, object] = {"security": "none", "timeout": 10.0, **kwargs}
    return ImapMailbox(
        host=account.host,
        port=account.port,
        user=account.user,
        password=account.password,
        **options,  # type: ignore[arg-type]
    )


async def collect(
    mailbox: ImapMailbox, after_uid: int, batch_size: int = 50
) -> list[list[FetchedMail]]:
    return [batch async for batch in mailbox.batches(after_uid, batch_size=batch_size)]


@pytest.fixture
async def mailbox(imap_account: ImapAccount) -> AsyncIterator[ImapMailbox]:
    box = imap_mailbox(imap_account)
    await box.connect()
    try:
        yield box
    finally:
        await box.close()


@pytest.fixture
def deliver(dovecot: DovecotServer, imap_account: ImapAccount) -> Callable[..., list[bytes]]:
    """``deliver(n, folder=..., start=...)``: APPEND n mails to the test user; returns them."""

    def _deliver(n: int, *, folder: str = "INBOX", start: int = 0) -> list[bytes]:
        raws = [make_mail(i) for i in range(start, start + n)]
        dovecot.append_many(imap_account.user, imap_account.password, raws, folder)
        return raws

    return _deliver


# -- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "server", "last", "expected"),
    [
        (None, 7, 0, (0, False)),
        (None, 7, 42, (0, False)),
        (7, 7, 42, (42, False)),
        (7, 8, 42, (0, True)),
    ],
)
def test_plan_fetch(stored: int | None, server: int, last: int, expected: tuple[int, bool]) -> None:
    assert plan_fetch(stored, server, last) == expected


def test_plan_fetch_refuses_negative_uid() -> None:
    with pytest.raises(ValueError, match="last_uid"):
        plan_fetch(1, 1, -1)


def test_uid_set_compresses_runs() -> None:
    assert uid_set([3, 1, 2, 7, 9, 10, 10]) == "1:3,7,9:10"
    assert uid_set([5]) == "5"
    with pytest.raises(ValueError, match="UIDs"):
        uid_set([])


def test_parse_fetch_reads_uid_and_flags_on_either_side_of_the_literal() -> None:
    dovecot_order = [
        b"1 FETCH (UID 11 FLAGS (\\Seen) BODY[] {3}",
        bytearray(b"abc"),
        b")",
    ]
    pymap_order = [b"2 FETCH (BODY[] {3}", bytearray(b"def"), b" UID 12 FLAGS ())"]
    mails = parse_fetch([*dovecot_order, *pymap_order, b"Fetch completed."])
    assert mails == [
        FetchedMail(uid=11, raw=b"abc", flags=frozenset({"\\Seen"})),
        FetchedMail(uid=12, raw=b"def", flags=frozenset()),
    ]


def test_backoff_is_capped_jittered_and_can_be_instant() -> None:
    backoff = Backoff(base=1.0, cap=60.0)
    delays = [backoff.delay(attempt) for attempt in range(200) for _ in range(3)]
    assert all(0.0 <= d <= 60.0 for d in delays)
    assert max(delays) > 30.0  # full jitter up to the cap, not a fixed value
    assert backoff.delay(10_000) <= 60.0  # no overflow on absurd attempt counts
    assert Backoff.instant().delay(5) == 0.0
    assert Backoff(base=0).delay(5) == 0.0


# -- against Dovecot ------------------------------------------------------------------------


@dovecot_test
async def test_login_and_select(mailbox: ImapMailbox, imap_account: ImapAccount) -> None:
    uidvalidity = await mailbox.select("INBOX")
    assert uidvalidity > 0
    assert mailbox.message_count == 0
    assert mailbox.has_idle
    assert mailbox.has_move
    # UIDVALIDITY is a property of the folder, not of the connection
    other = imap_mailbox(imap_account)
    await other.connect()
    try:
        assert await other.select("INBOX") == uidvalidity
    finally:
        await other.close()


@dovecot_test
@pytest.mark.parametrize("wrong", ["password", "user"])
async def test_bad_credentials_raise_auth_error(imap_account: ImapAccount, wrong: str) -> None:
    account = ImapAccount(
        imap_account.host,
        imap_account.port,
        imap_account.user + ("-nobody" if wrong == "user" else ""),
        imap_account.password + ("x" if wrong == "password" else ""),
    )
    box = imap_mailbox(account)
    with pytest.raises(MailboxAuthError, match="login refused"):
        await box.connect()
    await box.close()  # harmless after a failed connect


@dovecot_test
async def test_connection_refused_is_a_connection_error() -> None:
    account = ImapAccount("127.0.0.1", free_port(), "nobody", "x")
    with pytest.raises(MailboxConnectionError, match="cannot connect"):
        await imap_mailbox(account).connect()


@dovecot_test
async def test_batches_yield_everything_in_uid_order(
    mailbox: ImapMailbox, deliver: Callable[..., list[bytes]]
) -> None:
    raws = deliver(120)
    await mailbox.select("INBOX")
    batches = await collect(mailbox, 0)
    assert [len(b) for b in batches] == [50, 50, 20]
    mails = [m for batch in batches for m in batch]
    assert [m.uid for m in mails] == list(range(1, 121))
    assert [m.raw for m in mails] == [crlf(raw) for raw in raws]


@dovecot_test
async def test_batches_after_a_uid_skip_the_echo(
    mailbox: ImapMailbox, deliver: Callable[..., list[bytes]]
) -> None:
    deliver(120)
    await mailbox.select("INBOX")
    newer = [m.uid for batch in await collect(mailbox, 100, batch_size=7) for m in batch]
    assert newer == list(range(101, 121))
    # "121:*" makes Dovecot answer with UID 120; it must not come back as new
    assert await collect(mailbox, 120) == []
    assert await collect(mailbox, 10_000) == []


@dovecot_test
async def test_fetch_does_not_set_seen_and_mark_seen_does(
    mailbox: ImapMailbox, deliver: Callable[..., list[bytes]]
) -> None:
    deliver(3)
    await mailbox.select("INBOX")
    first = [m for batch in await collect(mailbox, 0) for m in batch]
    again = [m for batch in await collect(mailbox, 0) for m in batch]
    assert all("\\Seen" not in m.flags for m in first + again)
    await mailbox.mark_seen([1, 3])
    await mailbox.mark_seen([])  # no command, no error
    flags = {m.uid: m.flags for batch in await collect(mailbox, 0) for m in batch}
    assert "\\Seen" in flags[1]
    assert "\\Seen" not in flags[2]
    assert "\\Seen" in flags[3]


@dovecot_test
async def test_move_to_processed(mailbox: ImapMailbox, deliver: Callable[..., list[bytes]]) -> None:
    raws = deliver(5)
    await mailbox.select("INBOX")
    await mailbox.move([1, 2, 4], "Processed")
    assert [m.uid for b in await collect(mailbox, 0) for m in b] == [3, 5]
    await mailbox.select("Processed")
    moved = [m.raw for b in await collect(mailbox, 0) for m in b]
    assert moved == [crlf(raws[0]), crlf(raws[1]), crlf(raws[3])]


@dovecot_test
async def test_without_move_capability_mail_is_copied_and_never_deleted(
    mailbox: ImapMailbox, deliver: Callable[..., list[bytes]]
) -> None:
    deliver(2)
    await mailbox.select("INBOX")
    assert mailbox._client is not None
    mailbox._client.protocol.capabilities.discard("MOVE")  # pretend an old server
    assert not mailbox.has_move
    await mailbox.move([1, 2], "Processed")
    assert [m.uid for b in await collect(mailbox, 0) for m in b] == [1, 2]
    assert all("\\Deleted" not in m.flags for b in await collect(mailbox, 0) for m in b)
    await mailbox.select("Processed")
    assert len([m for b in await collect(mailbox, 0) for m in b]) == 2


@dovecot_test
async def test_idle_returns_true_soon_after_new_mail(
    mailbox: ImapMailbox, deliver: Callable[..., list[bytes]]
) -> None:
    await mailbox.select("INBOX")
    assert await collect(mailbox, 0) == []

    async def deliver_later() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(deliver, 1)

    started = time.monotonic()
    sender = asyncio.create_task(deliver_later())
    assert await mailbox.wait(10.0) is True
    elapsed = time.monotonic() - started
    await sender
    assert elapsed <= 3.0  # Dovecot pushes ~0.5 s after the APPEND
    assert [m.uid for b in await collect(mailbox, 0) for m in b] == [1]
    # and the connection is usable (IDLE ended cleanly)
    await mailbox.mark_seen([1])


@dovecot_test
async def test_idle_times_out_with_false(mailbox: ImapMailbox) -> None:
    await mailbox.select("INBOX")
    await collect(mailbox, 0)
    started = time.monotonic()
    assert await mailbox.wait(0.8) is False
    assert 0.7 <= time.monotonic() - started < 3.0
    assert await mailbox.wait(0.3) is False  # IDLE can be re-issued


@dovecot_test
async def test_mail_announced_outside_idle_is_not_lost(
    mailbox: ImapMailbox, deliver: Callable[..., list[bytes]]
) -> None:
    deliver(1)
    await mailbox.select("INBOX")
    assert len(await collect(mailbox, 0)) == 1
    deliver(1, start=1)
    # The EXISTS for UID 2 arrives with this STORE's answer, where aioimaplib would drop it.
    await mailbox.mark_seen([1])
    started = time.monotonic()
    assert await mailbox.wait(10.0) is True
    assert time.monotonic() - started < 1.0
    assert [m.uid for b in await collect(mailbox, 1) for m in b] == [2]


@dovecot_test
async def test_kicked_connection_raises_connection_error(
    dovecot: DovecotServer, mailbox: ImapMailbox, imap_account: ImapAccount
) -> None:
    await mailbox.select("INBOX")
    await asyncio.to_thread(dovecot.kill_connections, imap_account.user)
    with pytest.raises(MailboxConnectionError):
        await collect(mailbox, 0)
    await mailbox.close()
    await mailbox.connect()  # and we can come back
    await mailbox.select("INBOX")


@dovecot_test
async def test_kick_during_idle_raises_connection_error(
    dovecot: DovecotServer, mailbox: ImapMailbox, imap_account: ImapAccount
) -> None:
    await mailbox.select("INBOX")
    await collect(mailbox, 0)
    asyncio.get_running_loop().call_later(
        0.3,
        lambda: asyncio.ensure_future(
            asyncio.to_thread(dovecot.kill_connections, imap_account.user)
        ),
    )
    started = time.monotonic()
    with pytest.raises(MailboxConnectionError):
        await mailbox.wait(20.0)
    assert time.monotonic() - started < 5.0


@dovecot_test
async def test_implicit_tls_with_a_self_signed_certificate(
    dovecot: DovecotServer, imap_account: ImapAccount, deliver: Callable[..., list[bytes]]
) -> None:
    deliver(2)
    box = imap_mailbox(imap_account, security="ssl", ssl_context=dovecot.ssl_context())
    box.port = dovecot.ssl_port
    await box.connect()
    try:
        assert box._client is not None
        assert box._client.protocol.transport.get_extra_info("ssl_object") is not None
        await box.select("INBOX")
        assert [m.uid for b in await collect(box, 0) for m in b] == [1, 2]
    finally:
        await box.close()


@dovecot_test
async def test_untrusted_certificate_is_a_security_error(
    dovecot: DovecotServer, imap_account: ImapAccount
) -> None:
    box = imap_mailbox(imap_account, security="ssl", ssl_context=ssl.create_default_context())
    box.port = dovecot.ssl_port
    with pytest.raises(MailboxSecurityError, match="not trusted"):
        await box.connect()


@dovecot_test
async def test_starttls(dovecot: DovecotServer, imap_account: ImapAccount) -> None:
    box = imap_mailbox(imap_account, security="starttls", ssl_context=dovecot.ssl_context())
    await box.connect()
    try:
        assert box._client is not None
        assert box._client.protocol.transport.get_extra_info("ssl_object") is not None
        assert "STARTTLS" not in box.capabilities  # re-read after the upgrade
        await box.select("INBOX")
    finally:
        await box.close()


@dovecot_test
async def test_starttls_with_untrusted_certificate(
    dovecot: DovecotServer, imap_account: ImapAccount
) -> None:
    box = imap_mailbox(imap_account, security="starttls", ssl_context=ssl.create_default_context())
    with pytest.raises(MailboxSecurityError, match="not trusted"):
        await box.connect()


@dovecot_test
async def test_uidvalidity_change_means_rescan(
    mailbox: ImapMailbox, dovecot: DovecotServer, imap_account: ImapAccount
) -> None:
    def recreate(folder: str, first: bool) -> None:
        with imaplib.IMAP4(dovecot.host, dovecot.port) as client:
            client.login(imap_account.user, imap_account.password)
            if not first:
                assert client.delete(folder)[0] == "OK"
            assert client.create(folder)[0] == "OK"
            client.logout()

    recreate("Support", first=True)
    dovecot.append_many(imap_account.user, imap_account.password, [make_mail(1)], "Support")
    old = await mailbox.select("Support")
    last_uid = [m.uid for b in await collect(mailbox, 0) for m in b][-1]
    await mailbox.select("INBOX")

    recreate("Support", first=False)
    dovecot.append_many(
        imap_account.user, imap_account.password, [make_mail(2), make_mail(3)], "Support"
    )
    new = await mailbox.select("Support")
    assert new != old
    after, rescan = plan_fetch(old, new, last_uid)
    assert (after, rescan) == (0, True)
    assert [m.raw for b in await collect(mailbox, after) for m in b] == [
        crlf(make_mail(2)),
        crlf(make_mail(3)),
    ]


@dovecot_test
async def test_describe_mailbox_one_line(
    imap_account: ImapAccount, deliver: Callable[..., list[bytes]]
) -> None:
    deliver(3)
    line = await describe_mailbox(imap_mailbox(imap_account), "INBOX")
    assert "\n" not in line
    assert "3 messages" in line
    assert "UIDVALIDITY" in line
    assert "IDLE yes" in line


@dovecot_test
def test_users_can_be_added_while_running(dovecot: DovecotServer) -> None:
    # Dovecot re-reads a passwd-file at most once a second; per-user files avoid that.
    for _ in range(3):
        account = dovecot.new_account()
        with imaplib.IMAP4(account.host, account.port) as client:
            assert client.login(account.user, account.password)[0] == "OK"
            client.logout()


@dovecot_test
async def test_cancelled_wait_ends_idle_and_keeps_the_connection(
    mailbox: ImapMailbox, deliver: Callable[..., list[bytes]]
) -> None:
    await mailbox.select("INBOX")
    await collect(mailbox, 0)
    waiter = asyncio.create_task(mailbox.wait(30.0))
    await asyncio.sleep(0.3)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    deliver(1)
    assert [m.uid for b in await collect(mailbox, 0) for m in b] == [1]


async def test_a_server_that_never_greets_times_out() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # say nothing; closed by the test

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    box = imap_mailbox(ImapAccount("127.0.0.1", port, "u", "p"), timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(MailboxConnectionError, match="cannot connect"):
            await box.connect()
        assert time.monotonic() - started < 3.0
    finally:
        server.close()
        for writer in writers:
            writer.close()
            await writer.wait_closed()
        await server.wait_closed()
