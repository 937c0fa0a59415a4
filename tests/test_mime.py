"""The RFC 5322 message of an email job: what SMTP sends and the outbox writes."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
from collections.abc import Callable
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from notifier.channels import mime
from notifier.channels.mime import (
    POLICY,
    HeaderInjection,
    build_email,
    envelope,
    envelope_recipients,
)
from notifier.channels.outbox import OutboxChannel
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


def comparable(data: bytes) -> tuple[object, ...]:
    """A message apart from what differs between two builds: Date and the MIME boundary."""
    mail = parse(data)
    headers = [(k, v) for k, v in mail.items() if k not in ("Date", "Content-Type")]
    return headers, mail.get_content_type(), [part.as_bytes() for part in mail.iter_parts()]


async def test_outbox_writes_what_smtp_sends(tmp_path: Path) -> None:
    message = chinese_message()
    outbox = OutboxChannel(tmp_path, kind="email", sender=SENDER)

    await outbox.send(message)

    written = (tmp_path / "email" / "job1.eml").read_bytes()
    assert written.isascii() and b"\r\n" in written
    assert comparable(written) == comparable(bytes(build_email(message, SENDER)))


@pytest.mark.parametrize("kind", ["email", "sms"])
async def test_the_outbox_writes_messages_sent_together_in_one_thread_hop(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops: list[object] = []
    real = asyncio.to_thread

    async def counted(function: Callable[..., Any], *args: Any) -> Any:
        hops.append(function)
        return await real(function, *args)

    monkeypatch.setattr("notifier.channels.outbox.asyncio.to_thread", counted)
    outbox = OutboxChannel(tmp_path, kind=kind, sender=SENDER)
    jobs = [
        chinese_message(id=f"job{n}", channel=kind, to=(f"+86138{n:08d}",) if kind == "sms" else ())
        for n in range(20)
    ]

    await asyncio.gather(*(outbox.send(job) for job in jobs))
    await outbox.aclose()

    assert len(hops) < len(jobs)
    if kind == "email":
        assert sorted(p.name for p in (tmp_path / "email").iterdir()) == sorted(
            f"job{n}.eml" for n in range(20)
        )
    else:
        lines = (tmp_path / "sms.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["id"] for line in lines) == sorted(
            f"job{n}" for n in range(20)
        )


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
