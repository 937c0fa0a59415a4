"""The PostgreSQL store: intake, delivery and wake-up, one instance against two on one database.

    python -m bench.bench_postgres [--jobs 20000] [--wakeups 200]

- intake: jobs/s answered ``ok`` through real ``notifier serve`` processes, pipelined (1000
  requests in flight on one connection per instance); the jobs are due tomorrow so nothing
  else runs meanwhile.
- delivery: jobs/s claimed, handed to a no-op channel and recorded, by dispatcher processes
  draining a preloaded queue (pgqueuer: ``QueueManager`` in drain mode, same batch size).
- wake-up: how long an idle instance takes to start a job that another instance stored, with
  polling set to 30 s so only LISTEN/NOTIFY can wake it (p50 and p99).

PostgreSQL from ``NOTIFIER_TEST_POSTGRES_URL`` (default: the local test server). pgqueuer is
measured beside notifier when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.jobs import sms_job
from bench.loadgen import drive
from bench.procs import Child, free_port
from notifier.channels.base import Channel
from notifier.dispatcher import Dispatcher
from notifier.metrics import Metrics
from notifier.models import Message, NewJob, Receipt
from notifier.settings import Settings, load_settings
from notifier.store.postgres import PostgresStore
from tests.support.postgres import DEFAULT_URL, URL_VARIABLE, fresh_database

TOMORROW = "2099-01-01T00:00:00Z"
BATCH = 32  # claimed per round trip: notifier's SMS concurrency, pgqueuer's batch_size
Deliveries = Callable[[str, float, "multiprocessing.Queue[float]"], Awaitable[None]]


def settings_for(url: str, **overrides: Any) -> Settings:
    return load_settings(database_url=url, sms_concurrency=BATCH, log_level="WARNING", **overrides)


# -- intake ------------------------------------------------------------------------------------


def intake(admin_url: str, instances: int, jobs: int) -> float:
    with fresh_database(admin_url, "notifier_bench") as url, tempfile.TemporaryDirectory() as work:
        ports = [free_port() for _ in range(instances)]
        with contextlib.ExitStack() as stack:
            for i, port in enumerate(ports):
                env = {
                    "NOTIFIER_DATABASE_URL": url,
                    "NOTIFIER_PORT": str(port),
                    "NOTIFIER_HTTP_PORT": "0",
                    "NOTIFIER_OUTBOX_DIR": str(Path(work) / f"outbox-{i}"),
                    "NOTIFIER_LOG_LEVEL": "WARNING",
                }
                child = Child(
                    f"notifier-{i}",
                    [sys.executable, "-m", "notifier", "serve"],
                    ports=[port],
                    env=env,
                    log_dir=Path(work),
                    cwd=Path(work),
                )
                stack.enter_context(child)
            lines = [sms_job(n, send_at=TOMORROW) for n in range(jobs)]

            async def load_all() -> float:
                loads = await asyncio.gather(
                    *(
                        drive(port, lines[i::instances], connections=1, window=1000)
                        for i, port in enumerate(ports)
                    )
                )
                assert not any(load.errors for load in loads)
                return max(load.seconds for load in loads)

            return jobs / asyncio.run(load_all())


# -- delivery ----------------------------------------------------------------------------------


class NoopChannel(Channel):
    provider = "noop"

    async def send(self, message: Message) -> Receipt:
        return Receipt()


async def preload(url: str, jobs: int) -> None:
    store = PostgresStore.from_settings(settings_for(url))
    await store.open()
    try:
        for start in range(0, jobs, 1000):
            await store.enqueue(
                [
                    NewJob(Message(id=uuid.uuid4().hex, channel="sms", to=("+14155550101",)))
                    for _ in range(start, min(jobs, start + 1000))
                ]
            )
    finally:
        await store.close()


async def notifier_deliveries(url: str, go: float, done: multiprocessing.Queue[float]) -> None:
    settings = settings_for(url)
    store = PostgresStore.from_settings(settings)
    await store.open()
    dispatcher = Dispatcher(store, {"sms": NoopChannel()}, settings, metrics=Metrics())
    await asyncio.sleep(max(0.0, go - time.time()))
    await dispatcher.run_burst()
    await dispatcher.stop(grace=0)
    done.put(time.time())
    await store.close()


async def pgqueuer_deliveries(url: str, go: float, done: multiprocessing.Queue[float]) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.domain.types import QueueExecutionMode

    conn = await asyncpg.connect(url)
    manager = QueueManager(Queries(AsyncpgDriver(conn)))

    @manager.entrypoint("noop")
    async def noop(job: object) -> None:
        """Does nothing, like notifier's no-op channel."""

    await asyncio.sleep(max(0.0, go - time.time()))
    await manager.run(batch_size=BATCH, mode=QueueExecutionMode.drain)
    done.put(time.time())
    await conn.close()


async def pgqueuer_preload(url: str, jobs: int) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(url)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    for start in range(0, jobs, 1000):
        n = min(jobs, start + 1000) - start
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    await conn.close()


def _worker(name: str, url: str, go: float, done: multiprocessing.Queue[float]) -> None:
    logging.disable(logging.WARNING)  # the store's warning that autovacuum is off, per process
    asyncio.run(WORKERS[name](url, go, done))


WORKERS: dict[str, Deliveries] = {
    "notifier": notifier_deliveries,
    "pgqueuer": pgqueuer_deliveries,
}
PRELOAD = {"notifier": preload, "pgqueuer": pgqueuer_preload}


def delivery(admin_url: str, system: str, instances: int, jobs: int) -> float:
    """Worker processes start together at ``go`` (after their imports and connections)."""
    spawn = multiprocessing.get_context("spawn")
    with fresh_database(admin_url, "notifier_bench") as url:
        asyncio.run(PRELOAD[system](url, jobs))
        done: multiprocessing.Queue[float] = spawn.Queue()
        go = time.time() + 3.0
        workers = [
            spawn.Process(target=_worker, args=(system, url, go, done)) for _ in range(instances)
        ]
        for worker in workers:
            worker.start()
        finished = max(done.get(timeout=600) for _ in workers)
        for worker in workers:
            worker.join()
        return jobs / (finished - go)


# -- wake-up -----------------------------------------------------------------------------------


class SignallingChannel(Channel):
    provider = "signal"

    def __init__(self, started: Callable[[], None]) -> None:
        self.started = started

    async def send(self, message: Message) -> Receipt:
        self.started()
        return Receipt()


async def _wakeups(url: str, instances: int, count: int) -> list[float]:
    settings = settings_for(url, poll_interval=30.0)
    arrived = asyncio.Event()
    sender = PostgresStore.from_settings(settings)
    await sender.open()
    receivers = [PostgresStore.from_settings(settings) for _ in range(instances)]
    dispatchers = []
    for store in receivers:
        await store.open()
        dispatcher = Dispatcher(
            store, {"sms": SignallingChannel(arrived.set)}, settings, metrics=Metrics()
        )
        dispatchers.append((dispatcher, asyncio.create_task(dispatcher.run())))
    await asyncio.sleep(1.0)  # let every listener connect and every lane go idle
    latencies = []
    for _ in range(count):
        arrived.clear()
        await sender.enqueue([NewJob(Message(id=uuid.uuid4().hex, channel="sms", to=("+1",)))])
        stored = time.perf_counter()
        await asyncio.wait_for(arrived.wait(), 10)
        latencies.append(time.perf_counter() - stored)
        await asyncio.sleep(0.05)  # idle again: the record is written, the lanes wait
    for dispatcher, task in dispatchers:
        await dispatcher.stop(grace=1)
        await task
    for store in [sender, *receivers]:
        await store.close()
    return latencies


async def _pgqueuer_wakeups(url: str, instances: int, count: int) -> list[float]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager

    arrived = asyncio.Event()
    connections = [await asyncpg.connect(url) for _ in range(instances + 1)]
    queries = Queries(AsyncpgDriver(connections[0]))
    await queries.install()
    managers = []
    for conn in connections[1:]:
        manager = QueueManager(Queries(AsyncpgDriver(conn)))
        manager.entrypoint("signal")(_signal(arrived))
        managers.append((manager, asyncio.create_task(manager.run(batch_size=BATCH))))
    await asyncio.sleep(1.0)
    latencies = []
    for _ in range(count):
        arrived.clear()
        await queries.enqueue("signal", None)
        stored = time.perf_counter()
        await asyncio.wait_for(arrived.wait(), 10)
        latencies.append(time.perf_counter() - stored)
        await asyncio.sleep(0.05)
    for manager, task in managers:
        manager.shutdown.set()
        await task
    for conn in connections:
        await conn.close()
    return latencies


def _signal(arrived: asyncio.Event) -> Callable[[object], Awaitable[None]]:
    async def signal(job: object) -> None:
        arrived.set()

    return signal


def wakeup(admin_url: str, system: str, instances: int, count: int) -> tuple[float, float]:
    measure = _wakeups if system == "notifier" else _pgqueuer_wakeups
    with fresh_database(admin_url, "notifier_bench") as url:
        latencies = sorted(asyncio.run(measure(url, instances, count)))
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return statistics.median(latencies) * 1000, p99 * 1000


# -- report ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--wakeups", type=int, default=200)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    admin_url = os.environ.get(URL_VARIABLE, DEFAULT_URL)
    systems = ["notifier"]
    try:
        import pgqueuer  # noqa: F401

        systems.append("pgqueuer")
    except ImportError:
        print("pgqueuer is not installed: measuring notifier only")
    rows = []
    for system in systems:
        for instances in (1, 2):
            take_in = intake(admin_url, instances, args.jobs) if system == "notifier" else None
            deliver = delivery(admin_url, system, instances, args.jobs)
            p50, p99 = wakeup(admin_url, system, instances, args.wakeups)
            rows.append((system, instances, take_in, deliver, p50, p99))
    print(f"\n{args.jobs} jobs, {args.wakeups} wake-ups, {os.cpu_count()} CPUs, one PostgreSQL\n")
    print(
        "| system | instances | intake jobs/s | claim+deliver+ack jobs/s | wake-up p50 ms"
        " | wake-up p99 ms |"
    )
    print("|---|---|---|---|---|---|")
    for system, instances, take_in, deliver, p50, p99 in rows:
        intake_cell = f"{take_in:,.0f}" if take_in is not None else "n/a (no network intake)"
        print(
            f"| {system} | {instances} | {intake_cell} | {deliver:,.0f} | {p50:.1f} | {p99:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
