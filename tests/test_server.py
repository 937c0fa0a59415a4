"""The wire protocol over real TCP connections to the real service on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from notifier.errors import NotFound
from notifier.metrics import Metrics
from notifier.models import Enqueued, NewJob
from notifier.protocol import Request
from notifier.server import Server
from notifier.store import StoreUnavailable
from tests.support.server import LineConnection, isolated_settings, running_server
from tests.support.waiting import wait_for

EMAIL = {"channel": "email", "to": "ada@example.com", "subject": "Hi", "text": "Hello"}
SMS = {"channel": "sms", "to": "+14155550101", "text": "code 1234"}


def error_code(answer: dict[str, Any]) -> str:
    assert answer["ok"] is False, answer
    code: str = answer["error"]["code"]
    return code


async def test_send_status_and_delivery(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        sent = await conn.request({**EMAIL, "ref": "r1"})
        assert sent == {"ok": True, "id": sent["id"], "status": "queued", "ref": "r1"}

        async def delivered() -> bool:
            status = await conn.request({"op": "status", "id": sent["id"]})
            return status["status"] == "delivered"

        await wait_for(delivered, what="email delivered")
        status = await conn.request({"op": "status", "id": sent["id"], "ref": 7})
        assert status["ok"] and status["ref"] == 7 and status["channel"] == "email"
        assert status["attempts"] == 1 and status["last_error"] is None
        assert (server.outbox / "email" / f"{sent['id']}.eml").exists()
        await conn.close()


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json\n", "invalid_json"),
        (b"\xff\xfe{}\n", "invalid_json"),
        (b'{"channel": "email", "to": 5}\n', "invalid_request"),
        (b'{"op": "launch"}\n', "unknown_op"),
        (b'{"channel": "pigeon", "to": "x"}\n', "unknown_channel"),
        (b'{"channel": "email", "to": "a@example.com", "template": "nope"}\n', "unknown_template"),
        (b'{"op": "status", "id": "no-such-job"}\n', "not_found"),
        (b'{"op": "cancel", "id": "no-such-job"}\n', "not_found"),
        (b'{"op": "ping", "ref": NaN}\n', "invalid_json"),
        (b'{"op": "ping", "ref": 1e400}\n', "invalid_request"),
        (b'{"op": "jobs", "since": "99999999999d"}\n', "invalid_request"),
        (b'{"op": "purge", "older_than": 1e308}\n', "invalid_request"),
        (
            b'{"channel": "email", "to": "a@example.com", "text": "x",'
            b' "send_at": "9999-12-31T23:59:59-23:59"}\n',
            "invalid_request",
        ),
    ],
)
async def test_error_codes(tmp_path: Path, line: bytes, code: str) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        answer = await conn.request(line)
        assert error_code(answer) == code
        assert answer["error"]["message"]
        assert (await conn.request({"op": "ping"})) == {"ok": True}, "connection goes on"
        await conn.close()


@pytest.mark.parametrize("line", [b"[1, 2]", b'"send"', b"42", b"1.5", b"null", b"true"])
async def test_json_that_is_not_an_object_is_an_invalid_request(
    tmp_path: Path, line: bytes
) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        answer = await conn.request(line + b"\n")
        assert error_code(answer) == "invalid_request"
        assert answer["error"]["message"].startswith("request: must be a JSON object"), answer
        assert (await conn.request({"op": "ping"})) == {"ok": True}, "connection goes on"
        await conn.close()


async def test_invalid_request_names_the_field(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        cases: dict[str, dict[str, Any]] = {
            "subject": {**EMAIL, "subject": None, "ref": 1},
            "to": {**EMAIL, "to": "not an address"},
            "idempotency_key": {**EMAIL, "idempotency_key": "k" * 201},
            "send_at": {**EMAIL, "send_at": "tomorrow"},
            "subjct": {**EMAIL, "subjct": "typo"},
            "cc": {**SMS, "cc": "a@example.com"},
            "text": {"channel": "sms", "to": "+14155550101"},
        }
        for field, request in cases.items():
            answer = await conn.request(request)
            assert error_code(answer) == "invalid_request", field
            assert answer["error"]["message"].startswith(field), answer
        await conn.close()


async def test_template_error_for_missing_variable(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "code.sms.j2").write_text("Your code is {{ code }}")
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        request = {"channel": "sms", "to": "+14155550101", "template": "code"}
        assert error_code(await conn.request(request)) == "template_error"
        assert (await conn.request({**request, "data": {"code": "42"}}))["ok"]
        await conn.close()


@pytest.mark.parametrize("header", ["subject", "to", "reply_to"])
async def test_header_injection_refused(tmp_path: Path, header: str) -> None:
    value = "x@example.com\r\nBcc: victim@example.com"
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        answer = await conn.request({**EMAIL, header: value})
        assert error_code(answer) == "invalid_request"
        assert header in answer["error"]["message"]
        await conn.close()


async def test_line_too_long_skips_the_line_and_goes_on(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_line_bytes=1024) as server:
        conn = await LineConnection.open(server.port)
        huge = json.dumps({**EMAIL, "text": "x" * 100_000}).encode() + b"\n"
        await conn.send(huge, {"op": "ping", "ref": "after"})
        assert error_code(await conn.answer()) == "line_too_long"
        assert await conn.answer() == {"ok": True, "ref": "after"}
        exact = json.dumps({"op": "ping", "ref": "p" * 1000}).encode()
        await conn.send(exact[:1024].ljust(1024) + b"\n" if len(exact) > 1024 else exact + b"\n")
        assert (await conn.answer())["ok"] is not None
        await conn.close()


async def test_rate_limited(tmp_path: Path) -> None:
    async with running_server(tmp_path, rate_limit=0.001, rate_burst=2) as server:
        conn = await LineConnection.open(server.port)
        answers = [await conn.request({"op": "ping"}) for _ in range(3)]
        assert answers[:2] == [{"ok": True}, {"ok": True}]
        assert error_code(answers[2]) == "rate_limited"
        other = await LineConnection.open(server.port)
        assert await other.request({"op": "ping"}) == {"ok": True}
        await conn.close()
        await other.close()


async def test_unavailable_when_store_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(tmp_path) as server:

        async def unreachable(*args: object, **kwargs: object) -> None:
            raise StoreUnavailable("disk on fire")

        monkeypatch.setattr(server.service.store, "enqueue", unreachable)
        monkeypatch.setattr(server.service.store, "get", unreachable)
        conn = await LineConnection.open(server.port)
        assert error_code(await conn.request(EMAIL)) == "unavailable"
        assert error_code(await conn.request({"op": "status", "id": "x"})) == "unavailable"
        await conn.close()


async def test_internal_error_is_answered_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(tmp_path) as server:

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(server.service.store, "get", broken)
        conn = await LineConnection.open(server.port)
        answer = await conn.request({"op": "status", "id": "x", "ref": 3})
        assert error_code(answer) == "internal" and answer["ref"] == 3
        assert "bug" not in answer["error"]["message"]
        assert await conn.request({"op": "ping"}) == {"ok": True}
        await conn.close()


async def test_connection_limit(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_connections=1) as server:
        first = await LineConnection.open(server.port)
        assert await first.request({"op": "ping"}) == {"ok": True}
        second = await LineConnection.open(server.port)
        answer = await second.answer()
        assert error_code(answer) == "unavailable"
        assert "too many connections" in answer["error"]["message"]
        assert await second.reader.read() == b""
        assert await first.request({"op": "ping"}) == {"ok": True}
        await first.close()
        await second.close()


async def test_idle_connection_is_closed_with_a_reason(tmp_path: Path) -> None:
    async with running_server(tmp_path, idle_timeout=0.2) as server:
        conn = await LineConnection.open(server.port)
        answer = await conn.answer(timeout=10)
        assert error_code(answer) == "unavailable" and "idle" in answer["error"]["message"]
        assert await conn.reader.read() == b""
        await conn.close()


async def test_auth(tmp_path: Path) -> None:
    async with running_server(tmp_path, auth_tokens="alpha,beta") as server:
        conn = await LineConnection.open(server.port)
        assert await conn.request({"op": "ping"}) == {"ok": True}
        assert error_code(await conn.request(EMAIL)) == "unauthorized"
        assert error_code(await conn.request({"op": "auth", "token": "wrong"})) == "unauthorized"
        assert await conn.request({"op": "auth", "token": "beta"}) == {"ok": True}
        assert (await conn.request(EMAIL))["ok"]

        per_request = await LineConnection.open(server.port)
        assert (await per_request.request({**EMAIL, "token": "alpha"}))["ok"]
        assert (await per_request.request(EMAIL))["ok"], "the connection stays authenticated"
        await conn.close()
        await per_request.close()


async def test_pipelined_thousand_sends_in_one_write_answer_in_order(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        batch = b"".join(json.dumps({**SMS, "ref": i}).encode() + b"\n" for i in range(1000))
        await conn.send(batch)
        answers = [await conn.answer() for _ in range(1000)]
        assert [a["ref"] for a in answers] == list(range(1000))
        assert all(a["ok"] and a["status"] == "queued" for a in answers)
        assert len({a["id"] for a in answers}) == 1000
        await conn.close()


async def test_pipelined_sends_share_group_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(tmp_path) as server:
        store = server.service.store
        enqueue = store.enqueue
        batches: list[int] = []

        async def counting(jobs: Sequence[NewJob]) -> list[Enqueued]:
            batches.append(len(jobs))
            return await enqueue(jobs)

        monkeypatch.setattr(store, "enqueue", counting)
        conn = await LineConnection.open(server.port)
        await conn.send(
            b"".join(json.dumps({**SMS, "ref": i}).encode() + b"\n" for i in range(200))
        )
        answers = [await conn.answer() for _ in range(200)]
        assert all(a["ok"] for a in answers)
        assert sum(batches) == 200
        assert len(batches) < 20, f"a commit per few sends, not per send: {batches}"
        await conn.close()


async def test_fifty_concurrent_connections(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:

        async def client(n: int) -> list[str]:
            conn = await LineConnection.open(server.port)
            await conn.send(*({**SMS, "ref": f"{n}-{i}"} for i in range(20)))
            answers = [await conn.answer() for _ in range(20)]
            await conn.close()
            assert [a["ref"] for a in answers] == [f"{n}-{i}" for i in range(20)]
            return [a["id"] for a in answers]

        ids = [i for batch in await asyncio.gather(*(client(n) for n in range(50))) for i in batch]
        assert len(set(ids)) == 1000
        counts = await server.service.store.count_by_status()
        assert sum(counts.values()) == 1000


async def test_final_line_without_newline_then_half_close(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        await conn.send(b'{"op":"ping","ref":1}\r\n\n{"op":"ping","ref":2}')
        conn.writer.write_eof()
        assert await conn.answer() == {"ok": True, "ref": 1}
        assert await conn.answer() == {"ok": True, "ref": 2}
        assert await conn.reader.read() == b""
        await conn.close()


async def test_misbehaving_connection_does_not_disturb_another(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_line_bytes=4096, max_pipeline=10) as server:
        bad = await LineConnection.open(server.port)
        # Garbage, a half line never finished, and thousands of requests never read.
        await bad.send(b"\x00\xff garbage\n" + b'{"op":"ping"}\n' * 5000 + b'{"channel": "em')
        good = await LineConnection.open(server.port)
        for i in range(20):
            assert (await good.request({**SMS, "ref": i}))["ok"]
        bad.writer.transport.abort()
        assert await good.request({"op": "ping"}) == {"ok": True}
        await good.close()


async def test_duplicate_idempotency_key(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        await conn.send(
            {**SMS, "idempotency_key": "order-1"}, {**SMS, "idempotency_key": "order-1"}
        )
        first, second = await conn.answer(), await conn.answer()
        assert "duplicate" not in first
        assert second == {"ok": True, "id": first["id"], "status": "queued", "duplicate": True}
        await conn.close()


async def test_send_at_and_cancel(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        later = await conn.request({**SMS, "send_at": "2999-01-01T00:00:00Z"})
        status = await conn.request({"op": "status", "id": later["id"]})
        assert status["status"] == "queued" and status["run_at"].startswith("2999-01-01")
        cancelled = await conn.request({"op": "cancel", "id": later["id"], "ref": "c"})
        assert cancelled["ok"] and cancelled["status"] == "cancelled" and cancelled["ref"] == "c"
        again = await conn.request({"op": "cancel", "id": later["id"]})
        assert again["status"] == "cancelled"
        await conn.close()


def tls_files(tmp_path: Path) -> tuple[trustme.CA, dict[str, Path]]:
    """A test CA and the ``tls_cert``/``tls_key`` settings of a certificate it issued."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"tls_cert": tmp_path / "cert.pem", "tls_key": tmp_path / "key.pem"}
    cert.cert_chain_pems[0].write_to_path(str(files["tls_cert"]))
    cert.private_key_pem.write_to_path(str(files["tls_key"]))
    return ca, files


def client_context(ca: trustme.CA, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client trusting ``ca``, speaking only ``version`` when given."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if version is not None:
        context.minimum_version = context.maximum_version = version
        # OpenSSL 3 offers TLS below 1.2 only at security level 0; offer it for real.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def tls_handshake(port: int, context: ssl.SSLContext) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        pass


async def test_tls_listener(tmp_path: Path) -> None:
    ca, files = tls_files(tmp_path)
    async with running_server(tmp_path, **files) as server:
        context = client_context(ca)
        conn = await LineConnection.open(server.port, ssl=context, server_hostname="127.0.0.1")
        assert (await conn.request(EMAIL))["ok"]
        await conn.close()

        plain = await LineConnection.open(server.port)
        await plain.send({"op": "ping"})
        assert await plain.reader.read() == b"", "plain text is not answered on a TLS listener"
        await plain.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_listener_refuses_protocols_below_tls_1_2(tmp_path: Path) -> None:
    ca, files = tls_files(tmp_path)
    async with running_server(tmp_path, **files) as server:
        old = client_context(ca, ssl.TLSVersion.TLSv1_1)
        with pytest.raises((ssl.SSLError, ConnectionResetError)) as refused:
            await asyncio.to_thread(tls_handshake, server.port, old)
        # The server hung up on the hello (with or without an alert first): the client did
        # offer TLS 1.1, it did not refuse to itself.
        assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value)

        current = client_context(ca, ssl.TLSVersion.TLSv1_2)
        conn = await LineConnection.open(server.port, ssl=current, server_hostname="127.0.0.1")
        assert await conn.request({"op": "ping"}) == {"ok": True}
        assert conn.writer.get_extra_info("ssl_object").version() == "TLSv1.2"
        await conn.close()


class HeldHandler:
    """Starts each request and holds its answer until the test settles it."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, asyncio.Future[dict[str, Any]]]] = []

    def handle(self, request: Request, *, caller: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.started.append((request.ref, future))
        return future


async def test_answers_go_out_in_request_order_whatever_order_they_finish(
    tmp_path: Path,
) -> None:
    handler = HeldHandler()
    server = Server(isolated_settings(tmp_path), handler=handler, metrics=Metrics())
    await server.start()
    try:
        conn = await LineConnection.open(server.port)
        await conn.send(*({"op": "ping", "ref": n} for n in range(5)))
        await wait_for(lambda: len(handler.started) == 5, what="five requests started")
        assert [ref for ref, _ in handler.started] == [0, 1, 2, 3, 4]
        for ref, future in reversed(handler.started):
            if ref == 1:
                future.set_exception(NotFound("id: no such job"))
            elif ref == 3:
                future.set_exception(RuntimeError("a bug, with details"))
            else:
                future.set_result({"n": ref})
        answers = [await conn.answer() for _ in range(5)]
        assert [a["ref"] for a in answers] == [0, 1, 2, 3, 4]
        assert answers[0] == {"ok": True, "n": 0, "ref": 0}
        assert error_code(answers[1]) == "not_found"
        assert error_code(answers[3]) == "internal" and "details" not in str(answers[3])
        assert answers[4] == {"ok": True, "n": 4, "ref": 4}
        await conn.close()
    finally:
        await server.stop(grace=5.0)


async def test_a_nul_character_in_a_string_is_refused_naming_the_field(tmp_path: Path) -> None:
    """PostgreSQL stores no NUL in text: refused at the door on every store, never a false
    ``unavailable`` that a client would retry for ever."""
    async with running_server(tmp_path) as server:
        conn = await LineConnection.open(server.port)
        line = b'{"channel": "sms", "to": "+14155550101", "text": "code\\u0000 1234"}\n'
        answer = await conn.request(line)
        assert answer["error"]["code"] == "invalid_request"
        assert answer["error"]["message"].startswith("text: contains a NUL")
        escaped = b'{"channel": "sms", "to": "+14155550101", "text": "a \\\\u0000 b"}\n'
        assert (await conn.request(escaped))["ok"], "an escaped backslash is not a NUL"
        await conn.close()
