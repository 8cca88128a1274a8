"""Crisis detector bench and dev-set report.

    python bench/classify.py            # classifications per second on 2-4 KB mails
    python bench/classify.py --report   # recall / precision per category on the dev set
    python bench/classify.py --report tests/data/crisis/fresh.jsonl   # ... on another set

The throughput mails are built here from a fixed seed: mostly routine patient mail
(refills, billing, appointments, in English and Spanish, with quoted replies and
signatures) with a few crisis sentences mixed in, each padded to 2-4 KB.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpdesk.crisis import detect  # noqa: E402

DEVSET = ROOT / "tests" / "data" / "crisis" / "devset.jsonl"

_ROUTINE = [
    "Hi, could you please send a refill for my metformin to the Walgreens on 5th street.",
    "I was charged twice for the copay on my last visit, can someone look into it?",
    "My appointment is on Tuesday at 3pm but I need to move it to Thursday if possible.",
    "The video link did not work on my phone so I called in instead, sorry about that.",
    "Thanks again to Dr Kim, she was very patient and explained everything clearly.",
    "My insurance changed at the start of the year, the new member ID is attached.",
    "Can you tell me whether my lab results are back yet, I did the blood draw Monday.",
    "Hola, necesito cambiar mi cita del lunes para el miercoles por la tarde, gracias.",
    "Me cobraron dos veces la consulta, pueden revisar mi cuenta por favor.",
    "I can't log in to the portal, the password reset email never arrives.",
    "Is it safe to take ibuprofen with lisinopril? The pharmacist said to ask you.",
    "This wait is killing me, I have been on hold for forty minutes this morning.",
    "My blood pressure readings at home have been around 135 over 85 this week.",
    "Dr Osei asked me to send my glucose log before the follow up, it is attached.",
    "Can I take my levothyroxine at night instead of the morning? It upsets my stomach.",
    "The pharmacy says the prior authorization for my inhaler is still pending.",
    "My son has a mild fever and a runny nose, should we book a video visit or wait?",
    "Please cancel the appointment on the 14th, I will be travelling for work.",
    "I got a bill from the lab but I thought the test was covered by my plan.",
    "Could you resend the after-visit summary, I deleted the email by mistake.",
    "The new dose of sertraline seems to be helping, sleeping better this week.",
    "I need a note for my employer saying I was seen on Monday for the back pain.",
    "Is there a way to update my address in the portal? I moved last month.",
    "Mi hija necesita una cita con la pediatra, tiene tos desde hace una semana.",
    "Quisiera saber si aceptan el seguro de mi trabajo, gracias de antemano.",
    "Could the doctor call me back after 5pm, I am at work until then.",
    "My knee still swells a bit after running but the pain is much better.",
    "Do I need to stop eating before the blood work on Friday morning?",
    "I am allergic to penicillin, please make sure that is on my chart.",
    "The reminder text said Wednesday but the portal says Thursday, which is right?",
    "Thank you for the quick refill last time, the pharmacy had it ready the same day.",
    "My husband also wants to register as a patient, what does he need to send?",
]
_CRISIS = [
    "Honestly I don't want to be here anymore and I have been saving my pills.",
    "My chest hurts and my left arm feels heavy since this morning.",
    "me quiero morir, ya no aguanto mas",
]
_TAIL = (
    "\n\n--\nSent from my phone\n\nOn Mon, Jun 3, 2024 at 9:12 AM Help Desk <help@example.org> "
    "wrote:\n> Thank you for contacting us. If you are thinking about suicide, call or text the "
    "988 Suicide & Crisis Lifeline.\n> We will reply within one business day.\n"
)


def make_mails(n: int, seed: int = 7) -> list[tuple[str, str]]:
    rnd = random.Random(seed)
    mails = []
    for i in range(n):
        target = rnd.randint(2048, 4096)
        parts: list[str] = []
        size = 0
        while size < target - len(_TAIL):
            s = rnd.choice(_ROUTINE)
            if i % 20 == 0 and rnd.random() < 0.05:
                s = rnd.choice(_CRISIS)
            parts.append(s)
            size += len(s) + 1
        body = " ".join(parts) + (_TAIL if i % 3 == 0 else "")
        mails.append((rnd.choice(["Question", "Re: appointment", "refill", ""]), body))
    return mails


def bench(n: int = 2000, repeat: int = 3) -> float:
    mails = make_mails(n)
    for s, b in mails[:50]:
        detect(s, b)  # warm the lexicon and caches
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for s, b in mails:
            detect(s, b)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def load_devset(path: Path = DEVSET) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Detection recall/precision overall and per category, plus tier agreement.

    A mail counts as detected when ``detect`` gives any tier; per-category recall is
    over mails labelled with that category, per-category precision over mails whose
    predicted category is that category (correct when the mail is a labelled positive).
    """
    per: dict[str, dict[str, int]] = {}
    tp = fp = fn = tn = tier_ok = cat_ok = 0
    misses: list[str] = []
    for r in rows:
        res = detect(r["subject"], r["body"])
        expected_pos = r["tier"] is not None
        predicted_pos = res.tier is not None
        if expected_pos:
            c = per.setdefault(r["category"], {"n": 0, "tp": 0, "pred": 0, "pred_ok": 0})
            c["n"] += 1
            c["tp"] += predicted_pos
            tier_ok += res.tier == r["tier"]
            cat_ok += res.category == r["category"]
        if predicted_pos and res.category:
            c2 = per.setdefault(res.category, {"n": 0, "tp": 0, "pred": 0, "pred_ok": 0})
            c2["pred"] += 1
            c2["pred_ok"] += expected_pos
        if expected_pos and predicted_pos:
            tp += 1
        elif expected_pos:
            fn += 1
            misses.append(f"MISS {r['id']}")
        elif predicted_pos:
            fp += 1
            misses.append(f"FALSE {r['id']} {res.rule_ids}")
        else:
            tn += 1
    positives = tp + fn
    return {
        "recall": tp / positives if positives else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "tier_agreement": tier_ok / positives if positives else 1.0,
        "category_agreement": cat_ok / positives if positives else 1.0,
        "per_category": per,
        "errors": misses,
    }


def report(m: dict[str, Any]) -> str:
    lines = [f"{'category':24} {'n':>4} {'recall':>7} {'pred':>5} {'precision':>9}"]
    for cat, c in sorted(m["per_category"].items()):
        rec = c["tp"] / c["n"] if c["n"] else float("nan")
        prec = c["pred_ok"] / c["pred"] if c["pred"] else float("nan")
        lines.append(f"{cat:24} {c['n']:>4} {rec:>7.3f} {c['pred']:>5} {prec:>9.3f}")
    lines.append(
        f"overall: recall {m['recall']:.3f} precision {m['precision']:.3f} "
        f"(tp {m['tp']} fp {m['fp']} fn {m['fn']} tn {m['tn']}); "
        f"tier agreement {m['tier_agreement']:.3f}, "
        f"category agreement {m['category_agreement']:.3f}"
    )
    lines.extend(m["errors"])
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--report",
        nargs="*",
        metavar="JSONL",
        help="recall/precision on labelled sets (default: the dev set) instead of speed",
    )
    p.add_argument("-n", type=int, default=2000, help="mails for the speed bench")
    args = p.parse_args()
    if args.report is not None:
        for path in [Path(p) for p in args.report] or [DEVSET]:
            rows = load_devset(path)
            print(f"{path.name}: {len(rows)} mails")
            print(report(evaluate(rows)))
    else:
        rate = bench(args.n)
        print(f"{rate:,.0f} classifications/s (2-4 KB mails, one core)")


if __name__ == "__main__":
    main()
