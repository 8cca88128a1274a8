"""The crisis lexicon: well-formed, and every rule's own examples hold."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from helpdesk.crisis import detect
from helpdesk.crisis.lexicon import (
    CATEGORIES,
    Context,
    LexiconError,
    load_lexicon,
    parse_lexicon,
)

LEXICON = Path(__file__).resolve().parents[2] / "helpdesk" / "data" / "crisis_lexicon_v1.toml"

LEX = load_lexicon()
POSITIVES = [(r.id, ex) for r in LEX.rules for ex in r.positive]
NEGATIVES = [(r.id, ex) for r in LEX.rules for ex in r.negative]


def test_lexicon_is_versioned_and_covers_every_category_in_both_languages() -> None:
    assert LEX.version.startswith("crisis-lexicon-v1")
    covered = {(r.category, r.lang) for r in LEX.rules}
    for cat in CATEGORIES:
        assert (cat, "en") in covered, cat
        assert (cat, "es") in covered, cat


def test_every_rule_has_examples_both_ways() -> None:
    for r in LEX.rules:
        assert r.positive, r.id
        assert r.negative, r.id


@pytest.mark.parametrize(("rule_id", "example"), POSITIVES)
def test_positive_example_fires_its_rule(rule_id: str, example: str) -> None:
    assert rule_id in detect("", example).rule_ids


@pytest.mark.parametrize(("rule_id", "example"), NEGATIVES)
def test_negative_example_does_not_fire_its_rule(rule_id: str, example: str) -> None:
    assert rule_id not in detect("", example).rule_ids


def test_broken_lexicon_is_rejected() -> None:
    with pytest.raises(LexiconError):
        parse_lexicon({"rule": []})
    # every context cue present, so the rule itself is what is refused
    ctx = {f.name: ["x"] for f in dataclasses.fields(Context)}
    bad = {"context": ctx, "rule": [{"id": "a", "lang": "en", "tier": 3, "category": "x"}]}
    with pytest.raises(LexiconError, match="bad tier"):
        parse_lexicon(bad)


def test_a_macro_name_nobody_defined_is_refused_not_left_as_text() -> None:
    # a name with a digit once slipped through as literal text, silently never matching
    data = tomllib.loads(LEXICON.read_text(encoding="utf-8"))
    data["rule"][0]["unless"] = "%aspirin81%"
    with pytest.raises(LexiconError, match="unknown macro %aspirin81%"):
        parse_lexicon(data)
