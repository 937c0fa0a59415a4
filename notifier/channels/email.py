"""Email over SMTP (aiosmtplib); the outbox stands in while no SMTP host is configured.

Sessions are pooled per relay, each carrying many messages, because a TLS handshake plus
AUTH per message costs more than the message. How many may be in use is an AIMD window
(``aimd.AIMDWindow``) between 2 and ``NOTIFIER_SMTP_POOL_SIZE``: it grows while messages
wait and the relay answers promptly, and halves when the relay fails or refuses a session.
After a successful DATA the session is ready for the next MAIL FROM; after a refusal
aiosmtplib sends RSET. A pooled session the server has dropped (idle timeout, ``421`` "too
many messages") is replaced by a fresh one for the same message, once.

Relays: the primary (``NOTIFIER_SMTP_HOST``) and optionally a fallback
(``NOTIFIER_SMTP_FALLBACK_HOST``), each behind a ``circuit.CircuitBreaker``. A relay failing
as a whole (``_RelayFailed``: no session, a fresh session closed or answering 421) hands the
transaction to the next relay at once; a timeout after the session was up is not handed
over, as the first relay may have taken the message. More than
``NOTIFIER_SMTP_MAX_RECIPIENTS`` envelope recipients go in several transactions of the same
message, and ``Receipt.providers`` names the relay that took each recipient.

Security (``NOTIFIER_SMTP_SECURITY``): ``ssl`` is implicit TLS (port 465, as 163.com and
QQ Mail use it), ``starttls`` upgrades a plain connection (port 587 unless
``NOTIFIER_SMTP_PORT`` says otherwise), ``none`` sends in clear (port 25 unless set).
Certificates are always verified, against the system CAs plus ``NOTIFIER_SMTP_CA_FILE``.

Classification, done only by ``classify_smtp_error``: a 4xx reply, a timeout or a lost
connection is transient; a 5xx reply, refused credentials, an untrusted certificate or a
server lacking what the settings ask for (STARTTLS, AUTH) is permanent.

Partly refused recipients (some RCPT TO accepted, others not): the message goes to the
accepted ones, then

- if any refusal is temporary (4xx), ``TransientDeliveryError`` is raised with
  ``delivered`` naming the accepted recipients, so the retry goes only to the others;
- if every refusal is permanent (5xx), the job counts as delivered: ``send`` returns a
  ``Receipt`` whose ``provider_ids`` hold only the accepted recipients (a recipient missing
  from it was refused) and logs a warning naming each refused recipient and the reply.

The message is built once per job: bytes kept from an attempt that failed transiently are
sent again by the retry (``_Built``), so a retry costs no email-package work and carries the
same ``Date``. At most ``BUILT_KEPT`` messages and ``BUILT_KEPT_BYTES`` are kept, the oldest
let go first; a job whose bytes were let go (or that another instance retries) is built
again, differing only in ``Date``.

Recipients are keyed as the job spells them (``"张三 <z@example.com>"``), see
``mime.envelope``. The ``Receipt.provider_message_id`` is the server's reply to DATA
("2.0.0 Ok: queued as 4F2A1C"), the handle to look a message up in the server's logs.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import aiosmtplib
from aiosmtplib import SMTPResponse
from pydantic import SecretStr

from notifier.channels.aimd import AIMDWindow
from notifier.channels.base import Channel
from notifier.channels.circuit import CircuitBreaker
from notifier.channels.mime import email_bytes, envelope, parse_mailbox
from notifier.channels.outbox import OutboxChannel
from notifier.errors import (
    DeliveryConnectionError,
    DeliveryError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from notifier.models import Message, Receipt
from notifier.settings import Settings, SettingsError

log = logging.getLogger(__name__)

#: The port each security mode uses when NOTIFIER_SMTP_PORT is not set.
DEFAULT_PORTS = {"ssl": 465, "starttls": 587, "none": 25}

#: What the client was doing when the server refused, for error messages.
_REFUSED_STEP: tuple[tuple[type[aiosmtplib.SMTPResponseException], str], ...] = (
    (aiosmtplib.SMTPConnectResponseError, "greeting"),
    (aiosmtplib.SMTPHeloError, "EHLO"),
    (aiosmtplib.SMTPAuthenticationError, "AUTH (login)"),
    (aiosmtplib.SMTPSenderRefused, "MAIL FROM"),
    (aiosmtplib.SMTPRecipientRefused, "RCPT TO"),
    (aiosmtplib.SMTPDataError, "DATA"),
)


def _is_transient_code(code: int) -> bool:
    return 400 <= code < 500


def _certificate_problem(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure behind ``exc`` (aiosmtplib wraps it in a connect error)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _refusals(refused: Mapping[str, SMTPResponse], names: Mapping[str, str]) -> str:
    return "; ".join(
        f"{names.get(address, address)}: {reply.code} {reply.message}"
        for address, reply in refused.items()
    )


def _every_refused(refused: Mapping[str, SMTPResponse], names: Mapping[str, str]) -> DeliveryError:
    text = f"smtp: every recipient refused: {_refusals(refused, names)}"
    if any(_is_transient_code(reply.code) for reply in refused.values()):
        return TransientDeliveryError(text)
    return PermanentDeliveryError(text)


def classify_smtp_error(
    exc: BaseException, recipients: Mapping[str, str] | None = None
) -> DeliveryError:
    """Map an aiosmtplib (or socket) failure onto the delivery error tree.

    ``recipients`` maps envelope addresses to the job's spelling, for messages about
    refused recipients. The caller raises the result ``from exc``.
    """
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = {r.recipient: SMTPResponse(r.code, r.message) for r in exc.recipients}
        return _every_refused(refused, recipients or {})
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        step = next((name for cls, name in _REFUSED_STEP if isinstance(exc, cls)), "command")
        text = f"smtp: {step} refused: {exc.code} {exc.message}"
        if exc.code >= 500:
            return PermanentDeliveryError(text)
        return TransientDeliveryError(text)
    if isinstance(exc, TimeoutError):
        return DeliveryTimeout(f"smtp: timed out: {exc}")
    problem = _certificate_problem(exc)
    if problem is not None:
        return PermanentDeliveryError(
            f"smtp: the server's certificate is not trusted ({problem.verify_message}); "
            "set NOTIFIER_SMTP_CA_FILE to the CA that signed it"
        )
    if isinstance(exc, OSError):  # ConnectionError and aiosmtplib's connect errors included
        return DeliveryConnectionError(f"smtp: connection failed: {exc}")
    # What remains is the server lacking what the settings require (STARTTLS, AUTH).
    return PermanentDeliveryError(f"smtp: {exc}")


def _stale(exc: BaseException) -> bool:
    """Whether a reused session failed because the server let it go, not the message."""
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return True
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code == 421 for r in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 421


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system trust anchors, plus ``ca_file`` when set (a private CA, not instead)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"NOTIFIER_SMTP_CA_FILE: cannot load {ca_file}: {exc}") from exc
    return context


#: Times a delivery waits for another slot when a new session is refused with a 4xx while
#: the relay serves others ("421 too many connections"), before it counts as the relay down.
BUSY_RETRIES = 3

#: How many built messages, and bytes, are kept for retries (see the module docstring).
BUILT_KEPT = 1024
BUILT_KEPT_BYTES = 32 * 1024 * 1024


class _Built:
    """Messages of jobs waiting for a retry, by job id, bounded (oldest let go first)."""

    def __init__(self) -> None:
        self._kept: dict[str, bytes] = {}
        self._bytes = 0

    def take(self, job_id: str) -> bytes | None:
        data = self._kept.pop(job_id, None)
        self._bytes -= len(data or b"")
        return data

    def keep(self, job_id: str, data: bytes) -> None:
        self._kept[job_id] = data
        self._bytes += len(data)
        while len(self._kept) > BUILT_KEPT or self._bytes > BUILT_KEPT_BYTES:
            self.take(next(iter(self._kept)))


#: The floor of each relay's session window (Postfix starts a destination at 2 sessions).
WINDOW_FLOOR = 2


class _RelayFailed(Exception):
    """The relay failed as a whole, not the message: ``error`` is what the job would get.

    ``busy``: a new session was refused with a 4xx reply (the relay may serve fewer sessions);
    ``failover``: the message surely did not go through, so another relay may take it.
    """

    def __init__(self, error: DeliveryError, *, busy: bool = False, failover: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.busy = busy
        self.failover = failover


def _session_failure(
    exc: BaseException, recipients: dict[str, str], *, fresh: bool
) -> DeliveryError | _RelayFailed:
    """What a failed transaction on a connected session means for the relay."""
    error = classify_smtp_error(exc, recipients)
    if fresh and _stale(exc):  # a new session closed or answered 421: the relay is going away
        return _RelayFailed(error)
    if isinstance(error, DeliveryTimeout):  # DATA may have arrived: no failover
        return _RelayFailed(error, failover=False)
    return error


def _batches(recipients: dict[str, str], size: int) -> list[dict[str, str]]:
    items = list(recipients.items())
    return [dict(items[start : start + size]) for start in range(0, len(items), size)]


class Relay:
    """One SMTP server: its pooled sessions, its adaptive session window and its circuit."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str,
        port: int,
        security: str,
        username: str | None,
        password: SecretStr | None,
        tls: ssl.SSLContext | None,
        clock: Callable[[], float],
    ) -> None:
        self.name = f"{host}:{port}"
        self._host = host
        self._port = port
        self._security = security
        self._username = username
        self._password = password
        self._timeout = settings.smtp_timeout
        self._tls = tls
        ceiling = settings.smtp_pool_size
        self.window = AIMDWindow(
            floor=min(WINDOW_FLOOR, ceiling),
            ceiling=ceiling,
            prompt=settings.smtp_timeout / 10,
            clock=clock,
        )
        self.circuit = CircuitBreaker(
            self.name,
            failures=settings.circuit_failures,
            open_seconds=settings.circuit_open_seconds,
            clock=clock,
        )
        self._idle: list[aiosmtplib.SMTP] = []
        #: Sessions connected or connecting, idle ones included.
        self._open = 0
        self._closed = False

    async def transact(
        self, sender: str, recipients: dict[str, str], data: bytes
    ) -> tuple[dict[str, SMTPResponse], str]:
        """One mail transaction within the window; ``_RelayFailed`` if the relay failed."""
        for attempt in range(BUSY_RETRIES + 1):
            async with self.window.slot() as slot:
                try:
                    result = await self._on_a_session(sender, recipients, data)
                except _RelayFailed as failed:
                    slot.overloaded()
                    if not (failed.busy and self.window.in_use > 1 and attempt < BUSY_RETRIES):
                        raise
                    log.info(
                        "smtp: %s refused another session (%s), window now %d",
                        self.name,
                        failed.error.message,
                        self.window.size,
                    )
                    continue
                slot.succeeded()
                return result
        raise AssertionError("unreachable: the last attempt raises")

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        await asyncio.gather(*(_quit(client) for client in idle))

    async def _on_a_session(
        self, sender: str, recipients: dict[str, str], data: bytes
    ) -> tuple[dict[str, SMTPResponse], str]:
        """On a pooled session, or on a fresh one if there is none or it went stale."""
        if self._idle:
            try:
                return await self._sendmail(self._idle.pop(), sender, recipients, data)
            except (aiosmtplib.SMTPException, OSError) as exc:
                if not _stale(exc):
                    raise _session_failure(exc, recipients, fresh=False) from exc
                log.info("smtp: pooled session to %s went away (%s), reconnecting", self.name, exc)
        client = self._new_client()
        await self._connect(client, recipients)
        try:
            return await self._sendmail(client, sender, recipients, data)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _session_failure(exc, recipients, fresh=True) from exc

    async def _connect(self, client: aiosmtplib.SMTP, recipients: dict[str, str]) -> None:
        try:
            await client.connect()
        except BaseException as exc:
            self._discard(client)
            if not isinstance(exc, aiosmtplib.SMTPException | OSError):
                raise  # cancelled
            error = classify_smtp_error(exc, recipients)
            if not error.transient:
                raise error from exc
            busy = isinstance(exc, aiosmtplib.SMTPResponseException)
            raise _RelayFailed(error, busy=busy) from exc

    async def _sendmail(
        self, client: aiosmtplib.SMTP, sender: str, recipients: dict[str, str], data: bytes
    ) -> tuple[dict[str, SMTPResponse], str]:
        reusable = False
        try:
            result = await client.sendmail(sender, list(recipients), data)
            reusable = True
            return result
        except aiosmtplib.SMTPRecipientsRefused as exc:
            reusable = True  # aiosmtplib has reset the envelope with RSET
            if _stale(exc):
                raise
            return {r.recipient: SMTPResponse(r.code, r.message) for r in exc.recipients}, ""
        except aiosmtplib.SMTPResponseException:
            reusable = True
            raise
        finally:
            self._release(client, reusable=reusable)

    def _release(self, client: aiosmtplib.SMTP, *, reusable: bool) -> None:
        """Pool the session if its state is known and the window still has room for it."""
        room = self._open <= self.window.size
        if reusable and room and client.is_connected and not self._closed:
            self._idle.append(client)
        else:
            self._discard(client)

    def _discard(self, client: aiosmtplib.SMTP) -> None:
        self._open -= 1
        client.close()

    def _new_client(self) -> aiosmtplib.SMTP:
        self._open += 1
        return aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            username=self._username,
            password=self._password.get_secret_value() if self._password is not None else None,
            timeout=self._timeout,
            use_tls=self._security == "ssl",
            start_tls=self._security == "starttls",
            tls_context=self._tls,
        )


class SMTPChannel(Channel):
    """Email through the primary relay, or the fallback while the primary fails."""

    provider = "smtp"

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        if settings.smtp_host is None:
            raise SettingsError("NOTIFIER_SMTP_HOST: required for SMTP delivery")
        self._sender = settings.smtp_from
        try:
            self._sender_address = parse_mailbox(settings.smtp_from).addr_spec
        except ValueError as exc:
            raise SettingsError(f"NOTIFIER_SMTP_FROM: {settings.smtp_from!r}: {exc}") from exc
        self._max_recipients = settings.smtp_max_recipients
        self.port = (
            settings.smtp_port
            if "smtp_port" in settings.model_fields_set
            else DEFAULT_PORTS[settings.smtp_security]
        )
        fallback_security = settings.smtp_fallback_security or settings.smtp_security
        securities = {settings.smtp_security, fallback_security}
        tls = tls_context(settings.smtp_ca_file) if securities != {"none"} else None
        primary = Relay(
            settings,
            host=settings.smtp_host,
            port=self.port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password,
            tls=tls if settings.smtp_security != "none" else None,
            clock=clock,
        )
        self._relays = [primary]
        if settings.smtp_fallback_host is not None:
            fallback = Relay(
                settings,
                host=settings.smtp_fallback_host,
                port=settings.smtp_fallback_port or DEFAULT_PORTS[fallback_security],
                security=fallback_security,
                username=settings.smtp_fallback_username,
                password=settings.smtp_fallback_password,
                tls=tls if fallback_security != "none" else None,
                clock=clock,
            )
            if fallback.name == primary.name:
                raise SettingsError(
                    f"NOTIFIER_SMTP_FALLBACK_HOST: {fallback.name} is the primary relay itself"
                )
            self._relays.append(fallback)
        self._built = _Built()

    @property
    def circuits(self) -> list[CircuitBreaker]:
        """Each relay's circuit, for ``Metrics.track_circuits``."""
        return [relay.circuit for relay in self._relays]

    @property
    def windows(self) -> dict[str, AIMDWindow]:
        return {relay.name: relay.window for relay in self._relays}

    async def send(self, message: Message) -> Receipt:
        data, recipients = self._prepare(message)
        try:
            return await self._transactions(message, data, recipients)
        except DeliveryError as exc:
            if exc.transient:
                self._built.keep(message.id, data)
            raise

    async def _transactions(
        self, message: Message, data: bytes, recipients: dict[str, str]
    ) -> Receipt:
        sent = _Sent(recipients)
        for batch in _batches(recipients, self._max_recipients):
            try:
                relay, refused, reply = await self._deliver(batch, data)
            except DeliveryError as exc:
                exc.delivered.update(sent.delivered)  # the retry leaves out earlier batches
                exc.providers.update(sent.providers)
                raise
            sent.add(batch, relay.name, refused, reply)
        return sent.outcome(message)

    async def aclose(self) -> None:
        """Say QUIT on every idle session; sessions still sending are closed when done."""
        await asyncio.gather(*(relay.aclose() for relay in self._relays))

    def _prepare(self, message: Message) -> tuple[bytes, dict[str, str]]:
        try:
            data = self._built.take(message.id) or email_bytes(message, self._sender)
            recipients = envelope(message)
        except ValueError as exc:
            raise PermanentDeliveryError(f"smtp: cannot build the message: {exc}") from exc
        for address in (self._sender_address, *recipients):
            if not address.isascii():
                raise PermanentDeliveryError(
                    f"smtp: {address!r}: non-ASCII addresses need SMTPUTF8, not supported"
                )
        return data, recipients

    async def _deliver(
        self, recipients: dict[str, str], data: bytes
    ) -> tuple[Relay, dict[str, SMTPResponse], str]:
        """One transaction on the first relay whose circuit lets it through and that works."""
        failed: _RelayFailed | None = None
        for relay in self._relays:
            if not relay.circuit.allow():
                continue
            try:
                refused, reply = await relay.transact(self._sender_address, recipients, data)
            except _RelayFailed as exc:
                relay.circuit.failed(exc.error.message)
                if not exc.failover:
                    raise exc.error from exc.__cause__
                log.warning("smtp: relay %s failed: %s", relay.name, exc.error.message)
                failed = exc
                continue
            except DeliveryError:
                relay.circuit.succeeded()  # it answered: the message was refused
                raise
            relay.circuit.succeeded()
            return relay, refused, reply
        if failed is not None:
            raise failed.error from failed.__cause__
        names = ", ".join(relay.name for relay in self._relays)
        wait = min(relay.circuit.reopens_in() for relay in self._relays)
        raise TransientDeliveryError(
            f"smtp: circuit open for every relay ({names})", retry_after=wait or None
        )


class _Sent:
    """What the transactions of one message achieved so far, batch by batch."""

    def __init__(self, recipients: dict[str, str]) -> None:
        self.recipients = recipients
        self.delivered: dict[str, str | None] = {}
        self.providers: dict[str, str] = {}
        self.refused: dict[str, SMTPResponse] = {}
        self.replies: list[str] = []

    def add(
        self, batch: dict[str, str], relay: str, refused: dict[str, SMTPResponse], reply: str
    ) -> None:
        self.refused.update(refused)
        for address, name in batch.items():
            if address not in refused:
                self.delivered[name] = None
                self.providers[name] = relay
        if reply:
            self.replies.append(reply)

    def outcome(self, message: Message) -> Receipt:
        """The receipt, or the error when refusals leave someone to retry or nobody served."""
        recipients, refused = self.recipients, self.refused
        if not self.delivered:
            raise _every_refused(refused, recipients)
        if any(_is_transient_code(response.code) for response in refused.values()):
            raise TransientDeliveryError(
                f"smtp: {len(refused)} of {len(recipients)} recipients refused, "
                f"delivered to the others: {_refusals(refused, recipients)}",
                delivered=self.delivered,
                providers=self.providers,
            )
        if refused:
            log.warning(
                "smtp: message %s delivered, but %d recipients refused for good: %s",
                message.id,
                len(refused),
                _refusals(refused, recipients),
            )
        return Receipt(
            provider_ids=self.delivered,
            provider_message_id="; ".join(self.replies) or None,
            refused={
                recipients.get(address, address): f"{response.code} {response.message}"
                for address, response in refused.items()
            },
            providers=self.providers,
        )


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


def create_channel(settings: Settings) -> Channel:
    if settings.smtp_host is None:
        return OutboxChannel(settings.outbox_dir, kind="email", sender=settings.smtp_from)
    if settings.smtp_security == "none" and settings.smtp_username is not None:
        log.warning("NOTIFIER_SMTP_SECURITY=none: the SMTP login goes over the network unencrypted")
    return SMTPChannel(settings)
