"""The Python clients: their line core on its own, then both clients against the real service.

Integration tests run each case with both clients. The blocking ``Client`` is driven from the
running loop's executor threads, where an async app would call it (and where the in-process
server keeps running); ``AsyncClient`` is awaited directly.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import trustme

from notifier import (
    AsyncClient,
    Client,
    InternalError,
    InvalidJSON,
    InvalidRequest,
    JobInfo,
    JobStatus,
    LineTooLong,
    NotFound,
    NotifierConnectionError,
    NotifierError,
    RateLimited,
    TemplateError,
    Unauthorized,
    Unavailable,
    UnknownChannel,
    UnknownOp,
    UnknownTemplate,
)
from notifier.client._core import (
    Batch,
    Poller,
    Progress,
    Suppression,
    parse_answer,
    worth_retrying,
)
from notifier.errors import ERRORS_BY_CODE, ErrorCode
from notifier.store import StoreUnavailable
from tests.support.line_server import FakeSuppressions, line_server
from tests.support.proxy import dropping_proxy
from tests.support.server import RunningServer, ServerProcess, free_port, running_server
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
SMS: dict[str, Any] = {"channel": "sms", "to": "+14155550101", "text": "code 1234"}
ENV = ("NOTIFIER_HOST", "NOTIFIER_PORT", "NOTIFIER_TOKEN", "NOTIFIER_CA_FILE")


@pytest.fixture(autouse=True)
def _no_client_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


class Driver:
    """Either client, called the same way from an async test."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self.client = client

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        bound = getattr(self.client, method)
        if isinstance(self.client, AsyncClient):
            return await bound(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, partial(bound, *args, **kwargs))

    async def close(self) -> None:
        if isinstance(self.client, AsyncClient):
            await self.client.aclose()
        else:
            self.client.close()


Connect = Callable[..., Driver]


@pytest.fixture(params=["Client", "AsyncClient"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """Make clients of the kind under test, closed at the end of the test."""
    kind = Client if request.param == "Client" else AsyncClient
    drivers: list[Driver] = []

    def make(port: int, **options: Any) -> Driver:
        drivers.append(Driver(kind("127.0.0.1", port, **options)))
        return drivers[-1]

    yield make
    for driver in drivers:
        await driver.close()


def answer_line(**answer: Any) -> bytes:
    return json.dumps(answer).encode() + b"\n"


def sent(job_id: str, **extra: Any) -> bytes:
    return answer_line(ok=True, id=job_id, status="queued", **extra)


def refused(code: str, message: str = "why") -> bytes:
    return answer_line(ok=False, error={"code": code, "message": message})


async def stored_jobs(server: RunningServer) -> int:
    return sum((await server.service.store.count_by_status()).values())


def outbox_sms(server: RunningServer) -> list[dict[str, Any]]:
    path = server.outbox / "sms.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


# The line core, without a server.


def test_every_send_gets_its_own_idempotency_key_unless_it_has_one() -> None:
    first = json.loads(Client._send_line(SMS))
    second = json.loads(Client._send_line(SMS))
    assert uuid.UUID(first["idempotency_key"]).version == 4
    assert first["idempotency_key"] != second["idempotency_key"]
    mine = json.loads(Client._send_line({**SMS, "idempotency_key": "order-17"}))
    assert mine["idempotency_key"] == "order-17"


def test_send_line_is_one_json_line_of_the_protocol() -> None:
    line = Client._send_line(
        {
            "channel": "email",
            "to": ("ada@example.com", "张三 <zhang.san@example.com>"),
            "cc": None,
            "subject": "Hi",
            "text": "line one\nline two",
            "send_at": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
            "data": MappingProxyType({"name": "Ada"}),
        }
    )
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    request = json.loads(line)
    assert request["to"] == ["ada@example.com", "张三 <zhang.san@example.com>"]
    assert "cc" not in request
    assert request["text"] == "line one\nline two"
    assert datetime.fromisoformat(request["send_at"]) == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert request["data"] == {"name": "Ada"}


def test_the_send_fields_of_version_1_1_pass_through() -> None:
    fields = {"priority": "high", "collapse_key": "otp:42", "callback_url": "https://a.example/cb"}
    request = json.loads(Client._send_line({**SMS, **fields}))
    assert {name: request[name] for name in fields} == fields


@pytest.mark.parametrize(
    ("job", "field"),
    [
        ({"to": "+14155550101", "text": "x"}, "channel"),
        ({**SMS, "colour": "red"}, "colour"),
        ({**SMS, "to": 5}, "to"),
        ({**SMS, "send_at": datetime(2030, 1, 1)}, "send_at"),
        ({**SMS, "idempotency_key": "k" * 201}, "idempotency_key"),
        ({**SMS, "data": {"when": object()}}, "request"),
    ],
    ids=["no-channel", "unknown-field", "bad-to", "naive-send-at", "long-key", "not-json"],
)
def test_invalid_jobs_are_refused_before_sending(job: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        Client._send_line(job)
    assert caught.value.message.startswith(f"{field}:"), caught.value.message


@pytest.mark.parametrize("code", [code.value for code in ErrorCode])
def test_each_error_code_in_an_answer_raises_its_class(code: str) -> None:
    with pytest.raises(NotifierError) as caught:
        parse_answer(refused(code, "what went wrong"))
    assert type(caught.value) is ERRORS_BY_CODE[code]
    assert (caught.value.code, caught.value.message) == (code, "what went wrong")


def test_an_unknown_error_code_is_still_a_notifier_error() -> None:
    with pytest.raises(NotifierError) as caught:
        parse_answer(refused("too_early", "later"))
    assert type(caught.value) is NotifierError and caught.value.code == "too_early"


@pytest.mark.parametrize("line", [b"HTTP/1.1 400 Bad Request\r\n", b"[1]\n", b'{"ok": false}\n'])
def test_garbage_is_a_connection_error_not_retried(line: bytes) -> None:
    with pytest.raises(NotifierConnectionError) as caught:
        parse_answer(line)
    assert not worth_retrying(caught.value)


def test_send_many_window_is_bounded_and_rewinds_what_was_not_answered() -> None:
    lines = [f"{i}\n".encode() for i in range(8)]
    batch = Batch(lines, window=4, progress=Progress(10))
    assert batch.to_write() == b"0\n1\n2\n3\n"
    assert batch.to_write() == b"", "the window is full"
    batch.on_answer(sent("a"))
    assert batch.to_write() == b"", "more than half the window is unanswered"
    batch.on_answer(refused("unknown_channel"))
    assert batch.to_write() == b"4\n5\n"
    batch.rewind()
    assert batch.to_write() == b"2\n3\n4\n5\n", "unanswered lines are sent again, in order"
    with pytest.raises(Unavailable):
        batch.on_answer(refused("unavailable", "shutting down"))
    batch.rewind()
    assert batch.to_write() == b"2\n3\n4\n5\n", "a job answered unavailable is sent again"
    for i in range(2, 6):
        batch.on_answer(sent(f"id{i}", duplicate=i == 2))
    assert batch.to_write() == b"6\n7\n"
    batch.on_answer(sent("id6"))
    batch.on_answer(sent("id7"))
    assert batch.done
    results = batch.results()
    assert [r.id for r in results] == ["a", None, "id2", "id3", "id4", "id5", "id6", "id7"]
    assert isinstance(results[1].error, UnknownChannel) and not results[1].ok
    assert [r.duplicate for r in results[:4]] == [False, False, True, False]


def test_status_answer_becomes_a_typed_job_info() -> None:
    answer = json.loads(
        answer_line(
            ok=True,
            ref=3,
            id="j1",
            channel="sms",
            status="retrying",
            attempts=2,
            last_error="gateway busy",
            created_at="2030-01-01T10:00:00.000Z",
            updated_at="2030-01-01T10:00:05.500Z",
            run_at="2030-01-01T10:00:09.000Z",
        )
    )
    info = JobInfo.from_answer(answer)
    assert info.status is JobStatus.RETRYING and not info.final
    assert (info.id, info.channel, info.attempts) == ("j1", "sms", 2)
    assert info.last_error == "gateway busy"
    assert info.updated_at - info.created_at == timedelta(seconds=5.5)
    assert info.created_at.tzinfo is not None
    assert info.extra == {"run_at": "2030-01-01T10:00:09.000Z"}
    assert info.as_dict() == {k: v for k, v in answer.items() if k not in ("ok", "ref")}
    with pytest.raises(NotifierConnectionError, match="status"):
        JobInfo.from_answer({**answer, "status": "lost"})


def test_wait_polls_quickly_at_first_then_at_the_interval_and_ends_at_the_deadline() -> None:
    info = JobInfo("j1", "sms", JobStatus.QUEUED, 0, None, datetime.now(UTC), datetime.now(UTC))
    poller = Poller(timeout=3600, interval=0.1)
    assert [poller.next_delay(info) for _ in range(5)] == [0.02, 0.04, 0.08, 0.1, 0.1]
    with pytest.raises(TimeoutError, match="j1 is still queued"):
        Poller(timeout=0, interval=1).next_delay(info)


def test_defaults_come_from_the_environment_and_the_token_stays_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFIER_HOST", "10.1.2.3")
    monkeypatch.setenv("NOTIFIER_PORT", "9999")
    monkeypatch.setenv("NOTIFIER_TOKEN", "s3cret")
    client = Client()
    assert (client.host, client.port) == ("10.1.2.3", 9999)
    assert client._auth_line() == b'{"op":"auth","token":"s3cret"}\n'
    assert "s3cret" not in repr(client)
    explicit = Client("127.0.0.2", 7000, "other")
    assert (explicit.host, explicit.port) == ("127.0.0.2", 7000)
    assert explicit._auth_line() == b'{"op":"auth","token":"other"}\n'
    monkeypatch.setenv("NOTIFIER_PORT", "seventy")
    with pytest.raises(ValueError, match="NOTIFIER_PORT"):
        Client()


def test_a_closed_client_refuses_to_be_used_again() -> None:
    with Client("127.0.0.1", free_port()) as client:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        client.ping()
    with pytest.raises(RuntimeError, match="closed"), client:
        pass


async def test_a_closed_async_client_refuses_to_be_used_again() -> None:
    async with AsyncClient("127.0.0.1", free_port()) as client:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        await client.send(**SMS)
    with pytest.raises(RuntimeError, match="closed"):
        async with client:
            pass


# The blocking client is generated from the asyncio one.


def unasync(*args: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "scripts" / "unasync.py"
    command = [sys.executable, str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_the_blocking_client_is_what_unasync_makes_of_the_asyncio_one() -> None:
    result = unasync("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_unasync_check_fails_on_a_stale_blocking_client_until_regenerated(tmp_path: Path) -> None:
    client = tmp_path / "notifier" / "client"
    client.mkdir(parents=True)
    for name in ("_async.py", "_sync.py"):
        shutil.copy(ROOT / "notifier" / "client" / name, client / name)
    ping = "    async def ping(self) -> None:\n"
    shout = '    async def shout(self) -> None:\n        """Ping, louder."""\n'
    source = (client / "_async.py").read_text()
    assert ping in source
    (client / "_async.py").write_text(
        source.replace(ping, shout + "        await self.ping()\n\n" + ping)
    )
    stale = unasync("--check", "--root", str(tmp_path))
    assert stale.returncode == 1 and "notifier/client/_sync.py is stale" in stale.stderr
    assert unasync("--root", str(tmp_path)).returncode == 0
    assert unasync("--check", "--root", str(tmp_path)).returncode == 0
    generated = (client / "_sync.py").read_text()
    assert (
        '    def shout(self) -> None:\n        """Ping, louder."""\n        self.ping()\n'
        in generated
    )
    assert generated.startswith("# Generated from notifier/client/_async.py")


def _public_api(cls: type) -> dict[str, inspect.Signature]:
    names = {name for name in dir(cls) if not name.startswith("_") or name == "__init__"}
    return {name: inspect.signature(getattr(cls, name)) for name in names}


def test_both_clients_have_the_same_methods_and_signatures_and_full_docstrings() -> None:
    api = _public_api(AsyncClient)
    api["close"] = api.pop("aclose")
    assert _public_api(Client) == api
    for name in ("__enter__", "__exit__"):
        twin = getattr(AsyncClient, name.replace("__", "__a", 1))
        assert inspect.signature(getattr(Client, name)) == inspect.signature(twin)
    for name, method in vars(AsyncClient).items():
        if not name.startswith("_") and callable(method):
            assert method.__doc__, f"AsyncClient.{name} has no docstring"
            assert "See ``Client" not in method.__doc__


# The suppression ops: both clients against the real service, and a line server for answers
# of the wrong shape.


async def test_suppress_list_and_unsuppress(connect: Connect, tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        client = connect(server.port)
        assert await client("suppressions") == []
        assert await client("suppress", "Ada <Ada@example.com>", reason="asked us to stop") is None
        await client("suppress", "bob@example.com")
        listed = await client("suppressions")
        assert [(s.address, s.reason) for s in listed] == [
            ("ada@example.com", "asked us to stop"),
            ("bob@example.com", "suppressed by an operator"),
        ]
        assert listed[0].created_at <= datetime.now(UTC)
        assert await client("unsuppress", "ada@example.com") is True
        assert await client("unsuppress", "ada@example.com") is False
        assert [s.address for s in await client("suppressions")] == ["bob@example.com"]


@pytest.mark.parametrize("call", [("suppress", ""), ("unsuppress", " "), ("suppress", 7)])
async def test_a_suppression_without_an_address_is_refused_before_sending(
    connect: Connect, call: tuple[str, Any]
) -> None:
    async with line_server(FakeSuppressions()) as server:
        with pytest.raises(InvalidRequest, match="address"):
            await connect(server.port)(*call)
        assert server.requests == []


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("suppressions", {"ok": True}),
        ("suppressions", {"ok": True, "suppressions": [{"address": "a@example.com"}]}),
        ("unsuppress", {"ok": True}),
    ],
    ids=["no-list", "no-created-at", "no-removed"],
)
async def test_a_suppression_answer_of_the_wrong_shape_is_a_connection_error(
    connect: Connect, method: str, answer: dict[str, Any]
) -> None:
    async with line_server(lambda request: answer) as server:
        args = ["a@example.com"] if method == "unsuppress" else []
        with pytest.raises(NotifierConnectionError, match="not a notifier answer"):
            await connect(server.port, retry_timeout=0)(method, *args)


def test_a_suppression_is_json_ready_in_the_protocols_shape() -> None:
    entry = {"address": "a@example.com", "reason": None, "created_at": "2030-01-01T10:00:00.000Z"}
    suppression = Suppression.from_answer({**entry, "source": "bounce"})
    assert suppression.as_dict() == {**entry, "source": "bounce"}


# Both clients against the real service.


async def test_send_status_wait_cancel_ping(connect: Connect, tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        client = connect(server.port)
        await client("ping")
        job = await client(
            "send_email",
            ["ada@example.com", "张三 <zhang.san@example.com>"],
            subject="Hi",
            text="Hello",
            html="<p>Hello</p>",
        )
        info = await client("wait", job, timeout=30)
        assert (info.id, info.channel, info.status) == (job, "email", JobStatus.DELIVERED)
        assert info.attempts == 1 and info.last_error is None and "run_at" in info.extra
        assert (server.outbox / "email" / f"{job}.eml").exists()

        tomorrow = datetime.now(UTC) + timedelta(days=1)
        later = await client("send_sms", "+14155550101", text="later", send_at=tomorrow)
        assert (await client("status", later)).status is JobStatus.QUEUED
        with pytest.raises(TimeoutError, match=later):
            await client("wait", later, timeout=0.05)
        await client("cancel", later)
        assert (await client("wait", later, timeout=30)).status is JobStatus.CANCELLED
        assert await client("send", channel="sms", to=["+14155550101"], text="generic")


@dataclass
class ErrorCase:
    error: type[NotifierError]
    act: Callable[[Driver, RunningServer, pytest.MonkeyPatch], Awaitable[Any]]
    server: dict[str, Any] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)


async def _store_fails(
    client: Driver, server: RunningServer, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    async def broken(*args: object) -> None:
        raise exc

    monkeypatch.setattr(server.service.store, "get", broken)
    await client("status", "some-job")


async def _three_pings(client: Driver, *_: Any) -> None:
    for _ping in range(3):
        await client("ping")


ERROR_CASES = [
    # Lines no method of the clients writes, sent through the client's own request path.
    ErrorCase(InvalidJSON, lambda c, s, m: c("_request", b"{not json\n")),
    ErrorCase(UnknownOp, lambda c, s, m: c("_request", b'{"op": "frobnicate"}\n')),
    # Well-formed jobs that only the server can refuse.
    ErrorCase(InvalidRequest, lambda c, s, m: c("send_email", "not-an-address", text="x")),
    ErrorCase(UnknownChannel, lambda c, s, m: c("send", "pigeon", "loft 7", text="coo")),
    ErrorCase(UnknownTemplate, lambda c, s, m: c("send", **SMS, template="nope")),
    ErrorCase(TemplateError, lambda c, s, m: c("send_sms", "+14155550101", template="code")),
    ErrorCase(Unauthorized, lambda c, s, m: c("ping"), {"auth_tokens": "alpha"}, {"token": "b"}),
    ErrorCase(LineTooLong, lambda c, s, m: c("send", **{**SMS, "text": "x" * 600}),
              {"max_line_bytes": 256}),
    ErrorCase(NotFound, lambda c, s, m: c("status", "no-such-job")),
    ErrorCase(RateLimited, _three_pings, {"rate_limit": 0.001, "rate_burst": 2}),
    ErrorCase(Unavailable, partial(_store_fails, exc=StoreUnavailable("disk on fire")),
              client={"retry_timeout": 0}),
    ErrorCase(InternalError, partial(_store_fails, exc=RuntimeError("bug"))),
]  # fmt: skip


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.error.code for c in ERROR_CASES])
async def test_each_error_the_server_answers_raises_its_class(
    connect: Connect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: ErrorCase
) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "code.sms.j2").write_text("Your code is {{ code }}")
    async with running_server(tmp_path, **case.server) as server:
        client = connect(server.port, **case.client)
        with pytest.raises(NotifierError) as caught:
            await case.act(client, server, monkeypatch)
    assert type(caught.value) is case.error
    assert caught.value.code == case.error.code and caught.value.message


def test_a_server_restart_between_two_sends_is_survived(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, NOTIFIER_AUTH_TOKENS="s3cret").start()
    try:
        with Client("127.0.0.1", server.port, "s3cret") as client:
            first = client.send(**SMS)
            server.stop()
            server.start()
            second = client.send(**SMS)
            assert first != second
            for job in (first, second):
                assert client.wait(job, timeout=30).status is JobStatus.DELIVERED
    finally:
        server.stop()


async def test_a_send_while_the_server_is_down_goes_through_once_it_is_back(
    connect: Connect, tmp_path: Path
) -> None:
    port = free_port()
    attempts = 0

    async def turn_away(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.transport.abort()

    client = connect(port, retry_timeout=60)
    down = await asyncio.start_server(turn_away, "127.0.0.1", port)
    sending = asyncio.ensure_future(client("send", **SMS))
    await wait_for(lambda: attempts >= 3, what="the client trying again")
    down.close()
    await down.wait_closed()
    async with running_server(tmp_path, port=port) as server:
        job = await sending
        assert (await client("wait", job, timeout=30)).status is JobStatus.DELIVERED
        assert await stored_jobs(server) == 1


async def test_a_lost_answer_is_sent_again_but_stored_and_delivered_once(
    connect: Connect, tmp_path: Path
) -> None:
    async with running_server(tmp_path) as server, dropping_proxy(server.port) as proxy:
        client = connect(proxy.port)
        job = await client("send", **{**SMS, "text": "exactly once"})
        assert len(proxy.dropped) == 1, "the first answer was lost"
        assert json.loads(proxy.dropped[0])["id"] == job, "...after the server stored the job"
        assert proxy.connections == 2
        assert (await client("wait", job, timeout=30)).status is JobStatus.DELIVERED
        assert await stored_jobs(server) == 1
        assert [line["id"] for line in outbox_sms(server)] == [job]


async def test_send_many_after_a_lost_connection_stores_each_job_once(
    connect: Connect, tmp_path: Path
) -> None:
    jobs = [{**SMS, "text": f"#{i}"} for i in range(2000)]
    async with (
        running_server(tmp_path) as server,
        dropping_proxy(server.port, forward=700) as proxy,
    ):
        client = connect(proxy.port)
        results = await client("send_many", jobs, window=300)
        assert proxy.connections == 2 and len(proxy.dropped) == 1
        assert all(result.ok for result in results)
        assert len({result.id for result in results}) == len(jobs)
        assert await stored_jobs(server) == len(jobs)


async def test_send_many_of_ten_thousand_jobs_in_order(connect: Connect, tmp_path: Path) -> None:
    jobs: list[dict[str, Any]] = [{**SMS, "text": f"#{i}"} for i in range(10_000)]
    jobs[10] = {**SMS, "channel": "pigeon"}
    jobs[20] = {"channel": "sms", "text": "to nobody"}
    async with running_server(tmp_path) as server:
        client = connect(server.port)
        results = await client("send_many", jobs)
        assert len(results) == len(jobs)
        assert isinstance(results[10].error, UnknownChannel) and results[10].id is None
        assert isinstance(results[20].error, InvalidRequest) and "to:" in results[20].error.message
        ok = [(i, r) for i, r in enumerate(results) if i not in (10, 20)]
        assert all(r.ok and not r.duplicate for _, r in ok)
        assert len({r.id for _, r in ok}) == len(ok)
        assert await stored_jobs(server) == len(ok)
        for i, result in ok[::97]:
            assert result.id is not None
            job = await server.service.store.get(result.id)
            assert job is not None and job.message.text == f"#{i}", "results are in job order"


async def test_one_sync_client_shared_by_executor_threads(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        loop = asyncio.get_running_loop()
        with Client("127.0.0.1", server.port) as client:
            send = partial(client.send_sms, "+14155550101", text="hi")
            ids = await asyncio.gather(*(loop.run_in_executor(None, send) for _ in range(20)))
            infos = await asyncio.gather(
                *(loop.run_in_executor(None, client.status, i) for i in ids)
            )
        assert len(set(ids)) == 20 and [info.id for info in infos] == ids
        assert await stored_jobs(server) == 20


async def test_one_async_client_shared_by_tasks(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server, AsyncClient("127.0.0.1", server.port) as client:
        ids = await asyncio.gather(*(client.send_sms("+14155550101", text="hi") for _ in range(20)))
        infos = await asyncio.gather(*(client.status(i) for i in ids))
        assert len(set(ids)) == 20 and [info.id for info in infos] == ids
        assert await stored_jobs(server) == 20


async def test_a_request_cancelled_in_flight_does_not_leave_its_answer_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(tmp_path) as server, AsyncClient("127.0.0.1", server.port) as client:
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow_get(job_id: str) -> None:
            entered.set()
            await release.wait()

        monkeypatch.setattr(server.service.store, "get", slow_get)
        status = asyncio.ensure_future(client.status("slow"))
        await asyncio.wait_for(entered.wait(), 10)
        status.cancel()
        release.set()
        monkeypatch.undo()
        job = await client.send(**SMS)
        assert (await client.status(job)).id == job
        assert await stored_jobs(server) == 1


async def test_a_connection_the_server_closed_while_idle_is_replaced(
    connect: Connect, tmp_path: Path
) -> None:
    async with running_server(tmp_path, idle_timeout=0.2) as server:
        client = connect(server.port)
        await client("ping")
        await wait_for(
            lambda: server.service.server.open_connections == 0,
            what="the server closing the idle connection",
        )
        assert await client("send", **SMS)
        assert await stored_jobs(server) == 1


async def test_tls_with_a_ca_file_or_a_context(connect: Connect, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with running_server(tmp_path, tls_cert=cert_path, tls_key=key_path) as server:
        for options in ({"ca_file": ca_path}, {"tls": context}):
            client = connect(server.port, **options)
            assert await client("send", **SMS)
            await client.close()  # before the server stops: it waits for TLS goodbyes
        with pytest.raises(NotifierConnectionError) as caught:
            await connect(server.port, tls=True)("ping")
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
        assert not worth_retrying(caught.value)


async def test_no_server_is_a_connection_error(connect: Connect) -> None:
    with pytest.raises(NotifierConnectionError) as caught:
        await connect(free_port(), retry_timeout=0)("ping")
    assert isinstance(caught.value, ConnectionError) and caught.value.code == "connection"
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
