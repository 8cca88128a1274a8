"""Pytest fixtures for a real SMTP receiver (register with ``pytest_plugins``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpdesk.testing.smtp import SmtpReceiver


@pytest.fixture
def smtp_receiver() -> Iterator[SmtpReceiver]:
    """A fresh aiosmtpd receiver on 127.0.0.1 and a free port, stopped after the test."""
    with SmtpReceiver() as receiver:
        yield receiver
