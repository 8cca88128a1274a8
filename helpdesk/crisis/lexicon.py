"""The versioned crisis lexicon: loading, validating and compiling it once.

Job: read ``helpdesk/data/crisis_lexicon_v1.toml`` (shipped with the package), expand
its ``%macro%`` references, compile every rule and the context cues, and index the rules
by trigger stem so that a mail only runs the few rules whose stems it contains.

Invariants:
- Loaded lazily and once (``load_lexicon`` is cached); a broken file raises
  ``LexiconError`` at first use, which ``detect`` turns into an escalation.
- A literal space in a pattern matches any run of whitespace, ``-``, ``_`` or ``*`` (and
  `` ?`` an optional run), so phrases survive line wrapping and punctuation games.
- Every rule has at least one trigger stem (three characters or more); a pattern can only
  match text that contains one of its stems (the lexicon self-tests check this through
  the rule's positive examples).
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
_MACRO = re.compile(r"%([a-z_]+)%")
_SPACE = r"[\s\-_*]+"


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
    also: re.Pattern[str] | None
    unless: re.Pattern[str] | None
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


@dataclass(frozen=True, slots=True)
class Lexicon:
    version: str
    rules: tuple[Rule, ...]
    context: Context
    fuzzy: FuzzyIndex
    by_head: Mapping[bytes, tuple[tuple[str, bytes, tuple[int, ...]], ...]]

    def candidates(self, text: str, tokens: frozenset[bytes]) -> dict[int, list[int]]:
        """Rule index -> positions where one of its stems starts a word in ``text``.

        ``tokens`` are the words of ``text`` (see ``normalise.token_bytes``).
        """
        by_head = self.by_head
        present = by_head.keys() & set(map(_HEAD, tokens))
        if not present:
            return {}
        starting: dict[bytes, list[bytes]] = {}
        for t in tokens:
            if t[:3] in present:
                starting.setdefault(t[:3], []).append(t)
        found: dict[int, list[int]] = {}
        for h, toks in starting.items():
            for stem, bstem, idx in by_head[h]:
                if len(bstem) > 3 and not any(t.startswith(bstem) for t in toks):
                    continue
                pos = text.find(stem)
                while pos >= 0:
                    if pos == 0 or not text[pos - 1].isalnum():
                        for i in idx:
                            found.setdefault(i, []).append(pos)
                    pos = text.find(stem, pos + 1)
        return found


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
                also=_compile(r["also"], macros, rid) if "also" in r else None,
                unless=_compile(r["unless"], macros, rid) if "unless" in r else None,
                positive=tuple(r.get("positive", ())),
                negative=tuple(r.get("negative", ())),
            )
        )
    if not rules:
        raise LexiconError("no rules")
    heads: dict[bytes, dict[str, list[int]]] = {}
    for i, rule in enumerate(rules):
        for stem in rule.triggers:
            heads.setdefault(stem[:3].encode(), {}).setdefault(stem, []).append(i)
    by_head = {
        h: tuple((s, s.encode(), tuple(ix)) for s, ix in stems.items())
        for h, stems in heads.items()
    }
    fz = data.get("fuzzy", {})
    return Lexicon(
        version=str(data.get("version", "unknown")),
        rules=tuple(rules),
        context=context,
        fuzzy=FuzzyIndex(fz.get("targets", ()), fz.get("allow", ())),
        by_head=by_head,
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
