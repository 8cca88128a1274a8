"""Normalisation: what is folded, and offsets that lead back to the original."""

from __future__ import annotations

import pytest

from helpdesk.crisis.lexicon import load_lexicon
from helpdesk.crisis.normalise import normalise, squash

FUZZY = load_lexicon().fuzzy


def _back(raw: str, needle: str) -> str:
    n = normalise(raw, FUZZY)
    i = n.text.index(needle)
    a, z = n.span(i, i + len(needle))
    return raw[a:z]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("I Want To DIE", "i want to die"),
        ("está MÉDICO", "esta medico"),
        ("sui\u200bcide", "suicide"),
        ("self\u00adharm", "selfharm"),
        ("can\u2019t", "can't"),
        ("ﬁne", "fine"),
        ("k1ll my self", "kill my self"),
        ("su1c1de", "suicide"),
        ("s u i c i d e", "suicide"),
        ("s.u.i.c.i.d.e", "suicide"),
        ("ovrdose", "overdose"),
        ("suicde", "suicide"),
        ("<p>chest</p><p>pain</p>", " chest  pain "),
        ("I&nbsp;can&rsquo;t", "i can't"),
    ],
)
def test_folding(raw: str, expected: str) -> None:
    assert normalise(raw, FUZZY).text == expected


@pytest.mark.parametrize("word", ["overdue", "overdoes", "decide", "suicida", "10mg", "911", "988"])
def test_ordinary_words_are_left_alone(word: str) -> None:
    assert normalise(word, FUZZY).text == word


@pytest.mark.parametrize(
    ("raw", "needle", "original"),
    [
        ("Hello <b>there</b> I want to DIE", "want to die", "want to DIE"),
        ("Está bien. Me quiero MORIR", "me quiero morir", "Me quiero MORIR"),
        ("x sui\u200bcide y", "suicide", "sui\u200bcide"),
        ("I will k1ll myself", "kill myself", "k1ll myself"),
        ("a&amp;b chest pain", "chest pain", "chest pain"),
        ("ok s u i c i d e ok", "suicide", "s u i c i d e"),
        ("so suicdal", "suicidal", "suicdal"),
    ],
)
def test_offsets_round_trip(raw: str, needle: str, original: str) -> None:
    assert _back(raw, needle) == original


def test_span_is_always_inside_the_original() -> None:
    raw = "Á\u200b<i>x</i>&amp;ﬁ k1ll s u i c i d e"
    n = normalise(raw, FUZZY)
    for a in range(len(n.text) + 1):
        for z in range(a, len(n.text) + 1):
            s, e = n.span(a, z)
            assert 0 <= s <= e <= len(raw)


def test_squash_keeps_words_only() -> None:
    assert squash("  988 Suicide &amp; Crisis\nLifeline!! ") == "988 suicide crisis lifeline"


def _ambiguous_typos() -> list[str]:
    """Words one edit from two fuzzy targets or more (e.g. a deletion from one and a
    substitution from another), which are not themselves targets or allowed words."""
    from helpdesk.crisis.normalise import _osa_le1

    targets = sorted(FUZZY._targets)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    for t in targets:
        for i in range(len(t) + 1):
            words.update(t[:i] + c + t[i:] for c in letters)  # insertions
            if i < len(t):
                words.add(t[:i] + t[i + 1 :])  # deletions
                words.update(t[:i] + c + t[i + 1 :] for c in letters)  # substitutions
    return sorted(
        w
        for w in words
        if w not in targets and sum(_osa_le1(w, t) for t in targets) >= 2 and len(w) >= 5
    )


def test_a_typo_near_two_targets_is_corrected_alike_in_every_process() -> None:
    # str hashing is salted per process: a correction that depends on a set's order
    # would classify the same mail differently after a worker restart.
    import os
    import subprocess
    import sys

    words = _ambiguous_typos()
    assert words  # e.g. "overdosez": overdose and overdosed
    code = (
        "import sys\n"
        "from helpdesk.crisis.lexicon import load_lexicon\n"
        "from helpdesk.crisis.normalise import normalise\n"
        "f = load_lexicon().fuzzy\n"
        "print(normalise(sys.stdin.read(), f).text)\n"
    )
    outputs = set()
    for seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=" ".join(words),
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        outputs.add(out)
    assert len(outputs) == 1
