"""The operations listener, logs and secrets, read the way monitoring reads them."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from notifier.ops import HTTPServer
from tests.support.prometheus import metric
from tests.support.server import LineConnection, ServerProcess, free_port, running_server
from tests.support.waiting import wait_for, wait_for_sync

SMS = {"channel": "sms", "to": "+14155550101", "text": "code 1234"}


async def test_health_metrics_while_jobs_flow(tmp_path: Path) -> None:
    async with running_server(tmp_path, http_port=free_port()) as server:
        base = f"http://127.0.0.1:{server.settings.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 200
            conn = await LineConnection.open(server.port)
            await conn.send(*({**SMS, "ref": i} for i in range(50)))
            await conn.send(b"{bad json\n")
            for _ in range(51):
                await conn.answer()

            async def drained() -> str | None:
                text = (await http.get("/metrics")).text
                done = metric(text, "notifier_queue_depth", 'status="delivered"') == 50
                return (
                    text
                    if done and metric(text, "notifier_queue_depth", 'status="queued"') == 0
                    else None
                )

            text = await wait_for(drained, what="queue drained in /metrics")
            assert metric(text, "notifier_jobs_accepted_total", 'channel="sms"') == 50
            assert (
                metric(text, "notifier_jobs_delivered_total", 'channel="sms",provider="outbox"')
                == 50
            )
            assert metric(text, "notifier_requests_rejected_total", 'code="invalid_json"') == 1
            assert metric(text, "notifier_open_connections") == 1
            assert metric(text, "notifier_intake_seconds_count") == 50
            assert metric(text, "notifier_accept_to_delivered_seconds_count", 'channel="sms"') == 50
            assert (await http.get("/nope")).status_code == 404
            assert (await http.post("/healthz")).status_code == 405
            head = await http.head("/readyz")
            assert (head.status_code, head.content) == (200, b"")
            await conn.close()


async def test_readiness_follows_the_store(tmp_path: Path) -> None:
    async with running_server(tmp_path, http_port=free_port()) as server:
        base = f"http://127.0.0.1:{server.settings.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/readyz")).status_code == 200
            await server.service.store.close()
            response = await http.get("/readyz")
            assert response.status_code == 503 and "store" in response.text
            assert (await http.get("/healthz")).status_code == 200
            await server.service.store.open()
            assert (await http.get("/readyz")).status_code == 200


def test_json_logs_parse_and_never_show_secrets(tmp_path: Path) -> None:
    secrets = {
        "NOTIFIER_SMTP_PASSWORD": "smtp-pass-7f3a",
        "NOTIFIER_SMS_API_KEY": "sms-key-9c1d",
        "NOTIFIER_AUTH_TOKENS": "token-2b8e",
    }
    closed_port = str(free_port())
    server = ServerProcess(
        tmp_path,
        NOTIFIER_LOG_FORMAT="json",
        NOTIFIER_LOG_LEVEL="DEBUG",
        NOTIFIER_SMTP_HOST="127.0.0.1",
        NOTIFIER_SMTP_PORT=closed_port,
        NOTIFIER_SMTP_USERNAME="mailer",
        NOTIFIER_SMS_PROVIDER="webhook",
        NOTIFIER_SMS_URL=f"http://127.0.0.1:{closed_port}/sms",
        NOTIFIER_RETRY_MAX_ATTEMPTS="2",
        NOTIFIER_RETRY_BASE_DELAY="0.01",
        **secrets,
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            lines = conn.makefile("rwb")
            requests = [
                {"op": "auth", "token": "wrong-token"},
                {"op": "auth", "token": secrets["NOTIFIER_AUTH_TOKENS"]},
                {"channel": "email", "to": "a@example.com", "subject": "s", "text": "t"},
                SMS,
            ]
            for request in requests:
                lines.write(json.dumps(request).encode() + b"\n")
            lines.flush()
            answers = [json.loads(lines.readline()) for _ in requests]
        assert [a["ok"] for a in answers] == [False, True, True, True]
        wait_for_sync(
            lambda: server.log().count('"outcome": "failed"') >= 2,
            timeout=30,
            what="both jobs failed after retries",
        )
    finally:
        server.stop()
    log = server.log()
    for line in log.splitlines():
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= record.keys()
    for secret in secrets.values():
        assert secret not in log
    failed = [json.loads(line) for line in log.splitlines() if '"outcome": "failed"' in line]
    assert {r["channel"] for r in failed} == {"email", "sms"}
    assert all(r["job_id"] and r["attempt"] == 2 and r["provider"] for r in failed)


async def test_http_server_on_a_port_in_use_says_so() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = HTTPServer(Starlette(), host="127.0.0.1", port=port, name="receipts")
        with pytest.raises(OSError, match=f"receipts listener cannot listen on 127.0.0.1:{port}"):
            await server.start()
