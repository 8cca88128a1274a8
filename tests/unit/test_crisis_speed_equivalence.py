"""detect() gives exactly the frozen results: the guard for speed work on helpdesk.crisis.

``tests/data/crisis/golden.jsonl`` holds, for every labelled mail (devset, fresh, blind),
the throughput-bench mails (``bench/classify.py``, fixed seed) and a set of mixed mails
(routine padding around labelled crisis sentences, with HTML, entities, accents,
zero-width characters, leetspeak, spaced letters, quoted replies and our own templates,
so that the normalisation offset maps are exercised), the full result of ``detect``:
tier, category, error, and every hit (rule, category, tier, field, offsets, reason).

Any difference fails. The golden file is a snapshot of behaviour, not of truth: when the
lexicon or the detector's semantics change on purpose, regenerate it and review the diff:

    .venv/bin/python tests/unit/test_crisis_speed_equivalence.py --regenerate
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpdesk.crisis import CrisisResult, detect  # noqa: E402
from helpdesk.crisis.lexicon import load_lexicon  # noqa: E402
from helpdesk.crisis.normalise import normalise  # noqa: E402
from helpdesk.crisis.prefilter import branches, quick_start  # noqa: E402

DATA = ROOT / "tests" / "data" / "crisis"
GOLDEN = DATA / "golden.jsonl"
LABELLED = ("devset.jsonl", "fresh.jsonl", "blind.jsonl")
N_BENCH = 3000
N_MIXED = 2500
SEED = 20240603

OUR_TEMPLATES = (
    "Thank you for writing to us.\n\n"
    "If you are thinking about suicide or self-harm, or you are in danger, call 911 or call"
    " or\ntext the 988 Suicide & Crisis Lifeline now. Our on-call clinician has been paged."
    "\n\nSi tiene pensamientos suicidas, llame o envíe un mensaje de texto al 988.\n",
    "We received your message and will reply within one business day.",
)

Case = tuple[str, str, str, str | None, tuple[str, ...]]  # id, subject, text, html, templates


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crisis_bench", ROOT / "bench" / "classify.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _labelled() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in LABELLED:
        with (DATA / name).open(encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def _obfuscate(rnd: random.Random, s: str) -> str:
    """One of the disguises the normaliser undoes (or a harmless variant)."""
    k = rnd.randrange(10)
    if k == 0:
        return s.upper()
    if k == 1:  # accents and curly quotes
        return s.replace("e", "é", 2).replace("'", "\u2019").replace("a", "á", 1)
    if k == 2:  # zero-width characters and soft hyphens inside words
        return "".join(c + ("\u200b" if rnd.random() < 0.1 else "") for c in s).replace(
            "i", "i\u00ad", 1
        )
    if k == 3:  # leetspeak
        return s.replace("i", "1", 2).replace("e", "3", 1).replace("s", "$", 1)
    if k == 4:  # spaced letters in the longest word
        words = s.split(" ")
        j = max(range(len(words)), key=lambda i: len(words[i]))
        words[j] = " ".join(words[j])
        return " ".join(words)
    if k == 5:  # entities and tags (as plain text: the normaliser reads them too)
        return s.replace("'", "&#39;").replace(" ", " <b>", 1).replace("e", "&eacute;", 1)
    if k == 6:  # NFKC look-alikes and dashes
        return s.replace(" ", "\u00a0", 2).replace("-", "\u2014").replace("o", "ｏ", 1)
    if k == 7:  # one-letter typo in a long word (fuzzy correction)
        words = s.split(" ")
        j = max(range(len(words)), key=lambda i: len(words[i]))
        w = words[j]
        if len(w) > 5:
            p = rnd.randrange(1, len(w) - 1)
            words[j] = w[:p] + w[p + 1] + w[p] + w[p + 2 :]
        return " ".join(words)
    return s


def _mixed(bench: ModuleType, rows: list[dict[str, Any]], n: int) -> Iterator[Case]:
    rnd = random.Random(SEED)
    crisis = [r["body"] for r in rows if r["tier"] is not None]
    routine = list(bench._ROUTINE) + [r["body"] for r in rows if r["tier"] is None]
    for i in range(n):
        target = rnd.randint(300, 4096)
        parts: list[str] = []
        size = 0
        while size < target:
            s = rnd.choice(crisis) if rnd.random() < 0.08 else rnd.choice(routine)
            if rnd.random() < 0.3:
                s = _obfuscate(rnd, s)
            parts.append(s)
            size += len(s) + 1
        sep = rnd.choice([" ", "\n", "\n\n", ". ", "\r\n"])
        body = sep.join(parts)
        if i % 4 == 0:
            body += bench._TAIL
        if i % 7 == 0:
            body += "\n\n> " + rnd.choice(crisis) + "\n> " + rnd.choice(routine) + "\n"
        templates: tuple[str, ...] = ()
        if i % 5 == 0:
            templates = OUR_TEMPLATES
            body += "\n\n" + OUR_TEMPLATES[0]
        subject = rnd.choice(["", "Re: question", "help", rnd.choice(crisis)[:60]])
        if i % 6 == 0:  # HTML only
            html = "<html><body><p>" + body.replace("\n\n", "</p><p>").replace("\n", "<br>")
            if i % 12 == 0:
                html += "<blockquote>" + rnd.choice(crisis) + "</blockquote>"
            yield f"mixed-{i}", subject, "", html + "</p></body></html>", templates
        else:
            yield f"mixed-{i}", subject, body, None, templates


def cases() -> Iterator[Case]:
    """Every mail the golden file covers, in a fixed order."""
    bench = _bench()
    rows = _labelled()
    for r in rows:
        yield r["id"], r["subject"], r["body"], None, ()
    for i, (s, b) in enumerate(bench.make_mails(N_BENCH)):
        yield f"bench-{i}", s, b, None, ()
    yield from _mixed(bench, rows, N_MIXED)


def _digest(case: Case) -> str:
    _, subject, text, html, templates = case
    blob = json.dumps([subject, text, html, templates], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _record(case: Case, res: CrisisResult) -> dict[str, Any]:
    return {
        "id": case[0],
        "input": _digest(case),
        "tier": res.tier,
        "category": res.category,
        "rule_ids": list(res.rule_ids),
        "error": res.error,
        "version": res.lexicon_version,
        "hits": [
            [h.rule_id, h.category, h.tier, h.field, h.start, h.end, h.reason] for h in res.hits
        ],
    }


def _run(case: Case) -> dict[str, Any]:
    _, subject, text, html, templates = case
    return _record(case, detect(subject, text, html, own_templates=templates))


def regenerate() -> int:
    with GOLDEN.open("w", encoding="utf-8") as f:
        n = 0
        for case in cases():
            f.write(json.dumps(_run(case), ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def test_detect_matches_golden() -> None:
    with GOLDEN.open(encoding="utf-8") as f:
        golden = [json.loads(line) for line in f if line.strip()]
    all_cases = list(cases())
    assert [c[0] for c in all_cases] == [g["id"] for g in golden], "case list changed"
    drift = [c[0] for c, g in zip(all_cases, golden, strict=True) if _digest(c) != g["input"]]
    assert not drift, f"inputs changed (generator or data): {drift[:5]}; regenerate on purpose"
    diffs = []
    for case, want in zip(all_cases, golden, strict=True):
        got = json.loads(json.dumps(_run(case), ensure_ascii=False, sort_keys=True))
        if got != want:
            diffs.append(f"{case[0]}:\n  want {want}\n  got  {got}")
    assert not diffs, f"{len(diffs)} of {len(golden)} results differ:\n" + "\n".join(diffs[:10])


def test_golden_covers_firing_and_quiet_mail() -> None:
    with GOLDEN.open(encoding="utf-8") as f:
        golden = [json.loads(line) for line in f if line.strip()]
    assert len(golden) >= 5000
    fired = sum(g["tier"] is not None for g in golden)
    quiet = sum(g["tier"] is None for g in golden)
    assert fired >= 500
    assert quiet >= 1000
    assert not any(g["error"] for g in golden)


def test_quick_start_finds_the_same_matches() -> None:
    """The look-ahead form of a rule regex finds the same spans, also inside windows."""
    import re

    lex = load_lexicon()
    texts = [normalise(r["subject"] + "\n" + r["body"], lex.fuzzy).text for r in _labelled()]
    texts += [" ".join(ex for r in lex.rules for ex in (*r.positive, *r.negative)).lower()]
    # a unit is a rule's top-level alternative, in its quick-start form when it has one
    plain = {b.pattern: b for r in lex.rules for b in branches(r.regex)}
    changed = [u for u in lex.units if u.regex.pattern not in plain]
    assert changed, "no unit uses the quick-start form any more"
    for u in changed:
        fast = u.regex
        slow = next(b for p, b in plain.items() if fast.pattern.endswith("(?:" + p + ")"))
        for t in texts:
            assert [m.span() for m in fast.finditer(t)] == [m.span() for m in slow.finditer(t)]
            lo, hi = len(t) // 3, 2 * len(t) // 3
            assert [m.span() for m in fast.finditer(t, lo, hi)] == [
                m.span() for m in slow.finditer(t, lo, hi)
            ]
    # Unknown first characters, empty matches, inline flags: left alone.
    for pattern in (r"\b\w+ing", r"\b(?:a|)", r"(?i)\bfoo", r"\bx?", r"\b[ab]c"):
        assert quick_start(re.compile(pattern)).pattern == pattern
    assert quick_start(re.compile(r"\b(?:ab|c)?d")).pattern == r"(?=[acd])(?:\b(?:ab|c)?d)"


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        print(f"wrote {regenerate()} results to {GOLDEN.relative_to(ROOT)}")
    else:
        sys.exit("usage: test_crisis_speed_equivalence.py --regenerate")
