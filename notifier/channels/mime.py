"""Building the RFC 5322 message of an email job, shared by the SMTP channel and the outbox.

The message uses a 7-bit SMTP policy: CRLF line ends, UTF-8 subjects and display names as
RFC 2047 encoded words, non-ASCII bodies in base64 or quoted-printable. So ``bytes(mail)``
is exactly what the SMTP channel sends as DATA, whatever extensions the server offers,
and the outbox ``.eml`` file holds those same bytes. ``bcc`` is never a header: those
addresses are only envelope recipients.

Header fields are checked once more for CR/LF here (intake refuses them already), so a
message stored by an older version or a bug elsewhere cannot inject a header.
"""

from __future__ import annotations

import email.policy
import functools
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import formatdate, getaddresses

from notifier.models import Message


class _MadeOnce(HeaderRegistry):
    """The email package's header classes, each made once per name.

    ``HeaderRegistry`` makes a new class (``type(...)``) for every header it parses, the
    largest single cost of building a message (bench/README.md, "Cost per job"); the class
    depends only on the header's name, so one per name is the same thing.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


#: 7-bit clean, CRLF: the bytes do not depend on the server's 8BITMIME support.
POLICY = email.policy.SMTP.clone(cte_type="7bit", header_factory=_MadeOnce())


class HeaderInjection(ValueError):
    """A header value carries a CR or LF and would smuggle in another header."""


def _one_line(value: str, field: str) -> str:
    if "\r" in value or "\n" in value:
        raise HeaderInjection(f"{field}: must not contain CR or LF")
    return value


@functools.lru_cache(maxsize=4096)
def parse_mailbox(value: str) -> Address:
    """``Name <addr>`` or ``addr`` as an Address (the intake already validated it).

    Cached: the sender and frequent recipients come back with every message, and the email
    package's parsing is the slowest part of building one.
    """
    ((name, addr),) = getaddresses([_one_line(value, "address")])
    return Address(display_name=name, addr_spec=addr)


def new_message_id(job_id: str, sender: str) -> str:
    """``<job id@sender's domain>``: unique (the id is 128 random bits), fixed at intake so a
    redelivery carries the same one, and it leads from a bounce or a complaint to the job."""
    return f"<{job_id}@{parse_mailbox(sender).domain or 'localhost'}>"


def job_id_of(message_id: str) -> str:
    """The job a ``Message-ID`` of ``new_message_id`` names (a bounce quotes it)."""
    return message_id.strip().strip("<>").partition("@")[0]


def build_email(message: Message, sender: str) -> EmailMessage:
    """The message as sent; ``bytes()`` of it is the DATA payload (see the module doc)."""
    mail = EmailMessage(policy=POLICY)
    mail["From"] = parse_mailbox(sender)
    mail["To"] = [parse_mailbox(a) for a in message.to]
    if message.cc:
        mail["Cc"] = [parse_mailbox(a) for a in message.cc]
    if message.reply_to:
        mail["Reply-To"] = [parse_mailbox(a) for a in message.reply_to]
    mail["Subject"] = _one_line(message.subject or "", "subject")
    mail["Date"] = formatdate(localtime=False, usegmt=True)
    message_id = message.message_id or new_message_id(message.id, sender)
    mail["Message-ID"] = _one_line(message_id, "message_id")
    mail.set_content(message.text or "")
    if message.html is not None:
        mail.add_alternative(message.html, subtype="html")
    return mail


def envelope(message: Message) -> dict[str, str]:
    """Envelope address -> the recipient as the job names it, bcc included, each once,
    leaving out those an earlier attempt already served (``message.skip``).

    The job's own spelling (``"张三 <z@example.com>"``) is what per-recipient results are
    keyed by, so a retry can leave out the recipients already served.
    """
    recipients: dict[str, str] = {}
    for value in (*message.to, *message.cc, *message.bcc):
        if value not in message.skip:
            recipients.setdefault(parse_mailbox(value).addr_spec, value)
    return recipients


def envelope_recipients(message: Message) -> list[str]:
    """Every address the message goes to, bcc included, each once."""
    return list(envelope(message))
