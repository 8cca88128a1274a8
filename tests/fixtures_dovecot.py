"""Pytest fixtures for a real Dovecot IMAP server (registered in ``tests/conftest.py``).

One Dovecot serves the whole session; each test gets a mail user of its own through
``imap_account``. Used by the integration tier and by the web tier's end-to-end test.
``oauth_dovecot`` is a second one that takes XOAUTH2 logins, checked against the
``oauth_idp`` introspection endpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpdesk.testing.dovecot import DovecotServer, ImapAccount, dovecot_binary
from helpdesk.testing.oauth import IntrospectionServer

REPO = Path(__file__).resolve().parents[1]


def _ensure_dovecot() -> str | None:
    """The dovecot binary, installing it (as root, via apt) when missing; None if impossible."""
    binary = dovecot_binary()
    if binary is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run([str(REPO / "scripts" / "ensure-services.sh")], check=False, timeout=900)
        binary = dovecot_binary()
    return binary


def _require_dovecot() -> None:
    """Skip only when Dovecot is missing and cannot be installed, or when not root (mail
    folders must be chowned to the mail user)."""
    if _ensure_dovecot() is None:
        if os.environ.get("CI"):
            pytest.fail("dovecot is missing in CI (scripts/ensure-services.sh installs it)")
        pytest.skip("dovecot is not installed and could not be installed")
    if os.geteuid() != 0:
        pytest.skip("the Dovecot fixture needs root (it chowns mail folders to uid 65534)")


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotServer]:
    """One Dovecot for the whole session, with STARTTLS on ``.port`` and TLS on ``.ssl_port``.

    Tests get their own user via ``imap_account``.
    """
    _require_dovecot()
    with DovecotServer(tls=True) as server:
        yield server


@pytest.fixture(scope="session")
def oauth_idp() -> Iterator[IntrospectionServer]:
    """The OAuth2 token introspection endpoint ``oauth_dovecot`` asks about tokens."""
    with IntrospectionServer() as idp:
        yield idp


@pytest.fixture(scope="session")
def oauth_dovecot(oauth_idp: IntrospectionServer) -> Iterator[DovecotServer]:
    """A Dovecot (no TLS) that takes AUTHENTICATE XOAUTH2 with the tokens ``oauth_idp``
    grants: ``oauth_idp.grant(token, account.user)``."""
    _require_dovecot()
    with DovecotServer(oauth2_introspection_url=oauth_idp.url) as server:
        yield server


@pytest.fixture
def imap_account(dovecot: DovecotServer) -> ImapAccount:
    """A fresh mail user with an empty INBOX (and Processed folder) on the shared Dovecot."""
    return dovecot.new_account()
