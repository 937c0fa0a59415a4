"""The request lines the bench sends: an email or an SMS job, marked (see ``bench.marks``)."""

from __future__ import annotations

import json
from typing import Any

from bench.marks import mark


def email_job(
    number: int, *, sent: float | None = None, send_at: str | None = None, **fields: Any
) -> bytes:
    """``fields`` are more send fields (``priority``, ``callback_url``, ...)."""
    return _line(
        {
            "channel": "email",
            "to": f"Customer {number} <customer{number}@example.com>",
            "subject": f"Your order {number}",
            "text": f"Thank you for your order. {mark(number, sent)}",
            **fields,
        },
        send_at,
    )


def sms_job(
    number: int, *, sent: float | None = None, send_at: str | None = None, **fields: Any
) -> bytes:
    return _line(
        {
            "channel": "sms",
            "to": f"+86138{number:08d}",
            "text": f"Code 1234. {mark(number, sent)}",
            **fields,
        },
        send_at,
    )


def _line(request: dict[str, Any], send_at: str | None) -> bytes:
    if send_at is not None:
        request["send_at"] = send_at
    return json.dumps(request, ensure_ascii=False).encode() + b"\n"
