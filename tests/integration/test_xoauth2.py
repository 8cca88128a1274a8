"""XOAUTH2 logins against real servers, and the health signal when a token is refused.

SMTP: aiosmtpd taking AUTH XOAUTH2 for one user and access token (``SmtpReceiver(xoauth2=…)``),
answering a wrong token the way Gmail does (an error challenge, then 535). IMAP: Dovecot with
its ``oauth2`` passdb, which asks a local introspection endpoint about each token
(``oauth_dovecot`` / ``oauth_idp``). The token comes from a token file, as an operator's
refresher would leave it, or from a token command (the last test).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select

from helpdesk.config import Settings, load_settings
from helpdesk.db import SessionFactory, create_engine, session_factory
from helpdesk.errors import TransientDeliveryError
from helpdesk.mailbox import ImapMailbox, MailboxAuthError, check_imap
from helpdesk.models import LoginState, Outbox
from helpdesk.oauth import OAuthTokenError, TokenSource
from helpdesk.outbox import SmtpSender, check_smtp
from helpdesk.testing.dovecot import DovecotServer, ImapAccount
from helpdesk.testing.oauth import IntrospectionServer
from helpdesk.testing.smtp import SmtpReceiver
from helpdesk.web import create_app
from helpdesk.worker import Worker
from tests.conftest import make_settings, server_settings
from tests.factories import SUPPORT, patient_mail

pytestmark = pytest.mark.dovecot

RAW = b"From: help@clinic.test\r\nTo: p@patients.test\r\nSubject: x\r\n\r\nhi\r\n"


def write_token(path: Path, token: str) -> None:
    path.write_text(json.dumps({"access_token": token, "expires_in": 3600}))


def leaked(caplog: pytest.LogCaptureFixture, user: str, token: str) -> list[str]:
    """Our log records that carry ``token``, bare or as the base64 XOAUTH2 string."""
    xoauth2 = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
    needles = [token, xoauth2.decode()]
    return [
        r.name
        for r in caplog.records
        if r.name.startswith("helpdesk") and any(n in str(r.__dict__) for n in needles)
    ]


async def login_state(sessions: SessionFactory, service: str, mailbox: str) -> LoginState | None:
    async with sessions() as session:
        return await session.get(LoginState, (service, mailbox))


@pytest.fixture
async def engine_sessions(database_url: str) -> AsyncIterator[SessionFactory]:
    engine = create_engine(make_settings(database_url))
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


# --- SMTP ---------------------------------------------------------------------------------


async def test_smtp_sender_logs_in_with_xoauth2_and_reports_each_login(tmp_path: Path) -> None:
    token_file = tmp_path / "token.json"
    write_token(token_file, "smtp-good")
    outcomes: list[str | None] = []

    async def hook(error: str | None) -> None:
        outcomes.append(error)

    def sender() -> SmtpSender:
        made = SmtpSender(
            host=receiver.host, port=receiver.port, security="none", user=SUPPORT, timeout=5
        )
        made.oauth_token = TokenSource(file=str(token_file))
        made.on_login = hook
        return made

    with SmtpReceiver(xoauth2=(SUPPORT, "smtp-good")) as receiver:
        good = sender()
        await good.send(mail_from=SUPPORT, recipient="p@patients.test", raw=RAW)
        await good.close()
        assert len(await receiver.wait_for(1)) == 1
        assert receiver.logins == [("XOAUTH2", SUPPORT, True)]
        assert outcomes == [None]

        write_token(token_file, "smtp-revoked")
        refused = sender()
        with pytest.raises(TransientDeliveryError, match="login failed: 535"):
            await refused.send(mail_from=SUPPORT, recipient="p@patients.test", raw=RAW)
        await refused.close()
        assert receiver.logins[-1] == ("XOAUTH2", SUPPORT, False)
        assert outcomes[-1] is not None and "535" in outcomes[-1]
        assert "smtp-revoked" not in outcomes[-1]

        token_file.unlink()
        missing = sender()
        with pytest.raises(TransientDeliveryError, match="OAuth token"):
            await missing.send(mail_from=SUPPORT, recipient="p@patients.test", raw=RAW)
        await missing.close()
        assert outcomes[-1] is not None and outcomes[-1].startswith("OAuth token unavailable")
        assert len(receiver.messages) == 1


def smtp_oauth_settings(
    database_url: str, account: ImapAccount, receiver: SmtpReceiver, token_file: Path
) -> Settings:
    return server_settings(
        database_url,
        account,
        receiver,
        smtp_user=SUPPORT,
        smtp_auth="xoauth2",
        oauth_token_file=str(token_file),
        support_address=SUPPORT,
        crisis_scout=False,
    )


async def test_worker_sends_acks_over_smtp_xoauth2(
    database_url: str,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    engine_sessions: SessionFactory,
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token.json"
    write_token(token_file, "smtp-good")
    dovecot.append_many(
        imap_account.user,
        imap_account.password,
        [patient_mail(sender=f"P{i} <p{i}@patients.test>") for i in range(2)],
    )
    with SmtpReceiver(xoauth2=(SUPPORT, "smtp-good")) as receiver:
        settings = smtp_oauth_settings(database_url, imap_account, receiver, token_file)
        report = await Worker(settings, engine_sessions).run_once()
        assert (report.poll.created, report.sent) == (2, 2)
        assert sorted(m.rcpt_tos[0] for m in await receiver.wait_for(2)) == [
            "p0@patients.test",
            "p1@patients.test",
        ]
        assert receiver.logins and all(m == ("XOAUTH2", SUPPORT, True) for m in receiver.logins)
    smtp = await login_state(engine_sessions, "smtp", "relay")
    assert smtp is not None and (smtp.ok, smtp.auth, smtp.failures) == (True, "xoauth2", 0)
    imap = await login_state(engine_sessions, "imap", "default")
    assert imap is not None and (imap.ok, imap.auth) == (True, "password")


async def test_refused_smtp_token_is_retried_and_loud_until_the_token_file_is_renewed(
    database_url: str,
    dovecot: DovecotServer,
    imap_account: ImapAccount,
    engine_sessions: SessionFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="helpdesk")
    token_file = tmp_path / "token.json"
    write_token(token_file, "smtp-expired")
    dovecot.append(imap_account.user, imap_account.password, patient_mail())
    with SmtpReceiver(xoauth2=(SUPPORT, "smtp-renewed")) as receiver:
        worker = Worker(
            smtp_oauth_settings(database_url, imap_account, receiver, token_file), engine_sessions
        )
        report = await worker.run_once()
        assert (report.poll.created, report.sent, report.failed) == (1, 0, 0)
        assert report.retried >= 1
        async with engine_sessions() as session:
            ack = (await session.exec(select(Outbox))).one()
        # transient: still pending, to be retried; the reason names the login, not the mail
        assert ack.status == "pending" and ack.attempts >= 1
        assert ack.last_error is not None and "SMTP login failed: 535" in ack.last_error
        failing = await login_state(engine_sessions, "smtp", "relay")
        assert failing is not None and not failing.ok
        assert failing.failures == ack.attempts and failing.failing_since is not None
        assert failing.last_error is not None and "535" in failing.last_error
        assert any(
            r.levelno == logging.ERROR and "SMTP login refused" in r.getMessage()
            for r in caplog.records
        )
        assert receiver.messages == []

        write_token(token_file, "smtp-renewed")  # the refresher wrote a new token
        again = await worker.run_once()
        assert again.sent == 1
        assert len(await receiver.wait_for(1)) == 1
        assert receiver.logins[-1] == ("XOAUTH2", SUPPORT, True)
    healed = await login_state(engine_sessions, "smtp", "relay")
    assert healed is not None and (healed.ok, healed.failures, healed.failing_since) == (
        True,
        0,
        None,
    )
    assert leaked(caplog, SUPPORT, "smtp-expired") == []
    assert leaked(caplog, SUPPORT, "smtp-renewed") == []


# --- IMAP ---------------------------------------------------------------------------------


def oauth_mailbox(account: ImapAccount, token_file: Path) -> ImapMailbox:
    # no password at all: only the token can get us in
    return ImapMailbox(
        host=account.host,
        port=account.port,
        user=account.user,
        security="none",
        timeout=10.0,
        xoauth2_token=TokenSource(file=str(token_file)),
    )


async def test_imap_authenticate_xoauth2_reads_mail(
    oauth_dovecot: DovecotServer, oauth_idp: IntrospectionServer, tmp_path: Path
) -> None:
    account = oauth_dovecot.new_account("oauth")
    raw = patient_mail()
    oauth_dovecot.append(account.user, account.password, raw)
    token = f"imap-{uuid.uuid4().hex}"
    oauth_idp.grant(token, account.user)
    token_file = tmp_path / "token.json"
    write_token(token_file, token)
    box = oauth_mailbox(account, token_file)
    try:
        await box.connect()
        await box.select("INBOX")
        mails = [m async for batch in box.batches(0) for m in batch]
    finally:
        await box.close()
    assert len(mails) == 1 and b"Question about my refill" in mails[0].raw
    assert token in oauth_idp.asked  # Dovecot checked this very token with the provider


async def test_refused_imap_token_is_an_auth_error_not_a_timeout(
    oauth_dovecot: DovecotServer, oauth_idp: IntrospectionServer, tmp_path: Path
) -> None:
    account = oauth_dovecot.new_account("oauth")
    token_file = tmp_path / "token.json"
    write_token(token_file, f"never-granted-{uuid.uuid4().hex}")
    box = oauth_mailbox(account, token_file)
    # The server answers a refused XOAUTH2 token with a challenge first; a client that does
    # not reply to it waits for its timeout and reports a network problem instead.
    with pytest.raises(MailboxAuthError, match="login refused"):
        await box.connect()
    token_file.unlink()
    with pytest.raises(OAuthTokenError, match="cannot read token file"):
        await box.connect()


async def wait_for_failure(sessions: SessionFactory, timeout: float = 20.0) -> LoginState:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await login_state(sessions, "imap", "default")
        if state is not None and not state.ok:
            return state
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the worker did not record the failed login")
        await asyncio.sleep(0.1)


async def test_worker_reads_over_xoauth2_and_a_dead_token_shows_in_healthz_and_metrics(
    database_url: str,
    oauth_dovecot: DovecotServer,
    oauth_idp: IntrospectionServer,
    smtp_receiver: SmtpReceiver,
    engine_sessions: SessionFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="helpdesk")
    account = oauth_dovecot.new_account("oauth")
    token_file = tmp_path / "token.json"
    first = f"imap-{uuid.uuid4().hex}"
    oauth_idp.grant(first, account.user)
    write_token(token_file, first)
    settings = make_settings(
        database_url,
        imap_host=account.host,
        imap_port=account.port,
        imap_user=account.user,
        imap_security="none",
        imap_auth="xoauth2",
        oauth_token_file=str(token_file),
        smtp_host=smtp_receiver.host,
        smtp_port=smtp_receiver.port,
        smtp_security="none",
        support_address=SUPPORT,
        crisis_scout=False,
    )
    oauth_dovecot.append(account.user, account.password, patient_mail())
    worker = Worker(settings, engine_sessions)
    assert (await worker.run_once()).poll.created == 1
    ok = await login_state(engine_sessions, "imap", "default")
    assert ok is not None and (ok.ok, ok.auth) == (True, "xoauth2")

    # The provider revokes the token; the worker's loop keeps running but reads nothing.
    oauth_idp.revoke(first)
    oauth_dovecot.append(
        account.user, account.password, patient_mail(sender="Ann <ann@patients.test>")
    )
    running = asyncio.create_task(worker.run())
    try:
        failing = await wait_for_failure(engine_sessions)
    finally:
        worker.request_stop()
        await running
    assert failing.auth == "xoauth2" and failing.failures >= 1
    assert failing.last_error is not None and "login refused" in failing.last_error
    assert any(
        r.levelno == logging.ERROR and "mail is NOT being read" in r.getMessage()
        for r in caplog.records
    )

    body, metrics = await health_from_a_web_process(settings)
    assert body["logins"] == "failing"
    assert body["failing_logins"][0]["service"] == "imap"
    assert body["failing_logins"][0]["mailbox"] == "default"
    assert 'helpdesk_login_ok{mailbox="default",service="imap"} 0.0' in metrics

    renewed = f"imap-{uuid.uuid4().hex}"
    oauth_idp.grant(renewed, account.user)
    write_token(token_file, renewed)
    assert (await worker.run_once()).poll.created == 1
    body, metrics = await health_from_a_web_process(settings)
    assert (body["logins"], body["failing_logins"]) == ("ok", [])
    assert 'helpdesk_login_ok{mailbox="default",service="imap"} 1.0' in metrics
    assert leaked(caplog, account.user, first) == []
    assert leaked(caplog, account.user, renewed) == []


async def health_from_a_web_process(settings: Settings) -> tuple[dict[str, Any], str]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        health = await client.get("/healthz")
        metrics = await client.get("/metrics")
    assert health.status_code == 200  # the web UI itself is fine; the field says what is not
    return health.json(), metrics.text


async def test_helpdesk_check_logs_in_with_xoauth2(
    oauth_dovecot: DovecotServer, oauth_idp: IntrospectionServer, tmp_path: Path
) -> None:
    account = oauth_dovecot.new_account("oauth")
    token = f"both-{uuid.uuid4().hex}"
    oauth_idp.grant(token, account.user)
    token_file = tmp_path / "token.json"
    write_token(token_file, token)
    with SmtpReceiver(xoauth2=(SUPPORT, token)) as receiver:
        settings = load_settings(
            imap_host=account.host,
            imap_port=account.port,
            imap_user=account.user,
            imap_security="none",
            imap_auth="xoauth2",
            smtp_host=receiver.host,
            smtp_port=receiver.port,
            smtp_security="none",
            smtp_user=SUPPORT,
            smtp_auth="xoauth2",
            oauth_token_file=str(token_file),
        )
        assert f"{account.user}@" in await check_imap(settings)
        assert f"logged in as {SUPPORT} with XOAUTH2" in await check_smtp(settings)
        assert receiver.logins == [("XOAUTH2", SUPPORT, True)]


# --- a refused token is not reused ----------------------------------------------------------


async def test_a_refused_token_makes_the_next_login_run_the_token_command_again(
    oauth_dovecot: DovecotServer,
    oauth_idp: IntrospectionServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="helpdesk")
    current, runs = tmp_path / "current", tmp_path / "runs"
    script = tmp_path / "token.py"
    script.write_text(  # the operator's helper: hands out whatever the IdP issued last
        "import json, pathlib\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))\n"
        f"token = pathlib.Path({str(current)!r}).read_text()\n"
        "print(json.dumps({'access_token': token, 'expires_in': 3600}))\n"
    )

    def issue(token: str) -> str:
        current.write_text(token)
        return token

    def command_runs() -> int:
        return int(runs.read_text())

    account = oauth_dovecot.new_account("oauth")
    tokens = TokenSource(command=f"{sys.executable} {script}")  # shared, as in the worker
    box = ImapMailbox(
        host=account.host,
        port=account.port,
        user=account.user,
        security="none",
        timeout=10.0,
        xoauth2_token=tokens,
    )
    first = issue(f"imap-{uuid.uuid4().hex}")
    oauth_idp.grant(first, account.user)
    await box.connect()
    await box.close()
    assert command_runs() == 1

    # The provider revokes the token long before its hour is up, and issues a new one.
    oauth_idp.revoke(first)
    second = issue(f"imap-{uuid.uuid4().hex}")
    oauth_idp.grant(second, account.user)
    with pytest.raises(MailboxAuthError, match="login refused"):
        await box.connect()  # the cached token: nobody can know it was revoked until now
    assert command_runs() == 1
    await box.connect()  # the refused token was dropped: the command runs again
    await box.close()
    assert command_runs() == 2
    assert oauth_idp.asked[-2:] == [first, second]

    # The same for SMTP: the relay takes only a newer token than the one cached.
    third = issue(f"smtp-{uuid.uuid4().hex}")
    with SmtpReceiver(xoauth2=(SUPPORT, third)) as receiver:
        sender = SmtpSender(
            host=receiver.host, port=receiver.port, security="none", user=SUPPORT, timeout=5
        )
        sender.oauth_token = tokens
        with pytest.raises(TransientDeliveryError, match="login failed: 535"):
            await sender.send(mail_from=SUPPORT, recipient="p@patients.test", raw=RAW)
        assert command_runs() == 2
        await sender.send(mail_from=SUPPORT, recipient="p@patients.test", raw=RAW)
        await sender.close()
        assert command_runs() == 3
        assert receiver.logins == [("XOAUTH2", SUPPORT, False), ("XOAUTH2", SUPPORT, True)]
        assert len(await receiver.wait_for(1)) == 1
    for user, token in ((account.user, first), (account.user, second), (SUPPORT, third)):
        assert leaked(caplog, user, token) == []
