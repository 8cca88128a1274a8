"""Session fixtures that start real servers for the integration tests.

Each server section is owned by one module of helpdesk; add new sections below, keep them
independent. Dovecot (``dovecot``, ``imap_account``) lives in ``tests/fixtures_dovecot.py``
and the SMTP receiver in ``tests/fixtures_smtp.py``: both are registered in
``tests/conftest.py`` so that the web tier's end-to-end test can use them too.
"""

from __future__ import annotations
