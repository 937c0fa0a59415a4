"""A real SMTP server (aiosmtpd) in the test's event loop, on 127.0.0.1 port 0.

Three security modes, as the channel has them: ``ssl`` (implicit TLS), ``starttls`` (TLS
required before MAIL) and ``none``, with trustme certificates. Faults are injected two ways:

- by a marker in a recipient's local part: ``refuse-550@...`` (or any 4xx/5xx code) is
  refused at RCPT TO with that code;
- by script: ``sink.fail_next("DATA", "451 4.3.0 try later")`` answers the next DATA so,
  ``sink.fail_next("MAIL", DROP)`` closes the connection instead of answering, and
  ``sink.fail_next("DATA", PASS)`` lets one through before the next scripted reply;
- by limits: ``sink.max_sessions = 3`` greets a fourth concurrent session with ``421 too many
  connections`` (``0``: every session, a relay that is up but refuses service), and
  ``sink.data_delay`` answers each DATA that many seconds late, like a relay that queues.

The sink records every accepted message (envelope and raw bytes), the connections made, the
most sessions open at once and the logins, so tests can check what arrived and how many
sessions carried it.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import ssl
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

Security = Literal["ssl", "starttls", "none"]

#: A scripted reply that closes the connection without answering.
DROP = "drop"
#: A scripted reply that answers as if nothing were scripted.
PASS = "pass"

TOO_MANY = "421 4.7.0 too many connections, try later"

_MARKER = re.compile(r"^refuse-([45]\d\d)@")


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    def parsed(self) -> EmailMessage:
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class SMTPSink:
    host: str = "127.0.0.1"
    port: int = 0
    credentials: tuple[str, str] | None = None
    messages: list[ReceivedMail] = field(default_factory=list)
    connections: int = 0
    logins: list[str] = field(default_factory=list)
    quits: int = 0
    max_sessions: int | None = None
    data_delay: float = 0.0
    sessions: int = 0
    peak_sessions: int = 0
    refused_sessions: int = 0
    _script: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))

    def fail_next(self, command: str, reply: str) -> None:
        """Answer the next ``command`` (MAIL, RCPT, DATA) with ``reply``, or DROP the line."""
        self._script[command.upper()].append(reply)

    def _scripted(self, server: SMTP, command: str) -> str | None:
        if not self._script[command]:
            return None
        reply = self._script[command].popleft()
        if reply == PASS:
            return None
        if reply == DROP:
            assert server.transport is not None
            server.transport.close()
            return "421 4.4.2 connection dropped by the test"
        return reply

    # aiosmtpd handler hooks

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if (reply := self._scripted(server, "MAIL")) is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if (reply := self._scripted(server, "RCPT")) is not None:
            return reply
        marker = _MARKER.match(address)
        if marker is not None:
            return f"{marker.group(1)} {marker.group(1)[0]}.1.1 <{address}> refused by marker"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if (reply := self._scripted(server, "DATA")) is not None:
            return reply
        assert envelope.mail_from is not None and isinstance(envelope.content, bytes)
        if self.data_delay:
            await asyncio.sleep(self.data_delay)  # the relay's latency, not a synchronisation
        self.messages.append(
            ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return "221 Bye"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login = (data.login.decode(), data.password.decode())
        if login != self.credentials:
            return AuthResult(success=False, handled=False)
        self.logins.append(login[0])
        return AuthResult(success=True)


class _LimitedSMTP(SMTP):
    """aiosmtpd's server, counting its concurrent sessions and refusing those past the limit."""

    def __init__(self, sink: SMTPSink, **options: Any) -> None:
        super().__init__(sink, **options)
        self._sink = sink

    async def _handle_client(self) -> None:
        sink = self._sink
        if sink.max_sessions is not None and sink.sessions >= sink.max_sessions:
            sink.refused_sessions += 1
            await self.push(TOO_MANY)
            assert self.transport is not None
            self.transport.close()
            return
        sink.sessions += 1
        sink.peak_sessions = max(sink.peak_sessions, sink.sessions)
        try:
            await super()._handle_client()
        finally:
            sink.sessions -= 1


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@asynccontextmanager
async def running_smtp_sink(
    security: Security,
    ca: trustme.CA,
    *,
    credentials: tuple[str, str] | None = None,
    sink: SMTPSink | None = None,
) -> AsyncIterator[SMTPSink]:
    """Serve SMTP in this event loop until the block ends (with ``sink``'s hooks, if given)."""
    sink = sink or SMTPSink(credentials=credentials)
    tls = server_context(ca) if security != "none" else None
    loop = asyncio.get_running_loop()

    def protocol() -> SMTP:
        sink.connections += 1
        return _LimitedSMTP(
            sink,
            hostname="sink.test",
            loop=loop,
            # Implicit TLS wraps the whole connection, so aiosmtpd must not offer STARTTLS.
            tls_context=tls if security == "starttls" else None,
            require_starttls=security == "starttls",
            authenticator=sink.authenticate if credentials else None,
            auth_require_tls=security == "starttls",
        )

    server = await loop.create_server(
        protocol, sink.host, 0, ssl=tls if security == "ssl" else None
    )
    sink.port = server.sockets[0].getsockname()[1]
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority for the test servers."""
    return trustme.CA()


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> Path:
    """The test CA as a PEM file, for NOTIFIER_SMTP_CA_FILE."""
    path = tmp_path / "test-ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path
