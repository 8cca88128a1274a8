"""Which rules can possibly match a text: one literal scan instead of a regex per rule.

Job: from each compiled rule pattern, derive the literal sets that every match must
contain (from the regex parser's tree), pick the rarest as the place to try the rule
and keep the others as presence gates; then find all literals of all rules in a
normalised text in one pass (Aho-Corasick when ``pyahocorasick`` is installed, a
``str.find`` loop otherwise), so that a rule's regex only runs near its literals, and
not at all when one of its other necessary literals is missing.

Invariants:
- Sound: a literal set is derived only through constructs that force it (literal runs,
  groups, alternations whose every branch forces one, repeats with a minimum of one);
  anything else (classes, optional parts, look-arounds) yields nothing. A literal is a
  word start only when a ``\b`` or a separator class stands right before it. So a rule
  with a literal set none of which occurs in a text cannot match that text.
- A pattern that forces no usable literal (three characters, or two at a word start)
  is gated by the rule's declared trigger stems instead.
- Literals and text go through the same ``spaced`` map (every non-alphanumeric ASCII
  character to a space, one leading space), so offsets shift by exactly one.
- Pure: no I/O; the matcher is built once per lexicon.
"""

from __future__ import annotations

import importlib
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate, chain, repeat
from operator import sub
from typing import Any, Protocol

# The regex parser is the only sound source of what a pattern forces; its modules are
# private in 3.11+ (and the public aliases warn), hence the dynamic import.
sre: Any = importlib.import_module("re._constants")
sre_parse: Any = importlib.import_module("re._parser")

__all__ = [
    "USEFUL_PRESENCE",
    "LiteralIndex",
    "branches",
    "first_literals",
    "gate_groups",
    "literal_key",
    "necessary_literals",
    "presence_regex",
    "quick_start",
    "set_cost",
    "spaced",
]

# Words too common in patient mail to gate anything: a set containing one of them costs
# more than a longer set of rare words.
_COMMON = frozenset(
    """
    the and you for not all are was but can get got had has have her him his how its
    may now off one our out see she too two way who why yes any day take took make made
    will with this that from they them then than been just like more some what when
    your here there very much over back down also each even into need only same still
    such want well were would could should about after again because before being other
    their these those which while going gonna know think feel time really since doctor
    appointment please thanks thank help refill pharmacy insurance portal visit
    better blood email before instead pain should need still last next first week
    today call could would does did done give gave used use using keep kept said
    left right work home phone send sent sure tell told ask asked same new old
    para que con los las por una del mas pero sus mis esta este todo como muy sin hay
    tengo estoy quiero puedo necesito cita favor gracias hola mi me se le lo la el en de
    i'm i've i'll i'd ive ill isn aren wasn weren don doesn didn won wouldn couldn can't
    cannot not none nothing never again always around here everyone everybody people
    family kids they said says say stop end ending still able unable without our ours
    mine myself yourself everything something anything all every both few many most
    is am be being been do doing going got into onto upon under just should might must
    ready right next front hand hands life live living morning night tonight week days
    it this that these its who whom whose where there which while when then than though
    tome tomo toma tomar tomando dosis vez veces otra otro mejor ganas deseo pienso pense
    dia dias noche semana mes meses ano anos hoy ahora siempre nada nadie todos todas
    """.split()  # noqa: SIM905 - a word list reads and diffs better as text
)
_UNKNOWN = None


# A literal is (text, word_start): word_start when the pattern puts a word boundary or a
# separator right before it, so that it can be looked for as the start of a word.
Literal = tuple[str, bool]


def _cost(lit: Literal) -> float:
    """A rough guess of how often ``lit`` occurs in patient mail (lower is rarer).

    Short words are common and short word pieces (``ing``, ``ood``) far more so: a
    piece that need not start a word is found inside many other words. Each further
    word of a phrase makes it much rarer than its rarest word.
    """
    words = lit[0].replace("'", " ").split()
    if not words:
        return 200.0
    costs = [_word_cost(w, lit[1] or i > 0) for i, w in enumerate(words)]
    return min(costs) * 0.15 ** (len(words) - 1)


def _word_cost(core: str, word_start: bool) -> float:
    if word_start:
        if len(core) < 3:
            return 50.0
        if core in _COMMON:
            return 20.0
        return {3: 4.0, 4: 1.0}.get(len(core), 0.3)
    return {0: 200.0, 1: 200.0, 2: 100.0, 3: 40.0, 4: 8.0, 5: 2.0}.get(len(core), 0.6)


def _usable(lit: Literal) -> bool:
    """Long enough to gate: three characters, or two at the start of a word."""
    n = len(lit[0].strip(" '"))
    return n >= 3 or (n == 2 and lit[1])


def set_cost(lits: frozenset[Literal]) -> float:
    """A rough guess of how often some literal of ``lits`` occurs (lower is rarer)."""
    return _set_cost(lits)


# A presence gate this common is nearly always met: it would only slow the scan down.
USEFUL_PRESENCE = 40.0


def _set_cost(lits: frozenset[Literal]) -> float:
    return sum(_cost(x) for x in lits)


def _separator(op: Any, av: Any) -> bool:
    """A class or a repeat of one that only matches non-word characters (spaces...)."""
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
        return av[0] >= 1 and len(av[2]) == 1 and _separator(*av[2][0])
    if op is sre.IN and av and av[0][0] is sre.NEGATE:
        # [^\w...]: whatever it matches is not a word character
        return any(o is sre.CATEGORY and a == sre.CATEGORY_WORD for o, a in av[1:])
    if op is sre.IN:
        return all(
            (o is sre.CATEGORY and a == sre.CATEGORY_SPACE)
            or (o is sre.LITERAL and not chr(a).isalnum())
            for o, a in av
        )
    return False


_MAX_RUN = 64


def _finite(items: Sequence[tuple[Any, Any]]) -> set[str] | None:
    """Every text ``items`` can match when that is a small finite set, else None.

    A separator (see ``_separator``) counts as one space: literals are looked for in
    text whose separator runs are squeezed to one space.
    """
    out = {""}
    for op, av in items:
        if op is sre.AT:
            continue
        got: set[str] | None
        if op is sre.LITERAL:
            got = {chr(av)}
        elif _separator(op, av):
            got = {" "}
        elif op is sre.SUBPATTERN:
            got = _finite(av[-1])
        elif op is sre.BRANCH:
            got = set()
            for alt in av[1]:
                sub = _finite(alt)
                if sub is None:
                    return None
                got |= sub
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT) and av[0] == 0 and av[1] == 1:
            sub = _finite(av[2])
            got = None if sub is None else sub | {""}
        else:
            return None
        if got is None or len(out) * len(got) > _MAX_RUN:
            return None
        out = {a + b for a in out for b in got}
    return out


def _literals(texts: Iterable[str], boundary: bool) -> frozenset[Literal]:
    """Texts of a run as literals: separator runs as one space, a leading one a word start."""
    out = set()
    for t in texts:
        squeezed_text = " ".join(t.split(" ")) if "  " in t else t
        while "  " in squeezed_text:
            squeezed_text = squeezed_text.replace("  ", " ")
        word_start = boundary or squeezed_text.startswith(" ")
        out.add((squeezed_text.lstrip(" "), word_start))
    return frozenset(out)


def _necessary(items: Iterable[tuple[Any, Any]], boundary: bool) -> frozenset[Literal] | None:
    """Literals one of which every match of ``items`` contains, or None.

    ``boundary``: the text just before ``items`` is a word boundary. Consecutive parts
    with a small finite set of texts (literals, separators, short alternations and
    optional parts) make one run whose texts are the literals: "can't go on" is far
    rarer than any of its words.
    """
    options: list[frozenset[Literal]] = []
    run: set[str] | None = None
    run_boundary = boundary

    def flush() -> None:
        nonlocal run
        if run is not None:
            options.append(_literals(run, run_boundary))
            run = None

    for op, av in items:
        if op is sre.AT:  # zero-width: the literal run goes on
            if av is sre.AT_BOUNDARY and run is None:
                boundary = True
            continue
        fin = _finite([(op, av)])
        if fin is not None and (run is not None or fin != {" "}):
            if run is None:
                run, run_boundary = {""}, boundary
            if len(run) * len(fin) <= _MAX_RUN:
                run = {a + b for a in run for b in fin}
                boundary = fin == {" "}
                continue
        if fin == {" "}:
            boundary = True
            continue
        flush()
        found: frozenset[Literal] | None = None
        if op is sre.SUBPATTERN:
            found = _necessary(av[-1], boundary)
        elif op is sre.ATOMIC_GROUP:
            found = _necessary(av, boundary)
        elif op is sre.BRANCH:
            subs = [_necessary(b, boundary) for b in av[1]]
            if all(s for s in subs):
                found = frozenset().union(*(s for s in subs if s))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT) and av[0] >= 1:
            found = _necessary(av[2], boundary)
        if found:
            options.append(found)
        boundary = _separator(op, av)
    flush()
    usable = [o for o in options if all(_usable(x) for x in o)]
    if not usable:
        return _UNKNOWN
    return min(usable, key=_set_cost)


_MAX_LEADS = 300
_ZERO_WIDTH = ("AT", "ASSERT", "ASSERT_NOT")


def _lead(items: Sequence[tuple[Any, Any]]) -> set[str] | None:
    """Strings one of which every match of ``items`` starts with (None when unknown)."""
    i = 0
    while i < len(items) and str(items[i][0]) in _ZERO_WIDTH:
        i += 1
    if i >= len(items):
        return {""}
    op, av = items[i]
    if op is sre.LITERAL:
        run = []
        while i < len(items) and items[i][0] is sre.LITERAL:
            run.append(chr(items[i][1]))
            i += 1
        head = "".join(run)
        tails = _lead(items[i:]) if i < len(items) else {""}
        if tails is None or len(tails) > _MAX_LEADS:
            return {head}
        return {head + t for t in tails}
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT) and av[0] == 0 and av[1] == 1:
        # an optional part: leads with it and leads without it ("can'?t")
        opt = _finite(av[2])
        tails = _lead(items[i + 1 :]) if i + 1 < len(items) else {""}
        if opt is None or tails is None or len(opt) * len(tails) > _MAX_LEADS:
            return None
        return {o + t for o in opt | {""} for t in tails}
    if _separator(op, av):  # a separator inside a lead is one space (squeezed text)
        tails = _lead(items[i + 1 :]) if i + 1 < len(items) else {""}
        if tails is None or len(tails) > _MAX_LEADS:
            return {" "}
        return {" " + t for t in tails}
    if op is sre.SUBPATTERN:
        return _lead(list(av[-1]))
    if op is sre.BRANCH:
        out: set[str] = set()
        for alt in av[1]:
            got = _lead(list(alt))
            if got is None:
                return None
            out |= got
        return out
    return None


def _first(items: Sequence[tuple[Any, Any]]) -> frozenset[str] | None:
    """Word-start literals one of which begins every match of ``items``."""
    i = 0
    boundary = False
    while i < len(items) and str(items[i][0]) in _ZERO_WIDTH:
        boundary = boundary or (items[i][0] is sre.AT and items[i][1] is sre.AT_BOUNDARY)
        i += 1
    if not boundary:
        return None
    leads = _lead(items[i:])
    if not leads or any(len(x) < 2 or not x[0].isalnum() for x in leads):
        return None
    return frozenset(leads)


def first_literals(rx: re.Pattern[str]) -> frozenset[str] | None:
    """Literals that begin every match of ``rx``, each right after a word boundary.

    A rule with such literals can be tried at each of their offsets alone
    (``rx.match(text, offset)``) instead of scanning a window around them.
    """
    try:
        tree = sre_parse.parse(rx.pattern, rx.flags)
    except Exception:
        return None
    return _first(list(tree))


def _starts(items: Sequence[tuple[Any, Any]]) -> set[str] | None:
    """Strings one of which every match of ``items`` starts with (None when unknown).

    Like ``_lead``, but also through alternatives and groups followed by more pattern and
    through repeats: ``(?:a|b)?c`` starts with ``a``, ``b`` or ``c``.
    """
    i = 0
    while i < len(items) and str(items[i][0]) in _ZERO_WIDTH:
        i += 1
    if i >= len(items):
        return {""}
    op, av = items[i]
    rest = list(items[i + 1 :])
    if op is sre.LITERAL:
        run = []
        while i < len(items) and items[i][0] is sre.LITERAL:
            run.append(chr(items[i][1]))
            i += 1
        head = "".join(run)
        tails = _starts(items[i:]) if i < len(items) else {""}
        if tails is None or len(tails) > _MAX_LEADS:
            return {head}
        return {head + t for t in tails}
    if op is sre.SUBPATTERN:
        if av[1] or av[2]:  # inline flags: unknown
            return None
        return _starts([*av[-1], *rest])
    if op is sre.BRANCH:
        out: set[str] = set()
        for alt in av[1]:
            got = _starts([*alt, *rest])
            if got is None or len(out) > _MAX_LEADS:
                return None
            out |= got
        return out
    if op is sre.MAX_REPEAT or op is sre.MIN_REPEAT:
        body = _starts(list(av[2]))
        if body is None:
            return None
        if av[0] >= 1:
            return body
        after = _starts(rest)
        return None if after is None else body | after
    return None


def quick_start(rx: re.Pattern[str]) -> re.Pattern[str]:
    """``rx`` with a look-ahead on the first characters its matches can start with.

    The same matches at the same offsets (every match starts with one of the literals
    ``_starts`` finds, so the look-ahead only rules out offsets where no match starts),
    found faster: most offsets fail on one character class instead of every alternative.
    ``rx`` itself when its matches may be empty or start with an unknown character.
    """
    if rx.flags & re.IGNORECASE:
        return rx
    try:
        tree = sre_parse.parse(rx.pattern, rx.flags)
        if not len(tree) or str(tree[0][0]) not in _ZERO_WIDTH:
            return rx  # the regex engine already skips ahead on a leading literal or class
        leads = _starts(list(tree))
        if not leads or "" in leads or tree.getwidth()[0] == 0:
            return rx
        chars = "".join(sorted({lead[0] for lead in leads}))
        fast = re.compile("(?=[" + re.escape(chars) + "])(?:" + rx.pattern + ")", rx.flags)
    except Exception:  # an exotic construct (e.g. global inline flags): keep it as is
        return rx
    return fast if fast.groups == rx.groups else rx


def _options(items: Sequence[tuple[Any, Any]]) -> list[frozenset[Literal]]:
    """Every literal set a match of the top-level sequence ``items`` must contain."""
    if len(items) == 1 and items[0][0] is sre.SUBPATTERN:
        return _options(list(items[0][1][-1]))
    out: list[frozenset[Literal]] = []
    boundary = True
    for op, av in items:
        if op is sre.AT:
            boundary = boundary or av is sre.AT_BOUNDARY
            continue
        got = _necessary([(op, av)], boundary)
        if got is not None:
            out.append(got)
        boundary = _separator(op, av)
    return out


def gate_groups(rx: re.Pattern[str]) -> list[frozenset[Literal]]:
    """Every literal set that all matches of ``rx`` contain, rarest first."""
    try:
        tree = list(sre_parse.parse(rx.pattern, rx.flags))
    except Exception:
        return []
    opts = _options(tree)
    whole = _necessary(tree, True)
    if whole is not None:
        opts.append(whole)
    return sorted(set(opts), key=_set_cost)


def necessary_literals(rx: re.Pattern[str]) -> frozenset[Literal] | None:
    """Literals one of which every match of ``rx`` contains (None when none is forced)."""
    try:
        tree = sre_parse.parse(rx.pattern, rx.flags)
    except Exception:  # an exotic construct: no gate, the caller falls back
        return None
    return _necessary(tree, True)


# Letters and digits stay, every other ASCII character becomes a space: the scanned text
# and the literals go through the same map, so a literal that follows a word boundary or
# a separator (both always a non-alphanumeric character) can be looked for as " word".
_SPACING = bytes(c if chr(c).isalnum() else 32 for c in range(128)) + bytes(range(128, 256))
_NON_WORD = re.compile(r"[\W_]")


def literal_key(lit: Literal) -> str:
    """How ``lit`` is looked for in squeezed ``spaced`` text: after a space when it starts
    a word, every run of separators (apostrophes included) as one space."""
    key = " ".join(spaced(lit[0]).split(" ")[1:])
    while "  " in key:
        key = key.replace("  ", " ")
    return " " + key.lstrip(" ") if lit[1] else key


def presence_regex(group: frozenset[Literal]) -> re.Pattern[str]:
    """A regex finding any literal of ``group`` in ``spaced`` text.

    Separators inside a literal match a run of spaces (``spaced`` does not squeeze).
    """
    keys = sorted({literal_key(lit) for lit in group}, key=lambda k: (-len(k), k))
    return re.compile("|".join(_presence_key(k) for k in keys))


def _presence_key(key: str) -> str:
    head = " " if key.startswith(" ") else ""
    body = key[len(head) :]
    inner = " +".join(re.escape(w) for w in body.split(" "))
    return head + inner


def spaced(text: str) -> str:
    """``text`` with a leading space and every non-word character as a space."""
    if text.isascii():
        return " " + text.encode("ascii").translate(_SPACING).decode("ascii")
    return " " + _NON_WORD.sub(" ", text)


# A run of two spaces or more, kept by ``split``: the text between runs and the runs.
_RUNS = re.compile("(  +)")


class Squeezed:
    """``spaced(text)`` with each run of spaces as one, and the way back to ``spaced``.

    The map back is built on first use: most texts need no offsets at all.
    """

    __slots__ = ("_parts", "_removed", "_starts", "text")

    def __init__(self, text: str) -> None:
        sp = spaced(text)
        self._parts = _RUNS.split(sp)
        self.text = " ".join(self._parts[::2]) if len(self._parts) > 1 else sp
        self._starts: list[int] = []
        self._removed: list[int] = []

    def unsqueeze(self, key: str, ends: list[int]) -> list[int]:
        """A key's ends here -> the ends it would have in ``spaced`` text.

        That is where its first character came from plus its length (what the shifts
        expect).
        """
        if len(self._parts) == 1:
            return ends
        if not self._starts:
            # Run i ends at offset run_ends[i] of ``spaced``; squeezing took removed[i]
            # spaces up to there, so what follows it starts at run_ends[i] - removed[i].
            lengths = list(map(len, self._parts))
            run_ends = list(accumulate(lengths))[1::2]
            removed = list(accumulate(map(sub, lengths[1::2], repeat(1))))
            self._starts = [0, *map(sub, run_ends, removed)]
            # by ``bisect_right(starts, offset)``: the spaces removed before that offset
            self._removed = [0, 0, *removed]
        starts, removed = self._starts, self._removed
        back = len(key) - 2 if key[0] == " " else len(key) - 1
        return [e + removed[bisect_right(starts, e - back)] for e in ends]


class _Scanner(Protocol):
    def iter(self, text: str) -> Iterable[tuple[int, int]]: ...


class _FindScanner:
    """Fallback when pyahocorasick is missing: one ``str.find`` loop per key."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(enumerate(keys))

    def iter(self, text: str) -> Iterable[tuple[int, int]]:
        for k, key in self._keys:
            p = text.find(key)
            while p >= 0:
                yield p + len(key) - 1, k
                p = text.find(key, p + 1)


def _scanner(keys: Sequence[str]) -> _Scanner:
    try:
        import ahocorasick  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return _FindScanner(keys)
    auto = ahocorasick.Automaton()
    for k, key in enumerate(keys):
        auto.add_word(key, k)
    auto.make_automaton()
    return auto  # type: ignore[no-any-return]


class LiteralIndex:
    """All rules' literals, looked for in one pass over a text.

    Each unit has one *positional* gate (where its regex is tried) and any number of
    *presence* gates (more literal sets its matches all need: the unit is skipped unless
    each of them occurs somewhere in the text). Every literal of every gate is in the
    one-pass scan; the gates met are worked out from the set of keys found (C-level set
    operations), and only the units that pass read their positional literals' offsets.
    """

    __slots__ = ("_gates", "_keys", "_needs", "_positional", "_scan")

    def __init__(self, units: Sequence[tuple[int, Sequence[frozenset[Literal]]]]) -> None:
        # A unit is (unit index, [positional gate, presence gate, ...]). Presence gate g
        # of unit u is (u, g): it is met when a key with (u, g) in its ``_gates`` occurs,
        # and unit u needs all of ``_needs[u]``.
        index: dict[str, int] = {}
        positional: list[dict[tuple[int, int], None]] = []
        gates: list[set[tuple[int, int]]] = []
        needs: list[frozenset[tuple[int, int]]] = []
        for u, (_, groups) in enumerate(units):
            needs.append(frozenset((u, g) for g in range(1, len(groups))))
            for g, group in enumerate(groups):
                for lit in group:
                    key = literal_key(lit)
                    if key not in index:
                        index[key] = len(index)
                        positional.append({})
                        gates.append(set())
                    k = index[key]
                    if g:
                        gates[k].add((u, g))
                    else:
                        positional[k][u, _shift(key, lit)] = None
        self._keys = tuple(index)
        self._positional = tuple(tuple(p) for p in positional)
        self._gates = tuple(frozenset(g) for g in gates)
        self._needs = tuple(needs)
        self._scan = _scanner(self._keys)

    def candidates(self, text: str) -> dict[int, list[int]]:
        """Unit index -> offsets in ``text`` of its positional literals.

        Only units whose presence gates are all met are returned.
        """
        sqz = Squeezed(text)
        ends: dict[int, list[int]] = {}
        for end, k in self._scan.iter(sqz.text):
            if k in ends:
                ends[k].append(end)
            else:
                ends[k] = [end]
        if not ends:
            return {}
        met = frozenset(chain.from_iterable(map(self._gates.__getitem__, ends)))
        needs, positional, keys = self._needs, self._positional, self._keys
        out: dict[int, list[int]] = {}
        for k, es in ends.items():
            moved = False
            for u, shift in positional[k]:
                if not needs[u] <= met:
                    continue
                if not moved:
                    es = sqz.unsqueeze(keys[k], es)
                    moved = True
                offsets = [e - shift for e in es]
                if u in out:
                    out[u] += offsets
                else:
                    out[u] = offsets
        return out


def _shift(key: str, lit: Literal) -> int:
    """Key end minus this is the literal's offset in the text (``spaced`` adds one)."""
    return len(key) - 1 if lit[1] else len(key)


def _top_level(source: str) -> tuple[list[int], bool]:
    """Offsets of the top-level ``|`` of ``source`` (outside groups and classes), and
    whether its parentheses balance with no ``)`` before its ``(``."""
    bars: list[int] = []
    depth = 0
    balanced = True
    i = 0
    in_class = False
    while i < len(source):
        c = source[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if source[i + 1 : i + 2] == "^":
                i += 1
            if source[i + 1 : i + 2] == "]":  # a literal ] first in a class
                i += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            balanced = balanced and depth >= 0
        elif c == "|" and depth == 0:
            bars.append(i)
        i += 1
    return bars, balanced and depth == 0


def branches(rx: re.Pattern[str]) -> list[re.Pattern[str]]:
    """The top-level alternatives of ``rx``, each compiled alone (``[rx]`` when none).

    Every match of ``rx`` is a match of one alternative at the same offset, so running
    each alternative under its own (rarer) gates finds at least what ``rx`` finds.
    A pattern whose parse does not agree with the textual cut is kept whole.
    """
    source = rx.pattern
    bars, _ = _top_level(source)
    while not bars and source.startswith("(?:") and source.endswith(")"):
        # one wrapping non-capturing group: look inside it
        inner = source[3:-1]
        inner_bars, balanced = _top_level(inner)
        if not balanced:
            break
        try:
            re.compile(inner, rx.flags)
        except re.error:
            break
        source, bars = inner, inner_bars
    if not bars:
        return [rx]
    parts = [source[a + 1 : z] for a, z in zip([-1, *bars], [*bars, len(source)], strict=True)]
    try:
        compiled = [re.compile(p, rx.flags) for p in parts]
    except re.error:  # the textual cut went wrong somewhere: keep the pattern whole
        return [rx]
    if rx.groups != sum(p.groups for p in compiled):
        return [rx]
    return compiled
