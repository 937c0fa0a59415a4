"""HTTP details that the SMS providers, the receipts listener and the callback lane share:
notifier's request signature and a server's ``Retry-After``."""

from __future__ import annotations

import hashlib
import hmac
from email.utils import parsedate_to_datetime

import httpx

from notifier.models import utcnow

#: ``sha256=<hex HMAC-SHA256 of the raw body>``, on webhook SMS requests and on callbacks.
SIGNATURE_HEADER = "X-Notifier-Signature"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds from now, given as seconds or as an HTTP date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - utcnow()).total_seconds())
