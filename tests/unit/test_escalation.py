"""The pure core of escalation: the paging schedule and the one-click acknowledge token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from helpdesk.errors import ConfigError, HelpdeskError
from helpdesk.escalation import (
    ACKNOWLEDGED,
    EXHAUSTED,
    NO_ROTA_RECHECK,
    OPEN,
    AckClaim,
    Action,
    Decision,
    ExpiredTokenError,
    InvalidTokenError,
    decide,
    delay_for,
    make_ack_token,
    verify_ack_token,
)
from helpdesk.webhook import pagerduty_event, split_routing_key

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DELAYS = (0, 300, 600)
SECRET = "s3cret-for-tests"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run_schedule(
    levels: tuple[int, ...], *, delays: tuple[int, ...] = DELAYS, repeats: int = 3
) -> list[tuple[float, Action, int, int]]:
    """Drive decide() like the timer does, always exactly at next_action_at."""
    state, level, rnd = OPEN, 0, 1
    next_at: datetime | None = T0 + delay_for(1, delays)
    steps: list[tuple[float, Action, int, int]] = []
    for _ in range(100):
        if next_at is None:
            break
        now = next_at
        d = decide(
            state=state,
            level=level,
            round=rnd,
            next_action_at=next_at,
            levels=levels,
            delays=delays,
            repeats=repeats,
            now=now,
        )
        steps.append(((now - T0).total_seconds(), d.action, d.level, d.round))
        if d.action is Action.EXHAUST:
            state = EXHAUSTED
        level, rnd, next_at = d.level, d.round, d.next_action_at
    return steps


def test_full_default_schedule_three_levels_three_rounds() -> None:
    page, exhaust = Action.PAGE, Action.EXHAUST
    assert run_schedule((1, 2, 3)) == [
        (0, page, 1, 1),
        (300, page, 2, 1),
        (900, page, 3, 1),
        (1500, page, 1, 2),
        (1800, page, 2, 2),
        (2400, page, 3, 2),
        (3000, page, 1, 3),
        (3300, page, 2, 3),
        (3900, page, 3, 3),
        (4500, exhaust, 3, 3),
    ]


def test_one_round() -> None:
    steps = run_schedule((1, 2, 3), repeats=1)
    assert [(s[0], s[1]) for s in steps] == [
        (0, Action.PAGE),
        (300, Action.PAGE),
        (900, Action.PAGE),
        (1500, Action.EXHAUST),
    ]


def test_empty_level_is_skipped_not_waited_for() -> None:
    # Level 2 has nobody: level 3 takes level 2's slot (300 s after level 1).
    steps = run_schedule((1, 3), repeats=1)
    assert steps == [
        (0, Action.PAGE, 1, 1),
        (300, Action.PAGE, 3, 1),
        (900, Action.EXHAUST, 3, 1),
    ]


def test_no_level_one_pages_first_non_empty_level_at_once() -> None:
    steps = run_schedule((2, 3), repeats=1)
    assert steps[0] == (0, Action.PAGE, 2, 1)
    assert steps[1] == (600, Action.PAGE, 3, 1)


def test_single_level_repeats() -> None:
    assert run_schedule((1,), repeats=3) == [
        (0, Action.PAGE, 1, 1),
        (300, Action.PAGE, 1, 2),
        (600, Action.PAGE, 1, 3),
        (900, Action.EXHAUST, 1, 3),
    ]


def test_levels_beyond_delays_use_the_last_delay() -> None:
    steps = run_schedule((1, 2, 3, 4, 5), repeats=1)
    assert [s[0] for s in steps] == [0, 300, 900, 1500, 2100, 2700]


def test_first_delay_defers_the_first_page() -> None:
    d = decide(
        state=OPEN,
        level=0,
        round=1,
        next_action_at=at(60),
        levels=(1,),
        delays=(60, 300),
        repeats=1,
        now=at(0),
    )
    assert d == Decision(Action.NOTHING, 0, 1, at(60))


def test_not_yet_due_does_nothing_and_keeps_the_time() -> None:
    d = decide(
        state=OPEN,
        level=1,
        round=1,
        next_action_at=at(300),
        levels=(1, 2, 3),
        delays=DELAYS,
        repeats=3,
        now=at(299.999),
    )
    assert d == Decision(Action.NOTHING, 1, 1, at(300))


def test_late_timer_counts_the_next_wait_from_now() -> None:
    # A worker that was down for an hour pages one level, then gives it its full wait.
    d = decide(
        state=OPEN,
        level=1,
        round=1,
        next_action_at=at(300),
        levels=(1, 2, 3),
        delays=DELAYS,
        repeats=3,
        now=at(3600),
    )
    assert d == Decision(Action.PAGE, 2, 1, at(3600 + 600))


@pytest.mark.parametrize("state", [ACKNOWLEDGED, EXHAUSTED])
def test_closed_states_never_page(state: str) -> None:
    d = decide(
        state=state,
        level=1,
        round=1,
        next_action_at=at(0),
        levels=(1, 2),
        delays=DELAYS,
        repeats=3,
        now=at(10_000),
    )
    assert d == Decision(Action.NOTHING, 1, 1, None)


def test_no_rota_looks_again_later() -> None:
    d = decide(
        state=OPEN,
        level=0,
        round=1,
        next_action_at=None,
        levels=(),
        delays=DELAYS,
        repeats=3,
        now=at(0),
    )
    assert d == Decision(Action.NOTHING, 0, 1, at(0) + NO_ROTA_RECHECK)


def test_rota_that_appears_later_is_paged_from_level_one() -> None:
    d = decide(
        state=OPEN,
        level=0,
        round=1,
        next_action_at=at(60),
        levels=(1, 2),
        delays=DELAYS,
        repeats=3,
        now=at(60),
    )
    assert d == Decision(Action.PAGE, 1, 1, at(360))


def test_member_removed_from_current_level_moves_on() -> None:
    d = decide(
        state=OPEN,
        level=2,
        round=1,
        next_action_at=at(900),
        levels=(1, 3),
        delays=DELAYS,
        repeats=3,
        now=at(900),
    )
    assert (d.action, d.level, d.round) == (Action.PAGE, 3, 1)


def test_zero_delays_page_back_to_back() -> None:
    steps = run_schedule((1, 2), delays=(0, 0), repeats=2)
    assert [s[0] for s in steps] == [0, 0, 0, 0, 0]
    assert steps[-1][1] is Action.EXHAUST


def test_delay_for_needs_delays() -> None:
    with pytest.raises(ValueError, match="empty"):
        delay_for(1, ())


# --------------------------------------------------------------------------- tokens


def test_token_round_trip() -> None:
    token = make_ack_token(SECRET, 42, "oncall@example.org", T0)
    claim = verify_ack_token(SECRET, token, at(3600), timedelta(hours=24))
    assert claim == AckClaim(escalation_id=42, recipient="oncall@example.org")
    assert all(c.isalnum() or c in "-_." for c in token)  # URL-safe as is


def test_token_accepted_until_max_age_then_expired() -> None:
    token = make_ack_token(SECRET, 7, "a@example.org", T0)
    verify_ack_token(SECRET, token, at(24 * 3600), timedelta(hours=24))
    with pytest.raises(ExpiredTokenError):
        verify_ack_token(SECRET, token, at(24 * 3600 + 1), timedelta(hours=24))


def test_expired_is_an_invalid_token_and_a_helpdesk_error() -> None:
    assert issubclass(ExpiredTokenError, InvalidTokenError)
    assert issubclass(InvalidTokenError, HelpdeskError)


def test_wrong_secret_is_refused() -> None:
    token = make_ack_token(SECRET, 7, "a@example.org", T0)
    with pytest.raises(InvalidTokenError, match="signature"):
        verify_ack_token("another secret", token, T0, timedelta(hours=1))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature
        lambda t: "x" + t,  # body
        lambda t: t.replace(".", ""),  # no separator
        lambda t: t + ".extra",
        lambda t: "",
        lambda t: "é.é",
    ],
)
def test_tampered_token_is_refused(tamper: object) -> None:
    token = make_ack_token(SECRET, 7, "a@example.org", T0)
    assert callable(tamper)
    with pytest.raises(InvalidTokenError):
        verify_ack_token(SECRET, tamper(token), T0, timedelta(hours=1))


def test_token_for_another_escalation_cannot_be_forged_by_editing_the_body() -> None:
    import base64
    import json

    token = make_ack_token(SECRET, 7, "a@example.org", T0)
    _body, sig = token.split(".")
    forged = base64.urlsafe_b64encode(json.dumps([8, "a@example.org", 0]).encode()).decode()
    with pytest.raises(InvalidTokenError):
        verify_ack_token(SECRET, forged.rstrip("=") + "." + sig, T0, timedelta(hours=1))


def test_token_from_the_future_is_refused() -> None:
    token = make_ack_token(SECRET, 7, "a@example.org", at(3600))
    with pytest.raises(InvalidTokenError, match="future"):
        verify_ack_token(SECRET, token, T0, timedelta(hours=24))


def test_empty_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="HELPDESK_SECRET_KEY must be set"):
        make_ack_token("", 1, "a@example.org", T0)
    with pytest.raises(ConfigError, match="HELPDESK_SECRET_KEY"):
        verify_ack_token("", "x.y", T0, timedelta(hours=1))


# --------------------------------------------------------------------------- webhook body


def test_pagerduty_trigger_shape() -> None:
    body = pagerduty_event(
        routing_key="R1",
        action="trigger",
        escalation_id=5,
        reference="HD-1042",
        tier=1,
        category="self_harm",
        level=2,
        ticket_url="https://hd.example/tickets/HD-1042",
        ack_url="https://hd.example/ack/tok",
    )
    assert body == {
        "routing_key": "R1",
        "event_action": "trigger",
        "dedup_key": "helpdesk-escalation-5",
        "payload": {
            "summary": "Crisis escalation HD-1042 tier 1 (self_harm)",
            "severity": "critical",
            "source": "helpdesk",
            "custom_details": {
                "reference": "HD-1042",
                "tier": 1,
                "category": "self_harm",
                "level": 2,
                "ticket_url": "https://hd.example/tickets/HD-1042",
                "ack_url": "https://hd.example/ack/tok",
            },
        },
    }


def test_pagerduty_tier_two_is_error_and_ack_is_minimal() -> None:
    common = {
        "routing_key": "",
        "escalation_id": 5,
        "reference": "HD-1",
        "tier": 2,
        "category": "",
        "level": 1,
        "ticket_url": "u",
        "ack_url": "a",
    }
    trigger = pagerduty_event(action="trigger", **common)  # type: ignore[arg-type]
    assert trigger["payload"]["severity"] == "error"
    assert trigger["payload"]["summary"] == "Crisis escalation HD-1 tier 2"
    ack = pagerduty_event(action="acknowledge", **common)  # type: ignore[arg-type]
    assert ack == {
        "routing_key": "",
        "event_action": "acknowledge",
        "dedup_key": "helpdesk-escalation-5",
    }


def test_routing_key_travels_in_the_fragment() -> None:
    assert split_routing_key("https://events.pagerduty.com/v2/enqueue#KEY") == (
        "https://events.pagerduty.com/v2/enqueue",
        "KEY",
    )
    assert split_routing_key("http://127.0.0.1:9/hook") == ("http://127.0.0.1:9/hook", "")
