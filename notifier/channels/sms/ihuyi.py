"""ihuyi (互亿无线): a form POST per number to the Submit URL, answered with a JSON code.

Request: ``account`` (APIID), ``password`` (API key), ``mobile`` (national form: ``+86`` is
dropped; ihuyi's Submit API serves Chinese numbers only), ``content``, ``format=json``.
Answer: ``{"code": 2, "msg": "提交成功", "smsid": "..."}`` on success; ``smsid`` is the
provider id. Any other code is classified by ``CODES`` (from ihuyi's published code list):

====== ============================================ ==============================
code   meaning                                      handling
====== ============================================ ==============================
0      submission failed                            transient
400    IP not allowed                               permanent
401    account (APIID) empty                        permanent
402    password (API key) empty                     permanent
403    number empty                                 permanent
4030   number is on the blacklist                   permanent
404    content empty                                permanent
405    APIID or API key wrong                       permanent
4050   account frozen                               permanent
40501  dynamic password expired                     permanent
40502  dynamic password wrong                       permanent
4051   balance too low                              permanent
4052   IP does not match the registered IP          permanent
406    number format wrong                          permanent
407    content has forbidden words                  permanent
4070   signature format wrong                       permanent
4071   no registered template                       permanent
4072   content does not match an approved template  permanent
40722  a variable is too long                       permanent
4073   content too long                             permanent
4074   content contains emoji                       permanent
4075   signature not approved                       permanent
408    account frozen for abuse (sending limit)     permanent
4010   channel limit: 1 per number per minute       transient, 60 s
4080   per-number limit per second                  transient
4081   per-number limit per minute                  transient, 60 s
4082   per-number daily limit                       transient, next day (China)
4083   same-content limit per minute                transient, 60 s
4084   same-content daily limit                     transient, next day (China)
4085   per-number daily verification-code limit     transient, next day (China)
4086   sending too often to this number             transient
40864  number is on the blacklist                   permanent
====== ============================================ ==============================

"Next day" waits until midnight in China time (UTC+8), at least an hour. A code not in
the table is treated as transient (retries are bounded by NOTIFIER_RETRY_MAX_ATTEMPTS),
and the error names it. An answer that is not this JSON is transient too.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Self

import httpx
from pydantic import SecretStr

from notifier.channels.sms.base import SMSProvider, http_error, post, required
from notifier.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from notifier.models import utcnow
from notifier.settings import Settings

DEFAULT_URL = "https://106.ihuyi.com/webservice/sms.php?method=Submit"
SUCCESS = 2
CHINA = timezone(timedelta(hours=8), "Asia/Shanghai")


class Wait(Enum):
    """How a code is handled: never retried, retried after backoff, or after a wait."""

    PERMANENT = "permanent"
    BACKOFF = "backoff"
    MINUTE = "minute"
    NEXT_DAY = "next day"


CODES: dict[int, tuple[Wait, str]] = {
    0: (Wait.BACKOFF, "submission failed"),
    400: (Wait.PERMANENT, "IP not allowed"),
    401: (Wait.PERMANENT, "account (APIID) empty"),
    402: (Wait.PERMANENT, "password (API key) empty"),
    403: (Wait.PERMANENT, "number empty"),
    4030: (Wait.PERMANENT, "number is on the blacklist"),
    404: (Wait.PERMANENT, "content empty"),
    405: (Wait.PERMANENT, "APIID or API key wrong"),
    4050: (Wait.PERMANENT, "account frozen"),
    40501: (Wait.PERMANENT, "dynamic password expired"),
    40502: (Wait.PERMANENT, "dynamic password wrong"),
    4051: (Wait.PERMANENT, "balance too low"),
    4052: (Wait.PERMANENT, "IP does not match the registered IP"),
    406: (Wait.PERMANENT, "number format wrong"),
    407: (Wait.PERMANENT, "content has forbidden words"),
    4070: (Wait.PERMANENT, "signature format wrong"),
    4071: (Wait.PERMANENT, "no registered template"),
    4072: (Wait.PERMANENT, "content does not match an approved template"),
    40722: (Wait.PERMANENT, "a variable is too long"),
    4073: (Wait.PERMANENT, "content too long"),
    4074: (Wait.PERMANENT, "content contains emoji"),
    4075: (Wait.PERMANENT, "signature not approved"),
    408: (Wait.PERMANENT, "account frozen for abuse (sending limit)"),
    4010: (Wait.MINUTE, "channel limit: 1 per number per minute"),
    4080: (Wait.BACKOFF, "per-number limit per second"),
    4081: (Wait.MINUTE, "per-number limit per minute"),
    4082: (Wait.NEXT_DAY, "per-number daily limit"),
    4083: (Wait.MINUTE, "same-content limit per minute"),
    4084: (Wait.NEXT_DAY, "same-content daily limit"),
    4085: (Wait.NEXT_DAY, "per-number daily verification-code limit"),
    4086: (Wait.BACKOFF, "sending too often to this number"),
    40864: (Wait.PERMANENT, "number is on the blacklist"),
}


def until_next_china_day(now: datetime | None = None) -> float:
    """Seconds until midnight in China, when ihuyi's daily caps reset; at least an hour."""
    local = (now or utcnow()).astimezone(CHINA)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), CHINA)
    return max(3600.0, (midnight - local).total_seconds())


def code_error(code: int, msg: str) -> DeliveryError:
    """The one place ihuyi's answer codes become delivery errors (see the table above)."""
    wait, meaning = CODES.get(code, (Wait.BACKOFF, "unknown code"))
    text = f"ihuyi: code {code} ({meaning}): {msg}" if msg else f"ihuyi: code {code} ({meaning})"
    if wait is Wait.PERMANENT:
        return PermanentDeliveryError(text)
    retry_after = {Wait.MINUTE: 60.0, Wait.NEXT_DAY: until_next_china_day()}.get(wait)
    return TransientDeliveryError(text, retry_after=retry_after)


def national(number: str) -> str:
    """The form ihuyi takes: ``+8613800138000`` -> ``13800138000``."""
    if number.startswith("+86"):
        return number[3:]
    if number.startswith("+"):
        raise PermanentDeliveryError(
            f"ihuyi: {number} is not a Chinese (+86) number; ihuyi's Submit API sends in China only"
        )
    return number


def read_answer(response: httpx.Response) -> str | None:
    """The ``smsid`` of a successful answer, or the error for any other."""
    if not response.is_success:
        raise http_error("ihuyi", response)
    try:
        answer = response.json()
        code = int(answer["code"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TransientDeliveryError(
            f"ihuyi: unreadable answer (HTTP {response.status_code}, "
            f"{response.headers.get('content-type', 'no content type')})"
        ) from exc
    if code != SUCCESS:
        raise code_error(code, str(answer.get("msg") or ""))
    smsid = answer.get("smsid")
    return str(smsid) if smsid else None


class IhuyiProvider(SMSProvider):
    name = "ihuyi"

    def __init__(self, *, url: str, account: str, api_key: SecretStr) -> None:
        self.url = url
        self.account = account
        self._api_key = api_key

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(
            url=settings.sms_url or DEFAULT_URL,
            account=required(settings.sms_account, "SMS_ACCOUNT", cls.name),
            api_key=required(settings.sms_api_key, "SMS_API_KEY", cls.name),
        )

    async def send_one(
        self, client: httpx.AsyncClient, text: str, number: str, job_id: str
    ) -> str | None:
        form = {
            "account": self.account,
            "password": self._api_key.get_secret_value(),
            "mobile": national(number),
            "content": text,
            "format": "json",
        }
        return read_answer(await post(client, self.name, self.url, data=form))
