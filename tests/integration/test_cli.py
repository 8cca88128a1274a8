"""The `helpdesk` command as scripts use it: check, worker --once, ticket list/show --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpdesk.testing.dovecot import ImapAccount
from helpdesk.testing.env import worker_env
from helpdesk.testing.smtp import SmtpReceiver
from tests.factories import SUPPORT, patient_mail
from tests.fixtures_dovecot import DovecotServer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dovecot


def helpdesk(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "helpdesk.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def env(
    database_url: str, imap_account: ImapAccount, smtp_receiver: SmtpReceiver
) -> dict[str, str]:
    return worker_env(database_url, imap_account, smtp_receiver, support_address=SUPPORT)


def test_check_reports_each_service_on_one_line(env: dict[str, str]) -> None:
    done = helpdesk("check", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["database", "ok"],
        ["imap", "ok"],
        ["smtp", "ok"],
    ]
    bad = helpdesk("check", env={**env, "HELPDESK_IMAP_PASSWORD": "wrong"})
    assert bad.returncode == 1
    assert [line.split()[:2] for line in bad.stdout.strip().splitlines()][1] == ["imap", "FAIL"]


def test_bad_settings_are_one_line_each_and_exit_2(env: dict[str, str]) -> None:
    done = helpdesk(
        "check", env={**env, "HELPDESK_IMAP_PORT": "abc", "HELPDESK_SMTP_SECURITY": "tls"}
    )
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith("config error: HELPDESK_IMAP_PORT")
    assert errors[1].startswith("config error: HELPDESK_SMTP_SECURITY")
    assert "Traceback" not in done.stderr


def test_insecure_remote_host_is_refused(env: dict[str, str]) -> None:
    done = helpdesk("check", env={**env, "HELPDESK_IMAP_HOST": "imap.example.org"})
    assert done.returncode == 2
    assert "HELPDESK_ALLOW_INSECURE" in done.stderr


def test_worker_once_then_ticket_json(
    env: dict[str, str], dovecot: DovecotServer, imap_account: ImapAccount
) -> None:
    dovecot.append_many(
        imap_account.user,
        imap_account.password,
        [
            patient_mail(message_id="<cli-1@patients.test>"),
            patient_mail(sender="Bo <bo@patients.test>"),
        ],
    )
    done = helpdesk("worker", "--once", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["poll"]["created"] == 2 and report["sent"] == 2

    listed = json.loads(helpdesk("ticket", "list", "--json", env=env).stdout)
    assert len(listed) == 2
    for field in (
        "reference",
        "subject",
        "requester",
        "status",
        "message_count",
        "created_at",
        "crisis_tier",
        "escalation_state",
    ):
        assert field in listed[0]
    maria = next(t for t in listed if t["requester"] == "maria.lopez@patients.test")
    assert maria["message_count"] == 2 and maria["crisis_tier"] is None

    shown = json.loads(helpdesk("ticket", "show", maria["reference"], "--json", env=env).stdout)
    assert [m["direction"] for m in shown["messages"]] == ["inbound", "outbound"]
    assert shown["messages"][0]["message_id"] == "<cli-1@patients.test>"
    assert shown["messages"][0]["received_at"] and shown["messages"][1]["sent_at"]

    missing = helpdesk("ticket", "show", "HD-999999", "--json", env=env)
    assert missing.returncode == 1 and "no ticket HD-999999" in missing.stderr


def test_unmigrated_database_says_what_to_do(env: dict[str, str], tmp_path: Path) -> None:
    fresh = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    done = helpdesk("ticket", "list", "--json", env={**env, "HELPDESK_DATABASE_URL": fresh})
    assert done.returncode == 2
    assert "helpdesk db upgrade" in done.stderr


def test_logs_never_carry_bodies_subjects_or_addresses(
    env: dict[str, str], dovecot: DovecotServer, imap_account: ImapAccount
) -> None:
    dovecot.append_many(
        imap_account.user,
        imap_account.password,
        [
            patient_mail(
                sender="Quinn Secretname <quinn.secret@patients.test>",
                subject="Zebrafinch subject words",
                body="I took all of my warfarin pills tonight, the whole bottle. Xylophonic.",
            )
        ],
    )
    done = helpdesk("worker", "--once", env={**env, "HELPDESK_LOG_LEVEL": "DEBUG"})
    assert done.returncode == 0, done.stderr
    logs = done.stderr
    assert "crisis detected" in logs  # the event is logged, by rule id and reference
    for secret in ("Secretname", "quinn.secret", "Zebrafinch", "warfarin", "Xylophonic"):
        assert secret not in logs
