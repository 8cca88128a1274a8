"""The event loop commands run on: uvloop when installed, asyncio's on request."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from helpdesk import cli
from helpdesk.config import load_settings
from helpdesk.errors import ConfigError


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_takes_uvloop_when_installed() -> None:
    assert cli.loop_factory("auto") is uvloop.new_event_loop
    assert cli.loop_factory("uvloop") is uvloop.new_event_loop


def test_asyncio_is_asyncio_s_own_loop() -> None:
    assert cli.loop_factory("asyncio") is None


def test_uvloop_asked_for_but_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import now raises ImportError
    assert cli.loop_factory("auto") is None
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        cli.loop_factory("uvloop")


@pytest.mark.parametrize(("choice", "module"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_commands_run_on_the_chosen_loop(
    monkeypatch: pytest.MonkeyPatch, choice: str, module: str
) -> None:
    monkeypatch.setenv("HELPDESK_EVENT_LOOP", choice)
    monkeypatch.setitem(cli._state, "settings", load_settings(None))
    assert cli.run(_loop_module()).split(".")[0] == module


def test_a_bad_choice_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELPDESK_EVENT_LOOP", "trio")
    with pytest.raises(ConfigError, match=r"HELPDESK_EVENT_LOOP: .*auto"):
        load_settings(None)
