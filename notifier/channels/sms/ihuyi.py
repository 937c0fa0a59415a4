"""ihuyi (互亿无线): a form POST per number to the Submit URL, answered with a JSON code.

Request: ``account`` (APIID), ``password`` (API key), ``mobile`` (national form: ``+86`` is
dropped; ihuyi's Submit API serves Chinese numbers only), ``content``, ``format=json``.
Answer: ``{"code": 2, "msg": "提交成功", "smsid": "..."}`` on success; ``smsid`` is the
provider id. Any other code is classified by ``CODES`` (from ihuyi's published code list)
by who is wrong: the number, the message, or our account (``ProviderRejected``: another
provider may deliver, and this one's circuit opens); or whether to try later, after the
backoff or, for the "too often" codes (``RecipientThrottled``), after a wait:

====== ============================================ ==============================
code   meaning                                      handling
====== ============================================ ==============================
0      submission failed                            transient
400    IP not allowed                               account
401    account (APIID) empty                        account
402    password (API key) empty                     account
403    number empty                                 number
4030   number is on the blacklist                   number
404    content empty                                message
405    APIID or API key wrong                       account
4050   account frozen                               account
40501  dynamic password expired                     account
40502  dynamic password wrong                       account
4051   balance too low                              account
4052   IP does not match the registered IP          account
406    number format wrong                          number
407    content has forbidden words                  message
4070   signature format wrong                       message
4071   no registered template                       account
4072   content does not match an approved template  message
40722  a variable is too long                       message
4073   content too long                             message
4074   content contains emoji                       message
4075   signature not approved                       message
408    account frozen for abuse (sending limit)     account
4010   channel limit: 1 per number per minute       throttled, 60 s
4080   per-number limit per second                  throttled, 1 s
4081   per-number limit per minute                  throttled, 60 s
4082   per-number daily limit                       throttled, next day (China)
4083   same-content limit per minute                throttled, 60 s
4084   same-content daily limit                     throttled, next day (China)
4085   per-number daily verification-code limit     throttled, next day (China)
4086   sending too often to this number             throttled, 60 s
40864  number is on the blacklist                   number
====== ============================================ ==============================

"Next day" waits until midnight in China time (UTC+8), at least an hour. A code not in
the table is treated as transient (retries are bounded by NOTIFIER_RETRY_MAX_ATTEMPTS),
and the error names it. An answer that is not this JSON is transient too.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Self
from urllib.parse import quote_plus, urlencode

import httpx
from pydantic import SecretStr

from notifier.channels.sms.base import ProviderConfig, SMSProvider, http_error, post
from notifier.errors import (
    DeliveryError,
    InvalidMessage,
    PermanentDeliveryError,
    ProviderRejected,
    RecipientRejected,
    RecipientThrottled,
    TransientDeliveryError,
)
from notifier.models import utcnow
from notifier.settings import Settings

DEFAULT_URL = "https://106.ihuyi.com/webservice/sms.php?method=Submit"
SUCCESS = 2
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
CHINA = timezone(timedelta(hours=8), "Asia/Shanghai")


class Fault(Enum):
    """Who a code blames, and so which error it becomes."""

    NUMBER = "number"
    MESSAGE = "message"
    ACCOUNT = "account"
    LATER = "later"
    THROTTLED_SECOND = "per second"
    THROTTLED_MINUTE = "per minute"
    THROTTLED_DAY = "per day"


NUMBER, MESSAGE, ACCOUNT, LATER = Fault.NUMBER, Fault.MESSAGE, Fault.ACCOUNT, Fault.LATER

CODES: dict[int, tuple[Fault, str]] = {
    0: (LATER, "submission failed"),
    400: (ACCOUNT, "IP not allowed"),
    401: (ACCOUNT, "account (APIID) empty"),
    402: (ACCOUNT, "password (API key) empty"),
    403: (NUMBER, "number empty"),
    4030: (NUMBER, "number is on the blacklist"),
    404: (MESSAGE, "content empty"),
    405: (ACCOUNT, "APIID or API key wrong"),
    4050: (ACCOUNT, "account frozen"),
    40501: (ACCOUNT, "dynamic password expired"),
    40502: (ACCOUNT, "dynamic password wrong"),
    4051: (ACCOUNT, "balance too low"),
    4052: (ACCOUNT, "IP does not match the registered IP"),
    406: (NUMBER, "number format wrong"),
    407: (MESSAGE, "content has forbidden words"),
    4070: (MESSAGE, "signature format wrong"),
    4071: (ACCOUNT, "no registered template"),
    4072: (MESSAGE, "content does not match an approved template"),
    40722: (MESSAGE, "a variable is too long"),
    4073: (MESSAGE, "content too long"),
    4074: (MESSAGE, "content contains emoji"),
    4075: (MESSAGE, "signature not approved"),
    408: (ACCOUNT, "account frozen for abuse (sending limit)"),
    4010: (Fault.THROTTLED_MINUTE, "channel limit: 1 per number per minute"),
    4080: (Fault.THROTTLED_SECOND, "per-number limit per second"),
    4081: (Fault.THROTTLED_MINUTE, "per-number limit per minute"),
    4082: (Fault.THROTTLED_DAY, "per-number daily limit"),
    4083: (Fault.THROTTLED_MINUTE, "same-content limit per minute"),
    4084: (Fault.THROTTLED_DAY, "same-content daily limit"),
    4085: (Fault.THROTTLED_DAY, "per-number daily verification-code limit"),
    4086: (Fault.THROTTLED_MINUTE, "sending too often to this number"),
    40864: (NUMBER, "number is on the blacklist"),
}

PERMANENT: dict[Fault, type[PermanentDeliveryError]] = {
    NUMBER: RecipientRejected,
    MESSAGE: InvalidMessage,
    ACCOUNT: ProviderRejected,
}


def until_next_china_day(now: datetime | None = None) -> float:
    """Seconds until midnight in China, when ihuyi's daily caps reset; at least an hour."""
    local = (now or utcnow()).astimezone(CHINA)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), CHINA)
    return max(3600.0, (midnight - local).total_seconds())


def code_error(code: int, msg: str, number: str) -> DeliveryError:
    """The one place ihuyi's answer codes become delivery errors (see the table above)."""
    fault, meaning = CODES.get(code, (LATER, "unknown code"))
    text = f"ihuyi: code {code} ({meaning}): {msg}" if msg else f"ihuyi: code {code} ({meaning})"
    if fault in PERMANENT:
        return PERMANENT[fault](text)
    if fault is LATER:
        return TransientDeliveryError(text)
    wait = {Fault.THROTTLED_SECOND: 1.0, Fault.THROTTLED_MINUTE: 60.0}.get(fault)
    return RecipientThrottled(text, recipient=number, retry_after=wait or until_next_china_day())


def national(number: str) -> str:
    """The form ihuyi takes: ``+8613800138000`` -> ``13800138000``."""
    return number[3:] if number.startswith("+86") else number


def read_answer(response: httpx.Response, number: str) -> str | None:
    """The ``smsid`` of a successful answer, or the error for any other."""
    if not response.is_success:
        raise http_error("ihuyi", response, number)
    try:
        answer = response.json()
        code = int(answer["code"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TransientDeliveryError(
            f"ihuyi: unreadable answer (HTTP {response.status_code}, "
            f"{response.headers.get('content-type', 'no content type')})"
        ) from exc
    if code != SUCCESS:
        raise code_error(code, str(answer.get("msg") or ""), number)
    smsid = answer.get("smsid")
    return str(smsid) if smsid else None


class IhuyiProvider(SMSProvider):
    name = "ihuyi"
    max_text_length = 300

    def __init__(self, *, url: str, account: str, api_key: SecretStr) -> None:
        self.url = httpx.URL(url)
        self.account = account
        #: What every request's form starts with, encoded once (it holds the key: never shown).
        self._fixed = urlencode(
            {"account": account, "password": api_key.get_secret_value(), "format": "json"}
        ).encode()

    @classmethod
    def from_settings(cls, settings: Settings, config: ProviderConfig) -> Self:
        return cls(
            url=config.url or DEFAULT_URL,
            account=config.required(config.account, "account"),
            api_key=config.required(config.api_key, "api_key"),
        )

    def refuses(self, number: str) -> str | None:
        if number.startswith("+") and not number.startswith("+86"):
            return (
                f"ihuyi: {number} is not a Chinese (+86) number; "
                "ihuyi's Submit API sends in China only"
            )
        return None

    async def send_one(
        self, client: httpx.AsyncClient, text: str, number: str, job_id: str
    ) -> str | None:
        # What urlencode would make of the two fields, without its generic machinery.
        form = b"%s&mobile=%s&content=%s" % (
            self._fixed,
            quote_plus(national(number)).encode(),
            quote_plus(text).encode(),
        )
        answer = await post(client, self.name, self.url, content=form, headers=FORM)
        return read_answer(answer, number)
