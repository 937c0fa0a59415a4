"""The receipts listener: delivery reports (DLRs) that SMS providers push over HTTP.

PROTOCOL.md, Receipts. Each request becomes a list of ``DeliveryReport`` handed to an injected
``record(reports)`` coroutine; what stores them is wired in by the service. The listener faces
the internet, so every answer is small and says what was wrong, and none is an error page that
makes a provider stop reporting:

- 200: taken. ihuyi's body is ``success``, as it expects; the others ``ok``. Twilio's interim
  states (``queued``, ``sending``, ``sent``, ``accepted``, ...) are taken and passed on to nobody.
- 400: a field is missing or garbled; the message names it.
- 403: a bad or missing signature (Twilio always; webhook when a key is set). Without a Twilio
  Auth Token nothing can be checked, so every Twilio request is refused.
- 413: a body over ``max_body_bytes``: refused from its Content-Length before any of it is
  read, or as soon as a streamed (chunked) body passes the limit.
- 429 with Retry-After: a client address past its token bucket. Behind a proxy on 127.0.0.1
  the address is the one in its X-Forwarded-For (uvicorn's proxy headers).
- 503 with Retry-After: ``record`` raised (the store is unavailable), so the provider sends the
  report again later and no receipt is lost.

ihuyi batches are parallel repeated fields: the n-th ``smsid`` goes with the n-th ``code``. A
batch whose fields cannot be paired (``smsid`` or ``code`` absent, or counts that differ) is
400, because pairing them by guess would record a state against the wrong message. In a
well-formed batch, a report whose ``smsid`` or ``code`` is blank can never match a message: it
is logged and dropped, and the rest is recorded and answered ``success``, since sending the
batch again could not mend it. A request in which no report is usable is 400.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from notifier.http import SIGNATURE_HEADER, sign
from notifier.metrics import Metrics
from notifier.models import utcnow

log = logging.getLogger("notifier.receipts")

PROVIDERS = ("ihuyi", "twilio", "webhook")
TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"
#: ihuyi's report_time is Beijing time, without an offset.
IHUYI_TIMEZONE = timezone(timedelta(hours=8))
IHUYI_FIELDS = ("smsid", "code", "msg", "mobilephone", "report_time")
#: Twilio's final states; every other MessageStatus is interim and changes nothing.
TWILIO_STATES: dict[str, Literal["delivered", "undelivered"]] = {
    "delivered": "delivered",
    "undelivered": "undelivered",
    "failed": "undelivered",
}
#: Seconds a provider is asked to wait before sending a report again that could not be stored.
RETRY_AFTER_UNAVAILABLE = 30


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What one provider said became of one message to one recipient.

    ``reference`` is the provider's message id (ihuyi ``smsid``, Twilio ``MessageSid``) when
    ``by`` is ``provider_id``, or notifier's job id (the webhook gateway) when ``by`` is ``job_id``.
    """

    provider: str
    reference: str
    by: Literal["provider_id", "job_id"]
    recipient: str | None
    state: Literal["delivered", "undelivered"]
    reason: str | None
    at: datetime


Record = Callable[[list[DeliveryReport]], Awaitable[None]]


class BadReport(ValueError):
    """A field is missing or garbled (400); the message names it."""


class BadSignature(Exception):
    """The request is not signed by who it claims to come from (403)."""


class BodyTooLarge(Exception):
    """The body passed the listener's limit while it was being read (413)."""


def ihuyi_reports(form: FormData, received: datetime) -> list[DeliveryReport]:
    columns = {name: _texts(form, name, "ihuyi") for name in IHUYI_FIELDS}
    for name in ("smsid", "code"):
        if not columns[name]:
            raise BadReport(f"ihuyi: field {name!r} is missing")
    count = len(columns["smsid"])
    for name, values in columns.items():
        if values and len(values) != count:
            raise BadReport(
                f"ihuyi: {len(values)} {name!r} fields for {count} 'smsid' fields; "
                "the reports cannot be paired"
            )
    reports = []
    for index in range(count):
        row = {name: values[index].strip() if values else "" for name, values in columns.items()}
        if not row["smsid"] or not row["code"]:
            log.warning(
                "ihuyi: report %d of %d has a blank smsid or code; dropped", index + 1, count
            )
            continue
        delivered = row["code"] == "2"
        reports.append(
            DeliveryReport(
                provider="ihuyi",
                reference=row["smsid"],
                by="provider_id",
                recipient=row["mobilephone"] or None,
                state="delivered" if delivered else "undelivered",
                reason=None if delivered else row["msg"] or f"code {row['code']}",
                at=_ihuyi_time(row["report_time"], received),
            )
        )
    if not reports:
        raise BadReport("ihuyi: no report has both an 'smsid' and a 'code'")
    return reports


def _ihuyi_time(text: str, received: datetime) -> datetime:
    try:
        local = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        if text:
            log.info("ihuyi: report_time %r is not YYYY-MM-DD HH:MM:SS; using receipt time", text)
        return received
    return local.replace(tzinfo=IHUYI_TIMEZONE).astimezone(UTC)


def twilio_reports(form: FormData, received: datetime) -> list[DeliveryReport]:
    sid = _required_text(form, "MessageSid", "twilio")
    status = _required_text(form, "MessageStatus", "twilio")
    state = TWILIO_STATES.get(status.lower())
    if state is None:
        return []
    error = _optional_text(form, "ErrorCode", "twilio")
    return [
        DeliveryReport(
            provider="twilio",
            reference=sid,
            by="provider_id",
            recipient=_optional_text(form, "To", "twilio"),
            state=state,
            reason=None if state == "delivered" else error or status,
            at=received,
        )
    ]


class _WebhookReport(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    to: str = Field(min_length=1)
    state: Literal["delivered", "undelivered"]
    reason: str | None = None


def webhook_reports(body: bytes, received: datetime) -> list[DeliveryReport]:
    try:
        report = _WebhookReport.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(map(str, e['loc']))!r}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors(include_url=False)
        )
        raise BadReport(f"webhook: {problems}") from None
    return [
        DeliveryReport(
            provider="webhook",
            reference=report.id,
            by="job_id",
            recipient=report.to,
            state=report.state,
            reason=report.reason,
            at=received,
        )
    ]


def _texts(form: FormData, name: str, provider: str) -> list[str]:
    values = form.getlist(name)
    if not all(isinstance(value, str) for value in values):
        raise BadReport(f"{provider}: field {name!r} must be text, not a file")
    return [str(value) for value in values]


def _optional_text(form: FormData, name: str, provider: str) -> str | None:
    values = _texts(form, name, provider)
    return values[0].strip() or None if values else None


def _required_text(form: FormData, name: str, provider: str) -> str:
    value = _optional_text(form, name, provider)
    if value is None:
        raise BadReport(f"{provider}: field {name!r} is missing")
    return value


def twilio_signature(token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's scheme: the URL, then each POST parameter's name and value, sorted by name.

    The values of a repeated name are sorted (and repeats folded) as Twilio's own helper
    libraries do; HMAC-SHA1 with the Auth Token, base64.
    """
    grouped: dict[str, set[str]] = {}
    for name, value in params:
        grouped.setdefault(name, set()).add(value)
    payload = url + "".join(
        name + value for name in sorted(grouped) for value in sorted(grouped[name])
    )
    digest = hmac.new(token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _with_and_without_port(url: str) -> set[str]:
    """Twilio signs some URLs with the default port spelled out and some without; take both."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    default = 443 if parts.scheme == "https" else 80
    with_port = parts.netloc if parts.port else f"{host}:{default}"
    return {parts._replace(netloc=netloc).geturl() for netloc in (host, with_port)}


class AddressBuckets:
    """A token bucket per client address (``rate`` per second, ``burst`` at once; 0 = off).

    Past ``max_clients`` addresses the least recently seen is forgotten; it starts full again,
    which errs only towards letting a provider in.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def wait(self, address: str) -> float:
        """0 if a request from ``address`` may go now (taking a token), else seconds to wait."""
        if not self.rate:
            return 0.0
        now = self._clock()
        tokens, stamp = self._buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[address] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def _provider_of(scope: Scope) -> str:
    provider = str(scope.get("path", "")).removeprefix("/receipts/")
    return provider if provider in PROVIDERS else "none"


class _Guard:
    """Rate and size limits, applied before a request reaches its route or its body is read."""

    def __init__(
        self, app: ASGIApp, *, buckets: AddressBuckets, max_body_bytes: int, metrics: Metrics
    ) -> None:
        self.app = app
        self.buckets = buckets
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        wait = self.buckets.wait(client[0] if client else "unknown")
        if wait:
            self.metrics.receipts_rejected.labels(_provider_of(scope), "rate_limited").inc()
            answer = PlainTextResponse(
                "too many requests from this address; slow down\n",
                429,
                headers={"Retry-After": str(math.ceil(wait))},
            )
            await answer(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _too_large(self.max_body_bytes, self.metrics, scope)(scope, receive, send)
            return
        await self.app(scope, self._bounded(receive), send)

    def _bounded(self, receive: Receive) -> Receive:
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise BodyTooLarge
            return message

        return bounded_receive


def _too_large(limit: int, metrics: Metrics, scope: Scope) -> Response:
    metrics.receipts_rejected.labels(_provider_of(scope), "too_large").inc()
    return PlainTextResponse(f"body larger than {limit} bytes\n", 413)


class ReceiptsApp:
    """The ASGI app: guard, then the three provider routes."""

    def __init__(
        self,
        record: Record,
        metrics: Metrics,
        *,
        public_url: str | None,
        twilio_auth_token: SecretStr | None,
        webhook_key: SecretStr | None,
        max_body_bytes: int = 64 * 1024,
        rate_limit: float = 50.0,
        rate_burst: int = 200,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._record = record
        self.metrics = metrics
        self.public_url = public_url.rstrip("/") if public_url else None
        self._twilio_auth_token = twilio_auth_token
        self._webhook_key = webhook_key
        self.max_body_bytes = max_body_bytes
        routes = Starlette(
            routes=[
                Route("/receipts/ihuyi", self._ihuyi, methods=["POST"]),
                Route("/receipts/twilio", self._twilio, methods=["POST"]),
                Route("/receipts/webhook", self._webhook, methods=["POST"]),
            ],
            exception_handlers={
                BadReport: self._refuse,
                BadSignature: self._refuse,
                BodyTooLarge: self._refuse,
                HTTPException: self._refuse,
            },
        )
        buckets = AddressBuckets(rate_limit, rate_burst, clock=clock)
        self._app = _Guard(routes, buckets=buckets, max_body_bytes=max_body_bytes, metrics=metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def _ihuyi(self, request: Request) -> Response:
        reports = ihuyi_reports(await _form(request, "ihuyi"), utcnow())
        return await self._take("ihuyi", reports, PlainTextResponse("success"))

    async def _twilio(self, request: Request) -> Response:
        form = await _form(request, "twilio")
        self._check_twilio_signature(request, form)
        reports = twilio_reports(form, utcnow())
        if not reports:
            self.metrics.receipts.labels("twilio", "ignored").inc()
        return await self._take("twilio", reports, PlainTextResponse("ok\n"))

    async def _webhook(self, request: Request) -> Response:
        body = await request.body()
        if self._webhook_key is not None:
            given = request.headers.get(SIGNATURE_HEADER, "")
            expected = sign(self._webhook_key.get_secret_value().encode(), body)
            if not hmac.compare_digest(given.encode("latin-1"), expected.encode()):
                raise BadSignature(f"webhook: {SIGNATURE_HEADER} is missing or wrong")
        reports = webhook_reports(body, utcnow())
        return await self._take("webhook", reports, PlainTextResponse("ok\n"))

    def _check_twilio_signature(self, request: Request, form: FormData) -> None:
        if self._twilio_auth_token is None:
            raise BadSignature("twilio: no Auth Token is configured to check signatures with")
        given = request.headers.get(TWILIO_SIGNATURE_HEADER)
        if given is None:
            raise BadSignature(f"twilio: {TWILIO_SIGNATURE_HEADER} is missing")
        base = self.public_url or str(request.base_url).rstrip("/")
        query = request.url.query
        url = base + request.url.path + (f"?{query}" if query else "")
        params = [(name, value) for name, value in form.multi_items() if isinstance(value, str)]
        token = self._twilio_auth_token.get_secret_value()
        for candidate in _with_and_without_port(url):
            expected = twilio_signature(token, candidate, params)
            if hmac.compare_digest(given.encode("latin-1"), expected.encode()):
                return
        raise BadSignature(f"twilio: {TWILIO_SIGNATURE_HEADER} is not valid for {url}")

    async def _take(
        self, provider: str, reports: list[DeliveryReport], answer: Response
    ) -> Response:
        if reports:
            try:
                await self._record(reports)
            except Exception as exc:
                log.error(
                    "%s: %d report(s) not recorded (%s); answered 503 so they come again",
                    provider,
                    len(reports),
                    exc,
                )
                self.metrics.receipts_rejected.labels(provider, "unavailable").inc()
                return PlainTextResponse(
                    "cannot record reports now; send them again later\n",
                    503,
                    headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE)},
                )
        for report in reports:
            self.metrics.receipts.labels(provider, report.state).inc()
        return answer

    async def _refuse(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, BodyTooLarge):
            return _too_large(self.max_body_bytes, self.metrics, request.scope)
        if isinstance(exc, HTTPException):
            status = exc.status_code
            reason = _HTTP_REASONS.get(status, "bad_request")
            hint = " (the paths are POST /receipts/ihuyi, /receipts/twilio, /receipts/webhook)"
            message = exc.detail + (hint if status in _HTTP_REASONS else "")
        else:
            status, reason = _REFUSALS[type(exc)]
            message = str(exc)
        self.metrics.receipts_rejected.labels(_provider_of(request.scope), reason).inc()
        log.info("receipts: %s answered %d: %s", request.url.path, status, message)
        return PlainTextResponse(message + "\n", status)


_REFUSALS: dict[type[Exception], tuple[int, str]] = {
    BadReport: (400, "bad_request"),
    BadSignature: (403, "bad_signature"),
}
_HTTP_REASONS = {404: "not_found", 405: "method_not_allowed"}


async def _form(request: Request, provider: str) -> FormData:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        raise BadReport(
            f"{provider}: expected form fields (application/x-www-form-urlencoded), "
            f"not {content_type or 'a body without Content-Type'}"
        )
    try:
        # No provider uploads files: refused before any is spooled, so none is left open.
        return await request.form(max_files=0)
    except HTTPException as exc:
        raise BadReport(f"{provider}: the form cannot be read: {exc.detail}") from None
