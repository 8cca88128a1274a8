"""The crisis detector's fast paths agree with the plain definitions they stand in for.

Each fast path (sentence splitting, ASCII tokenising, the model's threshold cut-off, the
squeezed-text offset map, the window bounds, the literal-first forms of the attribution
and sentence-boundary patterns) is checked against the straightforward code it replaced,
on the labelled mails and on random strings built to hit the edges (apostrophes at word
ends, punctuation runs, blank lines, bullets, non-ASCII words, quote headers).
"""

from __future__ import annotations

import json
import math
import random
import re
from bisect import bisect_right
from dataclasses import replace
from pathlib import Path

import pytest

from helpdesk.crisis.context import _BOUNDARY
from helpdesk.crisis.detect import _sentence_bounds
from helpdesk.crisis.lexicon import load_lexicon
from helpdesk.crisis.model import _SPLIT, _TOKEN, _Words, load_model, sentences
from helpdesk.crisis.normalise import normalise
from helpdesk.crisis.prefilter import Squeezed, spaced
from helpdesk.crisis.quotes import _TO_END, _next_attribution

DATA = Path(__file__).resolve().parents[1] / "data" / "crisis"
LABELLED = ("devset", "fresh", "blind", "heldout_a", "heldout_b", "routine_a", "routine_b")


def _rows() -> list[dict[str, object]]:
    return [
        json.loads(line)
        for name in LABELLED
        for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Every labelled field, normalised as ``detect`` scores it."""
    fuzzy = load_lexicon().fuzzy
    return [normalise(str(r[f]), fuzzy).text for r in _rows() for f in ("subject", "body")]


def _random_texts(n: int, seed: int = 11) -> list[str]:
    rnd = random.Random(seed)
    pieces = ["a", "bc", "don't", "'x'", "''", "q''r", "é", "ñu", "_", "7", "-", "*", "•"]
    pieces += [" ", "  ", "\t", "\n", "\n\n", "\n > \n", ".", "!?", "...", ". ", ";", "\u00a0"]
    return ["".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 40))) for _ in range(n)]


def _plain_sentences(text: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    last = 0
    for m in _SPLIT.finditer(text):
        if m.start() - last >= 4:
            out.append((last, m.start()))
        last = m.end()
    if len(text) - last >= 4:
        out.append((last, len(text)))
    return out


def test_sentences_split_where_the_documented_pattern_does(texts: list[str]) -> None:
    for text in texts + _random_texts(5000):
        assert sentences(text) == _plain_sentences(text), repr(text)


def test_words_are_the_token_pattern_s_words(texts: list[str]) -> None:
    for text in texts + _random_texts(5000, seed=12):
        words = _Words(text)
        for a, z in [(0, len(text)), *sentences(text)]:
            assert words(a, z) == _TOKEN.findall(text[a:z]), repr(text[a:z])


def test_likely_is_best_above_the_threshold(texts: list[str]) -> None:
    """The cut-off never drops a sentence that would reach the threshold, and a skipped
    sentence (``skip``, asked only about those that reach it) is never chosen."""
    model = load_model()
    hotline = load_lexicon().context.hotline.search

    def skip(sentence: str) -> bool:
        return hotline(sentence) is not None

    reached = 0
    for text in texts:
        for s in (None, skip):
            best = model.best(text, skip=s)
            want = best if best is not None and best.probability >= model.threshold else None
            assert model.likely(text, skip=s) == want
            reached += want is not None
    assert reached > 100  # the labelled sets do reach the threshold, often


def test_the_cut_off_keeps_a_sentence_exactly_at_the_threshold() -> None:
    model = load_model()
    text = "please refill my inhaler. i can't do this anymore, i want it all to end"
    best = model.best(text)
    assert best is not None
    assert replace(model, threshold=best.probability).likely(text) == best
    above = math.nextafter(best.probability, 1.0)
    assert replace(model, threshold=above).likely(text) is None


def _plain_unsqueeze(text: str, key: str, ends: list[int]) -> list[int]:
    """The offset map as first written: one pass over the runs of spaces."""
    sp = spaced(text)
    starts, origins, removed = [0], [0], 0
    for m in re.finditer("  +", sp):
        removed += m.end() - m.start() - 1
        starts.append(m.end() - removed)
        origins.append(m.end())
    back = len(key) - 2 if key[0] == " " else len(key) - 1
    out = []
    for end in ends:
        i = bisect_right(starts, end - back) - 1
        out.append(origins[i] - starts[i] + end)
    return out


def test_squeezed_offsets_map_back_like_the_plain_map(texts: list[str]) -> None:
    keys = [" a", "a", " bc", "bc a", " a bc", "bc ", " t ", "t"]
    for text in texts[:300] + _random_texts(3000, seed=13):
        sqz = Squeezed(text)
        assert sqz.text == re.sub("  +", " ", spaced(text))
        for key in keys:
            ends = [i + len(key) - 1 for i in range(len(sqz.text)) if sqz.text.startswith(key, i)]
            assert sqz.unsqueeze(key, ends) == _plain_unsqueeze(text, key, ends), (text, key)


def test_sentence_bounds_are_the_sentence_ends_between_start_and_end(texts: list[str]) -> None:
    for text in texts + _random_texts(3000, seed=14):
        ends = [m.end() for m in re.finditer(r"[.!?]+", text)]
        assert _sentence_bounds(text) == [0, *ends, len(text)]


def _random_mail_lines(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    pieces = ["On Mon, 3 Jun 2024, Help Desk wrote:", "El lunes escribió:", "Le 3 juin a écrit :"]
    pieces += ["-- Original Message --", "__________\nFrom:", "From: x\nSent: y", "De: a\nFecha:"]
    pieces += ["*From:* a\n*Sent:*", "\n", "\n\n", " ", "\t", "hello.", "wrote:", "ON x WROTE:"]
    pieces += [
        "from",
        "sent:",
        "> quoted",
        "!?",
        ";",
        ". ",
        "\n > \n",
        "a.b",
        "end.",
        "dr.",
        "mrs.",
    ]
    return ["".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 14))) for _ in range(n)]


def test_the_attribution_search_starts_where_the_line_anchored_pattern_does() -> None:
    bodies = [str(r["body"]) for r in _rows()]
    for text in bodies + _random_mail_lines(20000, seed=15):
        line_starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        for pos in line_starts[:: max(1, len(line_starts) // 4)]:
            m = _TO_END.search(text, pos)
            assert _next_attribution(text, pos) == (None if m is None else m.span()), repr(text)


def test_sentence_boundaries_are_the_documented_ones() -> None:
    title = "".join(rf"(?<!\b{t})" for t in ("dr", "dra", "mr", "mrs", "ms", "sr", "sra"))
    plain = re.compile(rf"(?:{title}\.|[!?;])[.!?;]*(?=\s|$)|\n[ \t>]*\n")
    rnd = random.Random(16)
    for text in [str(r["body"]) for r in _rows()] + _random_mail_lines(20000, seed=17):
        lo = rnd.randint(0, len(text))
        hi = rnd.randint(lo, len(text))
        for a, z in ((0, len(text)), (lo, hi)):
            got = [m.span() for m in _BOUNDARY.finditer(text, a, z)]
            assert got == [m.span() for m in plain.finditer(text, a, z)], repr(text[a:z])
