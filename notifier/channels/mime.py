"""Building the RFC 5322 message of an email job, shared by the SMTP channel and the outbox.

The message uses a 7-bit SMTP policy: CRLF line ends, UTF-8 subjects and display names as
RFC 2047 encoded words, non-ASCII bodies in base64 or quoted-printable. So ``bytes(mail)``
is exactly what the SMTP channel sends as DATA, whatever extensions the server offers,
and the outbox ``.eml`` file holds those same bytes. ``bcc`` is never a header: those
addresses are only envelope recipients.

Header fields are checked once more for CR/LF here (intake refuses them already), so a
message stored by an older version or a bug elsewhere cannot inject a header.

Two ways to the same bytes: ``build_email`` is the email package's own path (an
``EmailMessage`` built header by header, then generated), and ``email_bytes`` is what the
channels send, about ten times cheaper (bench/README.md, "Cost per job"). It writes a header
line as given only where the email package provably writes the same (printable ASCII
without specials, encoded-word markers or runs of spaces, within one line of 78), hands
every other header to the email package's header classes and folding one by one, and
takes the content (``Content-Type`` onwards) from an ``EmailMessage`` holding the body
alone, except for the commonest body, 7-bit plain text, whose content headers the package
wrote once. tests/test_mime.py checks byte for byte that both ways agree.
"""

from __future__ import annotations

import email.policy
import functools
import re
import time
from collections.abc import Sequence
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
_MAX_LINE = POLICY.max_line_length or 78


class HeaderInjection(ValueError):
    """A header value carries a CR or LF and would smuggle in another header."""


def _one_line(value: str, field: str) -> str:
    if "\r" in value or "\n" in value:
        raise HeaderInjection(f"{field}: must not contain CR or LF")
    return value


#: RFC 5322 atext without ``=`` and ``?`` (which could start an encoded word).
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/^_`{|}~]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
#: A mailbox the email package neither quotes nor encodes: ``addr`` or ``Name <addr>``,
#: the name atoms apart by single spaces.
_PLAIN_MAILBOX = re.compile(
    rf"(?:(?P<name>{_ATOM}(?: {_ATOM})*) <(?P<local>{_DOT_ATOM})@(?P<domain>{_DOT_ATOM})>"
    rf"|(?P<bare_local>{_DOT_ATOM})@(?P<bare_domain>{_DOT_ATOM}))"
)
#: An unstructured value (a subject) the email package writes as it is, within one line.
_PLAIN_TEXT = re.compile(r"[!-~]+(?: [!-~]+)*")
_PLAIN_MESSAGE_ID = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")


@functools.lru_cache(maxsize=4096)
def parse_mailbox(value: str) -> Address:
    """``Name <addr>`` or ``addr`` as an Address (the intake already validated it).

    Cached: the sender and frequent recipients come back with every message. A plain
    mailbox (``_PLAIN_MAILBOX``, most of them) is split by the pattern, which gives the
    same Address as the email package's parsers at a fraction of their cost (the
    dispatcher looks up each email recipient's suppression through ``envelope``).
    """
    plain = _PLAIN_MAILBOX.fullmatch(value)
    if plain is None:
        return parsed_mailbox(value)
    if plain["name"] is None:
        return Address(username=plain["bare_local"], domain=plain["bare_domain"])
    return Address(display_name=plain["name"], username=plain["local"], domain=plain["domain"])


def parsed_mailbox(value: str) -> Address:
    """``parse_mailbox`` by the email package's parsers, whatever form RFC 5322 allows."""
    ((name, addr),) = getaddresses([_one_line(value, "address")])
    return Address(display_name=name, addr_spec=addr)


def new_message_id(job_id: str, sender: str) -> str:
    """``<job id@sender's domain>``: unique (the id is 128 random bits), fixed at intake so a
    redelivery carries the same one, and it leads from a bounce or a complaint to the job."""
    return f"<{job_id}@{parse_mailbox(sender).domain or 'localhost'}>"


def job_id_of(message_id: str) -> str:
    """The job a ``Message-ID`` of ``new_message_id`` names (a bounce quotes it)."""
    return message_id.strip().strip("<>").partition("@")[0]


def build_email(message: Message, sender: str, *, date: float | None = None) -> EmailMessage:
    """The message by the email package's own path; ``bytes()`` of it is what
    ``email_bytes`` gives (``date``: the ``Date`` as a timestamp, by default now)."""
    mail = EmailMessage(policy=POLICY)
    mail["From"] = parse_mailbox(sender)
    mail["To"] = [parse_mailbox(a) for a in message.to]
    if message.cc:
        mail["Cc"] = [parse_mailbox(a) for a in message.cc]
    if message.reply_to:
        mail["Reply-To"] = [parse_mailbox(a) for a in message.reply_to]
    mail["Subject"] = _one_line(message.subject or "", "subject")
    mail["Date"] = formatdate(date, usegmt=True)
    message_id = message.message_id or new_message_id(message.id, sender)
    mail["Message-ID"] = _one_line(message_id, "message_id")
    _set_body(mail, message)
    return mail


def _set_body(mail: EmailMessage, message: Message) -> None:
    mail.set_content(message.text or "")
    if message.html is not None:
        mail.add_alternative(message.html, subtype="html")


def email_bytes(message: Message, sender: str, *, date: float | None = None) -> bytes:
    """``bytes(build_email(message, sender, date=date))``, the DATA payload, built cheaply
    (see the module doc)."""
    subject = _one_line(message.subject or "", "subject")
    message_id = _one_line(message.message_id or new_message_id(message.id, sender), "message_id")
    lines = [_from_line(sender), _mailboxes_line("To", message.to)]
    if message.cc:
        lines.append(_mailboxes_line("Cc", message.cc))
    if message.reply_to:
        lines.append(_mailboxes_line("Reply-To", message.reply_to))
    plain_subject = "=?" not in subject and _PLAIN_TEXT.fullmatch(subject) is not None
    lines.append(_line("Subject", subject, plain=plain_subject))
    lines.append(_date_line(int(time.time() if date is None else date)))
    plain_id = _PLAIN_MESSAGE_ID.fullmatch(message_id) is not None
    lines.append(_line("Message-ID", message_id, plain=plain_id))
    lines.append(_content(message))
    return b"".join(lines)


def _folded(name: str, value: object) -> bytes:
    """The header line as the email package stores, folds and encodes it."""
    return POLICY.fold_binary(*POLICY.header_store_parse(name, value))


def _fits(name: str, value: str) -> bool:
    return len(name) + 2 + len(value) <= _MAX_LINE


def _line(name: str, value: str, *, plain: bool) -> bytes:
    """``Name: value`` as it is if ``plain`` says the email package writes it so and it
    fits one line, else as the email package folds it."""
    if plain and _fits(name, value):
        return f"{name}: {value}\r\n".encode("ascii")
    return _folded(name, value)


def _mailboxes_line(name: str, values: Sequence[str]) -> bytes:
    joined = ", ".join(values)
    if _fits(name, joined) and all(_PLAIN_MAILBOX.fullmatch(value) for value in values):
        return f"{name}: {joined}\r\n".encode("ascii")
    return _folded(name, [parse_mailbox(value) for value in values])


@functools.lru_cache(maxsize=16)
def _from_line(sender: str) -> bytes:
    return _mailboxes_line("From", (sender,))


@functools.lru_cache(maxsize=4)
def _date_line(second: int) -> bytes:
    return _folded("Date", formatdate(second, usegmt=True))


def _content(message: Message) -> bytes:
    """Everything from ``Content-Type`` on: the content's headers, a blank line, the body."""
    text = message.text or ""
    if message.html is None and text.isascii():
        lines = text.encode("ascii").splitlines()
        if max(map(len, lines), default=0) <= _MAX_LINE:  # as the email package picks 7bit
            return _text_head() + b"\r\n".join(lines) + b"\r\n"
    content = EmailMessage(policy=POLICY)
    _set_body(content, message)
    return bytes(content)


@functools.cache
def _text_head() -> bytes:
    """The content headers of a 7-bit text/plain body and the blank line after them, as
    the email package writes them."""
    content = EmailMessage(policy=POLICY)
    content.set_content("")
    head, blank, _ = bytes(content).partition(b"\r\n\r\n")
    return head + blank


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
