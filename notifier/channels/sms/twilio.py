"""Twilio: the Messages API, a form POST with basic auth (Account SID, Auth Token).

``POST {base}/2010-04-01/Accounts/{sid}/Messages.json`` with ``To``, ``Body`` and ``From``,
or ``MessagingServiceSid`` when the sender starts with ``MG``; with
NOTIFIER_RECEIPTS_PUBLIC_URL set, also ``StatusCallback`` (``<public url>/receipts/twilio``)
so Twilio reports what became of the message. Success is 201 with the message ``sid`` (the
``MessageSid`` of those reports, and the provider id).

Failures follow the common HTTP rules (``http_error``: 401/403 our account refused, 429 the
number throttled, 5xx transient, other 4xx permanent), refined by Twilio's error ``code``
in ``CODES``: whether the number, the message or our account is wrong, or to try later.
Every error records Twilio's ``code`` and ``message``.
"""

from __future__ import annotations

from typing import Self

import httpx
from pydantic import SecretStr

from notifier.channels.sms.base import ProviderConfig, SMSProvider, http_error, post
from notifier.errors import (
    DeliveryError,
    InvalidMessage,
    ProviderRejected,
    RecipientRejected,
    TransientDeliveryError,
)
from notifier.settings import Settings

DEFAULT_BASE = "https://api.twilio.com"
RECEIPTS_PATH = "/receipts/twilio"

#: Twilio error codes (https://www.twilio.com/docs/api/errors) and the error each becomes.
CODES: dict[int, tuple[type[DeliveryError], str]] = {
    20003: (ProviderRejected, "authentication failed"),
    20005: (ProviderRejected, "account not active"),
    20404: (ProviderRejected, "account or resource not found"),
    21212: (ProviderRejected, "the sender ('From') is not valid"),
    21606: (ProviderRejected, "the sender cannot send SMS for this account"),
    30002: (ProviderRejected, "account suspended"),
    21211: (RecipientRejected, "the 'To' number is not valid"),
    21408: (RecipientRejected, "the account may not send to this region"),
    21610: (RecipientRejected, "the recipient unsubscribed (STOP)"),
    21612: (RecipientRejected, "the 'To' number cannot be reached by SMS"),
    21614: (RecipientRejected, "the 'To' number is not a mobile number"),
    21602: (InvalidMessage, "the message has no body"),
    21617: (InvalidMessage, "the body is longer than 1,600 characters"),
    20429: (TransientDeliveryError, "too many requests"),
    21611: (TransientDeliveryError, "the sender's queue of messages is full"),
}


def twilio_error(response: httpx.Response, number: str) -> DeliveryError:
    """The one place Twilio's failures become delivery errors."""
    try:
        answer = response.json()
        code, message = answer.get("code"), answer.get("message")
    except (ValueError, AttributeError):
        code, message = None, None
    detail = f"error {code}: {message}" if code is not None else ""
    error = http_error("twilio", response, number, detail)
    if code not in CODES:
        return error
    cls, meaning = CODES[code]
    return cls(f"{error.message} ({meaning})", retry_after=error.retry_after)


class TwilioProvider(SMSProvider):
    name = "twilio"
    max_text_length = 1600

    def __init__(
        self,
        *,
        base: str,
        account_sid: str,
        token: SecretStr,
        sender: str,
        status_callback: str | None = None,
    ) -> None:
        self.url = httpx.URL(f"{base.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json")
        self.account_sid = account_sid
        self._auth = httpx.BasicAuth(account_sid, token.get_secret_value())
        self.sender_field = "MessagingServiceSid" if sender.startswith("MG") else "From"
        self.sender = sender
        self.status_callback = status_callback

    @classmethod
    def from_settings(cls, settings: Settings, config: ProviderConfig) -> Self:
        public = settings.receipts_public_url
        return cls(
            base=config.url or DEFAULT_BASE,
            account_sid=config.required(config.account, "account"),
            token=config.required(config.api_key, "api_key"),
            sender=config.required(config.sender, "from"),
            status_callback=public.rstrip("/") + RECEIPTS_PATH if public else None,
        )

    async def send_one(
        self, client: httpx.AsyncClient, text: str, number: str, job_id: str
    ) -> str | None:
        form = {"To": number, "Body": text, self.sender_field: self.sender}
        if self.status_callback is not None:
            form["StatusCallback"] = self.status_callback
        response = await post(client, self.name, self.url, data=form, auth=self._auth)
        if not response.is_success:
            raise twilio_error(response, number)
        try:
            sid = response.json().get("sid")
        except (ValueError, AttributeError):  # accepted all the same; only the id is lost
            return None
        return str(sid) if sid else None
