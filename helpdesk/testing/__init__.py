"""Test and benchmark helpers that start real servers. Never imported by the application.

``helpdesk.testing.dovecot`` runs a throwaway Dovecot IMAP server from a self-contained
config in a temporary folder (see :class:`~helpdesk.testing.dovecot.DovecotServer`).
"""

from helpdesk.testing.dovecot import DovecotError, DovecotServer, ImapAccount

__all__ = ["DovecotError", "DovecotServer", "ImapAccount"]
