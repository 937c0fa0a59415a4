"""Building the RFC 5322 message of an email job, shared by the SMTP channel and the outbox.

Built with ``email.message.EmailMessage`` and the SMTPUTF8-free default policy, so UTF-8
subjects and display names are encoded words and arrive intact everywhere. ``bcc`` is never
a header: those addresses are only envelope recipients.
"""

from __future__ import annotations

from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid

from notifier.models import Message


def parse_mailbox(value: str) -> Address:
    """``Name <addr>`` or ``addr`` as an Address (the intake already validated it)."""
    ((name, addr),) = getaddresses([value])
    return Address(display_name=name, addr_spec=addr)


def new_message_id(sender: str) -> str:
    """A Message-ID in the sender's domain, fixed at intake so redeliveries keep it."""
    domain = parse_mailbox(sender).domain or "localhost"
    return make_msgid(domain=domain)


def build_email(message: Message, sender: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = parse_mailbox(sender)
    mail["To"] = [parse_mailbox(a) for a in message.to]
    if message.cc:
        mail["Cc"] = [parse_mailbox(a) for a in message.cc]
    if message.reply_to:
        mail["Reply-To"] = [parse_mailbox(a) for a in message.reply_to]
    mail["Subject"] = message.subject or ""
    mail["Date"] = formatdate(localtime=False, usegmt=True)
    mail["Message-ID"] = message.message_id or new_message_id(sender)
    mail.set_content(message.text or "")
    if message.html is not None:
        mail.add_alternative(message.html, subtype="html")
    return mail


def envelope_recipients(message: Message) -> list[str]:
    """Every address the message goes to, bcc included, each once."""
    addresses = (parse_mailbox(a).addr_spec for a in (*message.to, *message.cc, *message.bcc))
    return list(dict.fromkeys(addresses))
