"""The RFC 5322 message of an email job: what SMTP sends and the outbox writes."""

from __future__ import annotations

import email
import email.errors
import email.policy
import random
import re
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from notifier.channels import mime
from notifier.channels.mime import (
    POLICY,
    HeaderInjection,
    build_email,
    email_bytes,
    envelope,
    envelope_recipients,
    parse_mailbox,
    parsed_mailbox,
)
from notifier.models import Message

SENDER = "通知中心 <notify@example.com>"


def chinese_message(**fields: object) -> Message:
    values: dict[str, object] = {
        "id": "job1",
        "channel": "email",
        "to": ("张三 <zhang.san@example.com>",),
        "cc": ("li@example.com",),
        "bcc": ("secret@example.com",),
        "reply_to": ("客服 <help@example.com>",),
        "subject": "欢迎张三 您的账户已开通",
        "text": "您好 张三。\n欢迎使用。",
        "html": "<p>您好 <b>张三</b></p>",
        "message_id": "<fixed.1@example.com>",
    }
    values.update(fields)
    return Message(**values)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_utf8_headers_and_bodies_round_trip() -> None:
    data = bytes(build_email(chinese_message(), SENDER))
    mail = parse(data)

    assert mail["Subject"] == "欢迎张三 您的账户已开通"
    assert mail["To"].addresses[0].display_name == "张三"
    assert mail["To"].addresses[0].addr_spec == "zhang.san@example.com"
    assert mail["From"].addresses[0].display_name == "通知中心"
    assert mail["Reply-To"].addresses[0].display_name == "客服"
    assert mail["Cc"] == "li@example.com"
    assert mail["Message-ID"] == "<fixed.1@example.com>"
    assert mail.get_content_type() == "multipart/alternative"
    text, html = (part.get_content() for part in mail.iter_parts())
    assert text.replace("\r\n", "\n").strip() == "您好 张三。\n欢迎使用。"
    assert html.strip() == "<p>您好 <b>张三</b></p>"


def test_bytes_are_7bit_with_crlf_line_ends() -> None:
    """The same bytes whatever the server supports: no 8BITMIME or SMTPUTF8 needed."""
    data = bytes(build_email(chinese_message(), SENDER))

    assert data.isascii()
    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_bcc_is_an_envelope_recipient_only() -> None:
    message = chinese_message()
    data = bytes(build_email(message, SENDER))

    assert "Bcc" not in parse(data)
    assert b"secret@example.com" not in data
    assert "secret@example.com" in envelope_recipients(message)


def test_envelope_keys_recipients_by_address_once() -> None:
    message = chinese_message(cc=("Zhang <zhang.san@example.com>", "li@example.com"))

    assert envelope(message) == {
        "zhang.san@example.com": "张三 <zhang.san@example.com>",
        "li@example.com": "li@example.com",
        "secret@example.com": "secret@example.com",
    }


def test_text_only_message_is_not_multipart() -> None:
    mail = build_email(chinese_message(html=None), SENDER)

    assert mail.get_content_type() == "text/plain"


@pytest.mark.parametrize(
    "fields",
    [
        {"subject": "Hello\r\nBcc: victim@example.com"},
        {"subject": "Hello\nX-Evil: 1"},
        {"to": ("Eve\r\nBcc: victim@example.com <eve@example.com>",)},
        {"reply_to": ("x@example.com\nBcc: victim@example.com",)},
        {"message_id": "<a@b>\r\nBcc: victim@example.com"},
    ],
)
def test_header_injection_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(HeaderInjection, match="must not contain CR or LF"):
        build_email(chinese_message(**fields), SENDER)


def test_a_retry_skips_served_recipients_in_the_envelope_only() -> None:
    message = Message(
        id="j1",
        channel="email",
        to=("a@example.com", "B <b@example.com>"),
        cc=("c@example.com",),
        bcc=("d@example.com",),
        subject="s",
        text="t",
        skip=("B <b@example.com>", "d@example.com"),
    )
    assert envelope_recipients(message) == ["a@example.com", "c@example.com"]
    mail = build_email(message, "notifier@example.com")
    assert "b@example.com" in str(mail["To"]), "headers stay as first sent"


def test_header_classes_are_made_once_and_the_bytes_stay_the_stock_policys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = chinese_message(cc=("李四 <li.si@example.com>",), html=None)  # no random boundary
    ours = bytes(build_email(job, SENDER))
    monkeypatch.setattr(mime, "POLICY", email.policy.SMTP.clone(cte_type="7bit"))
    stock = bytes(build_email(job, SENDER))

    def undated(data: bytes) -> bytes:
        return re.sub(rb"\r\nDate: [^\r]*", b"", data)

    assert undated(ours) == undated(stock)
    stock_factory, our_factory = mime.POLICY.header_factory, POLICY.header_factory
    assert isinstance(stock_factory, HeaderRegistry) and isinstance(our_factory, HeaderRegistry)
    assert stock_factory["Subject"] is not stock_factory["subject"]  # a new class each time
    assert our_factory["Subject"] is our_factory["subject"]


# email_bytes, the cheap way to build_email's bytes ---------------------------------------

#: Printable ASCII, whitespace, what the email package treats specially (specials, quotes,
#: encoded-word markers, long runs), and non-ASCII text, so both ways of building meet
#: every branch: header lines written as given, folded, RFC 2047-encoded, bodies in 7bit,
#: quoted-printable and base64.
_TRICKY = st.sampled_from(
    [
        "=?",
        "?=",
        "=?utf-8?q?hi?=",
        '"',
        "\\",
        "(",
        ")",
        ",",
        ";",
        ":",
        ".",
        "@",
        "<",
        ">",
        "  ",
        "\t",
    ]
)
_CHARS = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(blacklist_categories=("Cs", "Cc")),
    st.sampled_from(["张", "三", "é", "ß", "😀", " "]),
)
_TEXT = st.lists(st.one_of(_CHARS.map(str), _TRICKY), max_size=60).map("".join)
_WORD = st.text(st.sampled_from("abcxyzABC019!#$%&'*+-/^_`{|}~"), min_size=1, max_size=12)
_ADDR = st.builds(lambda local, domain: f"{local}@{domain}.example", _WORD, _WORD)
_NAMES = st.one_of(
    st.lists(_WORD, min_size=1, max_size=4).map(" ".join),  # written as given
    _TEXT.filter(lambda name: name.strip() and "<" not in name and ">" not in name),
    st.text(min_size=60, max_size=120).filter(lambda n: n.isalpha()),  # folded
)
_MAILBOX = st.one_of(_ADDR, st.builds(lambda name, addr: f"{name} <{addr}>", _NAMES, _ADDR))
_BODY = st.one_of(
    _TEXT,
    st.text(st.sampled_from("ab \r\n\x0b\x0c"), max_size=40),
    st.builds(lambda n, c: c * n, st.integers(76, 81), st.sampled_from("x张")),  # the 78 line
)
_SENDERS = st.sampled_from(["notifier@localhost", SENDER, "Notifier Team <team@example.com>"])
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=400)


def both_ways(job: Message, sender: str, date: float) -> tuple[bytes, bytes]:
    """email_bytes and the email package's bytes, with the same Date and MIME boundary."""
    random.seed(date)
    fast = email_bytes(job, sender, date=date)
    random.seed(date)
    full = bytes(build_email(job, sender, date=date))
    return fast, full


@PROPERTY
@given(
    to=st.lists(_MAILBOX, min_size=1, max_size=3),
    cc=st.lists(_MAILBOX, max_size=2),
    reply_to=st.lists(_MAILBOX, max_size=1),
    subject=st.one_of(_TEXT, st.text(max_size=200), st.none()),
    text=st.one_of(_BODY, st.none()),
    html=st.one_of(st.none(), _BODY),
    message_id=st.one_of(st.none(), st.builds("<{}@{}>".format, _WORD, _WORD)),
    sender=_SENDERS,
    date=st.integers(0, 2**32),
)
@example(  # the bench's message
    to=["Customer 7 <customer7@example.com>"],
    cc=[],
    reply_to=[],
    subject="Your order 7",
    text="Thank you for your order. bench #7",
    html=None,
    message_id=None,
    sender="notifier@localhost",
    date=1_796_000_000,
)
@example(
    to=["a@b.example"],
    cc=[],
    reply_to=[],
    subject="",
    text="",
    html=None,
    message_id=None,
    sender=SENDER,
    date=0,
)
def test_email_bytes_are_the_email_packages_bytes(
    to: list[str],
    cc: list[str],
    reply_to: list[str],
    subject: str | None,
    text: str | None,
    html: str | None,
    message_id: str | None,
    sender: str,
    date: int,
) -> None:
    job = chinese_message(
        to=tuple(to),
        cc=tuple(cc),
        reply_to=tuple(reply_to),
        subject=subject,
        text=text,
        html=html,
        message_id=message_id,
    )
    try:
        fast, full = both_ways(job, sender, date)
    except (ValueError, IndexError, email.errors.MessageError) as exc:  # the package refuses it
        with pytest.raises(type(exc)):
            email_bytes(job, sender, date=date)
        return

    assert fast == full


def test_a_plain_message_takes_no_header_or_body_through_the_email_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cheap path is taken where it should be, not only correct when it is."""
    job = chinese_message(
        to=("Customer 7 <customer7@example.com>", "b@example.com"),
        cc=("c@example.com",),
        reply_to=("Help Desk <help@example.com>",),
        subject="Your order 7: shipped!",
        html=None,
        text="Thank you.\nSee you soon.",
    )
    email_bytes(job, "notifier@example.com", date=1_796_000_000)  # the Date and From, cached
    folded: list[str] = []
    real = mime._folded

    def counting(name: str, value: object) -> bytes:
        folded.append(name)
        return real(name, value)

    monkeypatch.setattr(mime, "_folded", counting)
    monkeypatch.setattr(mime, "EmailMessage", None)  # building one would raise

    email_bytes(job, "notifier@example.com", date=1_796_000_000)

    assert folded == []


@PROPERTY
@given(value=_MAILBOX)
@example(value="Customer 7 <customer7@example.com>")
@example(value="o'brien+tag@mail.example")
def test_plain_mailboxes_parse_as_the_email_package_parses_them(value: str) -> None:
    try:
        expected = parsed_mailbox(value)
    except (ValueError, IndexError, email.errors.MessageError):  # not a mailbox: intake refuses it
        assume(False)
    assert parse_mailbox.__wrapped__(value) == expected
