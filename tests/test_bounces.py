"""The bounce reader: DSN parsing on Postfix and Exchange samples, the mailbox URL, and the
loop against a real Dovecot over POP3, POP3S, IMAP and IMAPS (tests/support/dovecot.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from notifier.bounces import (
    Bounce,
    BounceReader,
    DSNError,
    MailboxConfig,
    MailboxError,
    parse_dsn,
    parse_mailbox_url,
)
from notifier.bounces.dsn import is_dsn, parse_message
from notifier.settings import SettingsError, load_settings
from tests.support.dovecot import SCHEMES, DovecotServer
from tests.support.server import LineConnection, running_server
from tests.support.waiting import wait_for

DATA = Path(__file__).parent / "data" / "bounces"

USER_UNKNOWN = Bounce(
    "<0b8f1c2ad3e94f5a8b7c6d5e4f3a2b10@notify.example.com>",
    "no.such.user@example.org",
    "5.1.1",
    "550 5.1.1 <no.such.user@example.org>: Recipient address rejected: "
    "User unknown in virtual mailbox table",
)
EXCHANGE = Bounce(
    "<5e9d0c1b2a3f4e5d6c7b8a9f0e1d2c3b@notify.example.com>",
    "zhang.san@contoso.com",
    "5.1.10",
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient zhang.san@contoso.com "
    "not found by SMTP address lookup",
)


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


# --- DSN parsing -----------------------------------------------------------------------------


def test_postfix_report_with_returned_headers() -> None:
    assert parse_dsn(parse_message(sample("postfix-user-unknown.eml"))) == [USER_UNKNOWN]


def test_postfix_report_with_the_whole_message_and_two_recipients() -> None:
    bounces = parse_dsn(parse_message(sample("postfix-two-recipients.eml")))
    message_id = "<7d41e0c9b2a64f1e9c3b8a7f6e5d4c21@notify.example.com>"
    assert bounces == [
        Bounce(
            message_id, "full@example.net", "5.2.2", "552 5.2.2 <full@example.net>: Mailbox full"
        ),
        Bounce(
            message_id,
            "gone@example.net",
            "5.1.1",
            "550 5.1.1 <gone@example.net>: Recipient address rejected: User unknown",
        ),
    ]
    assert bounces[0].reason == "5.2.2 552 5.2.2 <full@example.net>: Mailbox full"


def test_exchange_ndr() -> None:
    assert parse_dsn(parse_message(sample("exchange-recipient-not-found.eml"))) == [EXCHANGE]


def test_message_id_from_in_reply_to_when_no_original_headers_come_back() -> None:
    raw = sample("exchange-recipient-not-found.eml").replace(
        b"Content-Type: text/rfc822-headers", b"Content-Type: text/plain"
    )
    assert parse_dsn(parse_message(raw)) == [EXCHANGE]


def test_a_delay_report_is_no_bounce() -> None:
    message = parse_message(sample("postfix-delayed.eml"))
    assert is_dsn(message)
    assert parse_dsn(message) == []


def test_a_report_without_recipient_or_message_id_is_an_error() -> None:
    message = parse_message(sample("unparseable-report.eml"))
    assert is_dsn(message)
    with pytest.raises(DSNError, match="Message-ID"):
        parse_dsn(message)


def test_a_failed_block_without_recipient_is_an_error() -> None:
    raw = sample("postfix-user-unknown.eml")
    raw = raw.replace(b"Final-Recipient: rfc822; no.such.user@example.org\n", b"")
    raw = raw.replace(b"Original-Recipient: rfc822;no.such.user@example.org\n", b"")
    with pytest.raises(DSNError, match="Final-Recipient"):
        parse_dsn(parse_message(raw))


def test_an_ordinary_message_is_no_dsn() -> None:
    message = parse_message(sample("out-of-office.eml"))
    assert not is_dsn(message)
    with pytest.raises(DSNError):
        parse_dsn(message)


# --- the mailbox URL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "protocol", "tls", "port"),
    [
        ("pop3://bob:pw@mail.example.com", "pop3", False, 110),
        ("pop3s://bob:pw@mail.example.com", "pop3", True, 995),
        ("imap://bob:pw@mail.example.com", "imap", False, 143),
        ("imaps://bob:pw@mail.example.com:10993", "imap", True, 10993),
    ],
)
def test_mailbox_url(url: str, protocol: str, tls: bool, port: int) -> None:
    config = parse_mailbox_url(url)
    assert (config.protocol, config.tls, config.host, config.port) == (
        protocol,
        tls,
        "mail.example.com",
        port,
    )


def test_mailbox_url_is_percent_decoded_and_the_password_hidden() -> None:
    config = parse_mailbox_url("imaps://bounces%40example.com:p%40ss%3Aword@mail.example.com")
    assert config.username == "bounces@example.com"
    assert config.password.get_secret_value() == "p@ss:word"
    assert "p@ss" not in repr(config)
    assert config.display == "imaps://bounces@example.com@mail.example.com:993"


def test_settings_give_the_typed_mailbox(tmp_path: Path) -> None:
    settings = load_settings(
        bounce_mailbox="pop3s://bob:hunter2@127.0.0.1:1995", bounce_ca_file=str(tmp_path)
    )
    assert settings.bounce_poll_interval == 60
    assert "hunter2" not in repr(settings)
    config = settings.bounce_mailbox_config()
    assert config is not None
    assert (config.protocol, config.tls, config.port, config.ca_file) == (
        "pop3",
        True,
        1995,
        tmp_path,
    )
    assert load_settings(bounce_mailbox="").bounce_mailbox_config() is None


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("smtp://bob:hunter2@mail.example.com", "scheme"),
        ("imaps://bob@mail.example.com", "user:password"),
        ("imaps://:hunter2@mail.example.com", "user:password"),
        ("imaps://bob:hunter2@", "no host"),
        ("imaps://bob:hunter2@mail.example.com:port", "not a mailbox URL"),
        ("imaps://bob:hunter2@mail.example.com/Bounces", "no path"),
    ],
)
def test_bad_mailbox_url_names_the_variable_not_the_password(url: str, problem: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(bounce_mailbox=url)
    assert "NOTIFIER_BOUNCE_MAILBOX" in str(caught.value)
    assert problem in str(caught.value)
    assert "hunter2" not in str(caught.value)


# --- the reader against Dovecot ---------------------------------------------------------------


class Sink:
    """The store's side: records bounces, or refuses while ``failing``."""

    def __init__(self) -> None:
        self.bounces: list[Bounce] = []
        self.failing = False
        self.attempts = 0

    async def record(self, bounces: list[Bounce]) -> None:
        self.attempts += 1
        if self.failing:
            raise ConnectionError("store unavailable")
        self.bounces.extend(bounces)


def config_for(
    mailbox: DovecotServer, scheme: str, ca_file: Path, **options: object
) -> MailboxConfig:
    config = load_settings(
        bounce_mailbox=mailbox.url(scheme, **options),  # type: ignore[arg-type]
        bounce_ca_file=str(ca_file),
    ).bounce_mailbox_config()
    assert config is not None
    return config


@pytest.fixture(params=SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_reads_records_and_deletes(
    dovecot: DovecotServer, scheme: str, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (
        "postfix-user-unknown.eml",
        "exchange-recipient-not-found.eml",
        "postfix-delayed.eml",
        "out-of-office.eml",
        "unparseable-report.eml",
    ):
        dovecot.deliver(sample(name))
    sink = Sink()
    reader = BounceReader(config_for(dovecot, scheme, ca_file), sink.record)
    with caplog.at_level(logging.INFO, logger="notifier.bounces"):
        result = await reader.poll()
    assert result is not None
    assert (result.bounces, result.deleted, result.kept) == (2, 4, 1)
    assert sorted(sink.bounces, key=lambda b: b.recipient) == [USER_UNKNOWN, EXCHANGE]
    (left,) = dovecot.messages()
    assert b"<broken-report-1@relay.example.com>" in left
    assert "<ooo-20261202054500@example.com>" in caplog.text  # the non-DSN, deleted
    assert "<broken-report-1@relay.example.com>" in caplog.text  # the unparseable, kept
    again = await reader.poll()
    assert again is not None
    assert (again.deleted, again.kept) == (0, 1)
    assert len(sink.bounces) == 2


async def test_odd_messages_neither_crash_nor_stop_the_reader(
    dovecot: DovecotServer, ca_file: Path
) -> None:
    dovecot.deliver(b"\xff\xfe\x00 not mail at all \x80\x81\n\n\x00\xff")
    dovecot.deliver(
        b"From: MAILER-DAEMON@example.com\nSubject: =?bogus?Q?x?=\nMIME-Version: 1.0\n"
        b"Content-Type: multipart/report; report-type=delivery-status\n\nno boundary\n"
    )
    dovecot.deliver(sample("postfix-user-unknown.eml"))
    sink = Sink()
    result = await BounceReader(config_for(dovecot, "imaps", ca_file), sink.record).poll()
    assert result is not None
    assert (result.bounces, result.deleted, result.kept) == (1, 2, 1)
    assert sink.bounces == [USER_UNKNOWN]
    (left,) = dovecot.messages()
    assert b"no boundary" in left


async def test_a_failing_sink_keeps_the_message_for_the_next_poll(
    dovecot: DovecotServer, scheme: str, ca_file: Path
) -> None:
    dovecot.deliver(sample("postfix-user-unknown.eml"))
    dovecot.deliver(sample("exchange-recipient-not-found.eml"))
    sink = Sink()
    sink.failing = True
    reader = BounceReader(config_for(dovecot, scheme, ca_file), sink.record)
    result = await reader.poll()
    assert result is not None
    assert (result.deleted, result.kept, sink.attempts) == (0, 1, 1)  # the poll ends there
    assert len(dovecot.messages()) == 2
    sink.failing = False
    await reader.poll()
    assert sorted(sink.bounces, key=lambda b: b.recipient) == [USER_UNKNOWN, EXCHANGE]
    assert dovecot.messages() == []


async def test_another_instance_holding_the_lock_skips_the_poll(
    dovecot: DovecotServer, ca_file: Path
) -> None:
    @asynccontextmanager
    async def taken() -> AsyncIterator[bool]:
        yield False

    dovecot.deliver(sample("postfix-user-unknown.eml"))
    sink = Sink()
    reader = BounceReader(config_for(dovecot, "imap", ca_file), sink.record, exclusive=taken)
    assert await reader.poll() is None
    assert sink.bounces == []
    assert len(dovecot.messages()) == 1


async def test_each_poll_reads_inside_the_lock(dovecot: DovecotServer, ca_file: Path) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lock() -> AsyncIterator[bool]:
        events.append("locked")
        yield True
        events.append("unlocked")

    async def record(bounces: list[Bounce]) -> None:
        events.append("recorded")

    dovecot.deliver(sample("postfix-user-unknown.eml"))
    reader = BounceReader(config_for(dovecot, "pop3", ca_file), record, exclusive=lock)
    await reader.poll()
    await reader.poll()
    assert events == ["locked", "recorded", "unlocked", "locked", "unlocked"]


async def test_a_wrong_password_is_a_mailbox_error_without_the_password(
    dovecot_alone: DovecotServer, scheme: str, ca_file: Path
) -> None:
    dovecot = dovecot_alone
    wrong = f"wrong-{secrets.token_hex(6)}"
    reader = BounceReader(config_for(dovecot, scheme, ca_file, password=wrong), Sink().record)
    with pytest.raises(MailboxError) as caught:
        await reader.poll()
    assert dovecot.user in str(caught.value)
    assert wrong not in str(caught.value)
    assert wrong not in repr(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


async def test_an_unreachable_mailbox_is_a_mailbox_error(ca_file: Path) -> None:
    with bound_socket() as refusing:
        port = refusing.getsockname()[1]
        config = parse_mailbox_url(f"imaps://bob:hunter2@127.0.0.1:{port}", ca_file=ca_file)
        with pytest.raises(MailboxError, match=f"imaps://bob@127.0.0.1:{port}") as caught:
            await BounceReader(config, Sink().record).poll()
    assert "hunter2" not in str(caught.value)


async def test_the_loop_retries_until_the_mailbox_answers_and_never_logs_the_password(
    dovecot: DovecotServer, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dovecot.deliver(sample("postfix-user-unknown.eml"))
    sink = Sink()
    with bound_socket() as mailbox_socket, caplog.at_level(logging.DEBUG):
        port = mailbox_socket.getsockname()[1]
        config = config_for(dovecot, "pop3s", ca_file, port=port)
        async with BounceReader(config, sink.record, interval=0.05).running():
            await wait_for(
                lambda: caplog.text.count("bounce mailbox unavailable") >= 2,
                what="failed polls logged",
            )
            async with forwarding(mailbox_socket, dovecot.ports["pop3s"]):
                await wait_for(lambda: sink.bounces, what="the bounce recorded")
                await wait_for(lambda: not dovecot.messages(), what="the report deleted")
    assert sink.bounces == [USER_UNKNOWN]
    assert dovecot.password not in caplog.text
    assert f"pop3s://{dovecot.user}@127.0.0.1:{port}" in caplog.text


async def test_stop_ends_the_loop(dovecot: DovecotServer, ca_file: Path) -> None:
    reader = BounceReader(config_for(dovecot, "imaps", ca_file), Sink().record, interval=3600)
    await reader.start()
    with pytest.raises(RuntimeError, match="already started"):
        await reader.start()
    await reader.stop()
    await reader.stop()
    assert [t for t in asyncio.all_tasks() if t.get_name() == "bounces"] == []


@contextmanager
def bound_socket() -> Iterator[socket.socket]:
    """Bound but not listening: connections to it are refused until ``forwarding``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


@asynccontextmanager
async def forwarding(sock: socket.socket, upstream_port: int) -> AsyncIterator[None]:
    """Start listening on ``sock``, passing each connection through to ``upstream_port``."""
    connections: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for each in (writer, up_writer):
                each.close()
                with contextlib.suppress(OSError):
                    await each.wait_closed()

    server = await asyncio.start_server(serve, sock=sock)
    try:
        yield
    finally:
        server.close()
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


# --- through the running service: a hard bounce suppresses the address -----------------------


async def test_a_hard_bounce_in_the_mailbox_suppresses_the_address(
    tmp_path: Path, dovecot: DovecotServer
) -> None:
    to = "No Such User <No.Such.User@example.org>"
    email = {"channel": "email", "to": to, "subject": "Hi", "text": "x"}
    async with running_server(
        tmp_path, bounce_mailbox=dovecot.url("imap"), bounce_poll_interval=0.1
    ) as server:
        conn = await LineConnection.open(server.port)

        async def status_when(job_id: str, done: Callable[[dict[str, Any]], bool]) -> Any:
            answer = await conn.request({"op": "status", "id": job_id})
            return answer if done(answer) else None

        sent = await conn.request(email)
        await wait_for(lambda: status_when(sent["id"], lambda a: a["status"] == "delivered"))
        report = sample("postfix-user-unknown.eml").replace(
            b"0b8f1c2ad3e94f5a8b7c6d5e4f3a2b10@notify.example.com",
            f"{sent['id']}@localhost".encode(),
        )
        dovecot.deliver(report)
        answer = await wait_for(
            lambda: status_when(sent["id"], lambda a: "receipts" in a), what="the bounce"
        )
        receipt = answer["receipts"][to]
        assert receipt["state"] == "bounced" and receipt["reason"].startswith("5.1.1")
        await wait_for(lambda: not dovecot.messages(), what="the report deleted")
        assert await server.service.store.suppressed({"no.such.user@example.org"})
        again = await conn.request(email)
        failed = await wait_for(
            lambda: status_when(again["id"], lambda a: a["status"] == "failed"),
            what="the next email to it failed at once",
        )
        assert "suppressed" in failed["last_error"]
        await conn.close()
