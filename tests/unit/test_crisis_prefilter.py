"""The literal prefilter: what it derives from patterns, and that it never hides a match."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpdesk.crisis import prefilter
from helpdesk.crisis.lexicon import load_lexicon
from helpdesk.crisis.normalise import normalise
from helpdesk.crisis.prefilter import (
    LiteralIndex,
    first_literals,
    gate_groups,
    necessary_literals,
    spaced,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "crisis"


def _rx(src: str) -> re.Pattern[str]:
    return re.compile(src)


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        (r"\bsuicid(?:e|al)\b", {("suicide", True), ("suicidal", True)}),
        # words, separators and small alternations make one phrase: far rarer than a word
        (
            r"\b(?:cut|burn)[\s\-_*]+my[\s\-_*]+wrists?\b",
            {("cut my wrist", True), ("cut my wrists", True)}
            | {("burn my wrist", True), ("burn my wrists", True)},
        ),
        (r"\bcan'?t[\s\-_*]+go[\s\-_*]+on\b", {("can't go on", True), ("cant go on", True)}),
        (r"\b(?:chest|heart)\b", {("chest", True), ("heart", True)}),
        (r"\bx?abc", {("abc", True), ("xabc", True)}),
        (r"\b\w+ing[\s\-_*]+pills", {("ing pills", False)}),
    ],
)
def test_necessary_literals(src: str, expected: set[tuple[str, bool]]) -> None:
    assert necessary_literals(_rx(src)) == frozenset(expected)


def test_nothing_is_forced_by_optional_or_classed_parts() -> None:
    assert necessary_literals(_rx(r"(?:abc)?\w+")) is None
    assert necessary_literals(_rx(r"[a-z]{4}")) is None


def test_first_literals_only_for_patterns_starting_with_a_word() -> None:
    assert first_literals(_rx(r"\b(?:took|swallowed)[\s]+pills")) == {"took", "swallowed"}
    assert first_literals(_rx(r"\bi\b.*die")) is None  # one letter: not used
    assert first_literals(_rx(r"(?:took|swallowed) pills")) is None  # no \b in front


def test_gate_groups_lists_every_forced_set() -> None:
    groups = gate_groups(_rx(r"\b(?:took|swallowed)[\s]+(?:\w+[\s]+)?(?:pills|tablets)\b"))
    words = [{lit for lit, _ in g} for g in groups]
    assert {"pills", "tablets"} in words
    assert {"took", "swallowed"} in words
    # after an optional part the analysis no longer claims a word start (conservative)
    assert frozenset({("pills", False), ("tablets", False)}) in groups


def test_spaced_keeps_offsets() -> None:
    text = "i can't_breathe—now"
    sp = spaced(text)
    assert len(sp) == len(text) + 1
    assert sp[1:].split() == ["i", "can", "t", "breathe", "now"]


def test_index_finds_word_starts_and_needs_every_presence_gate() -> None:
    idx = LiteralIndex(
        [
            (0, [frozenset({("pill", True)}), frozenset({("took", True)})]),
            (1, [frozenset({("ood", False)})]),
        ]
    )
    assert idx.candidates("i took all my pills") == {0: [14]}
    assert 0 not in idx.candidates("my pills are here")  # presence gate missing
    assert 0 not in idx.candidates("i took the spill kit")  # not a word start
    assert idx.candidates("blood") == {1: [2]}


def test_fallback_scanner_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    gates = [(0, [frozenset({("die", True), ("dead", True)})]), (1, [frozenset({("ing", False)})])]
    text = "i want to die, dead tired of dying and waiting"
    fast = LiteralIndex(gates).candidates(text)
    monkeypatch.setattr(prefilter, "_scanner", prefilter._FindScanner)
    slow = LiteralIndex(gates).candidates(text)
    assert {k: sorted(v) for k, v in fast.items()} == {k: sorted(v) for k, v in slow.items()}


def _labelled_texts() -> list[str]:
    out: list[str] = []
    for name in ("devset.jsonl", "fresh.jsonl", "blind.jsonl"):
        path = DATA / name
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    out += [row["subject"], row["body"]]
    return out


def _spread(text: str) -> str:
    """``text`` with separators doubled and varied: squeezing must undo all of it."""
    return text.replace(" ", " \n ").replace("-", " - ")


def test_gate_never_hides_a_rule_that_matches() -> None:
    """Every unit whose regex matches a labelled mail is a candidate there, with a
    position inside its match (anchored units: at its start), unless the rule's ``also``
    or ``near`` context is missing from the text (then no hit could be kept anyway)."""
    lex = load_lexicon()
    for raw in _labelled_texts():
        for variant in (raw, _spread(raw)):
            text = normalise(variant, lex.fuzzy).text
            found = lex.candidates(text)
            for u, unit in enumerate(lex.units):
                rule = lex.rules[unit.rule]
                if not all(a.search(text) for a in (*rule.also, *rule.near)):
                    continue
                for m in unit.regex.finditer(text):
                    if m.end() == m.start():
                        continue
                    assert u in found, (rule.id, m.group())
                    if unit.anchored:
                        assert m.start() in found[u], (rule.id, m.group(), found[u])
                    else:
                        assert any(m.start() - 130 <= p <= m.end() + 130 for p in found[u]), (
                            rule.id,
                            m.group(),
                        )


def test_branches_cut_only_at_the_top_level() -> None:
    parts = prefilter.branches(_rx(r"(?:\bgo[|] on|x(?:y|z)|\(a\|b\))"))
    assert [p.pattern for p in parts] == [r"\bgo[|] on", r"x(?:y|z)", r"\(a\|b\)"]
    assert [p.pattern for p in prefilter.branches(_rx(r"(a|b)c"))] == [r"(a|b)c"]
    # a capturing group split across alternatives would renumber: kept whole
    whole = _rx(r"(a)|b")
    assert prefilter.branches(whole) == [re.compile(r"(a)"), re.compile("b")]


def test_squeezed_text_maps_back_to_spaced_offsets() -> None:
    idx = LiteralIndex([(0, [frozenset({("go on", True)})])])
    text = "i can't  go \n\n  on like this, go on?"
    assert idx.candidates(text) == {0: [9, 30]}
    assert text[9:11] == "go" and text[30:32] == "go"


def test_common_positional_literal_counts_only_with_its_rare_presence_gate() -> None:
    idx = LiteralIndex([(0, [frozenset({("my", True)}), frozenset({("warfarin", True)})])])
    assert idx.candidates("my dog ate my socks") == {}
    text = "my  dose of warfarin, my   dose"
    assert sorted(idx.candidates(text)[0]) == [0, 22]
