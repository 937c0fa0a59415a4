"""Email bounces: RFC 3464 reports read from a POP3 or IMAP mailbox (PROTOCOL.md, Bounces).

``dsn`` turns a report into ``Bounce`` records, ``mailbox`` reaches the mailbox, ``reader``
is the polling loop the service starts, with the store's ``record`` as its sink.
"""

from __future__ import annotations

from notifier.bounces.dsn import Bounce, DSNError, parse_dsn
from notifier.bounces.mailbox import MailboxConfig, MailboxError, parse_mailbox_url
from notifier.bounces.reader import BounceReader, PollResult

__all__ = [
    "Bounce",
    "BounceReader",
    "DSNError",
    "MailboxConfig",
    "MailboxError",
    "PollResult",
    "parse_dsn",
    "parse_mailbox_url",
]
