"""``helpdesk demo``: the whole product on an embedded default, with nothing to set up.

SQLite in a demo folder, an in-process IMAP server (pymap) holding a support inbox, an
in-process SMTP receiver (aiosmtpd) standing in for the outside world, a demo on-call rota
and a demo staff login. It seeds realistic patient mail, runs the worker, prints what
happened, then keeps the worker and the web UI running until Ctrl-C.

All addresses are on ``demo.test`` (a reserved name): nothing leaves this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import secrets
import shutil
import signal
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from helpdesk import logs, migrations, oncall, tickets, users
from helpdesk.config import Settings, load_settings
from helpdesk.db import open_database
from helpdesk.embedded_imap import EmbeddedImap
from helpdesk.models import utcnow
from helpdesk.testing.smtp import SmtpReceiver
from helpdesk.worker import Worker

SUPPORT = "help@demo.test"
DEMO_LOGIN = ("admin@demo.test", "demo-password-2026")
ROTA = (
    ("dr.rivera@demo.test", 1, "Dr. Ana Rivera"),
    ("oncall-backup@demo.test", 2, "Backup nurse"),
)


def _mail(
    sender: str,
    subject: str,
    body: str,
    *,
    headers: dict[str, str] | None = None,
    in_reply_to: str | None = None,
) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = f"Patient Support <{SUPPORT}>"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(utcnow())
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2].rstrip(">"))
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    return msg.as_bytes()


SEED = [
    (
        "question",
        _mail(
            "Maria Lopez <maria.lopez@demo.test>",
            "Question about my refill",
            "Hello,\n\nMy blood pressure prescription runs out next week. Can my doctor renew"
            " it through the app, or do I need a new video visit?\n\nThanks,\nMaria",
        ),
    ),
    (
        "out-of-office",
        _mail(
            "Clinic Billing <billing@demo.test>",
            "Automatic reply: Invoice 2026-118",
            "I am out of the office until Monday and will answer your message when I return.",
            headers={"Auto-Submitted": "auto-replied", "X-Autoreply": "yes"},
        ),
    ),
    (
        "spanish",
        _mail(
            "José Hernández <jose.hernandez@demo.test>",
            "Cita con el médico",
            "Buenos días,\n\nQuisiera cambiar mi cita del jueves a la próxima semana porque tengo"
            " que trabajar. ¿Es posible?\n\nGracias,\nJosé",
        ),
    ),
    (
        "crisis",
        _mail(
            "Sam Taylor <sam.taylor@demo.test>",
            "need to talk",
            "I don't know who else to write to. I have been saving up my pills and I think"
            " tonight I am going to take them all. I don't want to be here anymore.",
        ),
    ),
]


def _demo_settings(db: Path, imap: EmbeddedImap, smtp: SmtpReceiver, port: int) -> Settings:
    return load_settings(
        database_url=f"sqlite+aiosqlite:///{db}",
        imap_host=imap.host,
        imap_port=imap.port,
        imap_user=imap.user,
        imap_password=imap.password,
        imap_security="none",
        imap_processed_folder="",
        imap_poll_interval=2.0,
        smtp_host=smtp.host,
        smtp_port=smtp.port,
        smtp_security="none",
        support_address=SUPPORT,
        support_name="Demo Telehealth Support",
        base_url=f"http://127.0.0.1:{port}",
        secret_key=secrets.token_urlsafe(32),
        outbox_retry_base_seconds=1.0,
    )


def _text_of(raw: bytes) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    body = msg.get_body(preferencelist=("plain",))
    return str(body.get_content()) if body is not None else ""


def _header(raw: bytes, name: str) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return str(msg.get(name, ""))


async def _seed_people(settings: Settings) -> None:
    async with (
        open_database(settings) as (_engine, sessions),
        sessions() as session,
        session.begin(),
    ):
        for address, level, name in ROTA:
            await oncall.add_member(session, email=address, level=level, name=name)
        await users.add_user(
            session, email=DEMO_LOGIN[0], role="admin", password=DEMO_LOGIN[1], name="Demo Admin"
        )


def _print_received(smtp: SmtpReceiver, start: int) -> None:
    for item in smtp.messages[start:]:
        rcpt = ", ".join(item.rcpt_tos)
        kind = _header(item.raw, "Auto-Submitted") or "personal"
        print(f"  -> {rcpt:<32} {kind:<15} {_header(item.raw, 'Subject')}")


async def _run(workdir: Path, *, serve_web: bool, port: int) -> None:
    db = workdir / "helpdesk.db"
    async with EmbeddedImap(user=SUPPORT, password=secrets.token_urlsafe(12)) as imap:
        with SmtpReceiver() as smtp:
            settings = _demo_settings(db, imap, smtp, port)
            await asyncio.to_thread(migrations.upgrade, settings)
            await _seed_people(settings)
            print(
                f"demo: SQLite at {db}, IMAP {imap.host}:{imap.port}, SMTP {smtp.host}:{smtp.port}"
            )
            print(f"demo: on-call rota: {', '.join(f'{a} (level {lvl})' for a, lvl, _ in ROTA)}\n")
            for label, raw in SEED:
                await imap.append(raw)
                print(f"seeded  {label:<14} {_header(raw, 'Subject')}")
            async with open_database(settings) as (_engine, sessions):
                worker = Worker(settings, sessions)
                report = await worker.run_once()
                print(
                    f"\nworker: {report.poll.fetched} mails, {report.poll.created} tickets,"
                    f" {report.sent} mails sent, {report.poll.crisis} crisis\n"
                )
                _print_received(smtp, 0)
                # The patient answers our acknowledgement: it must join her ticket.
                ack = next(m for m in smtp.messages if "maria.lopez@demo.test" in m.rcpt_tos)
                reply = _mail(
                    "Maria Lopez <maria.lopez@demo.test>",
                    f"Re: {_header(ack.raw, 'Subject')}",
                    "Also, my pharmacy changed - it is now the one on Main Street.",
                    in_reply_to=_header(ack.raw, "Message-ID"),
                )
                await imap.append(reply)
                print("\nseeded  reply-to-ack   (Maria answers her acknowledgement)")
                before = len(smtp.messages)
                report = await worker.run_once()
                print(
                    f"worker: {report.poll.fetched} mail, {report.poll.appended} added to an"
                    f" existing ticket, {len(smtp.messages) - before} mails sent\n"
                )
                await _print_tickets(sessions)
                _print_crisis(smtp)
                if serve_web:
                    await _serve(settings, sessions, worker, port)


async def _print_tickets(sessions: Any) -> None:
    from sqlmodel import col, select

    from helpdesk.models import Message, Outbox

    async with sessions() as session:
        rows = await tickets.list_tickets(session)
        messages = list((await session.exec(select(Message).order_by(col(Message.id)))).all())
        sent = list((await session.exec(select(Outbox))).all())
    print("tickets:")
    for t in reversed(rows):
        own = [m for m in messages if m.ticket_id == t.id]
        kinds = {o.kind for o in sent if o.ticket_id == t.id}
        robot = next((m.robot_reason for m in own if m.robot_reason), None)
        if t.crisis_tier:
            what = (
                f"CRISIS tier {t.crisis_tier} ({t.crisis_category}): on-call paged,"
                f" crisis reply sent, escalation {t.escalation_state}"
            )
        elif "ack" in kinds:
            what = f"acknowledged ({t.language})"
        elif robot:
            what = f"recorded, not answered: {robot}"
        else:
            what = "recorded"
        inbound = sum(m.direction == "inbound" for m in own)
        print(f"  {t.reference}  {t.requester:<26} {inbound} mail(s) from patient  {what}")


def _print_crisis(smtp: SmtpReceiver) -> None:
    for item in smtp.messages:
        subject = _header(item.raw, "Subject")
        if _header(item.raw, "Auto-Submitted") == "auto-generated":
            print(f"\n--- escalation notice to {', '.join(item.rcpt_tos)}: {subject}")
            print(_text_of(item.raw).strip())
            break
    for item in smtp.messages:
        if "sam.taylor@demo.test" in item.rcpt_tos:
            print(f"\n--- crisis reply to the patient: {_header(item.raw, 'Subject')}")
            print(_text_of(item.raw).strip())
            break


async def _serve(settings: Settings, sessions: Any, worker: Worker, port: int) -> None:
    import uvicorn

    from helpdesk.web import create_app

    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    web = asyncio.create_task(server.serve())
    work = asyncio.create_task(worker.run())
    print(f"\nweb UI: {settings.base_url}/  login {DEMO_LOGIN[0]} / {DEMO_LOGIN[1]}")
    print("the worker keeps watching the demo inbox; press Ctrl-C to stop")
    await stop.wait()
    server.should_exit = True
    worker.request_stop()
    for task in (web, work):
        with contextlib.suppress(Exception):
            await task


def run_demo(*, workdir: Path, serve_web: bool = True, port: int = 8000) -> None:
    logs.configure("ERROR")  # the demo tells its own story; the worker's log lines would interleave
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    asyncio.run(_run(workdir.resolve(), serve_web=serve_web, port=port))
