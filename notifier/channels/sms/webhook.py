"""An in-house gateway: a JSON POST per number to NOTIFIER_SMS_URL; any 2xx is success.

Body ``{"id": job id, "to": number, "text": ..., "from": NOTIFIER_SMS_FROM}``. When
NOTIFIER_SMS_API_KEY (NOTIFIER_SMS_WEBHOOK_API_KEY) is set it is the HMAC secret, never
sent: the header ``X-Notifier-Signature: sha256=<hex HMAC-SHA256 of the raw body>`` lets the
gateway check the request came from us. Failures follow the common HTTP rules: a 401 or 403
means the gateway refuses us (a wrong secret), so a later provider takes over.
"""

from __future__ import annotations

import json
from typing import Self

import httpx
from pydantic import SecretStr

from notifier.channels.sms.base import ProviderConfig, SMSProvider, http_error, post
from notifier.http import SIGNATURE_HEADER, sign
from notifier.settings import Settings


class WebhookProvider(SMSProvider):
    name = "webhook"

    def __init__(self, *, url: str, secret: SecretStr | None, sender: str | None) -> None:
        self.url = httpx.URL(url)
        self._key = secret.get_secret_value().encode() if secret is not None else None
        self.sender = sender

    @classmethod
    def from_settings(cls, settings: Settings, config: ProviderConfig) -> Self:
        return cls(
            url=config.required(config.url, "url"), secret=config.api_key, sender=config.sender
        )

    async def send_one(
        self, client: httpx.AsyncClient, text: str, number: str, job_id: str
    ) -> str | None:
        payload = {"id": job_id, "to": number, "text": text, "from": self.sender}
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            headers[SIGNATURE_HEADER] = sign(self._key, body)
        response = await post(client, self.name, self.url, content=body, headers=headers)
        if not response.is_success:
            raise http_error(self.name, response, number)
        return None
