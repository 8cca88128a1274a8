"""``detect``: the crisis decision for one inbound mail, as a value.

Job: normalise the subject and the body (the plain text, or the HTML when there is no
plain text), run the lexicon rules whose necessary literals occur (``prefilter``: one
literal scan, then each rule only near its literals), drop hits inside quoted
replies or our own templates, weigh each remaining hit in its sentence, and return the
most urgent tier with every hit, where it is and why. When no rule fires, a learned model
(``model``) scores each sentence, with the words of hits the lexicon judged harmless
blanked ("no chest pain", an idiom); a likely crisis sentence is a tier-2 hit of its own
(rule id ``model.<version>``, its category named by a second model from that sentence),
so wording the lexicon has never seen still escalates.

Invariants:
- ``detect`` never raises on str input: an internal failure answers tier 2 with
  ``error="could not check: <ExceptionType>"`` (in doubt, escalate).
- Hit offsets are into the original field text given to ``detect`` (``html`` when the
  body came from it); subject and body weigh the same.
- Tier 1 is the most urgent; the result's category is the deciding hit's: the most
  urgent, then a specific rule before a bare mention, then the earliest.
- No logging and no I/O; the text of a mail never leaves this function except as offsets.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from helpdesk.crisis.context import assess
from helpdesk.crisis.lexicon import Lexicon, Unit, load_lexicon
from helpdesk.crisis.model import load_category_model, load_model
from helpdesk.crisis.normalise import Normalised, normalise
from helpdesk.crisis.prefilter import spaced
from helpdesk.crisis.quotes import is_forward, mask, quoted_spans, template_spans

__all__ = ["CrisisHit", "CrisisResult", "detect", "model_texts"]

Field = Literal["subject", "body"]
_MAX_HITS = 50
_SENTENCE_END = re.compile(r"[.!?]+")
# Half-width of the window scanned around a trigger: longer than any lexicon match.
_REACH = 130
# Why a hit is dropped when the lexicon has judged the words themselves harmless here (a
# symptom stated as absent, an idiom, a past or someone else's event, an information
# question, a pet's emergency): the learned model does not read those words again. A
# rule's own excluded phrases are not on the list: many are shallow ("cat" beside a cut,
# "cough" beside a chest), and the model is the second opinion for exactly those.
_DISMISSED = frozenset(
    {
        "symptom stated as absent",
        "idiom",
        "past medical event",
        "someone else's past event",
        "informational mention",
        "an animal's emergency",
    }
)


@dataclass(frozen=True, slots=True)
class CrisisHit:
    """One rule that fired: where (offsets into the original field) and why this tier."""

    rule_id: str
    category: str
    tier: int
    field: Field
    start: int
    end: int
    reason: str


@dataclass(frozen=True, slots=True)
class CrisisResult:
    """The decision: ``tier`` 1 (page now), 2 (urgent) or None (no crisis language)."""

    tier: int | None
    category: str | None
    hits: tuple[CrisisHit, ...]
    lexicon_version: str
    error: str | None = None

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h.rule_id for h in self.hits))


def _overlaps(a: int, z: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(a < e and z > s for s, e in spans)


def _matches(
    unit: Unit, text: str, positions: list[int], bounds: list[int], sp: str
) -> list[re.Match[str]]:
    """Matches of the unit's regex in windows around the trigger positions.

    A window is the trigger's sentence (``bounds`` holds the text's start, its sentence
    ends and its end), at most ``_REACH`` characters either side: lexicon phrases do not
    cross a sentence end. A window that lacks one of the unit's other necessary literals
    (``sp`` is ``text`` spaced, one character to the right) cannot hold a match and is
    skipped.
    """
    rx, presence = unit.regex, unit.presence
    if unit.anchored:
        out: list[re.Match[str]] = []
        last = -1
        for p in sorted(set(positions)):
            if p >= last and (m := rx.match(text, p)) is not None and m.end() > m.start():
                out.append(m)
                last = m.end()
        return out
    wins: list[list[int]] = []
    last = len(bounds) - 1
    for p in sorted(positions):
        i = bisect_right(bounds, p, 1, last)  # the sentence end after p, or the text's
        lo = max(p - _REACH, bounds[i - 1])
        hi = min(p + _REACH, bounds[i])
        if wins and lo <= wins[-1][1]:
            if hi > wins[-1][1]:
                wins[-1][1] = hi
        else:
            wins.append([lo, hi])
    if presence:
        wins = [w for w in wins if all(p.search(sp, w[0], w[1] + 2) for p in presence)]
    return [m for lo, hi in wins for m in rx.finditer(text, lo, hi) if m.end() > m.start()]


def _sentence_bounds(text: str) -> list[int]:
    """0, the end of each run of ``. ! ?``, and the text's length, in order."""
    return [0, *[m.end() for m in _SENTENCE_END.finditer(text)], len(text)]


def _normalised(lex: Lexicon, field: Field, raw: str, forwarded: bool = False) -> Normalised:
    # Quoted replies are blanked before anything else (same length, so offsets hold):
    # they can never fire, and long reply chains are most of a long mail.
    quoted = quoted_spans(raw, forwarded=forwarded) if field == "body" else []
    return normalise(mask(raw, quoted) if quoted else raw, lex.fuzzy)


def _scan(
    lex: Lexicon,
    field: Field,
    raw: str,
    norm: Normalised,
    own_templates: Sequence[str],
    dismissed: list[tuple[int, int]],
) -> list[tuple[CrisisHit, bool]]:
    """The kept hits of one field; the normalised spans of hits dropped as harmless
    (``_DISMISSED``) are added to ``dismissed``."""
    text = norm.text
    found = lex.candidates(text)
    if not found:
        return []
    # sentence bounds and spaced text are only needed by units tried in windows
    bounds: list[int] = []
    sp = ""
    masked: list[tuple[int, int]] | None = None
    out: list[tuple[CrisisHit, bool]] = []
    # A rule's alternatives run as separate units; like one regex scan, a rule reports
    # non-overlapping matches: the earliest first, the longest at the same start.
    by_rule: dict[int, list[tuple[int, int]]] = {}
    for ui in found:
        unit = lex.units[ui]
        if not unit.anchored and not bounds:
            bounds, sp = _sentence_bounds(text), spaced(text)
        spans = [m.span() for m in _matches(unit, text, found[ui], bounds, sp)]
        if spans:
            by_rule.setdefault(unit.rule, []).extend(spans)
    for ri in sorted(by_rule):
        rule = lex.rules[ri]
        last = -1
        for start, end in sorted(by_rule[ri], key=lambda se: (se[0], -se[1])):
            if start < last:
                continue
            last = end
            a, z = norm.span(start, end)
            if masked is None:
                masked = template_spans(raw, own_templates)
            if _overlaps(a, z, masked):
                continue
            v = assess(rule, text, start, end, lex.context, any_drop_reason=True)
            if v.keep:
                hit = CrisisHit(rule.id, rule.category, v.tier, field, a, z, v.reason)
                out.append((hit, rule.generic))
            elif v.reason in _DISMISSED:
                dismissed.append((start, end))
            if len(out) >= _MAX_HITS:
                return out
    return out


def _fields(
    lex: Lexicon, subject: str, text: str, html: str | None
) -> list[tuple[Field, str, Normalised]]:
    """Each field's original text and its normalised form, quoted replies blanked."""
    body = text if text.strip() else (html or "")
    return [
        ("subject", subject, _normalised(lex, "subject", subject)),
        ("body", body, _normalised(lex, "body", body, is_forward(subject))),
    ]


def _scan_fields(
    lex: Lexicon, fields: Sequence[tuple[Field, str, Normalised]], own_templates: Sequence[str]
) -> tuple[list[tuple[CrisisHit, bool]], dict[Field, list[tuple[int, int]]]]:
    """The kept hits of every field, and per field the spans of hits dropped as harmless."""
    dismissed: dict[Field, list[tuple[int, int]]] = {"subject": [], "body": []}
    found = [
        hg
        for f, raw, norm in fields
        for hg in _scan(lex, f, raw, norm, own_templates, dismissed[f])
    ]
    return found, dismissed


def _model_text(norm: Normalised, dismissed: Sequence[tuple[int, int]]) -> str:
    """What the learned model reads of a field: its words the lexicon dismissed blanked."""
    return mask(norm.text, dismissed)


def model_texts(subject: str, text: str, html: str | None = None) -> list[str]:
    """The texts the learned model scores for this mail when no rule fires: each field
    normalised, quoted replies and the words of dismissed hits blanked. The training
    script reads mails through this, so the model learns from what it is shown here."""
    lex = load_lexicon()
    fields = _fields(lex, subject or "", text or "", html)
    _, dismissed = _scan_fields(lex, fields, ())
    return [_model_text(norm, dismissed[f]) for f, _, norm in fields]


def _detect(
    subject: str, text: str, html: str | None, own_templates: Sequence[str], learned: bool
) -> CrisisResult:
    lex = load_lexicon()
    fields = _fields(lex, subject, text, html)
    found, dismissed = _scan_fields(lex, fields, own_templates)
    if not found:
        # Wording the lexicon does not know: the learned model's opinion, at tier 2.
        hit = _model_hit(fields, own_templates, dismissed) if learned else None
        if hit is None:
            return CrisisResult(None, None, (), lex.version)
        return CrisisResult(hit.tier, hit.category, (hit,), lex.version)
    order = {"subject": 0, "body": 1}
    found.sort(key=lambda hg: (order[hg[0].field], hg[0].start, hg[0].end))
    best = min(found, key=lambda hg: (hg[0].tier, hg[1], order[hg[0].field], hg[0].start))[0]
    return CrisisResult(best.tier, best.category, tuple(h for h, _ in found), lex.version)


def _model_hit(
    fields: Sequence[tuple[Field, str, Normalised]],
    own_templates: Sequence[str],
    dismissed: dict[Field, list[tuple[int, int]]],
) -> CrisisHit | None:
    """The model's most likely crisis sentence, when it is likely enough. Words the
    lexicon dismissed ("no chest pain", "choking on the price") are blanked first: the
    model cannot tell a denied symptom from a reported one."""
    model = load_model()
    # Like a bare mention in the lexicon, a sentence about hotlines and emergency rooms
    # (return precautions, signatures, newsletters) is not the patient's crisis.
    hotline = load_lexicon().context.hotline.search
    best: tuple[float, Field, int, int, str] | None = None
    for field, raw, norm in fields:
        text = _model_text(norm, dismissed[field])
        scored = model.likely(text, skip=lambda sentence: hotline(sentence) is not None)
        if scored is None:
            continue
        a, z = norm.span(scored.start, scored.end)
        if own_templates and _overlaps(a, z, template_spans(raw, own_templates)):
            continue
        if best is None or scored.probability > best[0]:
            best = (scored.probability, field, a, z, text[scored.start : scored.end])
    if best is None:
        return None
    p, field, a, z, sentence = best
    category = load_category_model().category(sentence)
    reason = f"learned model ({model.version}): p={p:.2f}"
    return CrisisHit(f"model.{model.version}", category, 2, field, a, z, reason)


def detect(
    subject: str,
    text: str,
    html: str | None = None,
    *,
    own_templates: Sequence[str] = (),
    learned: bool = True,
) -> CrisisResult:
    """Classify one mail; see the module docstring for the guarantees.

    ``learned=False``: the lexicon alone, without the learned model's second opinion
    (for training and measuring that model).
    """
    try:
        return _detect(subject or "", text or "", html, own_templates, learned)
    except Exception as exc:  # in doubt, escalate: a failed check must not read as "safe"
        try:
            version = load_lexicon().version
        except Exception:  # the lexicon itself may be what failed
            version = "unknown"
        return CrisisResult(2, None, (), version, error=f"could not check: {type(exc).__name__}")
