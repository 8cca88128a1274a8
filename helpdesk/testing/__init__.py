"""Test and benchmark helpers that start real servers. Never imported by the application.

``helpdesk.testing.dovecot`` runs a throwaway Dovecot IMAP server from a self-contained
config in a temporary folder (see :class:`~helpdesk.testing.dovecot.DovecotServer`).
``helpdesk.testing.smtp`` is an aiosmtpd receiver (optionally taking AUTH XOAUTH2) and
``helpdesk.testing.oauth`` a token introspection endpoint for Dovecot's ``oauth2`` passdb.
"""

from helpdesk.testing.dovecot import DovecotError, DovecotServer, ImapAccount

__all__ = ["DovecotError", "DovecotServer", "ImapAccount"]
