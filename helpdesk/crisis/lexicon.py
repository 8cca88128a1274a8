"""The versioned crisis lexicon: loading, validating and compiling it once.

Job: read ``helpdesk/data/crisis_lexicon_v1.toml`` (shipped with the package), expand
its ``%macro%`` references, compile every rule and the context cues, and index the rules
by the literals their patterns force (``prefilter``), so that a mail only runs the few
rules whose literals it contains, and only near them.

Invariants:
- Loaded lazily and once (``load_lexicon`` is cached); a broken file raises
  ``LexiconError`` at first use, which ``detect`` turns into an escalation.
- A literal space in a pattern matches any run of whitespace, ``-``, ``_`` or ``*`` (and
  `` ?`` an optional run), so phrases survive line wrapping and punctuation games.
- Every rule has at least one trigger stem (two characters or more). The gate is the set
  of literals derived from the pattern itself (sound by construction); the declared
  stems are the gate only for a pattern that forces no usable literal, and then a
  pattern can only match text that contains one of them (the lexicon self-tests check
  this through the rule's positive examples).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from operator import itemgetter
from typing import Any

from helpdesk.crisis.normalise import FuzzyIndex
from helpdesk.crisis.prefilter import (
    USEFUL_PRESENCE,
    LiteralIndex,
    branches,
    first_literals,
    gate_groups,
    necessary_literals,
    presence_regex,
    quick_start,
    set_cost,
)

__all__ = ["CATEGORIES", "Context", "Lexicon", "LexiconError", "Rule", "load_lexicon"]

CATEGORIES = frozenset(
    {
        "suicidal_ideation",
        "self_harm",
        "overdose",
        "chest_pain",
        "stroke",
        "breathing",
        "anaphylaxis",
        "bleeding",
        "abuse",
        "medication_emergency",
    }
)
MEDICAL = frozenset(
    {"chest_pain", "stroke", "breathing", "anaphylaxis", "bleeding", "medication_emergency"}
)
_HEAD = itemgetter(slice(0, 3))
_MACRO = re.compile(r"%([a-z0-9_]+)%")
_SPACE = r"[\s\-_*]+"
_ANCHOR_BONUS = 3.0


class LexiconError(ValueError):
    """The lexicon file is malformed."""


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    lang: str
    tier: int
    category: str
    regex: re.Pattern[str]
    triggers: tuple[str, ...]
    generic: bool
    keep_third_person: bool
    also: tuple[re.Pattern[str], ...]
    # like ``also``, but anywhere within ``NEAR`` characters of the hit in the same
    # field: a drug named in one sentence and its danger sign in the next
    near: tuple[re.Pattern[str], ...]
    unless: re.Pattern[str] | None
    upgrade: re.Pattern[str] | None
    positive: tuple[str, ...]
    negative: tuple[str, ...]

    @property
    def medical(self) -> bool:
        return self.category in MEDICAL

    @property
    def medical_or_poison(self) -> bool:
        return self.category in MEDICAL or self.category == "overdose"


@dataclass(frozen=True, slots=True)
class Context:
    """Cue patterns shared by both languages (mails mix them)."""

    negation: re.Pattern[str]
    pseudo_negation: re.Pattern[str]
    history: re.Pattern[str]
    present: re.Pattern[str]
    third_person: re.Pattern[str]
    third_person_in_match: re.Pattern[str]
    child: re.Pattern[str]
    hypothetical: re.Pattern[str]
    informational: re.Pattern[str]
    hotline: re.Pattern[str]
    first_person: re.Pattern[str]
    idioms: re.Pattern[str]
    clause_break: re.Pattern[str]
    denial: re.Pattern[str]
    joke: re.Pattern[str]
    earnest: re.Pattern[str]
    list_denial: re.Pattern[str]
    list_turn: re.Pattern[str]
    dated: re.Pattern[str]
    animal: re.Pattern[str]
    human: re.Pattern[str]
    recovered: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class Unit:
    """One top-level alternative of a rule's pattern (or the whole pattern)."""

    rule: int
    regex: re.Pattern[str]
    # Literal sets that every match also contains, as regexes over ``spaced`` text: a
    # window without one of them is skipped before the (costlier) unit regex runs.
    presence: tuple[re.Pattern[str], ...] = ()
    # Every match starts at a gate literal: tried there alone, no window scan.
    anchored: bool = False


@dataclass(frozen=True, slots=True)
class Lexicon:
    version: str
    rules: tuple[Rule, ...]
    context: Context
    fuzzy: FuzzyIndex
    literals: LiteralIndex
    units: tuple[Unit, ...]

    def candidates(self, text: str) -> dict[int, list[int]]:
        """Unit index -> offsets in ``text`` of the literals that gate the unit."""
        return self.literals.candidates(text)


def _expand(pattern: str, macros: Mapping[str, str], depth: int = 0) -> str:
    if depth > 5:
        raise LexiconError("macro nesting too deep")

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in macros:
            raise LexiconError(f"unknown macro %{name}%")
        return "(?:" + _expand(macros[name], macros, depth + 1) + ")"

    return _MACRO.sub(sub, pattern)


def _compile(pattern: str, macros: Mapping[str, str], where: str) -> re.Pattern[str]:
    src = _expand(pattern.strip(), macros).replace(" ?", _SPACE[:-1] + "*").replace(" ", _SPACE)
    try:
        return re.compile(src)
    except re.error as exc:
        raise LexiconError(f"{where}: {exc}") from exc


def _alternation(items: Any, macros: Mapping[str, str], where: str) -> re.Pattern[str]:
    if not isinstance(items, list) or not items:
        raise LexiconError(f"{where}: expected a non-empty list")
    return _compile("|".join(f"(?:{i})" for i in items), macros, where)


def _also(
    items: Any, macros: Mapping[str, str], where: str, key: str = "also"
) -> tuple[re.Pattern[str], ...]:
    """``also`` (or ``near``) is one pattern or a list of them, every one required."""
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list | tuple):
        raise LexiconError(f"{where}: {key} must be a pattern or a list of patterns")
    return tuple(_compile(str(i), macros, where) for i in items)


def parse_lexicon(data: Mapping[str, Any]) -> Lexicon:
    macros = dict(data.get("macros", {}))
    ctx_data = data.get("context", {})
    fields = [f.name for f in dataclasses.fields(Context)]
    context = Context(**{f: _alternation(ctx_data.get(f), macros, f"context.{f}") for f in fields})
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, r in enumerate(data.get("rule", [])):
        rid = str(r.get("id", f"#{i}"))
        if rid in seen:
            raise LexiconError(f"duplicate rule id {rid}")
        seen.add(rid)
        tier, cat, lang = r.get("tier"), r.get("category"), r.get("lang")
        if tier not in (1, 2) or cat not in CATEGORIES or lang not in ("en", "es"):
            raise LexiconError(f"{rid}: bad tier/category/lang")
        triggers = tuple(str(t) for t in r.get("triggers", ()))
        if not triggers or any(len(t) < 2 or " " in t for t in triggers):
            raise LexiconError(f"{rid}: needs one-word trigger stems of 2+ characters")
        rules.append(
            Rule(
                id=rid,
                lang=lang,
                tier=tier,
                category=cat,
                regex=_compile(str(r["pattern"]), macros, rid),
                triggers=triggers,
                generic=bool(r.get("generic", False)),
                keep_third_person=bool(r.get("keep_third_person", False)),
                also=_also(r.get("also", ()), macros, rid),
                near=_also(r.get("near", ()), macros, rid, "near"),
                unless=_compile(r["unless"], macros, rid) if "unless" in r else None,
                upgrade=_compile(r["upgrade"], macros, rid) if "upgrade" in r else None,
                positive=tuple(r.get("positive", ())),
                negative=tuple(r.get("negative", ())),
            )
        )
    if not rules:
        raise LexiconError("no rules")
    # A unit is a rule's regex with its gates: the literal sets its matches all contain
    # (``prefilter``). The rarest set says where to try it; the others must occur in
    # the mail (and in the window) or the regex is not run at all.
    units: list[Unit] = []
    gates: list[tuple[int, list[frozenset[tuple[str, bool]]]]] = []
    for i, r in enumerate(rules):
        # Each top-level alternative is its own unit, gated by its own rarest literals:
        # a rule's commonest alternative no longer decides where all the others run.
        for rx in branches(r.regex):
            groups = gate_groups(rx) or [frozenset((t, True) for t in r.triggers)]
            # A hit is dropped unless its sentence matches every ``also`` pattern, so
            # what those force is a (sound) presence gate too.
            context_groups = [
                g for a in (*r.also, *r.near) if (g := necessary_literals(a)) is not None
            ]
            first = first_literals(rx)
            lead = frozenset((w, True) for w in first) if first is not None else None
            positional = groups[0]
            if lead is not None and set_cost(lead) <= _ANCHOR_BONUS * set_cost(positional):
                # every match starts at one of these words: trying it there alone is
                # cheaper than a window scan, worth a somewhat commoner gate
                positional = lead
            # Presence gates only pay for themselves when they are rare. What the match
            # itself forces is also looked for in the window around a trigger; what
            # ``also`` forces may be anywhere in the sentence, so only in the text.
            in_match = [g for g in groups if g != positional and set_cost(g) < USEFUL_PRESENCE]
            in_text = [
                g
                for g in context_groups
                if g != positional and g not in in_match and set_cost(g) < USEFUL_PRESENCE
            ]
            gates.append((len(units), [positional, *in_match, *in_text]))
            if positional == lead:
                units.append(Unit(i, rx, anchored=True))
            else:
                # The same matches, found faster (a look-ahead on the possible first letters).
                units.append(Unit(i, quick_start(rx), tuple(map(presence_regex, in_match))))
    fz = data.get("fuzzy", {})
    return Lexicon(
        version=str(data.get("version", "unknown")),
        rules=tuple(rules),
        context=context,
        fuzzy=FuzzyIndex(fz.get("targets", ()), fz.get("allow", ())),
        literals=LiteralIndex(gates),
        units=tuple(units),
    )


@lru_cache(maxsize=1)
def load_lexicon() -> Lexicon:
    """The packaged lexicon, parsed and compiled once per process."""
    raw = resources.files("helpdesk").joinpath("data/crisis_lexicon_v1.toml").read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LexiconError(f"cannot parse lexicon: {exc}") from exc
    return parse_lexicon(data)
