"""The service when its store fails under it: a full disk, PostgreSQL connections that die,
a claim whose answer is lost, an instance killed while the others work.

What must hold every time: no ``ok`` for a job that was not stored, nothing accepted lost,
readiness saying the truth, recovery without a restart, and shutdown within its grace.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.support.http_sink import HTTPSink, Recorded, Reply
from tests.support.server import LineConnection, ServerProcess, free_port, running_server
from tests.support.tmpfs import SmallDisk
from tests.support.waiting import wait_for

SMS = {"channel": "sms", "to": "+14155550101", "text": "code 1234"}


def email(key: str) -> dict[str, Any]:
    return {
        "channel": "email",
        "to": "someone@example.com",
        "subject": key,
        "text": "hi",
        "idempotency_key": key,
    }


# -- a full disk under SQLite ------------------------------------------------------------------


async def test_a_full_disk_refuses_jobs_turns_unready_and_recovers_by_itself(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    settings = {"http_port": free_port(), "database_url": f"sqlite:///{small_disk.path}/n.db"}
    async with running_server(tmp_path, **settings) as server:
        conn = await LineConnection.open(server.port)
        base = f"http://127.0.0.1:{server.settings.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/readyz")).status_code == 200
            accepted = {key: (await conn.request(email(key)))["id"] for key in ("a", "b")}
            small_disk.fill()
            refused: list[str] = []
            for n in range(200):  # until a write needs a page the disk no longer has
                key = f"full-{n}"
                answer = await conn.request(email(key))
                if not answer["ok"]:
                    assert answer["error"]["code"] == "unavailable", answer
                    refused.append(key)
                    break
                accepted[key] = answer["id"]
            assert refused, "a full disk must refuse jobs"
            readiness = await http.get("/readyz")
            assert readiness.status_code == 503 and "full" in readiness.text
            assert (await http.get("/healthz")).status_code == 200

            small_disk.free()
            await wait_for(
                lambda: _status_of(http, "/readyz", 200), what="readiness back once space is"
            )
            for key in refused:
                accepted[key] = (await conn.request(email(key)))["id"]

            async def all_delivered() -> bool:
                answers = [await conn.status(job_id) for job_id in accepted.values()]
                return all(a["status"] == "delivered" for a in answers)

            await wait_for(all_delivered, timeout=20, what="every accepted job delivered")
        await conn.close()


async def _status_of(http: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await http.get(path)).status_code == status


async def test_sigterm_on_a_full_disk_exits_within_the_grace_and_the_job_is_redone_after(
    tmp_path: Path, small_disk: SmallDisk, http_sink: HTTPSink
) -> None:
    """The delivery's outcome cannot be recorded; shutdown gives it up instead of riding the
    outage out, and the next start sends the job again (at least once)."""
    release = threading.Event()

    def hold_first(request: Recorded) -> Reply:
        if len(http_sink.requests) == 1:
            release.wait(60)
        return Reply(200)

    http_sink.respond_with(hold_first)
    server = ServerProcess(
        tmp_path,
        NOTIFIER_DATABASE_URL=f"sqlite:///{small_disk.path}/n.db",
        NOTIFIER_SMS_PROVIDER="webhook",
        NOTIFIER_SMS_URL=http_sink.url,
        NOTIFIER_SHUTDOWN_GRACE="3",
    ).start()
    try:
        conn = await LineConnection.open(server.port)
        job_id = (await conn.request(SMS))["id"]
        await wait_for(lambda: http_sink.requests, what="the job claimed and in flight")
        small_disk.fill()
        release.set()  # delivered, and its outcome meets the full disk
        await wait_for(
            lambda: "recording outcomes: store unavailable" in server.log(),
            what="the outcome record failing",
        )
        server.signal(signal.SIGTERM)
        await wait_for(
            lambda: server.exited, timeout=3 + 5, what="an exit within the grace on a full disk"
        )
        assert server.wait() == 0, server.log()
        await conn.close()
    finally:
        release.set()
        server.stop()

    small_disk.free()
    server.start()
    try:
        conn = await LineConnection.open(server.port)

        async def delivered() -> dict[str, Any] | None:
            status = await conn.status(job_id)
            return status if status["status"] == "delivered" else None

        status = await wait_for(delivered, what="the job delivered after the restart")
        assert status["attempts"] == 2
        assert len(http_sink.requests) == 2, "sent again: its first outcome was never recorded"
        await conn.close()
    finally:
        server.stop()
