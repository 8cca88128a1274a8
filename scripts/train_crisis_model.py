"""Train the crisis detector's learned second opinion (helpdesk/crisis/model.py).

    .venv/bin/pip install scikit-learn          # a development tool, not a dependency
    .venv/bin/python scripts/train_crisis_model.py            # train, report, write
    .venv/bin/python scripts/train_crisis_model.py --report   # leave-one-set-out only

Data: the labelled sets in tests/data/crisis (every *.jsonl but golden.jsonl). Sentences
are labelled from their mail: every sentence of a non-crisis mail is negative; in a
crisis mail the sentences where the lexicon fires are positive. A crisis mail where the
lexicon finds nothing gets its highest-scoring sentence under a first-pass model as its
positive (its other sentences are left out rather than called negative).

A second, multinomial model over the same features names the category of a model hit:
it learns from the sentences where the lexicon fires, labelled with their mail's category,
and is written to helpdesk/data/crisis_category_v1.json (--category-report: how often it
is right on held-out sets, from the sentence the crisis model finds likeliest).

The report trains on all sets but one and scores the one left out, for each set in turn:
recall and precision of the lexicon alone and of lexicon + model at the threshold. Sets
written by different people make this an estimate for wording nobody here has seen.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpdesk.crisis import detect  # noqa: E402
from helpdesk.crisis.detect import model_texts  # noqa: E402
from helpdesk.crisis.model import CATEGORY_FILE, MODEL_FILE, sentences, tokens  # noqa: E402

DATA = ROOT / "tests" / "data" / "crisis"
OUT = ROOT / "helpdesk" / MODEL_FILE
CATEGORY_OUT = ROOT / "helpdesk" / CATEGORY_FILE
VERSION = "crisis-model-v1"
CATEGORY_VERSION = "crisis-category-v1"

Row = dict[str, Any]


def fields(row: Row) -> list[str]:
    """The texts the detector's model scores: detect's own preparation of the subject and
    the body (normalised with the lexicon's corrections, quoted replies and the words of
    hits the lexicon dismissed blanked), so training sees what serving shows."""
    return model_texts(row["subject"], row["body"])


def mail_sentences(row: Row) -> list[str]:
    return [t[a:z] for t in fields(row) for a, z in sentences(t)]


def load(paths: Iterable[Path]) -> dict[str, list[Row]]:
    out = {}
    for p in paths:
        with p.open(encoding="utf-8") as f:
            out[p.stem] = [json.loads(line) for line in f if line.strip()]
    return out


def _fit(texts: Sequence[str], labels: Sequence[int], c: float) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    vec = TfidfVectorizer(analyzer=tokens, lowercase=False, sublinear_tf=True)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    return make_pipeline(vec, clf).fit(list(texts), list(labels))


def train(rows: Sequence[Row], c: float) -> Any:
    texts: list[str] = []
    labels: list[int] = []
    unlabelled: list[list[str]] = []
    for row in rows:
        ss = mail_sentences(row)
        if row["tier"] is None:
            texts += ss
            labels += [0] * len(ss)
            continue
        fired = [s for s in ss if detect("", s, learned=False).tier is not None]
        if fired:
            texts += ss
            labels += [int(s in fired) for s in ss]
        elif ss:
            unlabelled.append(ss)
    model = _fit(texts, labels, c)
    if unlabelled:  # second pass: the likeliest sentence of each such mail is the crisis
        for ss in unlabelled:
            probs = model.predict_proba(ss)[:, 1]
            texts.append(ss[int(probs.argmax())])
            labels.append(1)
        model = _fit(texts, labels, c)
    return model


def mail_score(model: Any, row: Row) -> float:
    ss = mail_sentences(row)
    return float(model.predict_proba(ss)[:, 1].max()) if ss else 0.0


def _rp(pred: Sequence[bool], gold: Sequence[bool]) -> str:
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(g and not p for p, g in zip(pred, gold, strict=True))
    rec = tp / (tp + fn) if tp + fn else 1.0
    prec = tp / (tp + fp) if tp + fp else 1.0
    return f"recall {rec:.3f} precision {prec:.3f}"


def report(sets: dict[str, list[Row]], c: float, thresholds: Sequence[float]) -> None:
    print("leave-one-set-out (trained on the other sets, scored on this one):", flush=True)
    for name, rows in sets.items():
        model = train([r for n, rs in sets.items() if n != name for r in rs], c)
        gold = [r["tier"] is not None for r in rows]
        rules = [detect(r["subject"], r["body"], learned=False).tier is not None for r in rows]
        scores = [mail_score(model, r) for r in rows]
        for t in thresholds:
            both = [a or s >= t for a, s in zip(rules, scores, strict=True)]
            if any(gold):
                print(
                    f"  {name:12} {len(rows):4} mails  lexicon {_rp(rules, gold)}  "
                    f"lexicon+model@{t} {_rp(both, gold)}",
                    flush=True,
                )
            else:  # routine mail only: how many would raise a false alarm
                print(
                    f"  {name:12} {len(rows):4} routine mails  false alarms: lexicon "
                    f"{sum(rules)}, lexicon+model@{t} {sum(both)}",
                    flush=True,
                )


def export(model: Any, threshold: float) -> dict[str, Any]:
    vec, clf = model.steps[0][1], model.steps[1][1]
    names = vec.get_feature_names_out()
    weights = clf.coef_[0]
    features = {
        str(n): [round(float(i), 5), round(float(w), 5)]
        for n, i, w in zip(names, vec.idf_, weights, strict=True)
    }
    return {
        "version": VERSION,
        "threshold": threshold,
        "bias": round(float(clf.intercept_[0]), 6),
        "features": features,
    }


def category_examples(rows: Sequence[Row]) -> tuple[list[str], list[str]]:
    """Sentences of crisis mails where the lexicon fires, labelled with the mail's category."""
    texts: list[str] = []
    labels: list[str] = []
    for row in rows:
        if row["tier"] is None or not row.get("category"):
            continue
        for s in mail_sentences(row):
            if detect("", s, learned=False).tier is not None:
                texts.append(s)
                labels.append(row["category"])
    return texts, labels


def train_category(rows: Sequence[Row], c: float) -> Any:
    """Which kind of crisis a sentence is about: multinomial logistic regression over the
    same features as the crisis model."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts, labels = category_examples(rows)
    vec = TfidfVectorizer(analyzer=tokens, lowercase=False, sublinear_tf=True)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    return make_pipeline(vec, clf).fit(texts, labels)


def category_report(sets: dict[str, list[Row]], c: float) -> None:
    """For each held-out set: how often the category model names a crisis mail's category
    from the sentence the crisis model finds likeliest (the sentence a model hit reports),
    on the mails the lexicon misses (where the model is the only opinion) and on all."""
    print("category of a model hit, leave-one-set-out:", flush=True)
    for name, rows in sets.items():
        crisis = [r for r in rows if r["tier"] is not None and r.get("category")]
        if not crisis:
            continue
        rest = [r for n, rs in sets.items() if n != name for r in rs]
        scorer, namer = train(rest, c), train_category(rest, c)
        right = missed = missed_right = 0
        for r in crisis:
            ss = mail_sentences(r)
            if not ss:
                continue
            best = ss[int(scorer.predict_proba(ss)[:, 1].argmax())]
            ok = namer.predict([best])[0] == r["category"]
            right += ok
            if detect(r["subject"], r["body"], learned=False).tier is None:
                missed += 1
                missed_right += ok
        print(
            f"  {name:12} right on {right}/{len(crisis)} crisis mails; "
            f"on the {missed} the lexicon misses: {missed_right}",
            flush=True,
        )


def export_category(model: Any) -> dict[str, Any]:
    vec, clf = model.steps[0][1], model.steps[1][1]
    names = vec.get_feature_names_out()
    features = {
        str(n): [round(float(i), 5), [round(float(w), 4) for w in clf.coef_[:, k]]]
        for k, (n, i) in enumerate(zip(names, vec.idf_, strict=True))
    }
    return {
        "version": CATEGORY_VERSION,
        "classes": [str(c) for c in clf.classes_],
        "bias": [round(float(b), 6) for b in clf.intercept_],
        "features": features,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--report", action="store_true", help="leave-one-set-out report only")
    p.add_argument("--c", type=float, default=8.0, help="inverse regularisation strength")
    p.add_argument("--threshold", type=float, default=0.7, help="probability that counts")
    p.add_argument(
        "--also-at", type=float, nargs="*", default=[], help="more thresholds for the report"
    )
    p.add_argument(
        "--category-report", action="store_true", help="leave-one-set-out category report only"
    )
    p.add_argument(
        "--no-report", action="store_true", help="write the models without the report first"
    )
    args = p.parse_args()
    paths = sorted(x for x in DATA.glob("*.jsonl") if x.name != "golden.jsonl")
    sets = load(paths)
    print(f"{sum(map(len, sets.values()))} labelled mails in {len(sets)} sets", flush=True)
    if args.category_report:
        category_report(sets, args.c)
        return
    if not args.no_report:
        report(sets, args.c, sorted({args.threshold, *args.also_at}))
    if args.report:
        return
    model = train([r for rs in sets.values() for r in rs], args.c)
    data = export(model, args.threshold)
    OUT.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(data['features'])} features")
    rows = [r for rs in sets.values() for r in rs]
    named = export_category(train_category(rows, args.c))
    CATEGORY_OUT.write_text(json.dumps(named, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {CATEGORY_OUT.relative_to(ROOT)}: {len(named['classes'])} categories")


if __name__ == "__main__":
    main()
