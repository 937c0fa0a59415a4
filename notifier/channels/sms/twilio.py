"""Twilio: the Messages API, a form POST with basic auth (Account SID, Auth Token).

``POST {base}/2010-04-01/Accounts/{sid}/Messages.json`` with ``To``, ``Body`` and ``From``,
or ``MessagingServiceSid`` when NOTIFIER_SMS_FROM starts with ``MG``. Success is 201 with
the message ``sid`` (the provider id). Failures follow the common HTTP rules (429 and 5xx
transient, other 4xx permanent), except the Twilio error codes in ``TRANSIENT_CODES``,
which come with a 4xx but mean "later"; every error records Twilio's ``code`` and
``message``.
"""

from __future__ import annotations

from typing import Self

import httpx
from pydantic import SecretStr

from notifier.channels.sms.base import SMSProvider, http_error, post, required
from notifier.errors import DeliveryError, TransientDeliveryError
from notifier.settings import Settings

DEFAULT_BASE = "https://api.twilio.com"

#: Twilio error codes that are worth retrying although their HTTP status is a 4xx.
TRANSIENT_CODES = {
    20429: "too many requests",
    21611: "the sender's queue of messages is full",
}


def twilio_error(response: httpx.Response) -> DeliveryError:
    """The one place Twilio's failures become delivery errors."""
    try:
        answer = response.json()
        code, message = answer.get("code"), answer.get("message")
    except (ValueError, AttributeError):
        code, message = None, None
    error = http_error("twilio", response, f"error {code}: {message}" if code is not None else "")
    if code in TRANSIENT_CODES and not error.transient:
        return TransientDeliveryError(f"{error.message} ({TRANSIENT_CODES[code]})")
    return error


class TwilioProvider(SMSProvider):
    name = "twilio"

    def __init__(self, *, base: str, account_sid: str, token: SecretStr, sender: str) -> None:
        self.url = f"{base.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self.account_sid = account_sid
        self._token = token
        self.sender_field = "MessagingServiceSid" if sender.startswith("MG") else "From"
        self.sender = sender

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(
            base=settings.sms_url or DEFAULT_BASE,
            account_sid=required(settings.sms_account, "SMS_ACCOUNT", cls.name),
            token=required(settings.sms_api_key, "SMS_API_KEY", cls.name),
            sender=required(settings.sms_from, "SMS_FROM", cls.name),
        )

    async def send_one(
        self, client: httpx.AsyncClient, text: str, number: str, job_id: str
    ) -> str | None:
        form = {"To": number, "Body": text, self.sender_field: self.sender}
        auth = (self.account_sid, self._token.get_secret_value())
        response = await post(client, self.name, self.url, data=form, auth=auth)
        if not response.is_success:
            raise twilio_error(response)
        try:
            sid = response.json().get("sid")
        except (ValueError, AttributeError):  # accepted all the same; only the id is lost
            return None
        return str(sid) if sid else None
