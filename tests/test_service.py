"""The service as it runs in production: `python -m notifier serve` processes, signals, kill -9;
and in process, a start that fails half way and must undo what it started."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from notifier.channels.base import Channel
from notifier.models import Message, Receipt
from notifier.service import Service
from notifier.settings import Settings, SettingsError
from notifier.store import open_store
from tests.support.http_sink import HTTPSink, Recorded, Reply
from tests.support.server import ServerProcess, free_port, isolated_settings
from tests.support.waiting import wait_for_sync

SMS = {"channel": "sms", "to": "+14155550101", "text": "code 1234"}


class BlockingLines:
    """A plain blocking socket speaking the protocol, as an app in any language would."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.lines = self.sock.makefile("rb")

    def send(self, *requests: dict[str, Any]) -> None:
        self.sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))

    def answer(self) -> dict[str, Any]:
        line = self.lines.readline()
        assert line, "connection closed"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        return self.answer()

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def outbox_emails(server: ServerProcess) -> set[str]:
    folder = server.outbox / "email"
    return {p.stem for p in folder.glob("*.eml")} if folder.exists() else set()


def email(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "channel": "email",
        "to": f"user{i}@example.com",
        "subject": f"#{i}",
        "text": "hi",
        "ref": i,
        **extra,
    }


def test_kill_9_after_answers_loses_nothing(tmp_path: Path) -> None:
    # A single slow-ish lane keeps most of the 500 jobs queued or in flight at the kill.
    server = ServerProcess(tmp_path, NOTIFIER_EMAIL_CONCURRENCY="1").start()
    conn = BlockingLines(server.port)
    conn.send(*(email(i) for i in range(500)))
    ids = {conn.answer()["id"] for _ in range(500)}
    server.kill()
    conn.close()
    assert len(ids) == 500
    delivered_before_restart = outbox_emails(server)
    assert delivered_before_restart < ids, "every job was delivered before the kill: test too weak"

    server.start()
    try:
        wait_for_sync(lambda: outbox_emails(server) >= ids, timeout=60, what="all 500 delivered")
        assert outbox_emails(server) == ids
    finally:
        server.stop()


def test_sigterm_drains_and_exits_0(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, NOTIFIER_EMAIL_CONCURRENCY="2").start()
    conn = BlockingLines(server.port)
    conn.send(*(email(i) for i in range(300)))
    ids = {conn.answer()["id"] for _ in range(300)}
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert "stopped" in server.log()
    conn.close()

    server.start()
    try:
        wait_for_sync(lambda: outbox_emails(server) >= ids, timeout=60, what="all 300 delivered")
        status = BlockingLines(server.port)
        answers = [status.request({"op": "status", "id": job_id}) for job_id in sorted(ids)[:20]]
        assert all(a["status"] == "delivered" for a in answers)
        status.close()
    finally:
        server.stop()


def test_a_second_sigterm_exits_at_once(tmp_path: Path, http_sink: HTTPSink) -> None:
    release = threading.Event()

    def hold(request: Recorded) -> Reply:
        release.wait(60)
        return Reply(200)

    http_sink.respond_with(hold)
    server = ServerProcess(
        tmp_path,
        NOTIFIER_SMS_PROVIDER="webhook",
        NOTIFIER_SMS_URL=http_sink.url,
        NOTIFIER_SHUTDOWN_GRACE="120",
    ).start()
    try:
        conn = BlockingLines(server.port)
        job_id = conn.request(SMS)["id"]
        conn.close()
        http_sink.wait_for_requests(1)
        server.signal(signal.SIGTERM)
        wait_for_sync(lambda: "shutting down" in server.log(), what="the first SIGTERM")
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 1, "the held delivery must not keep it alive"
        assert "exiting now" in server.log()
    finally:
        release.set()
        server.stop()

    server.start()
    try:
        conn = BlockingLines(server.port)
        status = wait_for_sync(
            lambda: (
                (s := conn.request({"op": "status", "id": job_id}))["status"] == "delivered" and s
            ),
            what="the interrupted job delivered after the restart",
        )
        assert status["attempts"] == 2
        conn.close()
    finally:
        server.stop()


def test_idempotency_across_restart(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    try:
        conn = BlockingLines(server.port)
        first = conn.request({**SMS, "idempotency_key": "receipt-77"})
        conn.close()
        server.stop()
        server.start()
        conn = BlockingLines(server.port)
        again = conn.request({**SMS, "idempotency_key": "receipt-77"})
        assert again == {"ok": True, "id": first["id"], "status": "queued", "duplicate": True}
        conn.close()
    finally:
        server.stop()


def test_send_at_delivers_no_earlier_and_cancel_never_delivers(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    try:
        conn = BlockingLines(server.port)
        soon = conn.request({"op": "ping"})
        assert soon == {"ok": True}
        from datetime import UTC, datetime, timedelta

        at = datetime.now(UTC) + timedelta(seconds=1)
        stamp = at.isoformat().replace("+00:00", "Z")
        kept = conn.request(email(1, send_at=stamp))
        dropped = conn.request(email(2, send_at=stamp))
        assert conn.request({"op": "cancel", "id": dropped["id"]})["status"] == "cancelled"
        assert conn.request({"op": "status", "id": kept["id"]})["status"] == "queued"

        def delivered() -> dict[str, Any] | None:
            status = conn.request({"op": "status", "id": kept["id"]})
            return status if status["status"] == "delivered" else None

        status = wait_for_sync(delivered, what="the scheduled email")
        delivered_at = datetime.fromisoformat(status["updated_at"].replace("Z", "+00:00"))
        assert delivered_at >= at
        assert outbox_emails(server) == {kept["id"]}
        assert conn.request({"op": "status", "id": dropped["id"]})["status"] == "cancelled"
        conn.close()
    finally:
        server.stop()


def test_second_process_on_the_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    try:
        second = ServerProcess(tmp_path)
        result = subprocess.run(
            [sys.executable, "-m", "notifier", "serve"],
            env=second.env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1
        assert "in use by another notifier process" in result.stderr
    finally:
        server.stop()


def test_serve_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "notifier", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and "NOTIFIER_" in result.stdout


@contextmanager
def port_taken() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def can_bind(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def assert_nothing_left(settings: Settings) -> None:
    """The store file can be taken again (its lock was let go) and no task still runs."""
    again = open_store(settings)
    await again.open()
    await again.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_tcp_port_in_use_unwinds_what_started(tmp_path: Path) -> None:
    with port_taken() as port:
        settings = isolated_settings(tmp_path, port=port, http_port=free_port())
        with pytest.raises(OSError):
            await Service(settings).start()
    await assert_nothing_left(settings)
    assert can_bind(settings.http_port), "the operations listener is still open"


async def test_ops_port_in_use_unwinds_what_started(tmp_path: Path) -> None:
    with port_taken() as http_port:
        settings = isolated_settings(tmp_path, port=free_port(), http_port=http_port)
        with pytest.raises(OSError):
            await Service(settings).start()
    await assert_nothing_left(settings)
    assert can_bind(settings.port), "the TCP listener is still open"


class Recording(Channel):
    closed = False

    async def send(self, message: Message) -> Receipt:
        raise AssertionError("never started, never sends")

    async def aclose(self) -> None:
        self.closed = True


def refuse(settings: Settings) -> Channel:
    raise SettingsError("NOTIFIER_PIGEON_LOFT: required for the pigeon channel")


async def test_a_channel_refusing_its_settings_opens_nothing_and_closes_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = Recording()
    factories = {"recording": lambda settings: built, "pigeon": refuse, "raven": refuse}
    monkeypatch.setattr("notifier.service.channel_factories", lambda: factories)
    settings = isolated_settings(tmp_path)
    with pytest.raises(SettingsError) as refused:
        await Service(settings).start()
    assert refused.value.problems == ("NOTIFIER_PIGEON_LOFT: required for the pigeon channel",) * 2
    assert built.closed
    assert not (tmp_path / "notifier.db").exists(), "the store was opened before the check"
    await assert_nothing_left(settings)
