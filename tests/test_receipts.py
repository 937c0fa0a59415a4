"""The receipts listener, fed the way each provider documents its delivery reports.

Every request goes over real HTTP to the app on the real embedded uvicorn (127.0.0.1, port 0);
Twilio signatures come from Twilio's own helper library, not from the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from notifier.http import sign
from notifier.metrics import Metrics
from notifier.ops import HTTPServer
from notifier.receipts import IHUYI_FIELDS, AddressBuckets, DeliveryReport, ReceiptsApp
from notifier.settings import SettingsError, load_settings
from notifier.store import StoreUnavailable
from tests.support.clock import Clock
from tests.support.http_sink import HTTPSink, Reply, ihuyi_gateway
from tests.support.prometheus import metric
from tests.support.server import LineConnection, free_port, running_server
from tests.support.waiting import wait_for
from tests.test_fuzz import FUZZ, JSON_VALUES

PUBLIC_URL = "https://notify.example.com/notifier"
TWILIO_URL = PUBLIC_URL + "/receipts/twilio"
AUTH_TOKEN = "twilio-auth-token-5e1f"
WEBHOOK_KEY = "webhook-key-8d2c"
FORM = "application/x-www-form-urlencoded"

#: A Twilio status callback as Twilio posts it (Messaging, "Track the Message Status").
TWILIO_DELIVERED = {
    "SmsSid": "SM" + "a" * 32,
    "SmsStatus": "delivered",
    "MessageStatus": "delivered",
    "To": "+15558675310",
    "MessageSid": "SM" + "a" * 32,
    "AccountSid": "AC" + "1" * 32,
    "From": "+15017122661",
    "ApiVersion": "2010-04-01",
    "RawDlrDoneDate": "2412021230",
}


class Sink:
    """The store side: records what it is handed, or fails like an unreachable store."""

    def __init__(self) -> None:
        self.reports: list[DeliveryReport] = []
        self.calls = 0
        self.failing = False

    async def record(self, reports: list[DeliveryReport]) -> None:
        self.calls += 1
        if self.failing:
            raise StoreUnavailable("database is locked")
        self.reports.extend(reports)


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@contextlib.asynccontextmanager
async def serving(
    sink: Sink, metrics: Metrics, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    settings: dict[str, Any] = {
        "public_url": PUBLIC_URL,
        "twilio_auth_token": SecretStr(AUTH_TOKEN),
        "webhook_key": SecretStr(WEBHOOK_KEY),
        **options,
    }
    server = HTTPServer(ReceiptsApp(sink.record, metrics, **settings), host="127.0.0.1", port=0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            yield http, server.port
    finally:
        await server.stop()


@pytest.fixture
async def http(sink: Sink, metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(sink, metrics) as (client, _):
        yield client


def twilio_headers(
    params: dict[str, str], *, url: str = TWILIO_URL, token: str = AUTH_TOKEN
) -> dict[str, str]:
    signature: str = RequestValidator(token).compute_signature(url, params)
    return {"X-Twilio-Signature": signature}


def signed_webhook(report: dict[str, Any], key: str = WEBHOOK_KEY) -> dict[str, Any]:
    body = json.dumps(report).encode()
    headers = {"Content-Type": "application/json", "X-Notifier-Signature": sign(key.encode(), body)}
    return {"content": body, "headers": headers}


def rejected(metrics: Metrics, provider: str, reason: str) -> float:
    labels = f'provider="{provider}",reason="{reason}"'
    return metric(metrics.render().decode(), "notifier_receipts_rejected_total", labels)


def assert_forbidden(
    response: httpx.Response, sink: Sink, metrics: Metrics, provider: str, header: str, secret: str
) -> None:
    """403 naming the header, without the secret, and nothing passed on."""
    assert response.status_code == 403 and header in response.text
    assert secret not in response.text
    assert sink.calls == 0
    assert rejected(metrics, provider, "bad_signature") == 1


# --- ihuyi ----------------------------------------------------------------------------------


async def test_ihuyi_report_as_ihuyi_pushes_it(
    http: httpx.AsyncClient, sink: Sink, metrics: Metrics
) -> None:
    body = (
        "code=2&msg=DELIVRD&mobilephone=13800138000&smsid=16732906"
        "&report_time=2024-12-02+11%3A02%3A33"
    )
    response = await http.post("/receipts/ihuyi", content=body, headers={"Content-Type": FORM})
    assert (response.status_code, response.text) == (200, "success")
    assert sink.reports == [
        DeliveryReport(
            provider="ihuyi",
            reference="16732906",
            by="provider_id",
            recipient="13800138000",
            state="delivered",
            reason=None,
            at=datetime(2024, 12, 2, 3, 2, 33, tzinfo=UTC),
        )
    ]
    text = metrics.render().decode()
    assert metric(text, "notifier_receipts_total", 'provider="ihuyi",state="delivered"') == 1


async def test_ihuyi_batch_of_repeated_fields(http: httpx.AsyncClient, sink: Sink) -> None:
    batch = {
        "code": ["2", "0", "2"],
        "msg": ["DELIVRD", "空号", "DELIVRD"],
        "mobilephone": ["13800138000", "13800138001", "13800138002"],
        "smsid": ["101", "102", "103"],
        "report_time": ["2024-12-02 11:00:00", "2024-12-02 11:00:01", "2024-12-02 11:00:02"],
    }
    response = await http.post("/receipts/ihuyi", data=batch)
    assert (response.status_code, response.text) == (200, "success")
    assert sink.calls == 1
    got = [(r.reference, r.recipient, r.state, r.reason) for r in sink.reports]
    assert got == [
        ("101", "13800138000", "delivered", None),
        ("102", "13800138001", "undelivered", "空号"),
        ("103", "13800138002", "delivered", None),
    ]


async def test_ihuyi_report_with_a_blank_smsid_is_dropped_the_rest_taken(
    http: httpx.AsyncClient, sink: Sink
) -> None:
    batch = {
        "code": ["2", "2"],
        "smsid": ["", "202"],
        "mobilephone": ["13800138000", "13800138001"],
    }
    response = await http.post("/receipts/ihuyi", data=batch)
    assert (response.status_code, response.text) == (200, "success")
    assert [r.reference for r in sink.reports] == ["202"]
    assert sink.reports[0].at.tzinfo is not None


@pytest.mark.parametrize(
    ("form", "named"),
    [
        ({"code": "2", "mobilephone": "13800138000"}, "'smsid' is missing"),
        ({"smsid": "1", "mobilephone": "13800138000"}, "'code' is missing"),
        ({"code": ["2", "2"], "smsid": ["1", "2"], "msg": "DELIVRD"}, "1 'msg' fields for 2"),
        ({"code": "2", "smsid": ""}, "no report has both"),
    ],
    ids=["no-smsid", "no-code", "unpaired", "all-blank"],
)
async def test_ihuyi_missing_fields_are_400_naming_them(
    http: httpx.AsyncClient, sink: Sink, metrics: Metrics, form: dict[str, Any], named: str
) -> None:
    response = await http.post("/receipts/ihuyi", data=form)
    assert response.status_code == 400
    assert named in response.text and "ihuyi" in response.text
    assert sink.calls == 0
    assert rejected(metrics, "ihuyi", "bad_request") == 1


async def test_ihuyi_body_that_is_not_a_form_is_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/receipts/ihuyi", json={"code": 2, "smsid": "1"})
    assert response.status_code == 400 and "application/x-www-form-urlencoded" in response.text


# --- Twilio ---------------------------------------------------------------------------------


async def test_twilio_callback_signed_by_twilio_helper(
    http: httpx.AsyncClient, sink: Sink, metrics: Metrics
) -> None:
    params = {**TWILIO_DELIVERED, "MessageStatus": "undelivered", "ErrorCode": "30003"}
    response = await http.post("/receipts/twilio", data=params, headers=twilio_headers(params))
    assert response.status_code == 200
    [report] = sink.reports
    assert (report.provider, report.reference, report.by) == (
        "twilio",
        params["MessageSid"],
        "provider_id",
    )
    assert (report.recipient, report.state, report.reason) == (
        "+15558675310",
        "undelivered",
        "30003",
    )
    text = metrics.render().decode()
    assert metric(text, "notifier_receipts_total", 'provider="twilio",state="undelivered"') == 1


@pytest.mark.parametrize(
    ("signed_url", "path"),
    [
        (TWILIO_URL, "/receipts/twilio"),
        ("https://notify.example.com:443/notifier/receipts/twilio", "/receipts/twilio"),
        (TWILIO_URL + "?tenant=a%20b", "/receipts/twilio?tenant=a%20b"),
    ],
    ids=["public-url-with-path", "default-port-spelled-out", "query-string"],
)
async def test_twilio_signature_is_over_the_public_url(
    http: httpx.AsyncClient, sink: Sink, signed_url: str, path: str
) -> None:
    headers = twilio_headers(TWILIO_DELIVERED, url=signed_url)
    response = await http.post(path, data=TWILIO_DELIVERED, headers=headers)
    assert response.status_code == 200, response.text
    assert [(r.state, r.reason) for r in sink.reports] == [("delivered", None)]


@pytest.mark.parametrize(
    ("tamper", "signature_of"),
    [
        ("changed-param", {"params": TWILIO_DELIVERED}),
        ("added-param", {"params": TWILIO_DELIVERED}),
        ("wrong-url", {"url": "https://notify.example.com/receipts/twilio"}),
        ("wrong-token", {"token": "another-auth-token"}),
        ("missing", {}),
    ],
)
async def test_twilio_tampered_signature_is_403(
    http: httpx.AsyncClient, sink: Sink, metrics: Metrics, tamper: str, signature_of: dict[str, Any]
) -> None:
    params = dict(TWILIO_DELIVERED)
    headers = twilio_headers(
        signature_of.get("params", params),
        url=signature_of.get("url", TWILIO_URL),
        token=signature_of.get("token", AUTH_TOKEN),
    )
    if tamper == "changed-param":
        params["MessageStatus"] = "failed"
    elif tamper == "added-param":
        params["ErrorCode"] = "30007"
    elif tamper == "missing":
        headers = {}
    response = await http.post("/receipts/twilio", data=params, headers=headers)
    assert_forbidden(response, sink, metrics, "twilio", "X-Twilio-Signature", AUTH_TOKEN)


async def test_twilio_without_auth_token_refuses_everything(sink: Sink, metrics: Metrics) -> None:
    async with serving(sink, metrics, twilio_auth_token=None) as (http, _):
        headers = twilio_headers(TWILIO_DELIVERED)
        response = await http.post("/receipts/twilio", data=TWILIO_DELIVERED, headers=headers)
    assert response.status_code == 403 and "Auth Token" in response.text
    assert sink.calls == 0


async def test_twilio_without_public_url_signs_the_address_it_was_reached_at(
    sink: Sink, metrics: Metrics
) -> None:
    async with serving(sink, metrics, public_url=None) as (http, port):
        url = f"http://127.0.0.1:{port}/receipts/twilio"
        headers = twilio_headers(TWILIO_DELIVERED, url=url)
        assert (await http.post(url, data=TWILIO_DELIVERED, headers=headers)).status_code == 200
        headers = twilio_headers(TWILIO_DELIVERED)
        assert (await http.post(url, data=TWILIO_DELIVERED, headers=headers)).status_code == 403
    assert len(sink.reports) == 1


@pytest.mark.parametrize("status", ["queued", "sending", "sent", "accepted"])
async def test_twilio_interim_states_change_nothing(
    http: httpx.AsyncClient, sink: Sink, metrics: Metrics, status: str
) -> None:
    params = {**TWILIO_DELIVERED, "MessageStatus": status, "SmsStatus": status}
    response = await http.post("/receipts/twilio", data=params, headers=twilio_headers(params))
    assert response.status_code == 200
    assert sink.calls == 0
    text = metrics.render().decode()
    assert metric(text, "notifier_receipts_total", 'provider="twilio",state="ignored"') == 1


async def test_twilio_missing_status_is_400_naming_it(http: httpx.AsyncClient, sink: Sink) -> None:
    params = {k: v for k, v in TWILIO_DELIVERED.items() if k != "MessageStatus"}
    response = await http.post("/receipts/twilio", data=params, headers=twilio_headers(params))
    assert response.status_code == 400 and "'MessageStatus' is missing" in response.text
    assert sink.calls == 0


# --- webhook --------------------------------------------------------------------------------

WEBHOOK_REPORT = {
    "id": "job-7f3a",
    "to": "+8613800138000",
    "state": "undelivered",
    "reason": "UNDELIV",
}


async def test_webhook_signed_report(http: httpx.AsyncClient, sink: Sink) -> None:
    response = await http.post("/receipts/webhook", **signed_webhook(WEBHOOK_REPORT))
    assert response.status_code == 200
    [report] = sink.reports
    assert (report.reference, report.by, report.recipient) == (
        "job-7f3a",
        "job_id",
        "+8613800138000",
    )
    assert (report.state, report.reason) == ("undelivered", "UNDELIV")


@pytest.mark.parametrize("signature", ["wrong-key", "missing", "not-ascii"])
async def test_webhook_bad_signature_is_403(
    http: httpx.AsyncClient, sink: Sink, metrics: Metrics, signature: str
) -> None:
    request = signed_webhook(WEBHOOK_REPORT, key="another-key")
    if signature == "missing":
        del request["headers"]["X-Notifier-Signature"]
    elif signature == "not-ascii":
        request["headers"]["X-Notifier-Signature"] = "sha256=é".encode("latin-1")
    response = await http.post("/receipts/webhook", **request)
    assert_forbidden(response, sink, metrics, "webhook", "X-Notifier-Signature", WEBHOOK_KEY)


async def test_webhook_without_key_takes_unsigned_reports(sink: Sink, metrics: Metrics) -> None:
    async with serving(sink, metrics, webhook_key=None) as (http, _):
        report = {**WEBHOOK_REPORT, "state": "delivered", "reason": None}
        assert (await http.post("/receipts/webhook", json=report)).status_code == 200
    assert [(r.state, r.reason) for r in sink.reports] == [("delivered", None)]


@pytest.mark.parametrize(
    ("report", "named"),
    [
        ({k: v for k, v in WEBHOOK_REPORT.items() if k != "state"}, "field 'state'"),
        ({**WEBHOOK_REPORT, "state": "read"}, "field 'state'"),
        ({k: v for k, v in WEBHOOK_REPORT.items() if k != "id"}, "field 'id'"),
        ({**WEBHOOK_REPORT, "to": 8613800138000}, "field 'to'"),
        (["not", "an", "object"], "webhook"),
    ],
    ids=["no-state", "unknown-state", "no-id", "number-to", "array"],
)
async def test_webhook_bad_fields_are_400_naming_them(
    http: httpx.AsyncClient, sink: Sink, report: Any, named: str
) -> None:
    response = await http.post("/receipts/webhook", **signed_webhook(report))
    assert response.status_code == 400 and named in response.text
    assert sink.calls == 0


async def test_webhook_body_not_json_is_400(http: httpx.AsyncClient) -> None:
    body = b"{not json"
    headers = {"X-Notifier-Signature": sign(WEBHOOK_KEY.encode(), body)}
    response = await http.post("/receipts/webhook", content=body, headers=headers)
    assert response.status_code == 400 and "JSON" in response.text


# --- limits and failures --------------------------------------------------------------------


async def raw_status_line(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send a request head and some of a body, and read the status line without sending more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), timeout=10)
    finally:
        writer.close()


def request_head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {FORM}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_ten_megabytes_declared_is_413_before_the_body_is_sent(
    sink: Sink, metrics: Metrics
) -> None:
    async with serving(sink, metrics) as (_, port):
        head = request_head("/receipts/ihuyi", f"Content-Length: {10 * 1024 * 1024}")
        status = await raw_status_line(port, head, b"code=2&smsid=1&")
    assert status.startswith(b"HTTP/1.1 413")
    assert rejected(metrics, "ihuyi", "too_large") == 1
    assert sink.calls == 0


async def test_streamed_body_past_the_limit_is_413(sink: Sink, metrics: Metrics) -> None:
    async with serving(sink, metrics, max_body_bytes=4096) as (_, port):
        head = request_head("/receipts/ihuyi", "Transfer-Encoding: chunked")
        chunk = b"code=2&smsid=1&" * 100
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4))
        status = await raw_status_line(port, head, chunks)
    assert status.startswith(b"HTTP/1.1 413")
    assert rejected(metrics, "ihuyi", "too_large") == 1
    assert sink.calls == 0


async def test_body_within_the_limit_passes(sink: Sink, metrics: Metrics) -> None:
    async with serving(sink, metrics, max_body_bytes=4096) as (http, _):
        batch = {"code": ["2"] * 100, "smsid": [str(i) for i in range(100)]}
        assert (await http.post("/receipts/ihuyi", data=batch)).status_code == 200
        batch = {"code": ["2"] * 400, "smsid": [str(i) for i in range(400)]}
        assert (await http.post("/receipts/ihuyi", data=batch)).status_code == 413
    assert len(sink.reports) == 100


async def test_flood_from_one_address_is_429_with_retry_after(sink: Sink, metrics: Metrics) -> None:
    clock = Clock()
    options = {"rate_limit": 0.5, "rate_burst": 3, "clock": clock, "webhook_key": None}
    async with serving(sink, metrics, **options) as (http, _):
        statuses = [
            (await http.post("/receipts/webhook", json=WEBHOOK_REPORT)).status_code
            for _ in range(3)
        ]
        flooded = await http.post("/receipts/webhook", json=WEBHOOK_REPORT)
        # a proxy on 127.0.0.1 names the real client; that address has its own bucket
        other = {"X-Forwarded-For": "203.0.113.9"}
        elsewhere = await http.post("/receipts/webhook", json=WEBHOOK_REPORT, headers=other)
        clock.now += 2
        later = await http.post("/receipts/webhook", json=WEBHOOK_REPORT)
    assert statuses == [200, 200, 200]
    assert flooded.status_code == 429 and flooded.headers["Retry-After"] == "2"
    assert elsewhere.status_code == 200 and later.status_code == 200
    assert len(sink.reports) == 5
    assert rejected(metrics, "webhook", "rate_limited") == 1


def test_address_buckets_forget_the_least_recently_seen() -> None:
    buckets = AddressBuckets(1.0, 1, max_clients=2, clock=Clock())
    assert buckets.wait("198.51.100.1") == 0 and buckets.wait("198.51.100.1") == 1.0
    buckets.wait("198.51.100.2")
    assert buckets.wait("198.51.100.1") == 1.0  # seen last, so .2 goes next
    buckets.wait("198.51.100.3")
    assert buckets.wait("198.51.100.1") == 1.0  # still known, still empty
    buckets.wait("198.51.100.4")
    buckets.wait("198.51.100.5")
    assert buckets.wait("198.51.100.1") == 0  # forgotten, so full again


async def test_sink_failure_is_503_and_the_report_comes_again(
    http: httpx.AsyncClient, sink: Sink, metrics: Metrics
) -> None:
    sink.failing = True
    params = dict(TWILIO_DELIVERED)
    response = await http.post("/receipts/twilio", data=params, headers=twilio_headers(params))
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
    assert rejected(metrics, "twilio", "unavailable") == 1
    text = metrics.render().decode()
    assert metric(text, "notifier_receipts_total", 'provider="twilio",state="delivered"') == 0
    sink.failing = False
    response = await http.post("/receipts/twilio", data=params, headers=twilio_headers(params))
    assert response.status_code == 200
    assert [r.reference for r in sink.reports] == [params["MessageSid"]]


async def test_unknown_path_and_method_get_short_answers(
    http: httpx.AsyncClient, metrics: Metrics
) -> None:
    response = await http.post("/receipts/nexmo", data={"a": "b"})
    assert response.status_code == 404 and "/receipts/twilio" in response.text
    response = await http.get("/receipts/ihuyi")
    assert response.status_code == 405
    assert rejected(metrics, "none", "not_found") == 1
    assert rejected(metrics, "ihuyi", "method_not_allowed") == 1


# --- settings -------------------------------------------------------------------------------


def test_receipts_settings() -> None:
    settings = load_settings(receipts_public_url="https://example.com/notifier/")
    assert settings.receipts_public_url == "https://example.com/notifier"
    assert settings.receipts_port == 0
    assert load_settings(receipts_public_url="").receipts_public_url is None
    with pytest.raises(SettingsError, match="NOTIFIER_RECEIPTS_PUBLIC_URL"):
        load_settings(receipts_public_url="notify.example.com")


# -- the whole loop, through the running service -----------------------------------------------


async def test_a_verification_sms_from_send_to_its_receipt_callback(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    """The worked example of docs/protocol.md: send, delivered, DLR, ``job.receipt``."""
    http_sink.respond_with(
        lambda request: ihuyi_gateway()(request) if request.path.startswith("/sms") else Reply()
    )
    receipts_port = free_port()
    async with running_server(
        tmp_path,
        sms_provider="ihuyi",
        sms_url=http_sink.url + "/sms?method=Submit",
        sms_account="C0000001",
        sms_api_key="k" * 32,
        receipts_port=receipts_port,
        callback_secret="hook-secret",
    ) as server:
        conn = await LineConnection.open(server.port)
        sent = await conn.request(
            {
                "channel": "sms",
                "to": "+8613800138000",
                "text": "Your code is 384912",
                "callback_url": http_sink.url + "/hooks",
            }
        )

        async def posted(kind: str) -> dict[str, Any] | None:
            for request in list(http_sink.requests):
                if request.path == "/hooks" and request.json()["type"] == kind:
                    event: dict[str, Any] = request.json()
                    return event
            return None

        final = await wait_for(lambda: posted("job.final"), what="the job.final callback")
        smsid = final["job"]["results"]["delivered"]["+8613800138000"]
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"http://127.0.0.1:{receipts_port}/receipts/ihuyi",
                data={
                    "code": "2",
                    "msg": "DELIVRD",
                    "mobilephone": "13800138000",
                    "smsid": smsid,
                    "report_time": "2026-12-02 14:00:05",
                },
            )
        assert (answer.status_code, answer.text) == (200, "success")
        receipt = await wait_for(lambda: posted("job.receipt"), what="the job.receipt callback")
        assert receipt["job"]["id"] == sent["id"]
        assert receipt["job"]["receipts"]["+8613800138000"]["state"] == "delivered"
        assert receipt["event_id"] != final["event_id"]
        status = await conn.request({"op": "status", "id": sent["id"]})
        assert status["status"] == "delivered" and status["receipts"]
        await conn.close()


# --- fuzzing: whatever arrives, a documented answer ------------------------------------------

#: Every status the listener documents; 429 and 503 cannot happen here (no rate limit, a
#: sink that works), so anything else, a 500 above all, is a bug.
DOCUMENTED = {200, 400, 403, 404, 405, 413}
CONTENT_TYPES: list[str | bytes | None] = [
    None,
    FORM,
    FORM + "; charset=utf-8",
    "multipart/form-data",
    "multipart/form-data; boundary=x",
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded; charset=latin-1",
    "\u00e9/\u00e9".encode("latin-1"),
]
FORM_NAMES = st.sampled_from(
    [*IHUYI_FIELDS, "MessageSid", "MessageStatus", "ErrorCode", "To", "AccountSid"]
) | st.text(max_size=8)
#: What an HTTP client can put in a header at all: latin-1 without control characters.
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"))
FORM_VALUES = st.sampled_from(
    ["", "2", "0", "delivered", "failed", "sent", "2024-13-45 99:99:99", "%ff", "\x00"]
) | st.text(max_size=30)


@st.composite
def receipt_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request any client could send: a path, a body of some kind, perhaps a signature."""
    path = draw(st.sampled_from(["/", "/receipts", "/receipts/ihuyi/x", "/receipts/%00"]))
    kind = draw(st.sampled_from(["form", "multipart", "json", "report", "bytes"]))
    headers: dict[str, str | bytes] = {}
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]))
    request: dict[str, Any] = {"method": method, "odd_path": path}
    if kind == "form":
        fields = draw(st.lists(st.tuples(FORM_NAMES, FORM_VALUES), max_size=12))
        request["content"] = urlencode(fields).encode()
        headers["Content-Type"] = FORM
        if draw(st.booleans()):
            signed = RequestValidator(AUTH_TOKEN).compute_signature(TWILIO_URL, dict(fields))
            headers["X-Twilio-Signature"] = signed
    elif kind == "multipart":
        request["files"] = {draw(FORM_NAMES) or "f": ("a.txt", draw(st.binary(max_size=100)))}
        request["data"] = dict(draw(st.lists(st.tuples(FORM_NAMES, FORM_VALUES), max_size=4)))
    elif kind == "json":
        request["content"] = json.dumps(draw(JSON_VALUES)).encode()
    elif kind == "report":
        report: dict[str, Any] = {**WEBHOOK_REPORT}
        for field in draw(st.lists(st.sampled_from(["id", "to", "state", "reason", "x"]))):
            report[field] = draw(JSON_VALUES)
        request["content"] = json.dumps(report).encode()
    else:
        request["content"] = draw(st.binary(max_size=2000))
    if "content" in request and kind != "form":
        headers.update(draw(body_headers(request["content"])))
    request["headers"] = headers
    return request


@st.composite
def body_headers(draw: st.DrawFn, content: bytes) -> dict[str, str | bytes]:
    """Some Content-Type or none, and a signature that is right, garbage or absent."""
    headers: dict[str, str | bytes] = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        headers["Content-Type"] = content_type
    signature = draw(st.sampled_from(["none", "right", "junk"]))
    if signature == "right":
        headers["X-Notifier-Signature"] = sign(WEBHOOK_KEY.encode(), content)
    elif signature == "junk":
        headers["X-Notifier-Signature"] = draw(HEADER_TEXT).encode("latin-1")
        headers["X-Twilio-Signature"] = draw(HEADER_TEXT).encode("latin-1")
    return headers


@pytest.fixture
async def fuzzed(
    sink: Sink, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[httpx.AsyncClient]:
    """One listener for every example, without its rate limit."""
    async with serving(sink, metrics, rate_limit=0.0) as (client, _):
        yield client
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@settings(FUZZ, max_examples=60)
@given(request=receipt_requests())
@example(request={"method": "POST", "content": b"code=2&smsid=%ff%fe", "headers": {}})
@example(request={"method": "POST", "content": b"--x\r\n\r\n", "headers": {}})
@example(request={"method": "POST", "content": b"\xff" * 10, "headers": {"Content-Type": FORM}})
@example(
    request={
        "method": "POST",
        "content": b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n",
        "headers": {"Content-Type": "multipart/form-data; boundary=x"},
    }
)
async def test_any_request_gets_a_documented_answer(
    fuzzed: httpx.AsyncClient, sink: Sink, request: dict[str, Any]
) -> None:
    request = dict(request)
    paths = [
        "/receipts/ihuyi",
        "/receipts/twilio",
        "/receipts/webhook",
        request.pop("odd_path", "/"),
    ]
    for path in paths:
        before = len(sink.reports)
        response = await fuzzed.request(url=path, **request)
        assert response.status_code in DOCUMENTED, (path, request, response.text)
        assert len(response.content) < 2048 and AUTH_TOKEN not in response.text
        assert WEBHOOK_KEY not in response.text
        if response.status_code != 200:
            assert len(sink.reports) == before, "a refused request recorded something"
    still = await fuzzed.post("/receipts/webhook", **signed_webhook(WEBHOOK_REPORT))
    assert still.status_code == 200, "the listener stopped taking good reports"
