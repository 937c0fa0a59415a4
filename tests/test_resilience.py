"""The service when its store fails under it: a full disk, a database made read-only,
PostgreSQL connections that die,
a claim whose answer is lost, an instance killed while the others work.

What must hold every time: no ``ok`` for a job that was not stored, nothing accepted lost,
readiness saying the truth, recovery without a restart, and shutdown within its grace.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from notifier.store.postgres import PostgresStore
from tests.support.http_sink import HTTPSink, Recorded, Reply
from tests.support.pgcluster import Cluster
from tests.support.pgproxy import answer_losing_proxy
from tests.support.postgres import database_name, execute, fetchval, terminate_backends
from tests.support.readonly import ExtDisk
from tests.support.server import (
    LineConnection,
    RunningServer,
    ServerProcess,
    free_port,
    isolated_settings,
    running_server,
)
from tests.support.tmpfs import SmallDisk
from tests.support.waiting import wait_for
from tests.test_multi_instance import Start, start_instances  # noqa: F401 - a fixture
from tests.test_store import new_job

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


# -- a database made read-only mid-run (both stores) -------------------------------------------


async def _read_only_mid_run(
    server: RunningServer,
    make_read_only: Callable[[], Awaitable[None]],
    make_writable: Callable[[], Awaitable[None]],
) -> None:
    """Sends before (delivered), while read-only (each ``unavailable``, readiness 503) and
    after (delivered, without a restart): each job answered ``ok`` is sent exactly once."""
    conn = await LineConnection.open(server.port)
    base = f"http://127.0.0.1:{server.settings.http_port}"
    accepted: dict[str, str] = {}

    async def all_delivered() -> bool:
        answers = [await conn.status(job_id) for job_id in accepted.values()]
        return all(a["status"] == "delivered" for a in answers)

    async with httpx.AsyncClient(base_url=base) as http:
        await _send_until_accepted(conn, [f"before-{n}" for n in range(20)], accepted)
        await wait_for(all_delivered, timeout=20, what="the jobs sent before delivered")
        await make_read_only()
        await wait_for(lambda: _status_of(http, "/readyz", 503), what="readiness lost")
        during = [f"during-{n}" for n in range(20)]
        await _send_until_accepted(conn, during, accepted, once=True)
        assert not set(during) & set(accepted), "ok while the database was read-only"
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/healthz")).status_code == 200

        await make_writable()
        await wait_for(lambda: _status_of(http, "/readyz", 200), what="readiness back")
        await _send_until_accepted(conn, [*during, *(f"after-{n}" for n in range(20))], accepted)
        await wait_for(all_delivered, timeout=20, what="every accepted job delivered")
    await conn.close()
    lines = (server.outbox / "sms.jsonl").read_text().splitlines()
    counts = Counter(json.loads(line)["id"] for line in lines)
    assert set(counts) == set(accepted.values())
    assert [job for job, n in counts.items() if n != 1] == [], "sent twice"


async def test_a_sqlite_database_made_read_only_refuses_jobs_and_recovers_by_itself(
    tmp_path: Path, ext_disk: ExtDisk
) -> None:
    database = ext_disk.path / "n.db"
    settings = {"http_port": free_port(), "database_url": f"sqlite:///{database}"}

    async def read_only() -> None:
        ext_disk.freeze(database)

    async def writable() -> None:
        ext_disk.thaw()

    async with running_server(tmp_path, **settings) as server:
        await _read_only_mid_run(server, read_only, writable)


@pytest.mark.postgres
async def test_a_postgresql_database_made_read_only_refuses_jobs_and_recovers_by_itself(
    tmp_path: Path, postgres_admin_url: str, postgres_url: str
) -> None:
    """As an operator does it: a read-only default for the database and its sessions cut.
    Making it writable again cuts nothing: sessions that found it read-only reconnect."""
    name = database_name(postgres_url)
    settings = {"http_port": free_port(), "database_url": postgres_url}

    async def read_only() -> None:
        await execute(
            postgres_admin_url, f"ALTER DATABASE {name} SET default_transaction_read_only = on"
        )
        await terminate_backends(postgres_admin_url, name)

    async def writable() -> None:
        await execute(
            postgres_admin_url, f"ALTER DATABASE {name} RESET default_transaction_read_only"
        )

    try:
        async with running_server(tmp_path, **settings) as server:
            await _read_only_mid_run(server, read_only, writable)
    finally:
        await writable()


# -- PostgreSQL: takeover by liveness ----------------------------------------------------------


class Gateway:
    """A webhook SMS gateway that answers the other senders at once and holds the requests
    of ``held_sender`` until ``release`` is set (or ``hold`` seconds have passed)."""

    def __init__(self, sink: HTTPSink, held_sender: str, *, hold: float = 60) -> None:
        self.sink = sink
        self.held_sender = held_sender
        self.hold = hold
        self.release = threading.Event()
        sink.respond_with(self)

    def __call__(self, request: Recorded) -> Reply:
        if request.json()["from"] == self.held_sender:
            self.release.wait(self.hold)
        return Reply(200)

    def senders(self, job_id: str) -> list[str]:
        return [r.json()["from"] for r in list(self.sink.requests) if r.json()["id"] == job_id]

    def env(self, sender: str) -> dict[str, str]:
        return {
            "NOTIFIER_SMS_PROVIDER": "webhook",
            "NOTIFIER_SMS_URL": self.sink.url,
            "NOTIFIER_SMS_FROM": sender,
            "NOTIFIER_SMS_TIMEOUT": "120",
            "NOTIFIER_DELIVERY_TIMEOUT": "120",
        }


async def _send_sms(instance: ServerProcess, count: int) -> list[str]:
    conn = await LineConnection.open(instance.port)
    try:
        return [(await conn.request(SMS))["id"] for _ in range(count)]
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_a_killed_instances_deliveries_are_taken_over_within_5s(
    start_instances: Start,  # noqa: F811 - the fixture imported above
    http_sink: HTTPSink,
) -> None:
    gateway = Gateway(http_sink, held_sender="victim")
    try:
        (victim,) = start_instances(1, **gateway.env("victim"))
        ids = await _send_sms(victim, 5)
        await wait_for(
            lambda: all(gateway.senders(job_id) for job_id in ids), what="the victim's claims"
        )
        start_instances(1, **gateway.env("survivor"))
        victim.kill()
        await wait_for(
            lambda: all("survivor" in gateway.senders(job_id) for job_id in ids),
            timeout=5,
            what="the killed instance's deliveries made by the survivor",
        )
    finally:
        gateway.release.set()


@pytest.mark.postgres
@pytest.mark.timeout(180)
async def test_a_20s_delivery_on_a_live_instance_is_not_taken_over(
    start_instances: Start,  # noqa: F811 - the fixture imported above
    http_sink: HTTPSink,
) -> None:
    gateway = Gateway(http_sink, held_sender="slow", hold=20)
    (slow,) = start_instances(1, **gateway.env("slow"))
    (job_id,) = await _send_sms(slow, 1)
    await wait_for(lambda: gateway.senders(job_id), what="the slow delivery under way")
    (other,) = start_instances(1, **gateway.env("other"))
    conn = await LineConnection.open(other.port)

    async def delivered() -> bool:
        return (await conn.status(job_id))["status"] == "delivered"

    await wait_for(delivered, timeout=60, what="the slow delivery to finish")
    await conn.close()
    assert gateway.senders(job_id) == ["slow"]


# -- PostgreSQL: a claim whose answer is lost --------------------------------------------------


@pytest.mark.postgres
async def test_a_claim_whose_answer_is_lost_is_delivered_without_waiting_out_the_lease(
    tmp_path: Path, postgres_url: str
) -> None:
    """The claim commits and its connection dies before the rows arrive: the jobs are leased
    to a live instance that does not know it has them. They go out at once, each once."""
    store = PostgresStore.from_settings(isolated_settings(tmp_path, database_url=postgres_url))
    await store.open()
    ids = {answer.id for answer in await store.enqueue([new_job() for _ in range(5)])}
    await store.close()
    async with (
        answer_losing_proxy(postgres_url) as proxy,
        running_server(tmp_path, database_url=proxy.url(postgres_url)) as server,
    ):
        await wait_for(lambda: proxy.dropped, what="a claim's answer lost")

        async def delivered() -> bool:
            done = await fetchval(
                postgres_url, "SELECT count(*) FROM jobs WHERE status = 'delivered'"
            )
            return done == len(ids)

        await wait_for(delivered, timeout=15, what="the lost claim's jobs delivered")
        lines = (server.outbox / "sms.jsonl").read_text().splitlines()
    counts = Counter(json.loads(line)["id"] for line in lines)
    assert set(counts) == ids
    assert [job for job, n in counts.items() if n != 1] == []


# -- PostgreSQL: the server restarted, the pool exhausted --------------------------------------


async def _send_until_accepted(
    conn: LineConnection, keys: list[str], accepted: dict[str, str], *, once: bool = False
) -> None:
    """Send an SMS per key not yet accepted, pipelined, noting the ``ok`` ones; again until
    all are (or only once). Any refusal must be ``unavailable``."""
    while pending := [key for key in keys if key not in accepted]:
        await conn.send(*({**SMS, "idempotency_key": key} for key in pending))
        for key in pending:
            answer = await conn.answer(timeout=30)
            if answer["ok"]:
                accepted[key] = answer["id"]
            else:
                assert answer["error"]["code"] == "unavailable", answer
        if once:
            return


async def test_a_postgresql_restart_mid_run_loses_nothing_and_recovers_by_itself(
    tmp_path: Path, pg_cluster: Cluster, http_sink: HTTPSink, caplog: pytest.LogCaptureFixture
) -> None:
    """Deliveries are under way when the server goes down; their outcomes wait for it, and
    no instance's work is reaped for an outage every instance shared."""
    gateway = Gateway(http_sink, held_sender="held")
    settings = {
        "database_url": pg_cluster.url,
        "http_port": free_port(),
        "sms_provider": ("webhook",),
        "sms_url": http_sink.url,
        "sms_from": "held",
    }
    accepted: dict[str, str] = {}
    async with running_server(tmp_path, **settings) as server:
        conn = await LineConnection.open(server.port)
        base = f"http://127.0.0.1:{server.settings.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            await _send_until_accepted(conn, [f"before-{n}" for n in range(100)], accepted)
            await wait_for(lambda: len(http_sink.requests) >= 10, what="deliveries under way")
            await asyncio.to_thread(pg_cluster.stop)
            gateway.release.set()
            down = [f"down-{n}" for n in range(50)]
            await _send_until_accepted(conn, down, accepted, once=True)
            assert not set(down) & set(accepted), "ok while the database was down"
            assert (await http.get("/readyz")).status_code == 503
            await wait_for(
                lambda: "recording outcomes: store unavailable" in caplog.text,
                what="outcomes waiting for the database",
            )
            await asyncio.to_thread(pg_cluster.start)
            await _send_until_accepted(conn, down, accepted)
            await wait_for(lambda: _status_of(http, "/readyz", 200), what="readiness back")

            async def all_delivered() -> bool:
                answers = [await conn.status(job_id) for job_id in accepted.values()]
                return all(a["status"] == "delivered" for a in answers)

            await wait_for(all_delivered, timeout=30, what="every accepted job delivered")
        await conn.close()
    counts = Counter(r.json()["id"] for r in list(http_sink.requests))
    assert set(counts) == set(accepted.values())
    assert [job for job, n in counts.items() if n != 1] == [], "sent twice across a restart"


@pytest.mark.postgres
async def test_an_exhausted_pool_answers_unavailable_at_once_and_recovers(
    tmp_path: Path, postgres_url: str
) -> None:
    settings = {
        "database_url": postgres_url,
        "database_pool_size": 2,
        "database_statement_timeout": 1.0,
    }
    async with running_server(tmp_path, **settings) as server:
        store = server.service.store
        assert isinstance(store, PostgresStore) and store._pool is not None
        conn = await LineConnection.open(server.port)
        taken = [await store._pool.acquire() for _ in range(2)]
        try:
            await conn.send({**SMS, "idempotency_key": "starved"})
            answer = await conn.answer(timeout=5)
            assert not answer["ok"] and answer["error"]["code"] == "unavailable", answer
            assert (await conn.request({"op": "ping"}))["ok"]
        finally:
            for connection in taken:
                await store._pool.release(connection)
        accepted: dict[str, str] = {}
        await _send_until_accepted(conn, ["starved"], accepted)

        async def delivered() -> bool:
            return (await conn.status(accepted["starved"]))["status"] == "delivered"

        await wait_for(delivered, what="the job sent again once connections were free")
        await conn.close()
