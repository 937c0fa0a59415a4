"""Callbacks: events POSTed to a real local HTTP receiver, signed, retried, never lost."""

from __future__ import annotations

import hashlib
import hmac
import random
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from notifier.callbacks import CallbackFailed, classify
from tests.support.http_sink import HTTPSink, Recorded, Reply
from tests.support.server import LineConnection, ServerProcess, running_server
from tests.support.waiting import wait_for, wait_for_sync

SECRET = "callback-secret-do-not-log"


def signature(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


def sms(hook: str, **fields: Any) -> dict[str, Any]:
    return {
        "channel": "sms",
        "to": "+14155550101",
        "text": "code 1234",
        "callback_url": hook,
        **fields,
    }


async def posted(sink: HTTPSink, count: int, timeout: float = 10.0) -> list[Recorded]:
    """The first ``count`` requests, waiting without blocking the service's event loop."""

    def arrived() -> list[Recorded] | None:
        requests = list(sink.requests)
        return requests if len(requests) >= count else None

    return await wait_for(arrived, timeout=timeout, what=f"{count} callback requests")


async def test_a_delivered_job_posts_one_signed_final_event(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    hook = http_sink.url + "/hooks/notifier"
    async with running_server(tmp_path, callback_secret=SECRET) as server:
        conn = await LineConnection.open(server.port)
        sent = await conn.request(sms(hook))
        (request, *_) = await posted(http_sink, 1)
        assert request.path == "/hooks/notifier"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["x-notifier-signature"] == signature(request.body)
        event = request.json()
        assert event["type"] == "job.final"
        assert event["job"]["id"] == sent["id"]
        assert event["job"]["status"] == "delivered"
        assert event["created_at"].endswith("Z") and event["event_id"]
        status = await wait_for(
            lambda: _callback_state(conn, sent["id"], "sent"), what="callback sent"
        )
        assert status["callback"]["attempts"] == 1
        await conn.close()
    assert SECRET.encode() not in (tmp_path / "notifier.db").read_bytes()


async def _callback_state(conn: LineConnection, job_id: str, state: str) -> dict[str, Any] | None:
    status = await conn.status(job_id)
    return status if status.get("callback", {}).get("state") == state else None


async def test_a_failing_receiver_gets_the_same_event_again_until_it_answers(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    http_sink.answer(Reply(500), Reply(503, headers={"Retry-After": "0"}))
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        sent = await conn.request(sms(http_sink.url))
        requests = await posted(http_sink, 3)
        assert len({r.json()["event_id"] for r in requests}) == 1
        status = await wait_for(lambda: _callback_state(conn, sent["id"], "sent"), what="sent")
        assert status["callback"]["attempts"] == 3
        await conn.close()


async def test_a_4xx_gives_up_at_once_and_the_max_attempts_give_up_on_5xx(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    http_sink.respond_with(lambda request: Reply(404) if request.path == "/gone" else Reply(500))
    async with running_server(tmp_path, callback_max_attempts=3) as server:
        conn = await LineConnection.open(server.port)
        gone = await conn.request(sms(http_sink.url + "/gone"))
        broken = await conn.request(sms(http_sink.url + "/broken"))
        failed = await wait_for(lambda: _callback_state(conn, gone["id"], "failed"), what="4xx")
        assert failed["callback"]["attempts"] == 1
        assert "404" in failed["callback"]["last_error"]
        failed = await wait_for(lambda: _callback_state(conn, broken["id"], "failed"), what="5xx")
        assert failed["callback"]["attempts"] == 3
        assert "gave up" in failed["callback"]["last_error"]
        assert failed["status"] == "delivered", "a callback never changes the delivery"
        await conn.close()


async def test_a_cancelled_job_and_the_default_callback_url(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    async with running_server(tmp_path, callback_url=http_sink.url + "/default") as server:
        conn = await LineConnection.open(server.port)
        later = await conn.request(
            {"channel": "sms", "to": "+14155550101", "text": "x", "send_at": "2999-01-01T00:00:00Z"}
        )
        await conn.request({"op": "cancel", "id": later["id"]})
        (request, *_) = await posted(http_sink, 1)
        assert request.path == "/default"
        assert request.json()["job"]["status"] == "cancelled"
        await conn.close()


async def test_callback_url_must_be_http(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        answer = await conn.request(sms("ftp://example.com/hook"))
        assert answer["error"]["code"] == "invalid_request"
        assert "callback_url" in answer["error"]["message"]
        await conn.close()


async def test_one_final_event_per_job_with_a_flaky_receiver(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    flaky = random.Random(20)
    http_sink.respond_with(lambda request: Reply(500) if flaky.random() < 0.2 else Reply(200))
    count = 2000
    async with running_server(tmp_path, callback_concurrency=16) as server:
        conn = await LineConnection.open(server.port)
        await conn.send(*(sms(http_sink.url) for _ in range(count)))
        ids = [(await conn.answer())["id"] for _ in range(count)]
        await conn.close()

        def delivered_events() -> set[str] | None:
            ok = {
                r.json()["job"]["id"]
                for r in list(http_sink.requests)
                if r.json()["type"] == "job.final"
            }
            return ok if len(ok) == count else None

        await wait_for(delivered_events, timeout=120, what="an event for every job")
    finals: dict[str, set[str]] = {}
    for request in http_sink.requests:
        event = request.json()
        finals.setdefault(event["job"]["id"], set()).add(event["event_id"])
    assert set(finals) == set(ids)
    assert all(len(events) == 1 for events in finals.values()), "one job.final per job"


def test_kill_9_before_the_callback_succeeded_posts_it_after_restart(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    http_sink.respond_with(lambda request: Reply(503))
    server = ServerProcess(
        tmp_path, NOTIFIER_RETRY_BASE_DELAY="0.05", NOTIFIER_RETRY_MAX_DELAY="0.1"
    )
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.sendall(
                (
                    '{"channel":"sms","to":"+14155550101","text":"x","callback_url":"'
                    + http_sink.url
                    + '"}\n'
                ).encode()
            )
            assert b'"ok":true' in conn.makefile("rb").readline()
        http_sink.wait_for_requests(1)
        server.kill()
        http_sink.respond_with(lambda request: Reply(200))
        before = len(http_sink.requests)
        server.start()
        requests: list[Recorded] = wait_for_sync(
            lambda: http_sink.requests[before:] or None, what="the callback after restart"
        )
        assert requests[0].json()["event_id"] == http_sink.requests[0].json()["event_id"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(200, None), (204, None), (408, True), (429, True), (500, True), (404, False), (410, False)],
)
def test_classify(status: int, retryable: bool | None) -> None:
    response = httpx.Response(status, request=httpx.Request("POST", "http://127.0.0.1/"))
    if retryable is None:
        classify(response)
        return
    with pytest.raises(CallbackFailed) as failure:
        classify(response)
    assert failure.value.retryable is retryable
