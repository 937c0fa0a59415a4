"""RFC 3464 delivery status notifications: which recipients of which message failed.

A DSN is ``multipart/report; report-type=delivery-status`` with a human-readable part, a
``message/delivery-status`` part (one block of per-message fields, then one block per
recipient) and, usually, the original message or its headers (``message/rfc822`` or
``text/rfc822-headers``), which is where the original ``Message-ID`` is.

Only ``Action: failed`` blocks are bounces; ``delayed``, ``delivered``, ``relayed`` and
``expanded`` say nothing final. A report that is a DSN but lacks what a bounce needs raises
``DSNError``, so the reader can leave it in the mailbox for a human instead of losing it.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

_POLICY = email.policy.compat32
_SPACES = re.compile(r"\s+")


class DSNError(ValueError):
    """A delivery status notification that cannot be turned into bounces."""


@dataclass(frozen=True)
class Bounce:
    """One recipient of one sent message that the receiving side gave up on."""

    message_id: str
    recipient: str
    status: str
    diagnostic: str | None

    @property
    def reason(self) -> str:
        """What a receipt's ``reason`` carries: the status code and the server's words."""
        return f"{self.status} {self.diagnostic}" if self.diagnostic else self.status


def parse_message(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=_POLICY)


def is_dsn(message: Message) -> bool:
    return (
        message.get_content_type() == "multipart/report"
        and str(message.get_param("report-type", "")).lower() == "delivery-status"
    )


def parse_dsn(message: Message) -> list[Bounce]:
    """The bounces a DSN reports; ``[]`` when no recipient failed (only delays, say)."""
    if not is_dsn(message):
        raise DSNError("not a multipart/report; report-type=delivery-status message")
    per_message, per_recipient = _status_blocks(message)
    failed = [block for block in per_recipient if header_value(block, "Action").lower() == "failed"]
    if not failed:
        return []
    message_id = _original_message_id(message, per_message)
    return [_bounce(message_id, block) for block in failed]


def _status_blocks(message: Message) -> tuple[Message, list[Message]]:
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = [block for block in part.get_payload() if isinstance(block, Message)]
            if len(blocks) >= 2:
                return blocks[0], blocks[1:]
            raise DSNError("the delivery-status part has no per-recipient fields")
    raise DSNError("no message/delivery-status part")


def _bounce(message_id: str, block: Message) -> Bounce:
    recipient = _typed_value(header_value(block, "Original-Recipient")) or _typed_value(
        header_value(block, "Final-Recipient")
    )
    if not recipient:
        raise DSNError("a failed recipient block has no Final-Recipient")
    status = header_value(block, "Status")
    if not status:
        raise DSNError(f"the failed block for {recipient} has no Status")
    diagnostic = _typed_value(header_value(block, "Diagnostic-Code")) or None
    return Bounce(message_id, recipient, status.split()[0], diagnostic)


def _original_message_id(message: Message, per_message: Message) -> str:
    """The bounced message's Message-ID: from its returned headers, else where MTAs put it."""
    for part in message.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822":
            original = part.get_payload(0)
            assert isinstance(original, Message)
        elif kind == "text/rfc822-headers":
            payload = part.get_payload(decode=True)
            original = parse_message(payload if isinstance(payload, bytes) else b"")
        else:
            continue
        if found := header_value(original, "Message-ID"):
            return found
    for fallback in (
        header_value(per_message, "Original-Envelope-Id"),
        header_value(message, "In-Reply-To"),
        (header_value(message, "References").split() or [""])[-1],
    ):
        if fallback.startswith("<") and fallback.endswith(">"):
            return fallback
    raise DSNError("the original message's Message-ID is nowhere in the report")


def header_value(block: Message, name: str) -> str:
    """A header's value, unfolded, with runs of white space made one space."""
    value = block.get(name)
    return _SPACES.sub(" ", str(value)).strip() if value is not None else ""


def _typed_value(value: str) -> str:
    """``rfc822; a@example.com`` → ``a@example.com`` (RFC 3464 address and code types)."""
    _, semicolon, rest = value.partition(";")
    return rest.strip() if semicolon else value.strip()
