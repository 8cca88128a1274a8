"""The shared real-world corpus (read in place, never copied): parse() never crashes, and
judge() suppresses the acknowledgement for every bounce, auto-reply and list mail.

ParseError is allowed only where it is explained in ``EXPECTED_PARSE_ERRORS``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from helpdesk.parse import InboundEmail, ParseError, parse
from helpdesk.robots import judge

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus"
MANIFEST = CORPUS / "MANIFEST.tsv"
OWN = frozenset({"help@clinic.test"})
ROBOT_KINDS = frozenset({"bounce", "auto-reply", "list"})

# path -> why it is not a mail
EXPECTED_PARSE_ERRORS = {
    "cpython/msg_19.txt": "a mailman digest body without any header block",
}
# normal mail we suppress on purpose, path -> why
KNOWN_FALSE_SUPPRESSIONS = {
    "flanker/long-links.eml": "a hand-made fixture sent from postmaster@ (treated as a mailer)",
}


def _rows() -> list[tuple[str, str]]:
    if not MANIFEST.exists():
        return []
    with MANIFEST.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    return [(row[0], row[5]) for row in rows[1:]]


ROWS = _rows()
needs_corpus = pytest.mark.skipif(not ROWS, reason=f"corpus not found at {CORPUS}")


def _parse(path: str) -> InboundEmail | None:
    try:
        return parse((CORPUS / path).read_bytes())
    except ParseError:
        return None


@needs_corpus
@pytest.mark.parametrize(("path", "kind"), ROWS, ids=[p for p, _ in ROWS])
def test_parse_never_crashes(path: str, kind: str) -> None:
    raw = (CORPUS / path).read_bytes()
    try:
        email = parse(raw)
    except ParseError:
        assert path in EXPECTED_PARSE_ERRORS, f"unexplained ParseError for {path} ({kind})"
        return
    assert path not in EXPECTED_PARSE_ERRORS
    assert email.size == len(raw)
    assert email.message_id.startswith("<") and email.message_id.endswith(">")
    assert "\n" not in email.subject and "\r" not in email.subject and len(email.subject) <= 998
    assert email.date is None or email.date.utcoffset() is not None
    for att in email.attachments:
        assert att.filename and not set(att.filename) & set("/\\\r\n\x00\"'")
        assert not att.filename.startswith(".") and len(att.filename) <= 150
    email.text.encode("utf-8")  # no lone surrogates anywhere we hand text out
    email.subject.encode("utf-8")
    judge(email, own_addresses=OWN)


@needs_corpus
def test_every_robot_is_suppressed() -> None:
    missed = []
    for path, kind in ROWS:
        if kind not in ROBOT_KINDS:
            continue
        email = _parse(path)
        if email is None or not judge(email, own_addresses=OWN).suppress_reply:
            missed.append(f"{kind} {path}")
    assert missed == []


@needs_corpus
def test_people_are_not_suppressed() -> None:
    wrong = {}
    for path, kind in ROWS:
        if kind != "normal":
            continue
        email = _parse(path)
        if email is not None and (v := judge(email, own_addresses=OWN)).suppress_reply:
            wrong[path] = v.reason
    print(f"normal mail suppressed: {len(wrong)}: {wrong}")
    assert set(wrong) == set(KNOWN_FALSE_SUPPRESSIONS)
