"""The SMTP channel against a real aiosmtpd server on 127.0.0.1, with injected faults."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from notifier.channels.circuit import CircuitState
from notifier.channels.email import SMTPChannel, _Built, classify_smtp_error, create_channel
from notifier.channels.mime import email_bytes
from notifier.channels.outbox import OutboxChannel
from notifier.errors import (
    DeliveryConnectionError,
    DeliveryError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from notifier.metrics import Metrics
from notifier.models import Message
from notifier.settings import Settings, SettingsError
from tests.support.smtp import DROP, PASS, SMTPSink, running_smtp_sink
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


async def test_a_retry_sends_the_message_built_for_the_first_attempt(
    channel: SMTPChannel, sink: SMTPSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []

    def counting(job: Message, sender: str) -> bytes:
        built.append(job.id)
        return email_bytes(job, sender)

    monkeypatch.setattr("notifier.channels.email.email_bytes", counting)
    sink.fail_next("DATA", "451 4.3.0 try again later")
    with pytest.raises(TransientDeliveryError):
        await channel.send(message(1))
    await channel.send(message(1))
    sink.fail_next("DATA", "550 5.7.1 refused for good")
    with pytest.raises(PermanentDeliveryError):
        await channel.send(message(2))
    await channel.send(message(2))

    assert built == ["job1", "job2", "job2"]  # built again only after a final outcome
    assert [m.parsed()["Message-ID"] for m in sink.messages] == [
        "<fixed.1@example.com>",
        "<fixed.2@example.com>",
    ]


def test_kept_messages_are_bounded_oldest_let_go_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("notifier.channels.email.BUILT_KEPT", 2)
    monkeypatch.setattr("notifier.channels.email.BUILT_KEPT_BYTES", 10)
    built = _Built()
    for number in range(3):
        built.keep(f"job{number}", b"abc")
    built.keep("big", b"x" * 8)

    assert [built.take(f"job{n}") for n in range(3)] == [None, None, None]
    assert built.take("big") == b"x" * 8
    assert built.take("big") is None


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


def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on: a relay that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fallback_to(sink: SMTPSink, primary_port: int, ca_file: Path, **overrides: Any) -> Settings:
    return settings(
        primary_port,
        ca_file,
        smtp_fallback_host="127.0.0.1",
        smtp_fallback_port=sink.port,
        **overrides,
    )


async def test_the_session_window_grows_while_a_prompt_relay_has_work_waiting(
    sink: SMTPSink, ca_file: Path
) -> None:
    sink.data_delay = 0.02
    channel = SMTPChannel(settings(sink.port, ca_file, smtp_pool_size=8))
    (window,) = channel.windows.values()
    assert window.size == 2

    await asyncio.gather(*(channel.send(message(n)) for n in range(1, 121)))
    await channel.aclose()

    assert len(sink.messages) == 120
    assert window.size > 2
    assert 2 < sink.peak_sessions <= 8


async def test_the_session_window_shrinks_when_the_relay_refuses_more_sessions(
    sink: SMTPSink, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink.data_delay = 0.02
    sink.max_sessions = 3
    channel = SMTPChannel(settings(sink.port, ca_file, smtp_pool_size=8))
    (window,) = channel.windows.values()

    with caplog.at_level(logging.INFO, logger="notifier.channels.email"):
        await asyncio.gather(*(channel.send(message(n)) for n in range(1, 121)))
    await channel.aclose()

    assert len(sink.messages) == 120
    assert sink.refused_sessions >= 1
    assert "refused another session" in caplog.text
    assert window.size <= 4


async def test_the_window_is_exported_as_a_gauge(channel: SMTPChannel, sink: SMTPSink) -> None:
    metrics = Metrics()
    metrics.watch_smtp_windows(channel.windows)

    rendered = metrics.render().decode()

    assert f'notifier_smtp_sessions_window{{relay="127.0.0.1:{sink.port}"}} 2.0' in rendered


@pytest.mark.parametrize("primary", ["down", "421"])
async def test_a_failing_primary_hands_the_message_to_the_fallback_at_once(
    primary: str, sink: SMTPSink, tls_ca: trustme.CA, ca_file: Path
) -> None:
    async with running_smtp_sink("ssl", tls_ca) as refusing:
        refusing.max_sessions = 0
        port = closed_port() if primary == "down" else refusing.port
        channel = SMTPChannel(fallback_to(sink, port, ca_file))
        receipt = await channel.send(message())
        await channel.aclose()

    assert len(sink.messages) == 1
    assert refusing.messages == []
    assert receipt.providers == {
        "张三 <zhang.san@example.com>": f"127.0.0.1:{sink.port}",
        "audit@example.com": f"127.0.0.1:{sink.port}",
    }


async def test_without_a_fallback_a_refusing_relay_is_a_transient_error(
    sink: SMTPSink, ca_file: Path
) -> None:
    sink.max_sessions = 0
    channel = SMTPChannel(settings(sink.port, ca_file))

    with pytest.raises(TransientDeliveryError, match="greeting refused: 421"):
        await channel.send(message())
    await channel.aclose()


@asynccontextmanager
async def behind_a_refusing_primary(
    fallback: SMTPSink, tls_ca: trustme.CA, ca_file: Path, *, failures: int
) -> AsyncIterator[tuple[SMTPSink, SMTPChannel, FakeClock]]:
    """A channel whose primary answers every session 421, its circuits on a fake clock."""
    clock = FakeClock()
    async with running_smtp_sink("ssl", tls_ca) as primary:
        primary.max_sessions = 0
        config = fallback_to(
            fallback, primary.port, ca_file, circuit_failures=failures, circuit_open_seconds=30
        )
        channel = SMTPChannel(config, clock=clock)
        try:
            yield primary, channel, clock
        finally:
            await channel.aclose()


async def test_the_circuit_opens_on_failures_and_a_half_open_probe_closes_it(
    sink: SMTPSink, tls_ca: trustme.CA, ca_file: Path
) -> None:
    async with behind_a_refusing_primary(sink, tls_ca, ca_file, failures=2) as (
        primary,
        channel,
        clock,
    ):
        for number in (1, 2):
            await channel.send(message(number))
        assert primary.refused_sessions == 2
        assert [c.state for c in channel.circuits] == [CircuitState.OPEN, CircuitState.CLOSED]

        receipt = await channel.send(message(3))  # open: the primary is not asked
        assert primary.connections == 2
        assert set(receipt.providers.values()) == {f"127.0.0.1:{sink.port}"}

        primary.max_sessions = None
        clock.now += 30
        probe = await channel.send(message(4))  # half-open: this one probes the primary
        after = await channel.send(message(5))  # closed again
    assert channel.circuits[0].state is CircuitState.CLOSED

    assert len(sink.messages) == 3
    assert [m.parsed()["Message-ID"] for m in primary.messages] == [
        "<fixed.4@example.com>",
        "<fixed.5@example.com>",
    ]
    assert (
        set(probe.providers.values())
        == set(after.providers.values())
        == {f"127.0.0.1:{primary.port}"}
    )


async def test_a_failed_probe_opens_the_circuit_again(
    sink: SMTPSink, tls_ca: trustme.CA, ca_file: Path
) -> None:
    async with behind_a_refusing_primary(sink, tls_ca, ca_file, failures=1) as (
        primary,
        channel,
        clock,
    ):
        await channel.send(message(1))
        clock.now += 30
        await channel.send(message(2))  # the probe fails, the fallback delivers
        await channel.send(message(3))

    assert primary.refused_sessions == 2
    assert len(sink.messages) == 3


async def test_every_circuit_open_is_transient_without_trying(
    tls_ca: trustme.CA, ca_file: Path
) -> None:
    clock = FakeClock()
    async with (
        running_smtp_sink("ssl", tls_ca) as primary,
        running_smtp_sink("ssl", tls_ca) as fallback,
    ):
        primary.max_sessions = fallback.max_sessions = 0
        channel = SMTPChannel(
            fallback_to(fallback, primary.port, ca_file, circuit_failures=1), clock=clock
        )
        with pytest.raises(TransientDeliveryError, match="greeting refused: 421"):
            await channel.send(message(1))
        with pytest.raises(TransientDeliveryError, match="circuit open for every relay") as caught:
            await channel.send(message(2))
        await channel.aclose()

    assert caught.value.retry_after == 30
    assert primary.connections == fallback.connections == 1


def crowd(count: int) -> tuple[str, ...]:
    return tuple(f"Reader {n} <reader{n}@example.com>" for n in range(count))


async def test_many_recipients_go_in_several_transactions_each_once(
    channel: SMTPChannel, sink: SMTPSink
) -> None:
    receipt = await channel.send(message(to=crowd(249)))  # and the bcc: 250

    assert [len(m.rcpt_tos) for m in sink.messages] == [100, 100, 50]
    addresses = [address for m in sink.messages for address in m.rcpt_tos]
    assert sorted(addresses) == sorted(
        [f"reader{n}@example.com" for n in range(249)] + ["audit@example.com"]
    )
    assert {m.parsed()["Message-ID"] for m in sink.messages} == {"<fixed.1@example.com>"}
    assert len(receipt.provider_ids) == 250
    assert receipt.provider_message_id is not None
    assert receipt.provider_message_id.count("queued as") == 3


async def test_a_failed_transaction_leaves_only_its_recipients_and_later_ones_to_retry(
    channel: SMTPChannel, sink: SMTPSink
) -> None:
    job = message(to=crowd(249))
    sink.fail_next("DATA", PASS)
    sink.fail_next("DATA", "451 4.3.0 try again later")

    with pytest.raises(TransientDeliveryError, match="DATA refused: 451") as caught:
        await channel.send(job)
    first = set(caught.value.delivered)
    retry = await channel.send(replace(job, skip=tuple(first)))

    assert len(first) == 100
    assert [len(m.rcpt_tos) for m in sink.messages] == [100, 100, 50]
    assert first.isdisjoint(retry.provider_ids)
    assert len(first | set(retry.provider_ids)) == 250


def test_a_fallback_that_is_the_primary_is_refused(ca_file: Path) -> None:
    with pytest.raises(SettingsError, match=r"NOTIFIER_SMTP_FALLBACK_HOST: 127\.0\.0\.1:2525"):
        SMTPChannel(fallback_to(SMTPSink(port=2525), 2525, ca_file))


async def test_a_timeout_once_the_message_is_sent_is_not_handed_to_the_fallback(
    sink: SMTPSink, tls_ca: trustme.CA, ca_file: Path
) -> None:
    async with running_smtp_sink("ssl", tls_ca) as slow:
        slow.data_delay = 30  # longer than smtp_timeout: the reply to DATA never comes in time
        channel = SMTPChannel(
            fallback_to(sink, slow.port, ca_file, smtp_timeout=0.3, circuit_failures=1)
        )
        with pytest.raises(DeliveryTimeout):
            await channel.send(message())
        await channel.aclose()

    assert sink.connections == 0
    assert channel.circuits[0].state is CircuitState.OPEN
