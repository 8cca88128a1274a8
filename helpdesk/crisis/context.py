"""Reading the words around a lexicon hit: does it count, and how urgent is it?

Job: given a rule that matched normalised text at ``[start, end)``, decide from the
surrounding sentence whether the hit is dropped (idiom, a joke with nothing earnest
beside it, excluded phrase, hotline or signature text, an informational or someone
else's past medical event, a symptom stated as absent, a pet's emergency) or lowered to
tier 2 (negated, historical, third-person, hypothetical), and say why.

Invariants:
- Context never raises a tier and never clears a suicide or self-harm hit except as an
  idiom, a joke (a laughter or kidding cue in its sentence and no earnest cue: no "not
  joking", no means, plan or time word; never a medical hit: "probably just anxiety
  lol" after chest pain is still chest pain), an excluded phrase or hotline/signature text: a
  negated, past, reported or hypothetical mention of suicide is still tier 2 ("in
  doubt, escalate").
- Cues are looked for inside the hit's sentence only (sentences end at ``. ! ? ;`` or a
  blank line, not at a single line break, because mail clients wrap lines); negation
  only in the last five words before the hit, inside the same clause, and not when a
  first-person word stands between the cue and the hit. A rule's ``near`` patterns are
  the one exception: they may be in a neighbouring sentence, within ``NEAR`` characters.
- Pure: the verdict depends on the text, the rule and the compiled cues only.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache

from helpdesk.crisis.lexicon import Context, Rule

__all__ = ["Verdict", "assess"]

# Sentence boundaries: a run of . ! ? ; before a space or the end, or a blank line; not
# the dot of a title ("dr. fisher said the pain..." is one sentence). Each
# branch starts with its own literal character (rather than one class for the run), so
# the regex engine skips ahead to the next candidate instead of trying every offset.
_BOUNDARY = re.compile(
    r"\.(?<!\bdr\.)(?<!\bdra\.)(?<!\bmr\.)(?<!\bmrs\.)(?<!\bms\.)(?<!\bsr\.)(?<!\bsra\.)"
    r"[.!?;]*(?=\s|$)|![.!?;]*(?=\s|$)|\?[.!?;]*(?=\s|$)|;[.!?;]*(?=\s|$)|\n[ \t>]*\n"
)
_WINDOW = 240
# How far from a hit a rule's ``near`` patterns are looked for (either side, same field).
NEAR = 400


@dataclass(frozen=True, slots=True)
class Verdict:
    keep: bool
    tier: int
    reason: str


def _sentence(text: str, start: int, end: int) -> tuple[int, int]:
    lo = max(0, start - _WINDOW)
    s = lo
    for m in _BOUNDARY.finditer(text, lo, start):
        s = m.end()
    m2 = _BOUNDARY.search(text, end, min(len(text), end + _WINDOW))
    return s, (m2.start() if m2 else min(len(text), end + _WINDOW))


def _last(rx: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for m in rx.finditer(text):
        last = m
    return last


def _cue_applies(rx: re.Pattern[str], before: str, ctx: Context) -> bool:
    """A cue in ``before`` with no first-person word between it and the hit."""
    m = _last(rx, before)
    return m is not None and not ctx.first_person.search(before, m.end())


def _negated(before: str, ctx: Context) -> bool:
    b = _last(ctx.clause_break, before)
    clause = before[b.end() :] if b else before
    words = clause.split()[-5:]
    window = " " + " ".join(words) + " "
    window = ctx.pseudo_negation.sub(" ", window)
    return _cue_applies(ctx.negation, window, ctx)


# A denial that runs over a list: "never had any chest pain, dizziness, fainting, or
# shortness of breath", "no tengo dolor de pecho ni me falta el aire". The words that open
# it and the turn words that end it are the lexicon's (``list_denial``, ``list_turn``);
# how a list is strung together is here. Each item is a few words without a turn ("but",
# "now", "still") or a new subject or verb ("and I can't breathe", "and my chest is
# crushing"), ended by a comma or a conjunction; the last one before the hit by "or",
# "nor", "ni" or "o": after a bare comma or "and" the next symptom may be a new statement
# ("no fever or cough, chest pressure since noon").
@lru_cache(maxsize=4)
def _list_denial(opener: str, turn: str) -> re.Pattern[str]:
    item = rf"(?:(?!\b(?:{turn})\b)[ \w'-]){{1,30}}"
    return re.compile(
        rf"(?:{opener})(?: any)?"
        rf"(?:{item}(?:,|\bor\b|\bnor\b|\bni\b|\bo\b|\band\b|\by\b)){{0,5}}"
        rf"{item},?\s*\b(?:or|nor|ni|o)\b"
        rf"(?: (?!(?:{turn})\b)[\w'-]+){{0,4}}\s*$"
    )


def _denied(before: str, ctx: Context) -> bool:
    """The words right before the hit say the symptom is absent ("no", "denies"), also as
    the next item of a denied list."""
    if _list_denial(ctx.list_denial.pattern, ctx.list_turn.pattern).search(before[-200:]):
        return True
    b = _last(ctx.clause_break, before)
    clause = before[b.end() :] if b else before
    window = " ".join(clause.split()[-4:])
    # "no" right before, or a denial phrase ending the window with at most two words
    # between it and the hit ("no swelling of my face", "don't have any chest pain")
    words = window.split()
    return any(ctx.denial.search(" ".join(words[: len(words) - k])) for k in range(3))


def _past_only(sentence: str, ctx: Context) -> bool:
    """A medical event dated to a past year, or one stated as over ("fully resolved")."""
    return bool(ctx.dated.search(sentence) or ctx.recovered.search(sentence))


def _near(rule: Rule, text: str, start: int, end: int, ctx: Context) -> bool:
    """Every ``near`` pattern of the rule matches within ``NEAR`` characters of the hit,
    and not as a sign stated as absent ("no tremors or nausea")."""
    for rx in rule.near:
        starts = _signs(rx, text, ctx)
        i = bisect_left(starts, start - NEAR)
        if i == len(starts) or starts[i] >= end + NEAR:
            return False
    return True


@lru_cache(maxsize=64)
def _signs(rx: re.Pattern[str], text: str, ctx: Context) -> tuple[int, ...]:
    """Where ``rx`` matches in ``text``, less the matches stated as absent. Found once a
    text: a mail with many hits of one rule asks for the same field each time."""
    return tuple(
        m.start()
        for m in rx.finditer(text)
        if not _denied(text[max(0, m.start() - 80) : m.start()], ctx)
    )


def assess(
    rule: Rule, text: str, start: int, end: int, ctx: Context, *, any_drop_reason: bool = False
) -> Verdict:
    """The verdict on one hit of ``rule`` at ``text[start:end]``.

    ``any_drop_reason``: a dropped hit may give any of the drop reasons that apply, not
    the first in the documented order (the cheapest checks go first; for callers that
    only keep kept hits, such as ``detect``).
    """
    s, e = _sentence(text, start, end)
    sentence = text[s:e]
    # the rule's own context: required (also, near) and excluded (unless)
    missing = any(not rx.search(sentence) for rx in rule.also) or not _near(
        rule, text, start, end, ctx
    )
    excluded = rule.unless is not None and rule.unless.search(sentence) is not None
    if any_drop_reason and (missing or excluded):
        return Verdict(
            False, rule.tier, "missing required context" if missing else "excluded phrase"
        )
    before = text[s:start]
    match = text[start:end]
    for m in ctx.idioms.finditer(text, max(s, start - 60), min(e, end + 60)):
        if m.start() < end and m.end() > start:
            return Verdict(False, rule.tier, "idiom")
    if excluded:
        return Verdict(False, rule.tier, "excluded phrase")
    if not rule.medical and ctx.joke.search(sentence) and not ctx.earnest.search(sentence):
        return Verdict(False, rule.tier, "joke")
    if missing:
        return Verdict(False, rule.tier, "missing required context")
    # A pet's emergency is the vet's: a medical hit in a sentence about an animal, with no
    # person in it ("our cat is wheezing", "the puppy ate my pills" is still read: "my").
    if rule.medical_or_poison and ctx.animal.search(sentence) and not ctx.human.search(sentence):
        return Verdict(False, rule.tier, "an animal's emergency")
    # A tier-2 concept rule rises to tier 1 on intent, plan, means or time words.
    tier = 1 if rule.upgrade is not None and rule.upgrade.search(sentence) else rule.tier
    first_person_here = ctx.first_person.search(sentence) is not None
    if ctx.hotline.search(sentence) and (rule.generic or not first_person_here):
        return Verdict(False, rule.tier, "hotline or signature text")

    reasons: list[str] = []
    if _cue_applies(ctx.informational, before, ctx):
        if rule.medical:
            return Verdict(False, rule.tier, "informational mention")
        reasons.append("informational: lowered")
    if rule.medical and _denied(before, ctx):
        return Verdict(False, rule.tier, "symptom stated as absent")
    if _negated(before, ctx):
        reasons.append("negated: lowered to tier 2")
    historical = ctx.history.search(sentence) is not None and not ctx.present.search(sentence)
    # the writer's own event, dated or stated as over: an overdose in 2019 "and clean
    # since" is history like a heart attack in 2019 (never a suicide or self-harm hit)
    if historical and rule.medical_or_poison and _past_only(sentence, ctx):
        return Verdict(False, rule.tier, "past medical event")
    if historical:
        reasons.append("historical: lowered")
    third = False
    if not rule.keep_third_person:
        in_match = ctx.third_person_in_match.search(
            match
        ) is not None and not ctx.first_person.search(before)
        third = in_match or (
            _cue_applies(ctx.third_person, before, ctx) and not ctx.first_person.search(match)
        )
        # A child in the writer's care: their emergency is the writer's emergency, medical
        # or not (a parent reporting a child's suicidal words or self-harm).
        if third and ctx.child.search(text, s, end) and (rule.medical_or_poison or not historical):
            third = False
    if third:
        if historical and rule.medical_or_poison:
            return Verdict(False, rule.tier, "someone else's past event")
        reasons.append("third-person: lowered")
    if _cue_applies(ctx.hypothetical, before, ctx) and not ctx.first_person.search(match):
        reasons.append("hypothetical: lowered")
    if not reasons:
        return Verdict(True, tier, "direct" if tier == rule.tier else "direct; upgraded")
    return Verdict(True, max(tier, 2), "; ".join(reasons))
