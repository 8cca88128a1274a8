"""Finding the parts of a mail that the sender did not write just now.

Job: locate quoted replies (``>`` lines, "On … wrote:" / "El … escribió:" attributions
and everything after them, Outlook "-----Original Message-----" and "From:/Sent:" header
blocks in English and Spanish, HTML blockquotes and Gmail/Outlook quote containers) and
passages that repeat our own outgoing templates, so that crisis words there never fire.

Invariants:
- Spans are half-open ``(start, end)`` offsets into the string given, sorted and
  non-overlapping; ``mask`` blanks them with spaces (newlines kept) so that every offset
  found in the masked text is an offset into the original.
- A forwarded message ("---------- Forwarded message") is not a quote: a patient who
  forwards their own words to us still means them.
- An attribution or header block only counts at the start of a line; the text above it
  is always kept.
- Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from helpdesk.crisis.normalise import squash

__all__ = ["mask", "quoted_spans", "strip_quoted", "template_spans"]

_QUOTE_LINE = re.compile(r"^[ \t]*>[^\n]*(?:\n|$)", re.M)
# What starts an attribution or header block (it counts only at the start of a line).
_ATTRIBUTION = (
    r"[ \t]*(?:"
    # "On Mon, 3 Jun 2024 at 10:02, Help Desk <help@x> wrote:" possibly over two lines
    r"On\b[^\n]{0,250}(?:\n[^\n]{0,250})?\bwrote:[ \t]*$"
    r"|El\b[^\n]{0,250}(?:\n[^\n]{0,250})?\bescribi(?:o|ó|\u0301o):[ \t]*$"
    r"|Le\b[^\n]{0,250}(?:\n[^\n]{0,250})?\ba (?:é|e)crit[ \t]*:[ \t]*$"
    r"|-{2,}[ \t]*(?:Original Message|Mensaje original|Message d'origine)[ \t]*-{2,}"
    r"|_{10,}[ \t]*\n[ \t]*(?:From|De):"
    r"|(?:From|De|\*From:\*)[ \t]*:?[^\n]*\n(?:[^\n]*\n){0,3}?[ \t]*\*?"
    r"(?:Sent|Date|Enviado|Fecha|Enviado el)\*?[ \t]*:"
    r")"
)
_TO_END = re.compile("^" + _ATTRIBUTION, re.M | re.I)
# The same after a line break: with a literal first character the regex engine skips
# from one line break to the next instead of trying every offset.
_TO_END_LATER = re.compile(r"\n" + _ATTRIBUTION, re.M | re.I)
_HTML_TO_END = re.compile(
    r"<div[^>]*\b(?:id=[\"']?(?:divRplyFwdMsg|appendonsend)|class=[\"']?gmail_quote"
    r"(?![\w-]))",
    re.I,
)
_HTML_QUOTE_TAG = re.compile(r"<(/?)blockquote\b[^>]*>", re.I)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_LINE = re.compile(r"[^\n]+")


def _blockquote_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    depth = 0
    start = 0
    for m in _HTML_QUOTE_TAG.finditer(text):
        if not m.group(1):
            if depth == 0:
                start = m.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                spans.append((start, m.end()))
    if depth:
        spans.append((start, len(text)))
    return spans


def quoted_spans(text: str) -> list[tuple[int, int]]:
    """Spans of ``text`` that are quoted from earlier mail."""
    spans: list[tuple[int, int]] = []
    if ">" in text:
        spans.extend(m.span() for m in _QUOTE_LINE.finditer(text))
        if "<" in text:
            spans.extend(_blockquote_spans(text))
            h = _HTML_TO_END.search(text)
            if h:
                spans.append((h.start(), len(text)))
    start = _to_end(text)
    if start is not None:
        spans.append((start, len(text)))
    return _merge(spans)


def _to_end(text: str) -> int | None:
    """Where the first attribution or header block starts (``_TO_END.search``)."""
    if _TO_END.match(text):
        return 0
    m = _TO_END_LATER.search(text)
    return None if m is None else m.start() + 1


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, z in sorted(spans):
        if out and a <= out[-1][1]:
            if z > out[-1][1]:
                out[-1] = (out[-1][0], z)
        else:
            out.append((a, z))
    return out


def mask(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """Blank the spans with spaces, keeping newlines and every offset."""
    if not spans:
        return text
    parts: list[str] = []
    last = 0
    for a, z in spans:
        parts.append(text[last:a])
        parts.append(re.sub(r"[^\n]", " ", text[a:z]))
        last = z
    parts.append(text[last:])
    return "".join(parts)


def strip_quoted(text: str) -> str:
    """``text`` without its quoted replies (what the sender wrote above them)."""
    spans = quoted_spans(text)
    if not spans:
        return text
    parts: list[str] = []
    last = 0
    for a, z in spans:
        parts.append(text[last:a])
        last = z
    parts.append(text[last:])
    return re.sub(r"\n{3,}", "\n\n", "".join(parts)).strip()


@lru_cache(maxsize=64)
def _template_blob(templates: tuple[str, ...]) -> tuple[str, frozenset[str]]:
    lines = frozenset(
        s for t in templates for line in t.splitlines() if (s := squash(line.lstrip("> \t")))
    )
    blob = " " + " ".join(squash(t) for t in templates) + " "
    return blob, lines


def template_spans(text: str, templates: Sequence[str]) -> list[tuple[int, int]]:
    """Spans of ``text`` (lines, or sentences within lines) that repeat our own templates.

    A line or sentence counts when its squashed words equal a template line or, for
    pieces of 12 characters or more, occur inside a template (a patient's mail client
    may rewrap our lines).
    """
    if not templates:
        return []
    blob, lines = _template_blob(tuple(templates))
    spans: list[tuple[int, int]] = []
    for lm in _LINE.finditer(text):
        pieces = [lm] if _own(lm.group(), blob, lines) else list(_SENTENCE.finditer(lm.group()))
        base = lm.start() if pieces and pieces[0] is not lm else 0
        for p in pieces:
            if p is lm or _own(p.group(), blob, lines):
                spans.append((base + p.start(), base + p.end()))
    return _merge(spans)


def _own(piece: str, blob: str, lines: frozenset[str]) -> bool:
    s = squash(piece.lstrip("> \t"))
    if not s:
        return False
    if s in lines:
        return True
    return len(s) >= 12 and f" {s} " in blob
