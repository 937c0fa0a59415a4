"""Abuse: clients that misbehave on purpose, and what notifier promises about them.

A client that never reads, one that sends a byte at a time, thousands at once, connections
left half open and TLS handshakes never finished: each is bounded (memory, time, slots) and
none slows the other connections, which a ping on a connection of its own checks throughout.
Then the security rules over TCP: a token for every op but ping, compared in constant time,
and per-token limits on the admin ops that requeue or delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import resource
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import notifier.server
from notifier.metrics import Metrics
from notifier.protocol import OPS
from tests.support.http_sink import HTTPSink, Reply
from tests.support.server import (
    LineConnection,
    ServerProcess,
    free_port,
    isolated_settings,
    running_server,
)
from tests.support.waiting import wait_for, wait_for_sync
from tests.test_fuzz import VALID
from tests.test_server import HeldHandler, client_context, error_code, tls_files

#: What a client that never reads may add to the server's resident memory, at most
#: (docs/SECURITY.md). Measured: 9 to 11 MiB for the test below.
NON_READER_RSS_BOUND_MIB = 48
EMAIL = {"channel": "email", "to": "ada@example.com", "subject": "Hi", "text": "Hello"}
LATER = {**EMAIL, "send_at": "2999-01-01T00:00:00Z"}
SMS_JOB = {"channel": "sms", "to": "+8613800138000", "text": "code 1234"}


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (VmRSS in /proc/<pid>/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class NonReader:
    """A blocking socket that writes ``unit`` over and over up to ``total`` bytes, in a
    thread, and never reads what comes back."""

    def __init__(self, port: int, unit: bytes, total: int, *, receive_buffer: int = 0) -> None:
        self.sock = socket.socket()
        if receive_buffer:
            # A small window: the answers it does not read back up into the server at once.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(("127.0.0.1", port))
        self.unit = unit
        self.total = total
        self.written = 0
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        with contextlib.suppress(OSError):
            while self.written < self.total:
                self.sock.sendall(self.unit)
                self.written += len(self.unit)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(30)


class Progress:
    """Whether a writer still moves: four looks without a byte more is a stop."""

    def __init__(self) -> None:
        self.last = -1
        self.still = 0

    def look(self, written: int) -> None:
        self.still = self.still + 1 if written == self.last else 0
        self.last = written

    def done(self, writer: NonReader) -> bool:
        return not writer.thread.is_alive() or self.still >= 4


@contextlib.contextmanager
def pinger(port: int) -> Iterator[Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        lines = conn.makefile("rwb")

        def ping() -> None:
            lines.write(b'{"op":"ping"}\n')
            lines.flush()
            assert lines.readline() == b'{"ok":true}\n', "the other connection stopped answering"

        yield ping


def test_a_client_that_never_reads_cannot_grow_memory_nor_slow_others(tmp_path: Path) -> None:
    """One non-reader writes 120 MB of big requests (an over-long line and a long one that
    is parsed), another pipelines small sends and pings through a small receive window; the
    server takes the first whole without holding it, stops reading the second once its answers
    back up, stays within the bound, and answers a ping on a third connection all along."""
    server = ServerProcess(tmp_path).start()
    assert server.process is not None
    pid = server.process.pid
    try:
        before = rss_mib(pid)
        big = b'{"op":"ping","pad":"' + b"x" * 1_500_000 + b'"}\n'
        long = b'{"op":"ping","pad":"' + b"y" * 900_000 + b'"}\n'
        small = (json.dumps(LATER).encode() + b"\n" + b'{"op":"ping"}\n' * 10) * 50
        with pinger(server.port) as ping:
            writers = [
                NonReader(server.port, big + long, 120 * 2**20),
                NonReader(server.port, small, 120 * 2**20, receive_buffer=16384),
            ]
            moves = [Progress() for _ in writers]
            peak = before
            # Until each writer has written all, or has not moved in four looks in a row (the
            # server stopped reading it); a look comes half a second after the last at most.
            while alive := [w for w, m in zip(writers, moves, strict=True) if not m.done(w)]:
                alive[0].thread.join(0.5)
                peak = max(peak, rss_mib(pid))
                assert peak - before < NON_READER_RSS_BOUND_MIB, (before, peak)
                ping()
                for writer, move in zip(writers, moves, strict=True):
                    move.look(writer.written)
            flood, pipelined = writers
            assert flood.written >= 120 * 2**20, "the over-long lines were all read"
            assert pipelined.written < 64 * 2**20, "the server stopped reading the pipeliner"
            for writer in writers:
                writer.close()
            ping()
        print(
            f"non-reader: RSS {before:.1f} MiB, at most +{peak - before:.1f} MiB while"
            f" {flood.written / 2**20:.0f} MiB of big lines were taken and the pipeliner was"
            f" stopped after {pipelined.written / 2**20:.1f} MiB"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            conn.sendall(json.dumps(EMAIL).encode() + b"\n")
            assert json.loads(conn.makefile("rb").readline())["ok"]
    finally:
        server.stop()
    assert "Traceback" not in server.log()


async def test_slowloris_is_closed_at_the_idle_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One byte every 50 ms of a line that never ends does not keep the connection: bytes
    are not activity, finished lines are."""
    async with running_server(tmp_path, idle_timeout=1.0) as server:
        slow = await LineConnection.open(server.port)
        busy = await LineConnection.open(server.port)

        async def drip() -> None:
            slow.writer.write(b'{"op": "ping", "pad": "')
            with contextlib.suppress(ConnectionError):
                while True:
                    slow.writer.write(b"x")
                    await slow.writer.drain()
                    assert await busy.request({"op": "ping"}) == {"ok": True}
                    await asyncio.sleep(0.05)  # the attack's pace, not a wait for anything

        dripping = asyncio.create_task(drip())
        try:
            goodbye = await slow.answer(timeout=15)
            assert error_code(goodbye) == "unavailable"
            assert goodbye["error"]["message"] == "idle for more than 1s"
            assert await asyncio.wait_for(slow.reader.read(), 15) == b""
        finally:
            dripping.cancel()
            await asyncio.gather(dripping, return_exceptions=True)
        assert await busy.request({"op": "ping"}) == {"ok": True}
        await wait_for(lambda: server.service.server.open_connections == 1, what="slow one gone")
        await slow.close()
        await busy.close()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for 2,000 client sockets and the server's 2,000 in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if wanted < 4500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 2,000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_two_thousand_connections_at_once_are_served_or_refused(
    tmp_path: Path, many_files: None, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(tmp_path) as server:
        limit = server.settings.max_connections
        opening = asyncio.Semaphore(200)

        async def connect() -> LineConnection:
            async with opening:
                return await LineConnection.open(server.port)

        conns = await asyncio.gather(*(connect() for _ in range(2000)))

        async def first_line(conn: LineConnection) -> dict[str, Any]:
            with contextlib.suppress(ConnectionError):
                await conn.send({"op": "ping"})
            return await conn.answer(timeout=60)

        answers = await asyncio.gather(*(first_line(conn) for conn in conns))
        served = [a for a in answers if a == {"ok": True}]
        refused = [a for a in answers if a.get("error", {}).get("code") == "unavailable"]
        assert (len(served), len(refused)) == (limit, 2000 - limit), answers[:3]
        assert {a["error"]["message"] for a in refused} == {f"too many connections (limit {limit})"}
        assert server.service.server.open_connections == limit
        await asyncio.gather(*(conn.close() for conn in conns))
        await wait_for(lambda: server.service.server.open_connections == 0, what="all let go")
        fresh = await LineConnection.open(server.port)
        assert (await fresh.request(EMAIL))["ok"]
        await fresh.close()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def _reset(conn: LineConnection) -> None:
    """Close with an RST, as a client whose host vanished mid-stream looks to the server."""
    sock = conn.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.writer.transport.abort()


async def test_half_open_and_vanished_connections_are_let_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(tmp_path, idle_timeout=1.0) as server:
        connections = server.service.server

        half_closed = await LineConnection.open(server.port)
        half_closed.writer.write_eof()
        assert await asyncio.wait_for(half_closed.reader.read(), 15) == b"", "closed, no answer"

        silent = await LineConnection.open(server.port)
        goodbye = await silent.answer(timeout=15)
        assert goodbye["error"]["message"] == "idle for more than 1s"

        vanished = await LineConnection.open(server.port)
        await vanished.send(*[{**LATER, "idempotency_key": f"gone-{n}"} for n in range(200)])
        _reset(vanished)

        writing_only = await LineConnection.open(server.port)
        await writing_only.send(*[{**LATER, "idempotency_key": f"half-{n}"} for n in range(200)])
        writing_only.writer.write_eof()
        answers = [await writing_only.answer() for _ in range(200)]
        assert all(a["ok"] for a in answers) and await writing_only.reader.read() == b""

        await wait_for(lambda: connections.open_connections == 0, what="every connection gone")
        check = await LineConnection.open(server.port)
        again = await check.request({**LATER, "idempotency_key": "half-199"})
        assert again["duplicate"] and again["id"] == answers[-1]["id"]
        await check.close()
        for conn in (half_closed, silent, writing_only):
            await conn.close()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_tls_handshake_that_never_finishes_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Silence, or half a ClientHello: the server hangs up after its handshake timeout (the
    idle timeout here, 10 s at most), not asyncio's 60 s, and serves TLS clients meanwhile."""
    ca, files = tls_files(tmp_path)
    async with running_server(tmp_path, idle_timeout=1.0, **files) as server:
        silent = await LineConnection.open(server.port)
        partial = await LineConnection.open(server.port)
        await partial.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        good = await LineConnection.open(
            server.port, ssl=client_context(ca), server_hostname="127.0.0.1"
        )
        assert await good.request({"op": "ping"}) == {"ok": True}
        for stalled in (silent, partial):
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(stalled.reader.read(), 15) == b""
            await stalled.close()
        assert await good.request({"op": "ping"}) == {"ok": True}
        await good.close()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(("idle", "expected"), [(300.0, 10.0), (2.0, 2.0)])
def test_the_handshake_timeout_is_ten_seconds_at_most(
    tmp_path: Path, idle: float, expected: float
) -> None:
    _, files = tls_files(tmp_path)
    settings = isolated_settings(tmp_path, idle_timeout=idle, **files)
    server = notifier.server.Server(settings, handler=HeldHandler(), metrics=Metrics())
    assert server._handshake_timeout() == expected


# --- security over TCP ---------------------------------------------------------------------

TOKENS = ("tok-first-8f2a", "tok-second-3c9d", "tok-third-5e1b")


@pytest.mark.parametrize("op", OPS)
async def test_every_op_but_ping_needs_a_token(tmp_path: Path, op: str) -> None:
    async with running_server(tmp_path, auth_tokens=",".join(TOKENS)) as server:
        stranger = await LineConnection.open(server.port)
        request = {key: value for key, value in VALID[op].items() if key != "token"}
        if op == "auth":
            request["token"] = "not-a-token"
        answer = await stranger.request(request)
        if op == "ping":
            assert answer == {"ok": True}
        else:
            assert error_code(answer) == "unauthorized", answer
            authorized = await stranger.request({**request, "token": TOKENS[2]})
            assert authorized.get("error", {}).get("code") != "unauthorized", authorized
        await stranger.close()


async def test_every_token_is_compared_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(given: bytes, known: bytes) -> bool:
        compared.append(known)
        return real(given, known)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    async with running_server(tmp_path, auth_tokens=",".join(TOKENS)) as server:
        for token in (TOKENS[0], "wrong", TOKENS[2]):
            conn = await LineConnection.open(server.port)
            compared.clear()
            await conn.request({"op": "auth", "token": token})
            assert compared == [t.encode() for t in TOKENS], token
            await conn.close()


async def test_admin_limit_is_per_token_not_per_connection(tmp_path: Path) -> None:
    async with running_server(
        tmp_path, auth_tokens=",".join(TOKENS), admin_rate_limit="2/1h"
    ) as server:
        purge = {"op": "purge", "older_than": "30d"}
        first = await LineConnection.open(server.port)
        assert (await first.request({**purge, "token": TOKENS[0]}))["ok"]
        assert (await first.request(purge))["ok"]
        refused = await first.request({**purge, "ref": 3})
        assert error_code(refused) == "rate_limited" and refused["ref"] == 3
        assert "token 1 went over 2/3600s" in refused["error"]["message"]
        assert TOKENS[0] not in json.dumps(refused)

        same_token = await LineConnection.open(server.port)
        assert (await same_token.request({"op": "auth", "token": TOKENS[0]}))["ok"]
        assert error_code(await same_token.request(purge)) == "rate_limited"
        assert (await same_token.request({"op": "jobs"}))["ok"], "reading is not limited"

        other_token = await LineConnection.open(server.port)
        assert (await other_token.request({**purge, "token": TOKENS[1]}))["ok"]
        for conn in (first, same_token, other_token):
            await conn.close()


#: Every secret setting, each a value that nothing else could contain by chance.
SECRETS = {
    "NOTIFIER_AUTH_TOKENS": "tok-secret-a41f",
    "NOTIFIER_SMTP_PASSWORD": "smtp-pw-secret-7c2d",
    "NOTIFIER_SMTP_FALLBACK_PASSWORD": "smtp-fallback-secret-0e9b",
    "NOTIFIER_SMS_API_KEY": "ihuyi-key-secret-5b8a",
    "NOTIFIER_SMS_TWILIO_API_KEY": "twilio-token-secret-3f6e",
    "NOTIFIER_SMS_WEBHOOK_API_KEY": "webhook-key-secret-9d1c",
    "NOTIFIER_CALLBACK_SECRET": "callback-secret-2a7f",
}
MAILBOX_PASSWORD = "mailbox-pw-secret-6e4b"


def test_no_secret_in_logs_answers_status_metrics_or_receipts_answers(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    """Every secret in use at once, every one refused by its far end: none of them shows in
    the debug log, the answers (errors, status, jobs), /metrics or the receipts listener's
    refusals."""
    http_sink.respond_with(lambda request: Reply(401, "unauthorized"))
    closed = str(free_port())
    http_port, receipts_port = free_port(), free_port()
    server = ServerProcess(
        tmp_path,
        NOTIFIER_LOG_FORMAT="json",
        NOTIFIER_LOG_LEVEL="DEBUG",
        NOTIFIER_HTTP_PORT=str(http_port),
        NOTIFIER_RECEIPTS_PORT=str(receipts_port),
        NOTIFIER_RETRY_MAX_ATTEMPTS="2",
        NOTIFIER_RETRY_BASE_DELAY="0.01",
        NOTIFIER_SMTP_HOST="127.0.0.1",
        NOTIFIER_SMTP_PORT=closed,
        NOTIFIER_SMTP_USERNAME="mailer",
        NOTIFIER_SMTP_FALLBACK_HOST="127.0.0.1",
        NOTIFIER_SMTP_FALLBACK_PORT=str(free_port()),
        NOTIFIER_SMTP_FALLBACK_USERNAME="mailer2",
        NOTIFIER_SMS_PROVIDER="ihuyi,twilio,webhook",
        NOTIFIER_SMS_URL=http_sink.url + "/ihuyi",
        NOTIFIER_SMS_ACCOUNT="C12345678",
        NOTIFIER_SMS_TWILIO_URL=http_sink.url,
        NOTIFIER_SMS_TWILIO_ACCOUNT="AC" + "1" * 32,
        NOTIFIER_SMS_TWILIO_FROM="+15017122661",
        NOTIFIER_SMS_WEBHOOK_URL=http_sink.url + "/webhook",
        NOTIFIER_CALLBACK_URL=http_sink.url + "/callback",
        NOTIFIER_BOUNCE_MAILBOX=f"imap://bounces:{MAILBOX_PASSWORD}@127.0.0.1:{closed}",
        NOTIFIER_BOUNCE_POLL_INTERVAL="0.2",
        **SECRETS,
    ).start()
    token = SECRETS["NOTIFIER_AUTH_TOKENS"]
    shown: list[str] = []
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            lines = conn.makefile("rwb")

            def ask(request: dict[str, Any]) -> dict[str, Any]:
                lines.write(json.dumps(request).encode() + b"\n")
                lines.flush()
                raw = lines.readline()
                shown.append(raw.decode())
                answer: dict[str, Any] = json.loads(raw)
                return answer

            assert not ask({"op": "auth", "token": token[:-1]})["ok"]
            assert not ask({"op": "status", "id": "x", "token": token + "x"})["ok"]
            assert ask({"op": "auth", "token": token})["ok"]
            ids = [ask(EMAIL)["id"], ask(SMS_JOB)["id"]]

            def finished() -> bool:
                return all(ask({"op": "status", "id": i})["status"] == "failed" for i in ids)

            wait_for_sync(finished, timeout=60, what="both jobs failed")
            ask({"op": "jobs", "status": "failed"})
        wait_for_sync(
            lambda: (
                any(r.path == "/callback" for r in http_sink.requests)
                and "bounce mailbox unavailable" in server.log()
            ),
            timeout=30,
            what="a callback posted and a bounce poll failed",
        )
        with httpx.Client(timeout=30) as http:
            shown.append(http.get(f"http://127.0.0.1:{http_port}/metrics").text)
            receipts = f"http://127.0.0.1:{receipts_port}/receipts"
            twilio = {"MessageSid": "SM1", "MessageStatus": "delivered"}
            bad = {"X-Twilio-Signature": "x", "X-Notifier-Signature": "sha256=00"}
            shown.append(http.post(receipts + "/twilio", data=twilio, headers=bad).text)
            shown.append(http.post(receipts + "/webhook", json={"id": "x"}, headers=bad).text)
    finally:
        server.stop()
    shown.append(server.log())
    everything = "\n".join(shown)
    for secret in (*SECRETS.values(), MAILBOX_PASSWORD):
        assert secret not in everything, secret
    assert "401" in everything and "callback" in everything, "the failures were logged"
