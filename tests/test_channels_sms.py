"""SMS providers: respx for each documented code and status, then a real local gateway."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from notifier.channels.base import Channel
from notifier.channels.circuit import CircuitBreaker, CircuitState
from notifier.channels.outbox import OutboxChannel
from notifier.channels.sms import PROVIDERS, ProviderConfig, SMSChannel, create_channel
from notifier.channels.sms.base import new_http_client
from notifier.channels.sms.ihuyi import CODES, Fault, code_error, until_next_china_day
from notifier.dispatcher import Dispatcher
from notifier.errors import (
    DeliveryConnectionError,
    DeliveryError,
    DeliveryTimeout,
    InvalidMessage,
    InvalidRequest,
    PermanentDeliveryError,
    ProviderRejected,
    RecipientRejected,
    RecipientThrottled,
    TransientDeliveryError,
    throttled,
)
from notifier.http import retry_after
from notifier.intake import Intake
from notifier.metrics import Metrics
from notifier.models import Message
from notifier.protocol import SendRequest
from notifier.settings import Settings, SettingsError, load_settings
from notifier.store import Store, open_store
from notifier.templates import Templates
from tests.support.clock import Clock
from tests.support.http_sink import (
    DROP,
    HTTPSink,
    Recorded,
    Reply,
    ihuyi_gateway,
    running_http_sink,
)
from tests.support.server import isolated_settings

IHUYI_URL = "https://106.ihuyi.com/webservice/sms.php?method=Submit"
TWILIO_URL = "https://api.twilio.com/2010-04-01/Accounts/AC123/Messages.json"
WEBHOOK_URL = "https://gateway.example.com/sms"
API_KEY = "k3y-that-must-not-leak"

#: The SMS clients run on aiohttp's transport (notifier/channels/sms/transport.py), not
#: httpcore's pool, so respx mocks them at the httpx client.
pytestmark = pytest.mark.respx(using="httpx", assert_all_called=False)


def sms_settings(provider: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"sms_provider": provider, "sms_api_key": API_KEY}
    values |= {
        "ihuyi": {"sms_account": "C123"},
        "twilio": {"sms_account": "AC123", "sms_from": "+15005550006"},
        "webhook": {"sms_url": WEBHOOK_URL, "sms_from": "ACME"},
    }[provider]
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def sms(*numbers: str, text: str = "您的验证码是 1234。") -> Message:
    return Message(id="job1", channel="sms", to=numbers, text=text)


@pytest.fixture
async def ihuyi() -> AsyncIterator[Channel]:
    channel = create_channel(sms_settings("ihuyi"))
    yield channel
    await channel.aclose()


def ihuyi_answer(code: int, msg: str = "", smsid: str = "0") -> httpx.Response:
    return httpx.Response(200, json={"code": code, "msg": msg, "smsid": smsid})


def assert_no_secret(error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    chain: BaseException | None = error
    while chain is not None:
        assert API_KEY not in str(chain)
        chain = chain.__cause__ or chain.__context__
    assert API_KEY not in caplog.text


# ihuyi


async def test_ihuyi_posts_the_form_and_returns_the_smsid(
    respx_mock: respx.MockRouter, ihuyi: Channel
) -> None:
    route = respx_mock.post(IHUYI_URL).mock(return_value=ihuyi_answer(2, "提交成功", "1601234567"))

    receipt = await ihuyi.send(sms("+8613800138000"))

    assert receipt.provider_ids == {"+8613800138000": "1601234567"}
    request = route.calls.last.request
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = dict(httpx.QueryParams(request.content.decode()))
    assert form == {
        "account": "C123",
        "password": API_KEY,
        "mobile": "13800138000",
        "content": "您的验证码是 1234。",
        "format": "json",
    }
    assert ihuyi.provider == "ihuyi"


async def test_ihuyi_takes_national_numbers_as_given(
    respx_mock: respx.MockRouter, ihuyi: Channel
) -> None:
    route = respx_mock.post(IHUYI_URL).mock(return_value=ihuyi_answer(2, smsid="7"))

    await ihuyi.send(sms("13800138000"))

    assert dict(httpx.QueryParams(route.calls.last.request.content.decode()))["mobile"] == (
        "13800138000"
    )


async def test_ihuyi_refuses_numbers_outside_china(
    respx_mock: respx.MockRouter, ihuyi: Channel
) -> None:
    route = respx_mock.post(IHUYI_URL).mock(return_value=ihuyi_answer(2))

    with pytest.raises(PermanentDeliveryError, match=r"\+14155550101 is not a Chinese"):
        await ihuyi.send(sms("+14155550101"))

    assert not route.called


@pytest.mark.parametrize(
    ("code", "expected", "wait"),
    [
        (0, TransientDeliveryError, None),
        (4010, RecipientThrottled, 60.0),
        (4080, RecipientThrottled, 1.0),
        (4081, RecipientThrottled, 60.0),
        (4083, RecipientThrottled, 60.0),
        (4086, RecipientThrottled, 60.0),
        (4082, RecipientThrottled, "next day"),
        (4084, RecipientThrottled, "next day"),
        (4085, RecipientThrottled, "next day"),
        (400, ProviderRejected, None),
        (405, ProviderRejected, None),
        (4050, ProviderRejected, None),
        (4051, ProviderRejected, None),
        (4052, ProviderRejected, None),
        (4071, ProviderRejected, None),
        (408, ProviderRejected, None),
        (4030, RecipientRejected, None),
        (406, RecipientRejected, None),
        (40864, RecipientRejected, None),
        (407, InvalidMessage, None),
        (4072, InvalidMessage, None),
        (4073, InvalidMessage, None),
        (99999, TransientDeliveryError, None),
    ],
)
def test_ihuyi_codes_are_classified(code: int, expected: type[DeliveryError], wait: object) -> None:
    error = code_error(code, "网关说明", "+8613800138000")

    assert type(error) is expected
    assert error.message.startswith(f"ihuyi: code {code} (")
    assert error.message.endswith(": 网关说明")
    if wait == "next day":
        assert error.retry_after is not None and error.retry_after >= 3600
    else:
        assert error.retry_after == wait
    if isinstance(error, RecipientThrottled):
        assert error.recipient == "+8613800138000"


@pytest.mark.parametrize("code", sorted(CODES))
async def test_every_documented_ihuyi_code_is_handled_as_the_table_says(
    respx_mock: respx.MockRouter, code: int, ihuyi: Channel
) -> None:
    respx_mock.post(IHUYI_URL).mock(return_value=ihuyi_answer(code))

    with pytest.raises(DeliveryError) as caught:
        await ihuyi.send(sms("+8613800138000"))

    fault, meaning = CODES[code]
    # Only the message or the number being wrong fails for good: a refused account is
    # retried later (the only provider's circuit is open), like every "later" code.
    assert caught.value.transient is (fault not in (Fault.NUMBER, Fault.MESSAGE))
    assert meaning in caught.value.message


@pytest.mark.parametrize(
    ("now", "seconds"),
    [
        (datetime(2024, 1, 1, 0, 0, tzinfo=UTC), 16 * 3600),  # 08:00 in China
        (datetime(2024, 1, 1, 15, 30, tzinfo=UTC), 3600),  # 23:30 in China: at least an hour
        (datetime(2024, 1, 1, 12, 0, tzinfo=UTC), 4 * 3600),  # 20:00 in China
    ],
)
def test_daily_caps_wait_until_the_next_day_in_china(now: datetime, seconds: float) -> None:
    assert until_next_china_day(now) == seconds


@pytest.mark.parametrize(
    ("answer", "expected", "says"),
    [
        (httpx.Response(503, headers={"Retry-After": "120"}), TransientDeliveryError, "HTTP 503"),
        (httpx.Response(502), TransientDeliveryError, "HTTP 502"),
        (httpx.Response(404), PermanentDeliveryError, "HTTP 404"),
        (
            httpx.Response(200, text="<html>maintenance</html>"),
            TransientDeliveryError,
            "unreadable",
        ),
        (httpx.Response(200, json={"msg": "no code"}), TransientDeliveryError, "unreadable"),
    ],
)
async def test_ihuyi_http_failures(
    respx_mock: respx.MockRouter,
    answer: httpx.Response,
    expected: type[DeliveryError],
    says: str,
    ihuyi: Channel,
) -> None:
    respx_mock.post(IHUYI_URL).mock(return_value=answer)

    with pytest.raises(expected, match=says) as caught:
        await ihuyi.send(sms("+8613800138000"))

    assert caught.value.retry_after == (120.0 if "Retry-After" in answer.headers else None)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (httpx.ConnectTimeout("connect timed out"), DeliveryTimeout),
        (httpx.ReadTimeout("read timed out"), DeliveryTimeout),
        (httpx.ConnectError("connection refused"), DeliveryConnectionError),
        (httpx.RemoteProtocolError("server disconnected"), DeliveryConnectionError),
    ],
)
async def test_transport_failures_are_transient_and_keep_the_key_secret(
    respx_mock: respx.MockRouter,
    failure: Exception,
    expected: type[DeliveryError],
    ihuyi: Channel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    respx_mock.post(IHUYI_URL).mock(side_effect=failure)

    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(expected, match=r"106\.ihuyi\.com") as caught,
    ):
        await ihuyi.send(sms("+8613800138000"))

    assert_no_secret(caught.value, caplog)


async def test_ihuyi_error_answers_keep_the_key_secret(
    respx_mock: respx.MockRouter, ihuyi: Channel, caplog: pytest.LogCaptureFixture
) -> None:
    respx_mock.post(IHUYI_URL).mock(return_value=ihuyi_answer(405, "APIID或APIKEY不正确"))

    with caplog.at_level(logging.DEBUG), pytest.raises(DeliveryError, match="code 405") as caught:
        await ihuyi.send(sms("+8613800138000"))

    assert_no_secret(caught.value, caplog)
    assert API_KEY not in repr(ihuyi.__dict__)


# Several numbers


async def test_each_number_once_and_partial_failure_names_the_delivered(
    respx_mock: respx.MockRouter, ihuyi: Channel
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        mobile = dict(httpx.QueryParams(request.content.decode()))["mobile"]
        return {
            "13800138000": ihuyi_answer(2, smsid="111"),
            "13900139000": ihuyi_answer(4085, "验证码超限"),
            "13700137000": ihuyi_answer(406, "手机格式不正确"),
        }[mobile]

    route = respx_mock.post(IHUYI_URL).mock(side_effect=answer)

    with pytest.raises(TransientDeliveryError, match="2 of 3 numbers failed") as caught:
        await ihuyi.send(sms("+8613800138000", "+8613900139000", "+8613700137000"))

    assert route.call_count == 3
    assert caught.value.delivered == {"+8613800138000": "111"}
    assert caught.value.retry_after is not None and caught.value.retry_after >= 3600
    assert "+8613700137000: ihuyi: code 406" in caught.value.message


async def test_only_permanent_failures_fail_for_good(
    respx_mock: respx.MockRouter, ihuyi: Channel
) -> None:
    respx_mock.post(IHUYI_URL).mock(
        side_effect=[ihuyi_answer(2, smsid="1"), ihuyi_answer(4030, "黑名单")]
    )

    with pytest.raises(PermanentDeliveryError, match="1 of 2 numbers failed") as caught:
        await ihuyi.send(sms("13800138000", "13900139000"))

    assert list(caught.value.delivered.values()) == ["1"]


async def test_all_numbers_delivered_is_a_receipt(
    respx_mock: respx.MockRouter, ihuyi: Channel
) -> None:
    respx_mock.post(IHUYI_URL).mock(
        side_effect=[ihuyi_answer(2, smsid="1"), ihuyi_answer(2, smsid="2")]
    )

    receipt = await ihuyi.send(sms("13800138000", "13900139000"))

    assert sorted(receipt.provider_ids.values()) == ["1", "2"]  # type: ignore[type-var]


async def test_a_gateway_client_keeps_no_cookies(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(IHUYI_URL).mock(
        return_value=httpx.Response(200, headers={"Set-Cookie": "session=1; Path=/"}, json={})
    )
    async with new_http_client(sms_settings("ihuyi")) as client:
        await client.post(IHUYI_URL)
        await client.post(IHUYI_URL)
        assert not client.cookies
        with pytest.raises(TypeError, match="no cookies"):
            client.cookies = {"session": "1"}

    assert "cookie" not in route.calls.last.request.headers


# Twilio


@pytest.mark.parametrize(
    ("sender", "field"), [("+15005550006", "From"), ("MG0123456789abcdef", "MessagingServiceSid")]
)
async def test_twilio_posts_with_basic_auth(
    respx_mock: respx.MockRouter, sender: str, field: str
) -> None:
    route = respx_mock.post(TWILIO_URL).mock(
        return_value=httpx.Response(201, json={"sid": "SM42", "status": "queued"})
    )
    channel = create_channel(sms_settings("twilio", sms_from=sender))

    receipt = await channel.send(sms("+14155550101", text="Your code is 1234"))
    await channel.aclose()

    assert receipt.provider_ids == {"+14155550101": "SM42"}
    request = route.calls.last.request
    assert request.headers["authorization"] == httpx.BasicAuth("AC123", API_KEY)._auth_header
    assert dict(httpx.QueryParams(request.content.decode())) == {
        "To": "+14155550101",
        "Body": "Your code is 1234",
        field: sender,
    }


@pytest.mark.parametrize(
    ("answer", "expected", "says", "wait"),
    [
        (
            httpx.Response(400, json={"code": 21211, "message": "Invalid 'To' Phone Number"}),
            RecipientRejected,
            "HTTP 400 Bad Request: error 21211: Invalid 'To' Phone Number",
            None,
        ),
        (
            httpx.Response(401, json={"code": 20003, "message": "Authenticate"}),
            TransientDeliveryError,  # the only provider refuses us: later, circuit open
            "error 20003",
            None,
        ),
        (
            httpx.Response(
                429,
                json={"code": 20429, "message": "Too Many Requests"},
                headers={"Retry-After": "30"},
            ),
            TransientDeliveryError,
            "error 20429",
            30.0,
        ),
        (
            httpx.Response(400, json={"code": 21611, "message": "queue full"}),
            TransientDeliveryError,
            "error 21611",
            None,
        ),
        (httpx.Response(500, text="oops"), TransientDeliveryError, "twilio: HTTP 500", None),
        (
            httpx.Response(400, json={"code": 21617, "message": "Body too long"}),
            InvalidMessage,
            "error 21617",
            None,
        ),
        (httpx.Response(429, headers={"Retry-After": "5"}), RecipientThrottled, "HTTP 429", 5.0),
    ],
)
async def test_twilio_failures(
    respx_mock: respx.MockRouter,
    answer: httpx.Response,
    expected: type[DeliveryError],
    says: str,
    wait: float | None,
) -> None:
    respx_mock.post(TWILIO_URL).mock(return_value=answer)
    channel = create_channel(sms_settings("twilio"))

    with pytest.raises(expected, match=says.replace("(", r"\(")) as caught:
        await channel.send(sms("+14155550101"))
    await channel.aclose()

    assert type(caught.value) is expected
    assert caught.value.retry_after == wait


async def test_twilio_success_without_a_readable_sid_is_still_a_success(
    respx_mock: respx.MockRouter,
) -> None:
    respx_mock.post(TWILIO_URL).mock(return_value=httpx.Response(201, text="Created"))
    channel = create_channel(sms_settings("twilio"))

    receipt = await channel.send(sms("+14155550101"))
    await channel.aclose()

    assert receipt.provider_ids == {"+14155550101": None}


# Webhook


async def test_webhook_signs_the_raw_body(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(WEBHOOK_URL).mock(return_value=httpx.Response(202))
    channel = create_channel(sms_settings("webhook"))

    receipt = await channel.send(sms("+8613800138000"))
    await channel.aclose()

    request = route.calls.last.request
    assert json.loads(request.content) == {
        "id": "job1",
        "to": "+8613800138000",
        "text": "您的验证码是 1234。",
        "from": "ACME",
    }
    expected = hmac.new(API_KEY.encode(), request.content, hashlib.sha256).hexdigest()
    assert request.headers["x-notifier-signature"] == f"sha256={expected}"
    assert receipt.provider_ids == {"+8613800138000": None}


async def test_webhook_without_secret_sends_no_signature(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(WEBHOOK_URL).mock(return_value=httpx.Response(200))
    channel = create_channel(sms_settings("webhook", sms_api_key=None))

    await channel.send(sms("+8613800138000"))
    await channel.aclose()

    assert "x-notifier-signature" not in route.calls.last.request.headers


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (408, TransientDeliveryError),
        (429, RecipientThrottled),
        (500, TransientDeliveryError),
        (503, TransientDeliveryError),
        (400, PermanentDeliveryError),
        (403, TransientDeliveryError),  # a wrong secret: our account, so retried later
        (422, PermanentDeliveryError),
    ],
)
async def test_webhook_statuses(
    respx_mock: respx.MockRouter, status: int, expected: type[DeliveryError]
) -> None:
    respx_mock.post(WEBHOOK_URL).mock(return_value=httpx.Response(status))
    channel = create_channel(sms_settings("webhook"))

    with pytest.raises(expected, match=f"webhook: HTTP {status}") as caught:
        await channel.send(sms("+8613800138000"))
    await channel.aclose()

    assert type(caught.value) is expected


# Shared rules and settings


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)

    def wait(value: str) -> float | None:
        return retry_after(httpx.Response(503, headers={"Retry-After": value}))

    assert wait("7") == 7.0
    assert wait(later) is not None and 3500 < wait(later) <= 3600  # type: ignore[operator]
    assert wait(past) == 0.0
    assert wait("soon") is None
    assert retry_after(httpx.Response(503)) is None


@pytest.mark.parametrize(
    ("provider", "missing", "variable"),
    [
        ("ihuyi", "sms_account", "NOTIFIER_SMS_ACCOUNT"),
        ("ihuyi", "sms_api_key", "NOTIFIER_SMS_API_KEY"),
        ("twilio", "sms_from", "NOTIFIER_SMS_FROM"),
        ("webhook", "sms_url", "NOTIFIER_SMS_URL"),
    ],
)
def test_missing_provider_settings_stop_the_start(
    provider: str, missing: str, variable: str
) -> None:
    with pytest.raises(SettingsError, match=f"{variable}: required for the {provider}"):
        create_channel(sms_settings(provider, **{missing: None}))


def test_no_provider_means_the_outbox(tmp_path: Path) -> None:
    channel = create_channel(Settings(_env_file=None, outbox_dir=tmp_path))  # type: ignore[call-arg]

    assert isinstance(channel, OutboxChannel)
    assert channel.simulated


# End to end against a real local gateway


async def test_ihuyi_against_a_local_gateway(http_sink: HTTPSink) -> None:
    http_sink.respond_with(ihuyi_gateway(codes={"13900139000": 4082}))
    url = http_sink.url + "/webservice/sms.php?method=Submit"
    channel = create_channel(sms_settings("ihuyi", sms_url=url))
    assert isinstance(channel, SMSChannel)

    receipt = await channel.send(sms("+8613800138000"))
    with pytest.raises(TransientDeliveryError, match="code 4082") as caught:
        await channel.send(sms("+8613700137000", "+8613900139000"))
    await channel.aclose()

    first, second, third = http_sink.wait_for_requests(3)
    assert receipt.provider_ids == {"+8613800138000": "0000000000000001"}
    assert caught.value.delivered == {"+8613700137000": "0000000000000002"}
    assert first.path == "/webservice/sms.php?method=Submit"
    assert first.form()["content"] == "您的验证码是 1234。"
    assert {second.form()["mobile"], third.form()["mobile"]} == {"13700137000", "13900139000"}


async def test_webhook_against_a_local_gateway(http_sink: HTTPSink) -> None:
    http_sink.answer(Reply(503, headers={"Retry-After": "9"}), DROP)
    channel = create_channel(sms_settings("webhook", sms_url=http_sink.url + "/hook"))

    with pytest.raises(TransientDeliveryError, match="HTTP 503") as busy:
        await channel.send(sms("+14155550101"))
    with pytest.raises(DeliveryConnectionError, match=r"127\.0\.0\.1"):
        await channel.send(sms("+14155550101"))
    await channel.send(sms("+14155550101"))
    await channel.aclose()

    requests = http_sink.wait_for_requests(3)
    assert busy.value.retry_after == 9.0
    body = requests[-1].body
    expected = hmac.new(API_KEY.encode(), body, hashlib.sha256).hexdigest()
    assert requests[-1].headers["x-notifier-signature"] == f"sha256={expected}"
    assert json.loads(body)["to"] == "+14155550101"


async def test_a_post_dropped_on_a_kept_alive_connection_is_lost_not_resent(
    http_sink: HTTPSink,
) -> None:
    http_sink.respond_with(ihuyi_gateway())
    http_sink.answer(Reply(body={"code": 2, "msg": "ok", "smsid": "1"}), DROP)
    url = http_sink.url + "/webservice/sms.php?method=Submit"
    channel = create_channel(sms_settings("ihuyi", sms_url=url))

    await channel.send(sms("+8613800138000"))
    with pytest.raises(DeliveryConnectionError, match=r"cannot reach 127\.0\.0\.1"):
        await channel.send(sms("+8613800138000"))
    third = await channel.send(sms("+8613800138000"))
    await channel.aclose()

    assert len(http_sink.wait_for_requests(3)) == 3  # the dropped one arrived once, not twice
    assert third.provider_ids == {"+8613800138000": "0000000000000001"}


async def test_a_refused_connection_and_a_silent_gateway_are_told_apart() -> None:
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepted by the kernel, never answered
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        urls = [f"http://127.0.0.1:{s.getsockname()[1]}/sms" for s in (closed, silent)]
        refused, waiting = (
            create_channel(sms_settings("webhook", sms_url=url, sms_timeout=0.5)) for url in urls
        )
        with pytest.raises(DeliveryConnectionError, match=r"cannot reach 127\.0\.0\.1"):
            await refused.send(sms("+14155550101"))
        with pytest.raises(DeliveryTimeout, match=r"timed out talking to 127\.0\.0\.1"):
            await waiting.send(sms("+14155550101"))
        await refused.aclose()
        await waiting.aclose()


# Several providers: settings, failover, circuits

TWILIO_LOCAL = "/2010-04-01/Accounts/AC123/Messages.json"


def failover_settings(ihuyi_url: str, twilio_base: str, **overrides: Any) -> Settings:
    """ihuyi first (the unprefixed settings), Twilio second (NOTIFIER_SMS_TWILIO_*)."""
    values: dict[str, Any] = {
        "sms_provider": "ihuyi,twilio",
        "sms_url": ihuyi_url,
        "sms_twilio_url": twilio_base,
        "sms_twilio_account": "AC123",
        "sms_twilio_api_key": "tw1lio-token",
        "sms_twilio_from": "+15005550006",
    }
    return sms_settings("ihuyi", **(values | overrides))


def twilio_created(sink: HTTPSink) -> Callable[[Recorded], Reply]:
    return lambda request: Reply(201, body={"sid": f"SM{len(sink.requests)}", "status": "queued"})


def test_each_provider_reads_its_own_settings_and_the_first_also_the_unprefixed() -> None:
    settings = sms_settings(
        "ihuyi",
        sms_provider="ihuyi, twilio",
        sms_from="unused-by-twilio",
        sms_ihuyi_account="C999",  # overrides NOTIFIER_SMS_ACCOUNT for the first provider
        sms_twilio_account="AC123",
        sms_twilio_api_key="tw1lio-token",
        sms_twilio_from="+15005550006",
    )

    ihuyi, twilio = (ProviderConfig.of(settings, name) for name in settings.sms_provider)

    assert (ihuyi.account, ihuyi.url) == ("C999", None)
    assert ihuyi.api_key is not None and ihuyi.api_key.get_secret_value() == API_KEY
    assert (twilio.account, twilio.sender) == ("AC123", "+15005550006")
    assert twilio.api_key is not None and twilio.api_key.get_secret_value() == "tw1lio-token"
    assert API_KEY not in repr(settings) and "tw1lio-token" not in repr(settings)


def test_providers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "PROVIDER": "webhook,twilio",
        "URL": WEBHOOK_URL,
        "TWILIO_ACCOUNT": "AC123",
        "TWILIO_API_KEY": "tw1lio-token",
        "TWILIO_FROM": "MG0123",
    }.items():
        monkeypatch.setenv(f"NOTIFIER_SMS_{name}", value)

    channel = create_channel(Settings(_env_file=None))  # type: ignore[call-arg]

    assert isinstance(channel, SMSChannel)
    assert channel.provider == "webhook,twilio"
    assert [circuit.name for circuit in channel.circuits] == ["webhook", "twilio"]


@pytest.mark.parametrize(
    ("missing", "variable"),
    [
        ("sms_twilio_account", "NOTIFIER_SMS_TWILIO_ACCOUNT"),
        ("sms_twilio_from", "NOTIFIER_SMS_TWILIO_FROM"),
    ],
)
def test_a_later_provider_missing_a_setting_names_its_own_variable(
    missing: str, variable: str
) -> None:
    settings = failover_settings(IHUYI_URL, "https://api.twilio.com", **{missing: None})

    with pytest.raises(SettingsError, match=f"^{variable}: required for the twilio SMS provider$"):
        create_channel(settings)


def test_the_first_provider_names_both_variables() -> None:
    with pytest.raises(
        SettingsError,
        match=r"NOTIFIER_SMS_ACCOUNT: required for the ihuyi SMS provider "
        r"\(or NOTIFIER_SMS_IHUYI_ACCOUNT\)",
    ):
        create_channel(sms_settings("ihuyi", sms_account=None))


def test_a_provider_named_twice_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"NOTIFIER_SMS_PROVIDER: .*named twice"):
        load_settings(_env_file=None, sms_provider="ihuyi,ihuyi")


async def test_failures_of_the_first_gateway_fail_over_to_the_next(http_sink: HTTPSink) -> None:
    """500, then a timeout, then bad credentials: each time Twilio delivers at once; after
    the bad credentials ihuyi's circuit is open and it is not asked again."""
    release = threading.Event()

    def hang(request: Recorded) -> Reply:
        release.wait(10)
        return Reply(body={"code": 2, "msg": "too late", "smsid": "late"})

    answers = iter(
        [
            lambda request: Reply(500, "Internal Server Error"),
            hang,
            lambda request: Reply(body={"code": 405, "msg": "APIID或APIKEY不正确"}),
        ]
    )
    http_sink.respond_with(lambda request: next(answers)(request))
    with running_http_sink() as twilio:
        twilio.respond_with(twilio_created(twilio))
        settings = failover_settings(http_sink.url + "/sms", twilio.url, sms_timeout=0.5)
        channel = create_channel(settings)
        assert isinstance(channel, SMSChannel)
        try:
            receipts = [await channel.send(sms("+8613800138000")) for _ in range(4)]
        finally:
            release.set()
            await channel.aclose()
        ihuyi_circuit, twilio_circuit = channel.circuits

        assert [r.providers for r in receipts] == [{"+8613800138000": "twilio"}] * 4
        assert [r.provider_ids for r in receipts] == [
            {"+8613800138000": f"SM{n}"} for n in range(1, 5)
        ]
        assert len(http_sink.requests) == 3
        assert [r.path for r in twilio.requests] == [TWILIO_LOCAL] * 4
        assert twilio.requests[0].form()["To"] == "+8613800138000"
        assert ihuyi_circuit.state is CircuitState.OPEN
        assert twilio_circuit.state is CircuitState.CLOSED


def failover_channel(clock: Clock, failures: int = 2) -> SMSChannel:
    settings = failover_settings(IHUYI_URL, "https://api.twilio.com")
    providers = [
        PROVIDERS[name].from_settings(settings, ProviderConfig.of(settings, name))
        for name in settings.sms_provider
    ]
    circuits = [
        CircuitBreaker(p.name, failures=failures, open_seconds=30, clock=clock) for p in providers
    ]
    clients = [httpx.AsyncClient() for _ in providers]
    return SMSChannel(providers, clients, circuits=circuits)


async def test_the_circuit_opens_lets_a_probe_through_and_closes(
    respx_mock: respx.MockRouter,
) -> None:
    clock = Clock()
    channel = failover_channel(clock, failures=2)
    ihuyi = respx_mock.post(IHUYI_URL).mock(return_value=httpx.Response(503))
    twilio = respx_mock.post(TWILIO_URL).mock(return_value=httpx.Response(201, json={"sid": "SM1"}))

    for _ in range(3):
        receipt = await channel.send(sms("+8613800138000"))
        assert receipt.providers == {"+8613800138000": "twilio"}
    assert (ihuyi.call_count, twilio.call_count) == (2, 3)  # open after two: not asked a third

    clock.now += 30
    ihuyi.mock(return_value=ihuyi_answer(2, smsid="42"))
    receipt = await channel.send(sms("+8613800138000"))  # the probe
    await channel.aclose()

    assert receipt.providers == {"+8613800138000": "ihuyi"}
    assert receipt.provider_ids == {"+8613800138000": "42"}
    assert [c.state for c in channel.circuits] == [CircuitState.CLOSED, CircuitState.CLOSED]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (ihuyi_answer(406, "手机格式不正确"), RecipientRejected),
        (ihuyi_answer(407, "含有敏感词"), InvalidMessage),
        (ihuyi_answer(4081, "同一手机号码1分钟内超过限制"), RecipientThrottled),
    ],
)
async def test_no_failover_when_the_number_or_message_is_the_problem(
    respx_mock: respx.MockRouter, answer: httpx.Response, expected: type[DeliveryError]
) -> None:
    channel = failover_channel(Clock())
    respx_mock.post(IHUYI_URL).mock(return_value=answer)
    twilio = respx_mock.post(TWILIO_URL).mock(return_value=httpx.Response(201, json={"sid": "SM1"}))

    with pytest.raises(expected) as caught:
        await channel.send(sms("+8613800138000"))
    await channel.aclose()

    assert not twilio.called
    assert channel.circuits[0].state is CircuitState.CLOSED  # it answered: it is up
    if isinstance(caught.value, RecipientThrottled):
        assert caught.value.recipient == "+8613800138000"
        assert caught.value.retry_after == 60.0
        assert throttled(caught.value) == {"+8613800138000": 60.0}


async def test_when_every_provider_is_down_the_error_is_transient(
    respx_mock: respx.MockRouter,
) -> None:
    clock = Clock()
    channel = failover_channel(clock, failures=1)
    ihuyi = respx_mock.post(IHUYI_URL).mock(return_value=ihuyi_answer(4051, "余额不足"))
    twilio = respx_mock.post(TWILIO_URL).mock(return_value=httpx.Response(502))

    with pytest.raises(TransientDeliveryError, match="no SMS provider took it") as first:
        await channel.send(sms("+8613800138000"))
    clock.now += 10
    with pytest.raises(TransientDeliveryError, match="circuit is open") as second:
        await channel.send(sms("+8613800138000"))
    await channel.aclose()

    assert "ihuyi: code 4051 (balance too low)" in first.value.message
    assert "twilio: HTTP 502" in first.value.message
    assert second.value.retry_after == 20.0
    assert (ihuyi.call_count, twilio.call_count) == (1, 1)


async def test_numbers_a_provider_cannot_serve_go_to_the_next_and_results_name_providers(
    respx_mock: respx.MockRouter,
) -> None:
    channel = failover_channel(Clock())
    respx_mock.post(IHUYI_URL).mock(return_value=ihuyi_answer(2, smsid="cn1"))
    respx_mock.post(TWILIO_URL).mock(
        side_effect=lambda request: (
            httpx.Response(201, json={"sid": "SMus"})
            if b"%2B14155550101" in request.content
            else httpx.Response(400, json={"code": 21211, "message": "Invalid 'To'"})
        )
    )

    receipt = await channel.send(sms("+8613800138000", "+14155550101"))
    with pytest.raises(PermanentDeliveryError, match="1 of 2 numbers failed") as caught:
        await channel.send(sms("+8613800138000", "+14155550199"))
    await channel.aclose()

    assert receipt.providers == {"+8613800138000": "ihuyi", "+14155550101": "twilio"}
    assert receipt.provider_ids == {"+8613800138000": "cn1", "+14155550101": "SMus"}
    assert caught.value.providers == {"+8613800138000": "ihuyi"}
    assert isinstance(caught.value.failed["+14155550199"], RecipientRejected)


async def test_twilio_asks_for_status_callbacks_at_the_public_receipts_url(
    respx_mock: respx.MockRouter,
) -> None:
    route = respx_mock.post(TWILIO_URL).mock(return_value=httpx.Response(201, json={"sid": "SM9"}))
    public = "https://notify.example.com/notifier/"
    channel = create_channel(sms_settings("twilio", receipts_public_url=public))

    receipt = await channel.send(sms("+14155550101"))
    await channel.aclose()

    form = dict(httpx.QueryParams(route.calls.last.request.content.decode()))
    assert form["StatusCallback"] == "https://notify.example.com/notifier/receipts/twilio"
    assert receipt.provider_ids == {"+14155550101": "SM9"}


# What the provider accepts, asked at intake


@pytest.mark.parametrize(
    ("providers", "limit"),
    [("ihuyi", 300), ("twilio", 1600), ("twilio,ihuyi", 300), ("webhook", None)],
)
def test_the_longest_text_is_what_every_provider_takes(providers: str, limit: int | None) -> None:
    settings = failover_settings(
        IHUYI_URL,
        "https://api.twilio.com",
        sms_provider=providers,
        sms_url=WEBHOOK_URL,
        sms_ihuyi_account="C123",  # needed when ihuyi is not first
        sms_ihuyi_api_key=API_KEY,
    )
    channel = create_channel(settings)

    assert isinstance(channel, SMSChannel)
    assert channel.max_text_length == limit


def jobs_store(tmp_path: Path) -> Store:
    settings = isolated_settings(tmp_path)
    return open_store(settings)


def intake(tmp_path: Path, channel: SMSChannel) -> Intake:
    return Intake(
        jobs_store(tmp_path),
        channels=["sms"],
        templates=Templates(tmp_path),
        sender="notifier@localhost",
        metrics=Metrics(),
        checks={"sms": channel.check},
    )


async def test_too_long_text_is_refused_at_intake_naming_text(tmp_path: Path) -> None:
    channel = create_channel(failover_settings(IHUYI_URL, "https://api.twilio.com"))
    assert isinstance(channel, SMSChannel)
    accepting = intake(tmp_path, channel)

    accepting.prepare(SendRequest(channel="sms", to=["+8613800138000"], text="码" * 300))
    with pytest.raises(InvalidRequest, match=r"^text: 301 characters, more than the 300 "):
        accepting.prepare(SendRequest(channel="sms", to=["+8613800138000"], text="码" * 301))
    await channel.aclose()


async def test_status_names_the_provider_of_each_number_and_the_segments(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    """End to end through intake, the SQLite store and the dispatcher: ihuyi is down, so
    Twilio delivers, and the status answer says so."""
    http_sink.respond_with(lambda request: Reply(503))
    with running_http_sink() as twilio:
        twilio.respond_with(twilio_created(twilio))
        settings = failover_settings(http_sink.url + "/sms", twilio.url)
        channel = create_channel(settings)
        assert isinstance(channel, SMSChannel)
        new_job = intake(tmp_path, channel).prepare(
            SendRequest(channel="sms", to=["+8613800138000"], text="验证码 1234" * 10)
        )
        store = jobs_store(tmp_path)
        await store.open()
        try:
            [enqueued] = await store.enqueue([new_job])
            dispatcher = Dispatcher(
                store, {"sms": channel}, isolated_settings(tmp_path), metrics=Metrics()
            )
            await dispatcher.run_burst()
            job = await store.get(enqueued.id)
        finally:
            await store.close()
            await channel.aclose()

    assert job is not None
    status = job.to_status()
    assert status["status"] == "delivered"
    assert status["results"]["providers"] == {"+8613800138000": "twilio"}
    assert status["results"]["delivered"] == {"+8613800138000": "SM1"}
    assert status["segments"] == 2  # 90 UCS-2 characters
