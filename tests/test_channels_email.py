"""The SMTP channel against a real aiosmtpd server on 127.0.0.1, with injected faults."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from notifier.channels.email import SMTPChannel, classify_smtp_error, create_channel
from notifier.channels.outbox import OutboxChannel
from notifier.errors import (
    DeliveryConnectionError,
    DeliveryError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from notifier.models import Message
from notifier.settings import Settings
from tests.support.smtp import DROP, SMTPSink, running_smtp_sink
from tests.support.waiting import wait_for

SENDER = "通知中心 <notify@example.com>"
PASSWORD = "s3cret-Passw0rd"


def settings(port: int, ca_file: Path | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_security": "ssl",
        "smtp_ca_file": ca_file,
        "smtp_from": SENDER,
        "smtp_timeout": 5.0,
        "smtp_pool_size": 2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def message(number: int = 1, **fields: Any) -> Message:
    values: dict[str, Any] = {
        "id": f"job{number}",
        "channel": "email",
        "to": ("张三 <zhang.san@example.com>",),
        "bcc": ("audit@example.com",),
        "subject": "欢迎张三",
        "text": "您好 张三。",
        "html": "<p>您好 <b>张三</b></p>",
        "message_id": f"<fixed.{number}@example.com>",
    }
    values.update(fields)
    return Message(**values)


@pytest.fixture
async def sink(tls_ca: trustme.CA) -> AsyncIterator[SMTPSink]:
    async with running_smtp_sink("ssl", tls_ca) as sink:
        yield sink


@pytest.fixture
async def channel(sink: SMTPSink, ca_file: Path) -> AsyncIterator[SMTPChannel]:
    channel = SMTPChannel(settings(sink.port, ca_file))
    yield channel
    await channel.aclose()


async def test_message_arrives_intact_over_implicit_tls_with_login(
    tls_ca: trustme.CA, ca_file: Path
) -> None:
    async with running_smtp_sink("ssl", tls_ca, credentials=("mailer", PASSWORD)) as sink:
        channel = SMTPChannel(
            settings(sink.port, ca_file, smtp_username="mailer", smtp_password=PASSWORD)
        )
        receipt = await channel.send(message())
        await channel.aclose()

    assert sink.logins == ["mailer"]
    (received,) = sink.messages
    assert received.mail_from == "notify@example.com"
    assert received.rcpt_tos == ["zhang.san@example.com", "audit@example.com"]
    mail = received.parsed()
    assert mail["Subject"] == "欢迎张三"
    assert mail["From"].addresses[0].display_name == "通知中心"
    assert mail["To"].addresses[0].display_name == "张三"
    assert mail["Message-ID"] == "<fixed.1@example.com>"
    assert "Bcc" not in mail
    assert b"audit@example.com" not in received.data
    assert mail.get_content_type() == "multipart/alternative"
    text, html = (part.get_content().strip() for part in mail.iter_parts())
    assert (text, html) == ("您好 张三。", "<p>您好 <b>张三</b></p>")
    assert receipt.provider_ids == {
        "张三 <zhang.san@example.com>": None,
        "audit@example.com": None,
    }
    assert receipt.provider_message_id is not None
    assert "queued as Q1" in receipt.provider_message_id


@pytest.mark.parametrize("security", ["starttls", "none"])
async def test_starttls_and_plain_deliver(security: Any, tls_ca: trustme.CA, ca_file: Path) -> None:
    # The STARTTLS sink refuses MAIL before TLS (530), so delivery proves the upgrade.
    async with running_smtp_sink(security, tls_ca, credentials=("mailer", PASSWORD)) as sink:
        channel = SMTPChannel(
            settings(
                sink.port,
                ca_file,
                smtp_security=security,
                smtp_username="mailer" if security == "starttls" else None,
                smtp_password=PASSWORD if security == "starttls" else None,
            )
        )
        await channel.send(message())
        await channel.aclose()

    assert [m.parsed()["Subject"] for m in sink.messages] == ["欢迎张三"]


async def test_one_session_carries_many_messages(channel: SMTPChannel, sink: SMTPSink) -> None:
    for number in range(1, 4):
        await channel.send(message(number))

    assert [m.parsed()["Message-ID"] for m in sink.messages] == [
        "<fixed.1@example.com>",
        "<fixed.2@example.com>",
        "<fixed.3@example.com>",
    ]
    assert sink.connections == 1


async def test_concurrent_sends_stay_within_the_pool(channel: SMTPChannel, sink: SMTPSink) -> None:
    await asyncio.gather(*(channel.send(message(n)) for n in range(1, 9)))

    assert len(sink.messages) == 8
    assert 1 <= sink.connections <= 2


@pytest.mark.parametrize("fault", [DROP, "421 4.3.2 too many messages on this connection"])
async def test_a_dropped_pooled_session_is_replaced(
    fault: str, channel: SMTPChannel, sink: SMTPSink
) -> None:
    await channel.send(message(1))
    sink.fail_next("MAIL", fault)

    await channel.send(message(2))

    assert [m.parsed()["Message-ID"] for m in sink.messages] == [
        "<fixed.1@example.com>",
        "<fixed.2@example.com>",
    ]
    assert sink.connections == 2


async def test_aclose_says_quit(channel: SMTPChannel, sink: SMTPSink) -> None:
    await channel.send(message())

    await channel.aclose()

    await wait_for(lambda: sink.quits == 1, what="QUIT at the sink")


@pytest.mark.parametrize(
    ("command", "reply", "expected", "says"),
    [
        ("MAIL", "451 4.3.0 try again later", TransientDeliveryError, "MAIL FROM refused: 451"),
        ("MAIL", "550 5.7.1 sender rejected", PermanentDeliveryError, "MAIL FROM refused: 550"),
        ("DATA", "452 4.3.1 mailbox full", TransientDeliveryError, "DATA refused: 452"),
        ("DATA", "554 5.6.0 message refused", PermanentDeliveryError, "DATA refused: 554"),
        ("DATA", "421 4.3.2 shutting down", TransientDeliveryError, "DATA refused: 421"),
        ("MAIL", DROP, DeliveryConnectionError, "connection failed"),
    ],
)
async def test_replies_are_classified(
    command: str,
    reply: str,
    expected: type[DeliveryError],
    says: str,
    channel: SMTPChannel,
    sink: SMTPSink,
) -> None:
    sink.fail_next(command, reply)

    with pytest.raises(expected, match=says) as caught:
        await channel.send(message())

    assert type(caught.value) is expected or expected is TransientDeliveryError
    assert caught.value.delivered == {}
    assert sink.messages == []


@pytest.mark.parametrize(
    ("code", "expected"), [("451", TransientDeliveryError), ("550", PermanentDeliveryError)]
)
async def test_every_recipient_refused(
    code: str, expected: type[DeliveryError], channel: SMTPChannel, sink: SMTPSink
) -> None:
    job = message(to=(f"Eve <refuse-{code}@example.com>",), bcc=())

    with pytest.raises(expected, match=f"every recipient refused: Eve <refuse-{code}@"):
        await channel.send(job)

    assert sink.messages == []


async def test_temporary_refusal_of_some_recipients_delivers_to_the_others(
    channel: SMTPChannel, sink: SMTPSink
) -> None:
    job = message(cc=("refuse-451@example.com", "refuse-550@example.com"))

    with pytest.raises(TransientDeliveryError, match="2 of 4 recipients refused") as caught:
        await channel.send(job)

    assert caught.value.delivered == {
        "张三 <zhang.san@example.com>": None,
        "audit@example.com": None,
    }
    assert sink.messages[0].rcpt_tos == ["zhang.san@example.com", "audit@example.com"]


async def test_permanent_refusal_of_some_recipients_is_a_receipt_and_a_warning(
    channel: SMTPChannel, sink: SMTPSink, caplog: pytest.LogCaptureFixture
) -> None:
    job = message(cc=("Bad <refuse-550@example.com>",))

    with caplog.at_level(logging.WARNING, logger="notifier.channels.email"):
        receipt = await channel.send(job)

    assert set(receipt.provider_ids) == {"张三 <zhang.san@example.com>", "audit@example.com"}
    assert "Bad <refuse-550@example.com>: 550" in caplog.text
    assert len(sink.messages) == 1


async def test_wrong_password_is_permanent_and_not_repeated(
    tls_ca: trustme.CA, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_smtp_sink("ssl", tls_ca, credentials=("mailer", "other")) as sink:
        channel = SMTPChannel(
            settings(sink.port, ca_file, smtp_username="mailer", smtp_password=PASSWORD)
        )
        with caplog.at_level(logging.DEBUG), pytest.raises(PermanentDeliveryError) as caught:
            await channel.send(message())
        await channel.aclose()

    assert "AUTH (login) refused: 535" in caught.value.message
    assert PASSWORD not in caplog.text
    assert PASSWORD not in repr(channel.__dict__)
    chain: BaseException | None = caught.value
    while chain is not None:
        assert PASSWORD not in str(chain)
        chain = chain.__cause__ or chain.__context__


async def test_untrusted_certificate_is_permanent(sink: SMTPSink) -> None:
    channel = SMTPChannel(settings(sink.port, ca_file=None))

    with pytest.raises(PermanentDeliveryError, match="certificate is not trusted"):
        await channel.send(message())
    await channel.aclose()


async def test_server_without_starttls_is_refused_when_starttls_is_required(
    tls_ca: trustme.CA, ca_file: Path
) -> None:
    async with running_smtp_sink("none", tls_ca) as sink:
        channel = SMTPChannel(settings(sink.port, ca_file, smtp_security="starttls"))
        with pytest.raises(PermanentDeliveryError, match="STARTTLS"):
            await channel.send(message())
        await channel.aclose()

    assert sink.messages == []


async def test_nobody_listening_is_a_connection_error(ca_file: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    channel = SMTPChannel(settings(port, ca_file))

    with pytest.raises(DeliveryConnectionError, match="connection failed"):
        await channel.send(message())
    await channel.aclose()


async def test_a_silent_server_times_out(ca_file: Path) -> None:
    connected = asyncio.Event()
    release = asyncio.Event()

    async def never_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(never_greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = SMTPChannel(settings(port, ca_file, smtp_security="none", smtp_timeout=0.2))
    try:
        with pytest.raises(DeliveryTimeout, match="timed out"):
            await channel.send(message())
        assert connected.is_set()
    finally:
        release.set()
        server.close()
        await server.wait_closed()
        await channel.aclose()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"to": ("张三 <张三@example.com>",)}, "cannot build the message"),
        ({"bcc": ("audit@例子.测试",)}, "non-ASCII addresses need SMTPUTF8"),
    ],
)
async def test_non_ascii_address_is_permanent(
    fields: dict[str, Any], says: str, channel: SMTPChannel, sink: SMTPSink
) -> None:
    with pytest.raises(PermanentDeliveryError, match=says):
        await channel.send(message(**fields))

    assert sink.connections == 0


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (aiosmtplib.SMTPConnectResponseError(421, "busy"), TransientDeliveryError),
        (aiosmtplib.SMTPConnectResponseError(554, "no service"), PermanentDeliveryError),
        (aiosmtplib.SMTPAuthenticationError(454, "temporary auth failure"), TransientDeliveryError),
        (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), PermanentDeliveryError),
        (aiosmtplib.SMTPReadTimeoutError("slow"), DeliveryTimeout),
        (aiosmtplib.SMTPConnectTimeoutError("slow"), DeliveryTimeout),
        (aiosmtplib.SMTPServerDisconnected("gone"), DeliveryConnectionError),
        (ConnectionResetError("reset"), DeliveryConnectionError),
        (aiosmtplib.SMTPNotSupported("no AUTH"), PermanentDeliveryError),
    ],
)
def test_classification_table(error: BaseException, expected: type[DeliveryError]) -> None:
    result = classify_smtp_error(error)

    assert type(result) is expected


def test_create_channel_picks_outbox_or_smtp(tmp_path: Path) -> None:
    outbox = create_channel(Settings(_env_file=None, outbox_dir=tmp_path))  # type: ignore[call-arg]
    smtp = create_channel(settings(2525, None))

    assert isinstance(outbox, OutboxChannel) and outbox.simulated
    assert isinstance(smtp, SMTPChannel) and not smtp.simulated


@pytest.mark.parametrize(("security", "port"), [("ssl", 465), ("starttls", 587), ("none", 25)])
def test_default_port_follows_the_security_mode(security: str, port: int) -> None:
    values: dict[str, Any] = {"smtp_host": "mail.example.com", "smtp_security": security}
    channel = SMTPChannel(Settings(_env_file=None, **values))  # type: ignore[call-arg]

    assert channel.port == port
