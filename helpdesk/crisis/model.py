"""A learned second opinion on crisis language, for wording the lexicon has never seen.

Job: score each sentence of a normalised field with a small linear model (word unigrams
and bigrams, sublinear TF-IDF, L2-normalised, logistic regression) whose weights ship in
``helpdesk/data/crisis_model_v1.json``, and say which sentence scores highest.

Why: the lexicon names the ways of saying a crisis that its authors thought of; mails
written by other people say it in other ways (measured on labelled sets written blind:
the lexicon alone found 75 % of crisis mails, lexicon + model 95 %). The model is
trained by ``scripts/train_crisis_model.py`` (scikit-learn, a development tool only) on
the labelled sets in ``tests/data/crisis``; here it is plain arithmetic over a dict.

Invariants:
- ``sentences`` and ``tokens`` are the ones the training script uses: a sentence scores
  here what it scored there (a test checks this against scikit-learn when present).
- A field's score is the maximum over its sentences; the span says which sentence.
- Pure: no I/O after the weights are loaded once; nothing is logged.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from itertools import pairwise

__all__ = ["Model", "ModelError", "Scored", "load_model", "sentences", "tokens"]

MODEL_FILE = "data/crisis_model_v1.json"
# Sentence ends: . ! ? followed by space, a blank line, or a line that starts anew.
_SPLIT = re.compile(r"(?<=[.!?])\s+|\n[ \t>]*\n|\n(?=[ \t]*[-*•])")
_TOKEN = re.compile(r"\b\w[\w']*\b")
_MIN_CHARS = 4


class ModelError(ValueError):
    """The model file is malformed."""


@dataclass(frozen=True, slots=True)
class Scored:
    """The highest-scoring sentence of a field: its probability and offsets."""

    probability: float
    start: int
    end: int


def sentences(text: str) -> list[tuple[int, int]]:
    """Spans of the sentences of ``text`` (the training script splits the same way)."""
    out: list[tuple[int, int]] = []
    last = 0
    for m in _SPLIT.finditer(text):
        if m.start() - last >= _MIN_CHARS:
            out.append((last, m.start()))
        last = m.end()
    if len(text) - last >= _MIN_CHARS:
        out.append((last, len(text)))
    return out


# Function words are no feature alone (only inside bigrams: "my life", "i can't"): alone
# they taught the model the style of first-person mail, which routine mail shares
# (measured: false alarms on unseen routine mail 10 % -> 2.5 % at the same recall).
STOP_WORDS = frozenset(
    """
    i me my myself we us our you your he him his she her it its they them their and or but
    the a an of to in on at for with from by as is am are was were be been being have has
    had do does did this that these those so just then than there here
    yo mi mis me te tu su sus el la los las un una unos unas de del y o pero que en con por
    para es son fue era ser estar esta este eso esa lo le les se al como muy
    """.split()  # noqa: SIM905 - a word list reads and diffs better as text
)


def tokens(sentence: str) -> list[str]:
    """The model's features of one (normalised, lowercase) sentence: words and bigrams."""
    words = _TOKEN.findall(sentence)
    return [w for w in words if w not in STOP_WORDS] + [f"{a} {b}" for a, b in pairwise(words)]


# 1 + ln(n) for a feature seen n times in a sentence (sublinear TF); longer is computed.
_SUBLINEAR = tuple([0.0] + [1.0 + math.log(n) for n in range(1, 16)])


@dataclass(frozen=True, slots=True)
class Model:
    version: str
    threshold: float
    bias: float
    # feature -> (idf, weight); every vocabulary feature counts in the L2 norm
    features: dict[str, tuple[float, float]]
    # the same, as (idf * weight, idf ** 2, index), words and bigrams apart (first -> second)
    _words: dict[str, tuple[float, float, int]] = field(default_factory=dict, repr=False)
    _pairs: dict[str, dict[str, tuple[float, float, int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for i, (name, (idf, weight)) in enumerate(self.features.items()):
            pre = (idf * weight, idf * idf, i)  # i: features with equal values stay apart
            if " " in name:
                first, second = name.split(" ", 1)
                self._pairs.setdefault(first, {})[second] = pre
            else:
                self._words[name] = pre

    def probability(self, sentence: str) -> float:
        return self._probability(_TOKEN.findall(sentence))

    def _probability(self, words: list[str]) -> float:
        get = self._words.get
        found = [(pre, n) for w, n in Counter(words).items() if (pre := get(w)) is not None]
        pairs = self._pairs.get
        found += [
            (pre, n)
            for (a, b), n in Counter(pairwise(words)).items()
            if (follow := pairs(a)) is not None and (pre := follow.get(b)) is not None
        ]
        if not found:
            return _sigmoid(self.bias)
        dot = norm = 0.0
        for (iw, ii, _), n in found:
            if n == 1:
                dot += iw
                norm += ii
            else:
                tf = _SUBLINEAR[n] if n < len(_SUBLINEAR) else 1.0 + math.log(n)
                dot += tf * iw
                norm += tf * tf * ii
        return _sigmoid(self.bias + dot / math.sqrt(norm))

    def best(self, text: str, skip: Callable[[str], bool] | None = None) -> Scored | None:
        """The highest-scoring sentence of ``text`` (None for a text without one), leaving
        out the sentences ``skip`` says to."""
        best: Scored | None = None
        for a, z in sentences(text):
            if skip is not None and skip(text[a:z]):
                continue
            p = self._probability(_TOKEN.findall(text, a, z))
            if best is None or p > best.probability:
                best = Scored(p, a, z)
        return best


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -500 else 0.0


def parse_model(data: object) -> Model:
    if not isinstance(data, dict):
        raise ModelError("model file is not a JSON object")
    try:
        feats = {
            str(name): (float(idf), float(weight))
            for name, (idf, weight) in data["features"].items()
        }
        return Model(
            version=str(data["version"]),
            threshold=float(data["threshold"]),
            bias=float(data["bias"]),
            features=feats,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model file is malformed: {exc!r}") from exc


@lru_cache(maxsize=1)
def load_model() -> Model:
    """The packaged model, parsed once per process."""
    raw = resources.files("helpdesk").joinpath(MODEL_FILE).read_bytes()
    try:
        return parse_model(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise ModelError(f"cannot parse model: {exc}") from exc
