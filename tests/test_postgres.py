"""What only the PostgreSQL store promises, beyond the contract in test_store.py: migrations,
several instances on one database (idempotency, claims, takeover by liveness, wake-ups),
outages, and plans that do not depend on fresh statistics."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from notifier.cli import main as cli_main
from notifier.models import JobStatus, NewJob, Outcome, utcnow
from notifier.store import StoreUnavailable
from notifier.store.postgres import PostgresStore, schema
from notifier.store.postgres import store as pg_store
from notifier.store.postgres.schema import LATEST, warn_about_upkeep
from notifier.store.sql import COUNT_WAITING, FAILING, FINAL, WAITING
from tests.support.grown import grow_postgres
from tests.support.postgres import database_name, terminate_backends
from tests.support.server import free_port, isolated_settings
from tests.support.waiting import wait_for
from tests.test_store import LONG, new_job

pytestmark = pytest.mark.postgres
T = TypeVar("T")


@pytest.fixture
async def stores(postgres_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """``await open_instance(**settings)``: an opened store, closed at the end of the test."""
    async with AsyncExitStack() as stack:

        async def open_instance(**overrides: Any) -> PostgresStore:
            settings = isolated_settings(tmp_path, database_url=postgres_url, **overrides)
            store = PostgresStore.from_settings(settings)
            await store.open()
            stack.push_async_callback(store.close)
            return store

        yield open_instance


async def query(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


# -- schema ------------------------------------------------------------------------------------


async def test_instances_starting_together_migrate_once(stores: Any, postgres_url: str) -> None:
    await asyncio.gather(*(stores() for _ in range(4)))
    versions = await query(postgres_url, "SELECT array_agg(version) FROM schema_migrations")
    assert versions == list(range(1, LATEST + 1))


async def test_a_schema_newer_than_the_code_is_refused(stores: Any, postgres_url: str) -> None:
    await stores()
    await query(postgres_url, "INSERT INTO schema_migrations VALUES ($1, 'future')", LATEST + 1)
    with pytest.raises(StoreUnavailable, match="newer than this notifier"):
        await stores()


async def test_the_partial_indexes_hold_the_status_groups_the_queries_name(
    stores: Any, postgres_url: str
) -> None:
    """Claims, counts and purges read these indexes only while their conditions match."""
    await stores()
    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE probe (status text) ON COMMIT DROP")
            for index, condition in [
                ("jobs_due", WAITING),
                ("jobs_finished", FINAL),
                ("jobs_failing", FAILING),
            ]:
                await conn.execute(
                    f"CREATE INDEX {index}_probe ON probe (status) WHERE {condition}"
                )
                conditions = await conn.fetch(
                    "SELECT pg_get_expr(indpred, indrelid) AS condition FROM pg_index"
                    " WHERE indexrelid IN ($1::regclass, $2::regclass)",
                    index,
                    f"pg_temp.{index}_probe",
                )
                assert len({row["condition"] for row in conditions}) == 1, (index, conditions)
    finally:
        await conn.close()


async def test_a_version_2_database_is_upgraded_with_its_jobs(
    stores: Any, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as earlier:
        earlier.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
        earlier.setattr(schema, "LATEST", 2)
        old = await stores()
        (waiting,) = [answer.id for answer in await old.enqueue([new_job()])]
        await old.close()
    store = await stores()
    assert await query(postgres_url, "SELECT max(version) FROM schema_migrations") == LATEST
    index = await query(postgres_url, "SELECT pg_get_indexdef('jobs_due'::regclass)")
    assert "INCLUDE (status)" in index
    assert (await store.count_by_status())[JobStatus.QUEUED] == 1
    (job,) = await store.claim("sms", owner="me", limit=5, lease_seconds=LONG)
    assert job.id == waiting


def test_migrate_command_applies_and_then_checks(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_DATABASE_URL", postgres_url)
    assert cli_main(["migrate", "--check"]) == 1
    assert cli_main(["migrate"]) == 0
    assert cli_main(["migrate", "--check"]) == 0
    out = capsys.readouterr().out
    assert f"applied migration {LATEST}" in out and f"schema is at version {LATEST}" in out


async def test_jobs_table_vacuums_and_analyzes_early(stores: Any, postgres_url: str) -> None:
    await stores()
    options = await query(postgres_url, "SELECT reloptions FROM pg_class WHERE relname = 'jobs'")
    assert "autovacuum_vacuum_scale_factor=0.01" in options
    assert "autovacuum_analyze_scale_factor=0.02" in options


async def test_warns_when_autovacuum_is_off(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        enabled = await conn.fetchval("SELECT current_setting('autovacuum') = 'on'")
        with caplog.at_level(logging.WARNING):
            assert await warn_about_upkeep(conn) is enabled
    finally:
        await conn.close()
    assert ("autovacuum is off" in caplog.text) is not enabled


async def test_due_work_is_found_on_its_index_without_fresh_statistics(
    stores: Any, postgres_url: str
) -> None:
    """Statistics are those of the empty table; 50,000 finished rows arrive unanalyzed."""
    await stores()
    await query(
        postgres_url,
        "INSERT INTO jobs (id, channel, status, message, created_at, updated_at, run_at)"
        " SELECT md5(g::text), 'sms', 'delivered', '{}', now(), now(), now()"
        " FROM generate_series(1, 50000) g",
    )
    conn = await asyncpg.connect(postgres_url)
    try:
        plan = "\n".join(
            row[0]
            for row in await conn.fetch(
                "EXPLAIN SELECT id FROM jobs WHERE channel = 'sms'"
                " AND status IN ('queued', 'retrying') AND run_at <= now()"
                " ORDER BY run_at, id LIMIT 32 FOR UPDATE SKIP LOCKED"
            )
        )
    finally:
        await conn.close()
    assert "jobs_due" in plan and "Seq Scan" not in plan, plan


# -- tables that grow --------------------------------------------------------------------------


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


async def explained(
    conn: asyncpg.Connection, statement: str, *args: Any, analyze: bool = False
) -> dict[str, Any]:
    """The plan of ``statement`` (run and rolled back when ``analyze``), as EXPLAIN's JSON."""
    options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    tx = conn.transaction()
    await tx.start()
    try:
        answer = await conn.fetchval(f"EXPLAIN ({options}) {statement}", *args)
    finally:
        await tx.rollback()
    plan: dict[str, Any] = json.loads(answer)[0]["Plan"]
    return plan


async def test_hot_statements_read_indexes_not_the_table(stores: Any, postgres_url: str) -> None:
    """On a grown, analyzed table: no statement of the hot paths reads the jobs table whole."""
    store = await stores()
    await grow_postgres(postgres_url, queued=20_000, finished=50_000, due=100)
    outcome = (["x"], ["delivered"], [None], [None], [None], "me", 0)
    statements: dict[str, tuple[str, tuple[Any, ...]]] = {
        "claim": (pg_store.CLAIM[False], ("sms", "me", 60.0, 32)),
        "claim with oldest": (pg_store.CLAIM[True], ("sms", "me", 60.0, 32, 4)),
        "record": (pg_store.RECORD, outcome),
        "next due": (pg_store.NEXT_DUE, ("sms",)),
        "status": (pg_store.GET, ("x",)),
        "counts": (pg_store.COUNT_BY_STATUS, ()),
        "waiting": (COUNT_WAITING, ()),
        "purge": (pg_store.PURGE, (utcnow(), 1000, 0)),
    }
    conn = await asyncpg.connect(postgres_url)
    try:
        for name, (statement, args) in statements.items():
            plan = await explained(conn, statement, *args)
            scans = [
                node
                for node in plan_nodes(plan)
                if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "jobs"
            ]
            assert not scans, (name, plan)
    finally:
        await conn.close()
    assert store is not None


#: Blocks a grown index adds to a claim that reads the same entries: each of its four
#: ranges descends a B-tree a few levels deeper. Walking past 50,000 entries reads hundreds.
DEEPER = 50


async def due_index_blocks(conn: asyncpg.Connection, limit: int) -> int:
    """Index blocks one claim reads from the due indexes (rolled back)."""
    plan = await explained(conn, pg_store.CLAIM[True], "sms", "me", 60.0, limit, 4, analyze=True)
    return sum(
        node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0)
        for node in plan_nodes(plan)
        if node.get("Index Name") in ("jobs_due", "jobs_due_by_priority")
    )


async def test_a_claim_reads_as_much_however_many_jobs_wait(stores: Any, postgres_url: str) -> None:
    """Jobs queued for later, finished ones and a backlog of due ones cost a claim nothing
    more: neither one that takes all that is due (fewer than its limit) nor a full one."""
    await stores()
    await grow_postgres(postgres_url, queued=0, finished=0, due=40)
    conn = await asyncpg.connect(postgres_url)
    try:
        full, drained = await due_index_blocks(conn, 32), await due_index_blocks(conn, 64)
        await grow_postgres(postgres_url, queued=50_000, finished=50_000)
        assert await due_index_blocks(conn, 64) < 2 * drained + DEEPER
        await grow_postgres(postgres_url, queued=0, finished=0, due=20_000)
        assert await due_index_blocks(conn, 32) < 2 * full + DEEPER
    finally:
        await conn.close()


async def test_a_backlog_newer_than_the_statistics_is_claimed_from_its_own_ranges(
    stores: Any, postgres_url: str
) -> None:
    """A bulk send outruns autovacuum's analyze (the store analyzed the empty table): a claim
    still reads each priority's range of the due index and its rows by their key, not every
    waiting job of the other priorities (it did, at 20,000 buffers a claim)."""
    store = await stores()
    await store.enqueue([new_job() for _ in range(5000)])
    conn = await asyncpg.connect(postgres_url)
    try:
        plan = await explained(conn, pg_store.CLAIM[True], "sms", "me", 60.0, 32, 4, analyze=True)
    finally:
        await conn.close()
    nodes = list(plan_nodes(plan))
    assert sum(node.get("Rows Removed by Filter", 0) for node in nodes) == 0, plan
    assert sum(node.get("Actual Rows", 0) for node in nodes if "Index Name" in node) < 200, plan
    assert plan["Actual Rows"] == 32


# -- several instances -------------------------------------------------------------------------


async def test_the_same_key_sent_to_two_instances_is_stored_once(stores: Any) -> None:
    a, b = await stores(), await stores()
    keys = [f"k{i}" for i in range(200)]
    from_a = [new_job(key=key) for key in keys]
    from_b = [new_job(key=key) for key in keys]
    answers_a, answers_b = await asyncio.gather(
        *(store.enqueue(jobs) for store, jobs in ((a, from_a), (b, from_b)))
    )
    for x, y in zip(answers_a, answers_b, strict=True):
        assert x.id == y.id and x.duplicate != y.duplicate
    assert (await a.count_by_status())[JobStatus.QUEUED] == len(keys)


async def test_instances_claiming_together_never_share_a_job(stores: Any) -> None:
    instances = [await stores() for _ in range(3)]
    ids = {answer.id for answer in await instances[0].enqueue([new_job() for _ in range(300)])}
    claimed: list[str] = []

    async def drain(store: PostgresStore, owner: str) -> None:
        while jobs := await store.claim("sms", owner=owner, limit=7, lease_seconds=LONG):
            claimed.extend(job.id for job in jobs)

    await asyncio.gather(*(drain(s, f"o{i}") for i, s in enumerate(instances)))
    assert sorted(claimed) == sorted(ids)


async def test_work_of_a_dead_instance_is_taken_over_and_a_live_ones_is_not(
    stores: Any, postgres_url: str
) -> None:
    survivor, other = await stores(), await stores()
    await other.recover(owner="alive")
    await survivor.enqueue([new_job(), new_job()])
    (dead_job,) = await survivor.claim("sms", owner="dead", limit=1, lease_seconds=LONG)
    (live_job,) = await survivor.claim("sms", owner="alive", limit=1, lease_seconds=LONG)
    await query(
        postgres_url,
        "INSERT INTO instances (owner, heartbeat_at) VALUES ('dead', now() - interval '1 hour')",
    )
    assert await survivor.recover(owner="survivor") == 1
    taken = await survivor.get(dead_job.id)
    assert taken is not None and taken.status is JobStatus.RETRYING
    assert await survivor.record("dead", [Outcome(dead_job.id, JobStatus.DELIVERED)]) == [False]
    assert await other.record("alive", [Outcome(live_job.id, JobStatus.DELIVERED)]) == [True]
    assert await query(postgres_url, "SELECT count(*) FROM instances WHERE owner = 'dead'") == 0


async def test_heartbeats_keep_coming_and_stop_at_close(stores: Any, postgres_url: str) -> None:
    store = await stores(heartbeat_interval=0.05)
    await store.recover(owner="beating")
    beat = "SELECT heartbeat_at FROM instances WHERE owner = 'beating'"
    first = await query(postgres_url, beat)

    async def beat_again() -> bool:
        return bool(await query(postgres_url, beat) > first)

    await wait_for(beat_again, what="a second heartbeat")
    assert HEARTBEAT_THREAD in _thread_names()
    await store.close()
    assert await query(postgres_url, beat) is None
    assert HEARTBEAT_THREAD not in _thread_names(), "the heartbeat's thread outlived the store"


HEARTBEAT_THREAD = "postgres-heartbeat"
#: Fast beats for the liveness tests; an instance is dead after 1.5 s without one.
BEATING = {"heartbeat_interval": 0.25, "instance_dead_after": 1.5}
#: The heartbeat age (in seconds) of ``$1``, by the database's clock.
HEARTBEAT_AGE = (
    "SELECT extract(epoch FROM now() - heartbeat_at)::float8 FROM instances WHERE owner = $1"
)


def _thread_names() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


def _on_another_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a loop of its own in another thread; the caller's loop stays blocked
    until it is done."""
    with ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, coro).result(timeout=30)


async def _reap_as_another_instance(tmp_path: Path, url: str) -> int:
    """What a second instance starting now takes over."""
    store = PostgresStore.from_settings(isolated_settings(tmp_path, database_url=url, **BEATING))
    await store.open()
    try:
        return await store.recover(owner="another")
    finally:
        await store.close()


async def _holder(url: str, job_id: str) -> str | None:
    """Who holds the job in flight, if anyone."""
    owner: str | None = await query(
        url, "SELECT lease_owner FROM jobs WHERE id = $1 AND status = 'sending'", job_id
    )
    return owner


async def test_the_heartbeat_goes_on_while_the_event_loop_is_blocked(
    stores: Any, postgres_url: str, tmp_path: Path
) -> None:
    busy = await stores(**BEATING)
    await busy.recover(owner="busy")
    await busy.enqueue([new_job()])
    (job,) = await busy.claim("sms", owner="busy", limit=1, lease_seconds=LONG)
    before = await query(postgres_url, HEARTBEAT_AGE, "busy")
    # The fault: the loop does nothing else for twice the time that declares an instance dead.
    time.sleep(2 * BEATING["instance_dead_after"])
    # Still blocked: how the busy instance looks to the database and to another instance.
    age = _on_another_loop(query(postgres_url, HEARTBEAT_AGE, "busy"))
    taken = _on_another_loop(_reap_as_another_instance(tmp_path, postgres_url))
    assert before is not None and age is not None
    assert age < BEATING["instance_dead_after"], f"no heartbeat for {age:.2f}s"
    assert taken == 0
    assert await _holder(postgres_url, job.id) == "busy"


async def test_the_heartbeat_goes_on_while_every_pooled_connection_is_held(
    stores: Any, postgres_url: str
) -> None:
    busy = await stores(database_pool_size=2, database_statement_timeout=1.0, **BEATING)
    await busy.recover(owner="busy")
    await busy.enqueue([new_job()])
    (job,) = await busy.claim("sms", owner="busy", limit=1, lease_seconds=LONG)
    assert busy._pool is not None
    taken = [await busy._pool.acquire() for _ in range(2)]
    try:
        exhausted_at = await query(postgres_url, "SELECT now()")
        beat = (
            "SELECT heartbeat_at > $1::timestamptz + make_interval(secs => $2)"
            " FROM instances WHERE owner = $3"
        )

        async def beating_long_after() -> bool:
            return bool(
                await query(
                    postgres_url, beat, exhausted_at, 2 * BEATING["instance_dead_after"], "busy"
                )
            )

        await wait_for(beating_long_after, what="heartbeats while the pool is exhausted")
        other = await stores(**BEATING)
        assert await other.recover(owner="other") == 0
    finally:
        for connection in taken:
            await busy._pool.release(connection)
    assert await _holder(postgres_url, job.id) == "busy"


async def test_the_heartbeat_says_when_it_fails_recovers_and_finds_itself_reaped(
    stores: Any, postgres_admin_url: str, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = await stores(**BEATING)
    caplog.set_level(logging.INFO, logger="notifier.store.postgres")
    await store.recover(owner="beating")
    first = await query(postgres_url, "SELECT heartbeat_at FROM instances WHERE owner = 'beating'")

    async def beat_from_the_thread() -> bool:
        beat = "SELECT heartbeat_at > $1 FROM instances WHERE owner = 'beating'"
        return bool(await query(postgres_url, beat, first))

    await wait_for(beat_from_the_thread, what="the heartbeat's connection")
    await terminate_backends(postgres_admin_url, database_name(postgres_url))
    await wait_for(lambda: "heartbeat: store unavailable" in caplog.text, what="a failed beat")
    await wait_for(lambda: "heartbeat: store reachable again" in caplog.text, what="a new beat")
    await query(postgres_url, "DELETE FROM instances WHERE owner = 'beating'")
    await wait_for(
        lambda: "instance beating was presumed dead" in caplog.text, what="the reaping noticed"
    )


async def test_close_gives_back_what_the_instance_still_holds(stores: Any) -> None:
    leaving, staying = await stores(), await stores()
    await leaving.recover(owner="leaving")
    (job_id,) = [a.id for a in await leaving.enqueue([new_job()])]
    await leaving.claim("sms", owner="leaving", limit=1, lease_seconds=LONG)
    await leaving.close()
    (job,) = await staying.claim("sms", owner="staying", limit=1, lease_seconds=LONG)
    assert (job.id, job.attempts) == (job_id, 2)


async def test_work_sent_to_one_instance_wakes_the_others(stores: Any) -> None:
    sender, idle = await stores(), await stores()
    woken = asyncio.Event()
    idle.on_work(woken.set)
    await wait_for(lambda: idle._listener is not None and idle._listener.connected.is_set())
    woken.clear()
    await sender.enqueue([new_job()])
    await asyncio.wait_for(woken.wait(), 10)


async def test_only_work_due_before_the_next_poll_wakes_anyone(
    stores: Any, postgres_url: str
) -> None:
    """A bulk send scheduled ahead wakes no dispatcher per batch (their poll finds it in
    time); a job due now does, here and in every instance, by one NOTIFY in commit order."""
    store = await stores(poll_interval=1.0)
    woken: list[None] = []
    store.on_work(lambda: woken.append(None))
    await wait_for(lambda: store._listener is not None and store._listener.connected.is_set())
    woken.clear()  # the listener wakes everyone once it is connected, for what it missed
    listening = await asyncpg.connect(postgres_url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listening.add_listener(schema.WORK_CHANNEL, lambda *args: heard.put_nowait(args[2]))
        await store.enqueue([new_job(delay=5.0) for _ in range(3)])
        assert woken == []
        await store.enqueue([new_job(), new_job(delay=5.0)])
        assert woken
        assert await asyncio.wait_for(heard.get(), 10) == schema.WORK_CHANNEL
        assert heard.empty()
    finally:
        await listening.close()


async def test_the_listener_reconnects_after_its_connection_is_killed(
    stores: Any, postgres_admin_url: str, postgres_url: str
) -> None:
    sender, idle = await stores(), await stores()
    woken = asyncio.Event()
    idle.on_work(woken.set)
    listener = idle._listener
    assert listener is not None
    await wait_for(listener.connected.is_set, what="the listener")
    await terminate_backends(postgres_admin_url, database_name(postgres_url))
    await wait_for(lambda: not listener.connected.is_set(), what="the listener to notice")
    await wait_for(listener.connected.is_set, what="the listener to reconnect")
    woken.clear()
    await wait_for(lambda: _enqueue_ignoring_outage(sender), what="an enqueue after the kill")
    await asyncio.wait_for(woken.wait(), 10)


# -- outages -----------------------------------------------------------------------------------


async def _enqueue_ignoring_outage(store: PostgresStore, *jobs: NewJob) -> bool:
    try:
        await store.enqueue(list(jobs) or [new_job()])
    except StoreUnavailable:
        return False
    return True


async def test_killed_connections_fail_as_unavailable_then_recover(
    stores: Any, postgres_admin_url: str, postgres_url: str
) -> None:
    store = await stores()
    await store.enqueue([new_job()])
    await terminate_backends(postgres_admin_url, database_name(postgres_url))
    outcomes: list[BaseException | None] = []
    for _ in range(3):
        try:
            await store.count_by_status()
            outcomes.append(None)
        except StoreUnavailable as exc:
            outcomes.append(exc)
    assert outcomes[-1] is None, "the pool did not reconnect"
    assert (await store.count_by_status())[JobStatus.QUEUED] == 1


async def test_an_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    store = PostgresStore.from_settings(isolated_settings(tmp_path, database_url=url))
    with pytest.raises(StoreUnavailable):
        await store.open()
    with pytest.raises(StoreUnavailable):
        await store.enqueue([new_job()])


async def test_a_statement_stuck_on_a_lock_times_out_as_unavailable(
    stores: Any, postgres_url: str
) -> None:
    store = await stores(database_statement_timeout=0.3)
    (answer,) = await store.enqueue([new_job()])
    blocker = await asyncpg.connect(postgres_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", answer.id)
            with pytest.raises(StoreUnavailable):
                await store.cancel(answer.id)
    finally:
        await blocker.close()
    cancelled = await store.cancel(answer.id)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
