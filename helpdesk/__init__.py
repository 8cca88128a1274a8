"""helpdesk: the support-email ticketing system and auto-responder behind a help@ inbox.

Data flows one way: mailbox -> parse -> classify -> tickets -> outbox -> SMTP, with
escalation beside the outbox and the web UI reading and writing tickets. Parsing,
classifying, composing and the escalation decision are pure; the network lives in
``mailbox``, ``outbox`` and ``web``.
"""

__version__ = "0.1.0"
