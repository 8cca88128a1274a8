"""helpdesk.crisis: the pure crisis detector (no I/O, no settings, no database).

Public API: ``detect`` (subject, text, html, own_templates -> ``CrisisResult``),
``detect_language`` ("en"/"es"), ``strip_quoted`` and the value types ``CrisisResult`` /
``CrisisHit``. The rules live in the versioned data file
``helpdesk/data/crisis_lexicon_v1.toml``, compiled once on first use.

Invariants: ``detect`` never raises on str input (a failure escalates to tier 2 with
``error`` set); tier 1 is the most urgent; nothing here logs or stores mail text.
"""

from helpdesk.crisis.detect import CrisisHit, CrisisResult, detect
from helpdesk.crisis.language import detect_language
from helpdesk.crisis.quotes import strip_quoted

__all__ = ["CrisisHit", "CrisisResult", "detect", "detect_language", "strip_quoted"]
