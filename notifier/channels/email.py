"""Email over SMTP (aiosmtplib); the outbox stands in while no SMTP host is configured.

Sessions are pooled: at most ``NOTIFIER_SMTP_POOL_SIZE`` long-lived connections, each
carrying many messages, because a TLS handshake plus AUTH per message costs more than the
message. After a successful DATA the session is ready for the next MAIL FROM; after a
refusal aiosmtplib sends RSET. A pooled session the server has dropped (idle timeout,
``421`` "too many messages") is replaced by a fresh one for the same message, once.

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

Recipients are keyed as the job spells them (``"张三 <z@example.com>"``), see
``mime.envelope``. The ``Receipt.provider_message_id`` is the server's reply to DATA
("2.0.0 Ok: queued as 4F2A1C"), the handle to look a message up in the server's logs.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from pathlib import Path

import aiosmtplib
from aiosmtplib import SMTPResponse

from notifier.channels.base import Channel
from notifier.channels.mime import build_email, envelope, parse_mailbox
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


def classify_smtp_error(
    exc: BaseException, recipients: Mapping[str, str] | None = None
) -> DeliveryError:
    """Map an aiosmtplib (or socket) failure onto the delivery error tree.

    ``recipients`` maps envelope addresses to the job's spelling, for messages about
    refused recipients. The caller raises the result ``from exc``.
    """
    names = recipients or {}
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = {r.recipient: SMTPResponse(r.code, r.message) for r in exc.recipients}
        text = f"smtp: every recipient refused: {_refusals(refused, names)}"
        if any(_is_transient_code(reply.code) for reply in refused.values()):
            return TransientDeliveryError(text)
        return PermanentDeliveryError(text)
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


class SMTPChannel(Channel):
    provider = "smtp"

    def __init__(self, settings: Settings) -> None:
        if settings.smtp_host is None:
            raise SettingsError("NOTIFIER_SMTP_HOST: required for SMTP delivery")
        self._settings = settings
        self._host = settings.smtp_host
        self.port = (
            settings.smtp_port
            if "smtp_port" in settings.model_fields_set
            else DEFAULT_PORTS[settings.smtp_security]
        )
        self._sender = settings.smtp_from
        try:
            self._sender_address = parse_mailbox(settings.smtp_from).addr_spec
        except ValueError as exc:
            raise SettingsError(f"NOTIFIER_SMTP_FROM: {settings.smtp_from!r}: {exc}") from exc
        self._tls = tls_context(settings.smtp_ca_file) if settings.smtp_security != "none" else None
        self._slots = asyncio.Semaphore(settings.smtp_pool_size)
        self._idle: list[aiosmtplib.SMTP] = []
        self._closed = False

    async def send(self, message: Message) -> Receipt:
        data, recipients = self._prepare(message)
        async with self._slots:
            refused, reply = await self._transact(recipients, data)
        return _outcome(message, recipients, refused, reply)

    async def aclose(self) -> None:
        """Say QUIT on every idle session; sessions still sending are closed when done."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(client) for client in idle))

    def _prepare(self, message: Message) -> tuple[bytes, dict[str, str]]:
        try:
            data = bytes(build_email(message, self._sender))
            recipients = envelope(message)
        except ValueError as exc:
            raise PermanentDeliveryError(f"smtp: cannot build the message: {exc}") from exc
        for address in (self._sender_address, *recipients):
            if not address.isascii():
                raise PermanentDeliveryError(
                    f"smtp: {address!r}: non-ASCII addresses need SMTPUTF8, not supported"
                )
        return data, recipients

    async def _transact(
        self, recipients: dict[str, str], data: bytes
    ) -> tuple[dict[str, SMTPResponse], str]:
        """One mail transaction on a pooled session, or on a fresh one if that went stale."""
        if self._idle:
            try:
                return await self._sendmail(self._idle.pop(), recipients, data)
            except (aiosmtplib.SMTPException, OSError) as exc:
                if not _stale(exc):
                    raise classify_smtp_error(exc, recipients) from exc
                log.info("smtp: pooled session to %s went away (%s), reconnecting", self._host, exc)
        client = self._new_client()
        try:
            await client.connect()
            return await self._sendmail(client, recipients, data)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise classify_smtp_error(exc, recipients) from exc

    async def _sendmail(
        self, client: aiosmtplib.SMTP, recipients: dict[str, str], data: bytes
    ) -> tuple[dict[str, SMTPResponse], str]:
        reusable = False
        try:
            result = await client.sendmail(self._sender_address, list(recipients), data)
            reusable = True
            return result
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
            reusable = True  # a refusal: aiosmtplib has reset the envelope with RSET
            raise
        finally:
            self._release(client, reusable=reusable)

    def _release(self, client: aiosmtplib.SMTP, *, reusable: bool) -> None:
        """Pool the session if its state is known; a timeout or cancellation closes it."""
        if reusable and client.is_connected and not self._closed:
            self._idle.append(client)
        else:
            client.close()

    def _new_client(self) -> aiosmtplib.SMTP:
        settings = self._settings
        password = settings.smtp_password
        return aiosmtplib.SMTP(
            hostname=self._host,
            port=self.port,
            username=settings.smtp_username,
            password=password.get_secret_value() if password is not None else None,
            timeout=settings.smtp_timeout,
            use_tls=settings.smtp_security == "ssl",
            start_tls=settings.smtp_security == "starttls",
            tls_context=self._tls,
        )


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


def _outcome(
    message: Message,
    recipients: dict[str, str],
    refused: dict[str, SMTPResponse],
    reply: str,
) -> Receipt:
    """The outcome of an accepted DATA, given the recipients refused at RCPT TO."""
    delivered: dict[str, str | None] = {
        name: None for address, name in recipients.items() if address not in refused
    }
    if any(_is_transient_code(response.code) for response in refused.values()):
        raise TransientDeliveryError(
            f"smtp: {len(refused)} of {len(recipients)} recipients refused, "
            f"delivered to the others: {_refusals(refused, recipients)}",
            delivered=delivered,
        )
    if refused:
        log.warning(
            "smtp: message %s delivered, but %d recipients refused for good: %s",
            message.id,
            len(refused),
            _refusals(refused, recipients),
        )
    return Receipt(
        provider_ids=delivered,
        provider_message_id=reply or None,
        refused={
            recipients.get(address, address): f"{response.code} {response.message}"
            for address, response in refused.items()
        },
    )


def create_channel(settings: Settings) -> Channel:
    if settings.smtp_host is None:
        return OutboxChannel(settings.outbox_dir, kind="email", sender=settings.smtp_from)
    if settings.smtp_security == "none" and settings.smtp_username is not None:
        log.warning("NOTIFIER_SMTP_SECURITY=none: the SMTP login goes over the network unencrypted")
    return SMTPChannel(settings)
