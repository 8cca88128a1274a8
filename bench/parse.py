"""Benchmark ``helpdesk.parse.parse`` (and ``robots.judge``) in one process.

    .venv/bin/python bench/parse.py                 # 5,000 generated mails + the corpus
    .venv/bin/python bench/parse.py --n 20000 --repeat 5

Generated mails are realistic 2-4 KB patient mails (a fifth with an HTML alternative, a
tenth with a small PDF), built by ``tests.factories.patient_mail`` like ``bench/ingest.py``.
The corpus is /work/shared/corpus (read in place, never copied); it is skipped when absent.
Prints messages/second for parse() alone and for parse() + judge(), best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpdesk.parse import ParseError, parse  # noqa: E402
from helpdesk.robots import judge  # noqa: E402
from tests.factories import patient_mail  # noqa: E402

CORPUS = ROOT / ".." / "shared" / "corpus"


def make_mails(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    mails = []
    for i in range(n):
        html = None
        if i % 5 == 0:
            html = (
                "<html><body><p>Hello,</p><p>"
                + "I have a question about my visit. " * 20
                + "</p></body></html>"
            )
        attachment = None
        if i % 10 == 3:
            content = bytes(rng.getrandbits(8) for _ in range(600))
            attachment = ("insurance-card.pdf", content, "application/pdf")
        mails.append(
            patient_mail(
                sender=f"Patient {i} <patient{i}.{uuid.uuid4().hex[:6]}@patients.test>",
                subject=f"Question {i} about my account",
                html=html,
                attachment=attachment,
                size_hint=rng.randint(1800, 3200),
                rng=rng,
            )
        )
    return mails


def corpus_mails() -> list[bytes]:
    manifest = CORPUS / "MANIFEST.tsv"
    if not manifest.exists():
        return []
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))[1:]
    return [(CORPUS / row[0]).read_bytes() for row in rows]


def _parse_only(raw: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse(raw)


def _parse_judge(raw: bytes) -> None:
    with contextlib.suppress(ParseError):
        judge(parse(raw), own_addresses=frozenset({"help@clinic.test"}))


def rate(mails: Sequence[bytes], fn: Callable[[bytes], None], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for raw in mails:
            fn(raw)
        best = min(best, time.perf_counter() - start)
    return len(mails) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="generated mails (default 5000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
    args = ap.parse_args()

    generated = make_mails(args.n)
    avg = sum(map(len, generated)) / len(generated)
    print(f"generated: {len(generated)} mails, average {avg / 1024:.1f} KB")
    print(f"  parse          {rate(generated, _parse_only, args.repeat):>9,.0f} msg/s")
    print(f"  parse + judge  {rate(generated, _parse_judge, args.repeat):>9,.0f} msg/s")

    corpus = corpus_mails()
    if not corpus:
        print("corpus: not found, skipped")
        return
    total = sum(map(len, corpus))
    print(f"corpus: {len(corpus)} files, {total / 1e6:.1f} MB")
    corpus_rate = rate(corpus, _parse_only, args.repeat)
    mb_s = corpus_rate * total / len(corpus) / 1e6
    print(f"  parse          {corpus_rate:>9,.0f} msg/s  ({mb_s:.1f} MB/s)")
    print(f"  parse + judge  {rate(corpus, _parse_judge, args.repeat):>9,.0f} msg/s")
    slowest = []
    for raw in corpus:
        start = time.perf_counter()
        _parse_only(raw)
        slowest.append((time.perf_counter() - start, len(raw)))
    worst = max(slowest)
    print(f"  slowest single mail: {worst[0] * 1000:.1f} ms ({worst[1] / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
