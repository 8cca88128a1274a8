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
- Speed without a different answer: ASCII text is split into words by ``str.split``
  (the same words as ``_TOKEN``), each sentence's features are looked up at C speed and
  summed in the order the plain formula adds them, and ``likely`` (what ``detect`` asks)
  turns a logit into a probability, and asks ``skip``, only for a sentence that can
  reach the threshold. Tests hold each of these to the plain definition.
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

__all__ = [
    "CategoryModel",
    "Model",
    "ModelError",
    "Scored",
    "load_category_model",
    "load_model",
    "sentences",
    "tokens",
]

MODEL_FILE = "data/crisis_model_v1.json"
CATEGORY_FILE = "data/crisis_category_v1.json"
# Sentence ends: . ! ? followed by space, a blank line, or a line that starts anew.
_SPLIT = re.compile(r"(?<=[.!?])\s+|\n[ \t>]*\n|\n(?=[ \t]*[-*•])")
# The same ends found faster: every branch starts with a literal character, so the regex
# engine jumps from one such character to the next; a match starting at the . ! or ?
# ends its sentence one character later.
_SPLIT_FAST = re.compile(r"\.\s+|!\s+|\?\s+|\n[ \t>]*\n|\n(?=[ \t]*[-*•])")
_TOKEN = re.compile(r"\b\w[\w']*\b")
_MIN_CHARS = 4
# ASCII text keeps its word characters and apostrophes; all else becomes a space, so that
# ``split`` gives the runs ``_TOKEN`` reads words from (less apostrophes at either end).
_WORD_BYTES = bytes(
    c if c < 128 and (chr(c).isalnum() or chr(c) in "_'") else 32 for c in range(256)
)


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
    for m in _SPLIT_FAST.finditer(text):
        start, end = m.span()
        if text[start] != "\n":  # the punctuation ends the sentence
            start += 1
        if start - last >= _MIN_CHARS:
            out.append((last, start))
        last = end
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


class _Words:
    """``_TOKEN.findall`` over spans of one text, by ``str.split`` when the text is ASCII."""

    __slots__ = ("_ascii", "_text")

    def __init__(self, text: str) -> None:
        self._text = text
        self._ascii = (
            text.encode("ascii").translate(_WORD_BYTES).decode("ascii") if text.isascii() else None
        )

    def __call__(self, start: int, end: int) -> list[str]:
        if self._ascii is None:
            return _TOKEN.findall(self._text, start, end)
        runs = self._ascii[start:end]
        words = runs.split()
        if "'" in runs:
            # an apostrophe is inside a word only with a word character on both sides
            words = [w for run in words if (w := run.strip("'"))]
        return words


# 1 + ln(n) for a feature seen n times in a sentence (sublinear TF); longer is computed.
_SUBLINEAR = tuple([0.0] + [1.0 + math.log(n) for n in range(1, 16)])
# A sentence whose logit is this far below the threshold's is certainly below it (the
# margin covers the rounding of the sigmoid, many orders of magnitude over).
_MARGIN = 1e-6


@dataclass(frozen=True, slots=True)
class Model:
    version: str
    threshold: float
    bias: float
    # feature -> (idf, weight); every vocabulary feature counts in the L2 norm
    features: dict[str, tuple[float, float]]
    # Built from ``features``: each feature's number (from 1), words by themselves and
    # bigrams as (first, second), and by number its idf * weight and idf ** 2.
    _ids: dict[str | tuple[str, str], int] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _iw: list[float] = field(default_factory=list, init=False, repr=False, compare=False)
    _ii: list[float] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._iw.append(0.0)
        self._ii.append(0.0)
        for name, (idf, weight) in self.features.items():
            key: str | tuple[str, str] = name
            if " " in name:
                first, second = name.split(" ", 1)
                key = (first, second)
            self._ids[key] = len(self._iw)
            self._iw.append(idf * weight)
            self._ii.append(idf * idf)

    def probability(self, sentence: str) -> float:
        return _sigmoid(self._logit(_Words(sentence)(0, len(sentence))))

    def _logit(self, words: list[str]) -> float:
        get = self._ids.get
        ids = [*filter(None, map(get, words)), *filter(None, map(get, pairwise(words)))]
        if not ids:
            return self.bias
        iw, ii = self._iw, self._ii
        if len(set(ids)) == len(ids):  # the common case: every feature once
            dot = sum(map(iw.__getitem__, ids), 0.0)
            norm = sum(map(ii.__getitem__, ids), 0.0)
            return self.bias + dot / math.sqrt(norm)
        dot = norm = 0.0
        for i, n in Counter(ids).items():
            if n == 1:
                dot += iw[i]
                norm += ii[i]
            else:
                tf = _SUBLINEAR[n] if n < len(_SUBLINEAR) else 1.0 + math.log(n)
                dot += tf * iw[i]
                norm += tf * tf * ii[i]
        return self.bias + dot / math.sqrt(norm)

    def best(self, text: str, skip: Callable[[str], bool] | None = None) -> Scored | None:
        """The highest-scoring sentence of ``text`` (None for a text without one), leaving
        out the sentences ``skip`` says to."""
        best: Scored | None = None
        words = _Words(text)
        for a, z in sentences(text):
            if skip is not None and skip(text[a:z]):
                continue
            p = _sigmoid(self._logit(words(a, z)))
            if best is None or p > best.probability:
                best = Scored(p, a, z)
        return best

    def likely(self, text: str, skip: Callable[[str], bool] | None = None) -> Scored | None:
        """``best`` when its probability reaches the threshold, else None.

        Cheaper: only a sentence that reaches the threshold is ever passed to ``skip``
        (the model's score decides first), and a logit clearly below the threshold's is
        not turned into a probability.
        """
        best: Scored | None = None
        floor = self._floor()
        words = _Words(text)
        for a, z in sentences(text):
            logit = self._logit(words(a, z))
            if logit < floor:
                continue
            p = _sigmoid(logit)
            if p < self.threshold or (best is not None and p <= best.probability):
                continue
            if skip is not None and skip(text[a:z]):
                continue
            best = Scored(p, a, z)
        return best

    def _floor(self) -> float:
        """A logit below this gives a probability below the threshold."""
        t = self.threshold
        return math.log(t / (1.0 - t)) - _MARGIN if 0.0 < t < 1.0 else -math.inf


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


def _packaged_json(path: str, what: str) -> object:
    """A JSON file shipped in the package, or ModelError naming ``what`` it holds."""
    raw = resources.files("helpdesk").joinpath(path).read_bytes()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelError(f"cannot parse {what}: {exc}") from exc


@lru_cache(maxsize=1)
def load_model() -> Model:
    """The packaged model, parsed once per process."""
    return parse_model(_packaged_json(MODEL_FILE, "model"))


@dataclass(frozen=True, slots=True)
class CategoryModel:
    """Which kind of crisis a sentence the crisis model flagged is about: multinomial
    logistic regression over the same features (sublinear TF-IDF, L2-normalised). It runs
    only for a model hit, so it is written for clarity, not speed."""

    version: str
    classes: tuple[str, ...]
    bias: tuple[float, ...]
    # feature -> (idf, one weight per class)
    features: dict[str, tuple[float, tuple[float, ...]]]

    def category(self, sentence: str) -> str:
        counts = Counter(f for f in tokens(sentence) if f in self.features)
        scores = list(self.bias)
        if counts:
            values = {f: (1.0 + math.log(n)) * self.features[f][0] for f, n in counts.items()}
            norm = math.sqrt(sum(v * v for v in values.values()))
            for f, v in values.items():
                for k, w in enumerate(self.features[f][1]):
                    scores[k] += w * v / norm
        return self.classes[max(range(len(scores)), key=scores.__getitem__)]


def parse_category_model(data: object) -> CategoryModel:
    if not isinstance(data, dict):
        raise ModelError("category model file is not a JSON object")
    try:
        classes = tuple(str(c) for c in data["classes"])
        bias = tuple(float(b) for b in data["bias"])
        feats = {
            str(name): (float(idf), tuple(float(w) for w in weights))
            for name, (idf, weights) in data["features"].items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"category model file is malformed: {exc!r}") from exc
    if not classes or len(bias) != len(classes):
        raise ModelError("category model file has no classes or a bias per class missing")
    if any(len(w) != len(classes) for _, w in feats.values()):
        raise ModelError("category model file has a feature without a weight per class")
    return CategoryModel(str(data["version"]), classes, bias, feats)


@lru_cache(maxsize=1)
def load_category_model() -> CategoryModel:
    """The packaged category model, parsed once per process."""
    return parse_category_model(_packaged_json(CATEGORY_FILE, "category model"))
