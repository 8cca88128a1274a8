"""Finding the parts of a mail that the sender did not write just now.

Job: locate quoted replies (``>`` lines, "On … wrote:" / "El … escribió:" attributions
and the quote under them, Outlook "-----Original Message-----" and "From:/Sent:" header
blocks in English and Spanish and everything after them, HTML blockquotes and
Gmail/Outlook quote containers) and passages that repeat our own outgoing templates, so
that crisis words there never fire.

Invariants:
- Spans are half-open ``(start, end)`` offsets into the string given, sorted and
  non-overlapping; ``mask`` blanks them with spaces (newlines kept) so that every offset
  found in the masked text is an offset into the original.
- A forwarded message is not a quote: a patient who forwards their own words to us
  still means them, and a relative who forwards a text from someone in danger is telling
  us about it now. The header block under a forward marker ("---------- Forwarded
  message", "Begin forwarded message:", "Mensaje reenviado") is kept, and so is the first
  header block of a mail whose subject says it is a forward (``FW:``, ``Fwd:``, ``RV:``:
  Outlook forwards have no marker line). Older replies inside the forward stay quoted.
  A forward from an organisation or a role account (a pharmacy's leaflet, a clinic's
  newsletter, ``noreply@``, ``alerts@``) is a bulletin, not someone in danger: it is
  quoted like a reply.
- An attribution ("On … wrote:") followed by ``>`` lines quotes only those lines: text
  after them is new (bottom-posting, inline answers). Followed by unprefixed text, it
  quotes everything after it.
- An attribution or header block only counts at the start of a line; the text above it
  is always kept.
- Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from helpdesk.crisis.normalise import squash

__all__ = ["is_forward", "mask", "quoted_spans", "strip_quoted", "template_spans"]

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
_FORWARD_MARK = re.compile(
    r"(?:-{2,}[ \t]*(?:Forwarded message|Mensaje reenviado|Message transf[ée]r[ée])[ \t]*-{2,}"
    r"|Begin forwarded message:|Inicio del mensaje reenviado:)[ \t]*$",
    re.I,
)
_FORWARD_SUBJECT = re.compile(r"\s*(?:fwd?|rv|tr|enc|reenv)\s*(?:\[\d+\])?\s*:", re.I)
_REPLY_ATTRIBUTION = re.compile(r"[ \t]*(?:On|El|Le)\b", re.I)
_FROM_LINE = re.compile(r"^[ \t]*\*?(?:From|De)\*?[ \t]*:[ \t]*([^\n]*)", re.I | re.M)
# Who sends bulletins: role accounts (RFC 2142 and their kin) by the address's local part,
# and organisations by a word of their display name.
_ROLE_ADDRESS = re.compile(
    r"<?\b(?:no-?reply|do-?not-?reply|donotreply|news(?:letter)?s?|info|alerts?|notifications?"
    r"|notify|updates?|avisos?|boletin|bulletin|portal|office|programs?|events?|marketing"
    r"|support|team|people|hr|admin|mailer|rx|pharmacy|farmacia|wellness|nurse|nursing"
    r"|visits|drives|community|comunidad|contact|hello|reminders?|recordatorios?)@",
    re.I,
)
_ORG_NAME = re.compile(
    r"\b(?:pharmacy|farmacia|apothecary|drugstore|clinic|cl[ií]nica|health|salud|hospital"
    r"|medical|m[eé]dico|center|centre|centro|office|team|alerts?|news|bolet[ií]n|services?"
    r"|department|school|elementary|university|college|camp|assisted living|home health"
    r"|partners|association|foundation|society|council|group|community|comunidad|church"
    r"|iglesia|program|network|insurance|seguro|rx|inc|llc)\b",
    re.I,
)
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


def is_forward(subject: str) -> bool:
    """Whether a subject says its mail is a forward ("FW: …", "Fwd: …", "RV: …")."""
    return _FORWARD_SUBJECT.match(subject) is not None


def quoted_spans(text: str, *, forwarded: bool = False) -> list[tuple[int, int]]:
    """Spans of ``text`` that are quoted from earlier mail (``forwarded``: the mail's
    subject says it is a forward; see the module invariants)."""
    spans: list[tuple[int, int]] = []
    if ">" in text:
        spans.extend(m.span() for m in _QUOTE_LINE.finditer(text))
        if "<" in text:
            spans.extend(_blockquote_spans(text))
            h = _HTML_TO_END.search(text)
            if h:
                spans.append((h.start(), len(text)))
    spans.extend(_attribution_spans(text, forwarded))
    return _merge(spans)


def _next_attribution(text: str, pos: int) -> tuple[int, int] | None:
    """Start and end of the first attribution or header block starting on a line at or
    after ``pos`` (``pos`` is 0 or just after a line break): ``_TO_END.search``, faster."""
    m = _TO_END.match(text, pos)
    if m is not None:
        return m.span()
    m = _TO_END_LATER.search(text, pos)
    return None if m is None else (m.start() + 1, m.end())


def _attribution_spans(text: str, forwarded: bool) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    forward_header = forwarded
    pos = 0
    while (found := _next_attribution(text, pos)) is not None:
        start, header_end = found
        if _REPLY_ATTRIBUTION.match(text, start):
            end = _quote_run_end(text, header_end)
            if end is None:
                spans.append((start, len(text)))
                break
            spans.append((start, end))
            pos = end
            continue
        if forward_header or _forward_mark_above(text, start):
            forward_header = False  # the forward's own header: what follows is the forward
            if _from_organisation(text, start):
                spans.append((start, len(text)))
                break
            nl = text.find("\n", header_end)
            if nl < 0:
                break
            pos = nl + 1
            continue
        spans.append((start, len(text)))
        break
    return spans


def _from_organisation(text: str, start: int) -> bool:
    """Whether the header block at ``start`` names an organisation or a role account as
    its sender."""
    f = _FROM_LINE.search(text, start, start + 400)
    if f is None:
        return False
    sender = f.group(1)
    name = sender.split("<")[0]
    return bool(_ROLE_ADDRESS.search(sender) or _ORG_NAME.search(name) or "@group" in sender)


def _forward_mark_above(text: str, start: int) -> bool:
    """Whether one of the two non-blank lines above ``start`` is a forward marker."""
    lines = [line for line in text[max(0, start - 300) : start].splitlines() if line.strip()]
    return any(_FORWARD_MARK.search(line.strip()) for line in lines[-2:])


def _quote_run_end(text: str, pos: int) -> int | None:
    """After an attribution line ending at ``pos``: where the new text starts when the
    attribution is followed by ``>`` lines (and blank lines) and then more text; None
    when the quote runs to the end or is not ``>``-prefixed."""
    nl = text.find("\n", pos)
    if nl < 0:
        return None
    j = nl + 1
    seen_quote = False
    while j < len(text):
        k = text.find("\n", j)
        line_end = len(text) if k < 0 else k
        line = text[j:line_end].strip()
        if line.startswith(">"):
            seen_quote = True
        elif line:
            return j if seen_quote else None
        j = line_end + 1
    return None


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
    """Blank the spans (in any order, overlapping or not) with spaces, keeping newlines
    and every offset."""
    if not spans:
        return text
    parts: list[str] = []
    last = 0
    for a, z in _merge(list(spans)):
        parts.append(text[last:a])
        parts.append(re.sub(r"[^\n]", " ", text[a:z]))
        last = z
    parts.append(text[last:])
    return "".join(parts)


def strip_quoted(text: str, *, forwarded: bool = False) -> str:
    """``text`` without its quoted replies (what the sender wrote above them)."""
    spans = quoted_spans(text, forwarded=forwarded)
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
