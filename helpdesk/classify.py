"""Pure classification: an ``InboundEmail`` -> a ``Classification`` value.

Three questions, answered without I/O: is this a robot (never answer it), is it a crisis
(escalate now), and which language does the patient write in (en/es templates).

Invariants: crisis detection runs on every mail, robots and duplicates included, and a
failure inside it escalates at tier 2 ("could not check") rather than passing silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from helpdesk.crisis import CrisisResult, detect, detect_language
from helpdesk.parse import InboundEmail
from helpdesk.robots import RobotVerdict, judge

COULD_NOT_CHECK = "could not check"


@dataclass(frozen=True, slots=True)
class Classification:
    robot: RobotVerdict
    crisis: CrisisResult
    language: str

    @property
    def crisis_tier(self) -> int | None:
        return self.crisis.tier


def _unchecked(reason: str) -> CrisisResult:
    return CrisisResult(
        tier=2,
        category="unchecked",
        hits=(),
        lexicon_version="",
        error=f"{COULD_NOT_CHECK}: {reason}",
    )


def classify(
    email: InboundEmail,
    *,
    own_addresses: frozenset[str],
    own_templates: Sequence[str] = (),
) -> Classification:
    robot = judge(email, own_addresses=own_addresses)
    try:
        crisis = detect(email.subject, email.text, email.html, own_templates=own_templates)
    except Exception as exc:  # detect() promises not to raise; if it does, escalate
        crisis = _unchecked(type(exc).__name__)
    try:
        language = detect_language(f"{email.subject}\n{email.text[:4000]}")
    except Exception:
        language = "en"
    return Classification(robot=robot, crisis=crisis, language=language)


def classify_unreadable(reason: str) -> CrisisResult:
    """The crisis verdict for a mail we could not parse: escalate at tier 2."""
    return _unchecked(reason)
