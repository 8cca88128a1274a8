"""Text normalisation for crisis matching, with an offset map back to the original.

Job: turn one field of a mail (subject or body, plain text that may still carry HTML
tags and entities) into a lowercase, accent-folded, de-obfuscated string that the lexicon
patterns are written against, and remember where every normalised character came from.

Invariants:
- ``Normalised.span(start, end)`` maps any half-open span of ``text`` back to a span of
  the original string with ``0 <= start <= end <= len(original)``; a span covering a
  replaced chunk (a tag, an entity, a de-obfuscated word) widens to the whole chunk.
- Tags become one space, so words on both sides never glue together; zero-width
  characters and soft hyphens vanish, so words split by them do glue back.
- Obfuscation is undone only where it cannot create a new word out of ordinary text:
  leetspeak only inside tokens that are mostly letters, spaced letters only in runs of
  four or more single letters, fuzzy (edit distance 1) only towards the configured long
  stems and never for a word on the allow list.
- Pure: no I/O, no global state beyond bounded caches of pure functions.
"""

from __future__ import annotations

import html
import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["FuzzyIndex", "Normalised", "OffsetMap", "normalise", "squash", "token_bytes"]

_ZERO_WIDTH = frozenset(
    "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff"
)
# Typographic look-alikes that NFKC keeps: fold them to the ASCII the patterns use.
_PUNCT = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201b": "'",
        "\u00b4": "'",
        "`": "'",
        "\u02bc": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2010": "-",
        "\u2011": "-",
        "\u2012": "-",
        "\u2013": "-",
        "\u2014": "-",
        "\u2212": "-",
        "\u00a0": " ",
    }
)
_STAGE1 = re.compile(
    r"<[A-Za-z/!?][^<>]{0,2000}>"
    r"|&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
    r"|[^\x00-\x7f]"
)
_SPACED = re.compile(r"(?<![a-z0-9])[a-z](?:[ .\-_*]{1,2}[a-z]){3,}(?![a-z0-9])")
# Cheap pre-check for _SPACED on the token bytes (separators already turned to spaces).
_SPACED_GUARD = re.compile(rb"(?:^| )[a-z] +[a-z] +[a-z] +[a-z](?: |$)")
# Starts with the rare character class, so the regex engine skips ahead quickly.
_LEET_GUARD = re.compile(r"[0-9@$!|](?:(?<=[a-z][0-9@$!|])|(?=[a-z]))")
_LEET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789@$!|")
_LEET_MAP = str.maketrans("013457@$!|", "oieastasii")
_TOKEN_TABLE = bytes(c if (chr(c).isalnum() or c == 39) else 32 for c in range(128)) + bytes(
    range(128, 256)
)


@lru_cache(maxsize=4096)
def _fold_char(c: str) -> str:
    if c in _ZERO_WIDTH:
        return ""
    s = unicodedata.normalize("NFKC", c).casefold()
    s = unicodedata.normalize("NFD", s)
    s = "".join(ch for ch in s if not unicodedata.combining(ch))
    s = s.translate(_PUNCT)
    if s and not s.isprintable() and not s.isspace():
        return " "
    return s


@dataclass(frozen=True, slots=True)
class OffsetMap:
    """Piecewise map from one text to the text it was derived from."""

    norm_starts: tuple[int, ...]
    orig_starts: tuple[int, ...]
    orig_ends: tuple[int, ...]
    identity: tuple[bool, ...]
    orig_len: int

    def start(self, p: int) -> int:
        if not self.norm_starts:
            return 0
        i = max(bisect_right(self.norm_starts, p) - 1, 0)
        if self.identity[i]:
            return min(self.orig_starts[i] + (p - self.norm_starts[i]), self.orig_ends[i])
        return self.orig_starts[i]

    def end(self, p: int) -> int:
        if not self.norm_starts:
            return 0
        i = max(bisect_left(self.norm_starts, p) - 1, 0)
        if self.identity[i]:
            return min(self.orig_starts[i] + (p - self.norm_starts[i]), self.orig_ends[i])
        return self.orig_ends[i]


class _Builder:
    __slots__ = ("ids", "n", "ns", "oe", "os", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.ns: list[int] = []
        self.os: list[int] = []
        self.oe: list[int] = []
        self.ids: list[bool] = []
        self.n = 0

    def add(self, text: str, o_start: int, o_end: int, identity: bool) -> None:
        if not text:
            return
        if identity and self.ids and self.ids[-1] and self.oe[-1] == o_start:
            self.oe[-1] = o_end
        else:
            self.ns.append(self.n)
            self.os.append(o_start)
            self.oe.append(o_end)
            self.ids.append(identity)
        self.parts.append(text)
        self.n += len(text)

    def build(self, orig_len: int) -> tuple[str, OffsetMap]:
        m = OffsetMap(tuple(self.ns), tuple(self.os), tuple(self.oe), tuple(self.ids), orig_len)
        return "".join(self.parts), m


def _identity_map(n: int) -> OffsetMap:
    return OffsetMap((0,), (0,), (n,), (True,), n)


def _stage1(raw: str) -> tuple[str, OffsetMap]:
    """HTML tags/entities, NFKC, casefold, accent folding, zero-width removal."""
    if raw.isascii() and "<" not in raw and "&" not in raw:
        return raw.lower(), _identity_map(len(raw))
    b = _Builder()
    last = 0
    for m in _STAGE1.finditer(raw):
        a, z = m.span()
        if a > last:
            b.add(raw[last:a].lower(), last, a, True)
        tok = m.group()
        if tok[0] == "<" and len(tok) > 1:
            b.add(" ", a, z, False)
        elif tok[0] == "&" and len(tok) > 1:
            folded = "".join(_fold_char(c) for c in html.unescape(tok))
            b.add(folded, a, z, False)
        else:
            folded = _fold_char(tok)
            b.add(folded, a, z, len(folded) == 1)
        last = z
    if last < len(raw):
        b.add(raw[last:].lower(), last, len(raw), True)
    return b.build(len(raw))


_CHECKED_MAX = 200_000
_CONSONANTS = tuple(c.encode() for c in "bcdfghjklmnpqrstvwxz")


class FuzzyIndex:
    """Edit-distance-1 (with transpositions) correction towards a few long stems."""

    __slots__ = ("_allow", "_checked", "_heads", "_tails", "_targets", "correct")

    def __init__(self, targets: Iterable[str], allow: Iterable[str]) -> None:
        # Sorted, not a set: a token one edit from two targets ("overdoses": overdose,
        # overdosed) must get the same correction in every process (str hashing is
        # salted per process, so a set's order is not).
        self._targets = tuple(sorted({t for t in targets if len(t) >= 6}))
        self._allow = frozenset(a.encode() for a in (*allow, *self._targets))
        self._heads = frozenset(t[:3].encode() for t in self._targets)
        self._tails = frozenset(t[-3:].encode() for t in self._targets)
        self.correct = lru_cache(maxsize=8192)(self._correct)
        # Tokens already known to need no correction: a bounded memo of a pure function,
        # so that the common words of a mail cost one set difference.
        self._checked: set[bytes] = set()

    def candidates(self, toks: frozenset[bytes]) -> list[bytes]:
        """Tokens worth an edit-distance check (cheap gate on length, head and tail)."""
        new = toks - self._checked
        if not new:
            return []
        heads, tails, allow = self._heads, self._tails, self._allow
        out = [
            t
            for t in new
            if 5 <= len(t) <= 16 and (t[:3] in heads or t[-3:] in tails) and t not in allow
        ]
        if len(self._checked) > _CHECKED_MAX:
            self._checked.clear()
        self._checked.update(new.difference(out))
        return out

    def _correct(self, tok: str) -> str | None:
        for t in self._targets:
            if abs(len(t) - len(tok)) <= 1 and _osa_le1(tok, t):
                return t
        return None


def _osa_le1(a: str, b: str) -> bool:
    """True when a and b differ by at most one edit (insert, delete, substitute, swap)."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    i = 0
    while i < min(la, lb) and a[i] == b[i]:
        i += 1
    if la == lb:
        if a[i + 1 :] == b[i + 1 :]:
            return True
        return i + 1 < la and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2 :] == b[i + 2 :]
    if la + 1 == lb:
        return a[i:] == b[i + 1 :]
    if lb + 1 == la:
        return a[i + 1 :] == b[i:]
    return False


def _leet_ok(tok: str) -> bool:
    letters = sum(c.isalpha() for c in tok)
    return letters >= 3 and letters > len(tok) - letters


def token_bytes(text: str) -> bytes:
    """``text`` as ASCII-ish bytes with every separator but the apostrophe turned to space."""
    return text.encode("utf-8", "ignore").translate(_TOKEN_TABLE)


def _stage2(
    text: str, tb: bytes, toks: frozenset[bytes], fuzzy: FuzzyIndex | None
) -> tuple[str, OffsetMap | None]:
    """Spaced letters, leetspeak and misspellings of the long stems, token by token."""
    repl: list[tuple[int, int, str]] = []
    # Spaced-out words need several one-letter tokens beyond the usual "i", "a", "y", "o".
    if sum(c in toks for c in _CONSONANTS) >= 2 and _SPACED_GUARD.search(tb):
        for m in _SPACED.finditer(text):
            repl.append((m.start(), m.end(), "".join(c for c in m.group() if c.isalpha())))
    last_end = -1
    for g in _LEET_GUARD.finditer(text):
        a = g.start()
        if a < last_end:
            continue
        while a > 0 and text[a - 1] in _LEET_CHARS:
            a -= 1
        z = g.end()
        while z < len(text) and text[z] in _LEET_CHARS:
            z += 1
        last_end = z
        tok = text[a:z]
        if _leet_ok(tok):
            fixed = tok.translate(_LEET_MAP)
            if fixed != tok:
                repl.append((a, z, fixed))
    if fuzzy is not None:
        hits = {
            t: fix
            for b in fuzzy.candidates(toks)
            if (fix := fuzzy.correct(t := b.decode("utf-8", "ignore"))) is not None
        }
        if hits:
            rx = re.compile(r"\b(?:" + "|".join(map(re.escape, hits)) + r")\b")
            repl.extend((m.start(), m.end(), hits[m.group()]) for m in rx.finditer(text))
    if not repl:
        return text, None
    repl.sort()
    b = _Builder()
    last = 0
    for a, z, new in repl:
        if a < last:  # overlapping candidates: the first one wins
            continue
        if a > last:
            b.add(text[last:a], last, a, True)
        b.add(new, a, z, False)
        last = z
    if last < len(text):
        b.add(text[last:], last, len(text), True)
    return b.build(len(text))


@dataclass(frozen=True, slots=True)
class Normalised:
    """A normalised field and the maps that lead back to the original text."""

    text: str
    maps: tuple[OffsetMap, ...]

    def span(self, start: int, end: int) -> tuple[int, int]:
        for m in reversed(self.maps):
            start, end = m.start(start), m.end(end)
        return start, max(start, end)


def normalise(raw: str, fuzzy: FuzzyIndex | None = None) -> Normalised:
    """Normalise one field; see the module docstring for what is folded."""
    t1, m1 = _stage1(raw)
    tb = token_bytes(t1)
    toks = frozenset(tb.split())
    t2, m2 = _stage2(t1, tb, toks, fuzzy)
    if m2 is None:
        return Normalised(t1, (m1,))
    return Normalised(t2, (m1, m2))


_SQUASH_NON_WORD = re.compile(r"[^a-z0-9]+")


def squash(text: str) -> str:
    """Words only, single-spaced: the form used to compare text with our own templates."""
    t, _ = _stage1(text)
    return _SQUASH_NON_WORD.sub(" ", t).strip()
