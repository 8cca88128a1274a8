"""The OAuth2 token source: command or file, cached until shortly before expiry."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from helpdesk.oauth import OAuthTokenError, TokenSource, parse_token


def test_parse_bare_and_json_tokens() -> None:
    assert parse_token("ya29.abc\n") == ("ya29.abc", None)
    assert parse_token('{"access_token": "t1", "expires_in": 3599}') == ("t1", 3599.0)
    for bad in ("", "two words", "{", '{"expires_in": 5}'):
        with pytest.raises(OAuthTokenError):
            parse_token(bad)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_command(tmp_path: Path) -> str:
    """A token command printing ``tok1``, ``tok2``, … (one more each run), valid an hour."""
    counter = tmp_path / "n"
    script = tmp_path / "token.py"
    script.write_text(
        "import json, pathlib\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "print(json.dumps({'access_token': f'tok{n}', 'expires_in': 3600}))\n"
    )
    return f"{sys.executable} {script}"


async def test_command_token_is_cached_until_near_expiry(tmp_path: Path) -> None:
    clock = Clock()
    source = TokenSource(command=counting_command(tmp_path), clock=clock)
    assert await source() == "tok1"
    clock.now += 3000  # still more than the 300 s margin before expiry
    assert await source() == "tok1"
    clock.now += 400
    assert await source() == "tok2"


async def test_a_refused_token_is_dropped_and_the_command_run_again(tmp_path: Path) -> None:
    clock = Clock()
    source = TokenSource(command=counting_command(tmp_path), clock=clock)
    assert await source() == "tok1"
    source.invalidate("tok1")  # refused long before its expiry
    assert await source() == "tok2"
    # A late refusal of the old token (another login's) leaves the new one alone.
    source.invalidate("tok1")
    assert await source() == "tok2"
    assert (tmp_path / "n").read_text() == "2"  # the command ran twice, not three times


async def test_a_refused_file_token_makes_the_file_read_again(tmp_path: Path) -> None:
    path = tmp_path / "token.json"
    path.write_text(json.dumps({"access_token": "a", "expires_in": 3600}))
    os.utime(path, (1, 1))
    source = TokenSource(file=str(path))
    assert await source() == "a"
    path.write_text(json.dumps({"access_token": "b", "expires_in": 3600}))
    os.utime(path, (1, 1))  # same mtime: only invalidate() can make it read again
    assert await source() == "a"
    source.invalidate("a")
    assert await source() == "b"


async def test_failing_command_is_a_clear_error_and_recorded(tmp_path: Path) -> None:
    source = TokenSource(
        command=f"{sys.executable} -c 'import sys; sys.exit(\"refresh token revoked\")'"
    )
    with pytest.raises(OAuthTokenError, match="exited 1: refresh token revoked"):
        await source()
    assert source.last_error is not None and "revoked" in source.last_error


async def test_file_token_is_reread_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "token.json"
    path.write_text(json.dumps({"access_token": "a", "expires_in": 3600}))
    source = TokenSource(file=str(path))
    assert await source() == "a"
    path.write_text(json.dumps({"access_token": "b", "expires_in": 3600}))
    os.utime(path, (1, 1))  # a different mtime, whatever the clock's resolution
    assert await source() == "b"
    path.unlink()
    with pytest.raises(OAuthTokenError, match="cannot read token file"):
        await source()


def test_exactly_one_source() -> None:
    with pytest.raises(OAuthTokenError):
        TokenSource()
    with pytest.raises(OAuthTokenError):
        TokenSource(command="x", file="y")
