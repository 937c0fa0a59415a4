"""Admin ops (jobs, retry, purge) over the protocol, against the real store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from notifier.cli import main
from tests.support.server import LineConnection, free_port, running_server
from tests.support.waiting import wait_for

EMAIL = {"channel": "email", "to": "a@example.com", "subject": "s", "text": "t"}
SMS = {"channel": "sms", "to": "+14155550101", "text": "code 1234"}


async def test_jobs_retry_and_purge(tmp_path: Path) -> None:
    # SMS goes to a port nobody listens on: one transient failure, and with one attempt
    # allowed the job fails for good. Email goes to the outbox and is delivered.
    gateway = f"http://127.0.0.1:{free_port()}/sms"
    async with running_server(
        tmp_path, retry_max_attempts=1, sms_provider="webhook", sms_url=gateway
    ) as server:
        conn = await LineConnection.open(server.port)
        sms = await conn.request(SMS)
        email = await conn.request(EMAIL)

        async def final(job_id: str) -> dict[str, Any] | None:
            status = await conn.request({"op": "status", "id": job_id})
            return status if status["status"] in ("delivered", "failed") else None

        failed = await wait_for(lambda: final(sms["id"]), what="sms failed")
        assert failed["status"] == "failed" and failed["attempts"] == 1
        assert (await wait_for(lambda: final(email["id"])))["status"] == "delivered"

        listed = await conn.request({"op": "jobs", "status": "failed", "since": "1h"})
        assert [j["id"] for j in listed["jobs"]] == [sms["id"]]
        everything = await conn.request({"op": "jobs", "limit": 10})
        assert {j["id"] for j in everything["jobs"]} == {sms["id"], email["id"]}

        retried = await conn.request({"op": "retry", "since": "1h", "ref": 1})
        assert retried == {"ok": True, "ids": [sms["id"]], "ref": 1}
        failed_again = await wait_for(lambda: final(sms["id"]), what="sms failed again")
        assert failed_again["attempts"] == 1, "a retried job gets a fresh attempt budget"
        assert (await conn.request({"op": "retry", "id": sms["id"]}))["ids"] == [sms["id"]]
        await wait_for(lambda: final(sms["id"]), what="sms failed a third time")

        refused = await conn.request({"op": "retry", "id": email["id"]})
        assert refused["error"]["code"] == "invalid_request"
        assert "delivered" in refused["error"]["message"]
        missing = await conn.request({"op": "retry", "id": "nope"})
        assert missing["error"]["code"] == "not_found"
        vague = await conn.request({"op": "retry"})
        assert vague["error"]["code"] == "invalid_request"

        assert await conn.request({"op": "purge", "older_than": "30d"}) == {"ok": True, "purged": 0}
        assert await conn.request({"op": "purge", "older_than": 0}) == {"ok": True, "purged": 2}
        gone = await conn.request({"op": "status", "id": email["id"]})
        assert gone["error"]["code"] == "not_found"

        bad = await conn.request({"op": "purge", "older_than": "soon"})
        assert bad["error"]["code"] == "invalid_request" and "older_than" in bad["error"]["message"]
        await conn.close()


async def test_admin_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = f"http://127.0.0.1:{free_port()}/sms"
    async with running_server(
        tmp_path, retry_max_attempts=1, sms_provider="webhook", sms_url=gateway
    ) as server:
        port = ["--port", str(server.port)]

        def run(*args: str) -> tuple[int, str, str]:
            code = main([*args, *port])
            out, err = capsys.readouterr()
            return code, out, err

        sent = await asyncio.to_thread(
            run, "send", "--channel", "sms", "--to", "+14155550101", "--text", "hi"
        )
        job_id = sent[1].strip()
        conn = await LineConnection.open(server.port)

        async def failed() -> bool:
            status = await conn.request({"op": "status", "id": job_id})
            return status["status"] == "failed"

        await wait_for(failed, what="the sms failed")
        code, out, _ = await asyncio.to_thread(run, "jobs", "--status", "failed", "--since", "1h")
        assert code == 0 and job_id in out and "gave up after 1 attempts" in out
        code, out, _ = await asyncio.to_thread(run, "jobs", "--json")
        assert code == 0 and json.loads(out.splitlines()[0])["id"] == job_id
        code, out, err = await asyncio.to_thread(run, "retry", "--failed", "--since", "1h")
        assert (code, out.strip(), err.strip()) == (0, job_id, "requeued 1 job(s)")
        await wait_for(failed, what="the sms failed again")
        code, _, err = await asyncio.to_thread(run, "retry", "--failed")
        assert code == 2 and "--since" in err
        code, out, _ = await asyncio.to_thread(run, "purge", "--older-than", "0s")
        assert (code, out.strip()) == (0, "purged 1 job(s)")
        code, _, err = await asyncio.to_thread(run, "cancel", job_id)
        assert code == 1 and "not_found" in err
        await conn.close()
