"""The PostgreSQL store: intake, delivery and wake-up, one instance against two on one database.

    python -m bench.bench_postgres [--jobs 20000] [--wakeups 200] [--runs 3]

- intake: jobs/s answered ``ok`` (durably stored) through real ``notifier serve`` processes,
  in the shapes of scenarios 1 and 2 (1 connection x 100 in flight, 50 x 10; per instance),
  beside the bare asyncio-streams server of ``bench.bare`` in the same run; the jobs are due
  far ahead so nothing else runs meanwhile. CPU per job is every notifier process's
  (``/proc/<pid>/stat``), the PostgreSQL server's not included.
- delivery: jobs/s claimed, handed to a no-op channel and recorded, by dispatcher processes
  draining a preloaded queue (pgqueuer: ``QueueManager`` in drain mode, same batch size),
  timed from when every worker is ready; CPU per job is the workers'. A worker that dies
  fails the run with its error, and a run that leaves jobs behind fails too.
- wake-up: how long an idle instance takes to start a job that another instance stored, with
  polling set to 30 s so only LISTEN/NOTIFY can wake it (p50 and p99).

Rates are medians of ``--runs``; the targets (issue 14) are judged per run, on ratios taken
in that run. PostgreSQL from ``NOTIFIER_TEST_POSTGRES_URL`` (default: the local test server).
pgqueuer is measured beside notifier when it is installed (``pip install pgqueuer``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import queue
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, NamedTuple

from bench.cost import STREAMS, cpu_seconds
from bench.jobs import sms_job
from bench.loadgen import drive
from bench.procs import Child, bench_module, free_port
from notifier.channels.base import Channel
from notifier.dispatcher import Dispatcher
from notifier.metrics import Metrics
from notifier.models import Message, NewJob, Receipt
from notifier.settings import Settings, load_settings
from notifier.store.postgres import PostgresStore
from tests.support.postgres import DEFAULT_URL, URL_VARIABLE, fetchval, fresh_database

TOMORROW = "2099-01-01T00:00:00Z"
BATCH = 32  # claimed per round trip: notifier's SMS concurrency, pgqueuer's batch_size
#: Entered once the worker is ready to drain: waits for the others, then times the drain.
Ready = Callable[[], AbstractAsyncContextManager[None]]
Deliveries = Callable[[str, Ready], Coroutine[Any, Any, None]]
#: Seconds a worker waits for the others to be ready, and a drain may take.
BARRIER_TIMEOUT = 120.0
DRAIN_TIMEOUT = 600.0


def settings_for(url: str, **overrides: Any) -> Settings:
    return load_settings(database_url=url, sms_concurrency=BATCH, log_level="WARNING", **overrides)


# -- intake ------------------------------------------------------------------------------------


class Rate(NamedTuple):
    """Jobs per second, and CPU microseconds per job of the processes measured."""

    per_s: float
    cpu_us: float


#: Scenarios 1 and 2 of ``python -m bench``: (connections, in flight on each), per server.
SHAPES = {"1 x 100": (1, 100), "50 x 10": (50, 10)}


def _load(ports: list[int], lines: list[bytes], connections: int, window: int) -> float:
    """Seconds until every line, spread over the servers at ``ports``, was answered ``ok``."""

    async def load_all() -> float:
        loads = await asyncio.gather(
            *(
                drive(port, lines[i :: len(ports)], connections=connections, window=window)
                for i, port in enumerate(ports)
            )
        )
        assert not any(load.errors for load in loads), "some sends were not answered ok"
        return max(load.seconds for load in loads)

    return asyncio.run(load_all())


def _timed(children: list[Child], lines: list[bytes], connections: int, window: int) -> Rate:
    before = sum(cpu_seconds(child.pid) for child in children)
    seconds = _load([child.ports[0] for child in children], lines, connections, window)
    cpu = sum(cpu_seconds(child.pid) for child in children) - before
    return Rate(len(lines) / seconds, cpu / len(lines) * 1e6)


def intake(admin_url: str, instances: int, jobs: int, connections: int, window: int) -> Rate:
    with (
        fresh_database(admin_url, "notifier_bench") as url,
        tempfile.TemporaryDirectory() as work,
        contextlib.ExitStack() as stack,
    ):
        children = []
        for i in range(instances):
            port = free_port()
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
            children.append(stack.enter_context(child))
        lines = [sms_job(n, send_at=TOMORROW) for n in range(jobs)]
        return _timed(children, lines, connections, window)


def bare_intake(jobs: int, connections: int, window: int) -> Rate:
    """The bare asyncio-streams server: parse each line, answer an id, store nothing."""
    with tempfile.TemporaryDirectory() as work:
        port = free_port()
        with Child(
            "bare-streams", bench_module("bare", "streams", port), ports=[port], log_dir=Path(work)
        ) as child:
            lines = [sms_job(n, send_at=TOMORROW) for n in range(jobs)]
            return _timed([child], lines, connections, window)


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


async def notifier_deliveries(url: str, ready: Ready) -> None:
    settings = settings_for(url)
    store = PostgresStore.from_settings(settings)
    await store.open()
    dispatcher = Dispatcher(store, {"sms": NoopChannel()}, settings, metrics=Metrics())
    async with ready():
        await dispatcher.run_burst()
        await dispatcher.stop(grace=0)
    await store.close()


async def pgqueuer_deliveries(url: str, ready: Ready) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.domain.types import QueueExecutionMode

    conn = await asyncpg.connect(url)
    manager = QueueManager(Queries(AsyncpgDriver(conn)))

    @manager.entrypoint("noop")
    async def noop(job: object) -> None:
        """Does nothing, like notifier's no-op channel."""

    async with ready():
        await manager.run(batch_size=BATCH, mode=QueueExecutionMode.drain)
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


#: How many jobs a drain left behind: notifier's not delivered, pgqueuer's still queued.
LEFT = {
    "notifier": "SELECT count(*) FROM jobs WHERE status <> 'delivered'",
    "pgqueuer": "SELECT count(*) FROM pgqueuer",
}


class Report(NamedTuple):
    """What a worker sends back: wall-clock start and end of its drain and its CPU seconds,
    or the error it died of."""

    started: float
    finished: float
    cpu: float
    error: str | None = None


def _worker(name: str, url: str, go: Any, reports: multiprocessing.Queue[Report]) -> None:
    """Connect, wait at the barrier ``go`` with the other workers, drain, report."""
    logging.disable(logging.WARNING)  # the store's warning that autovacuum is off, per process

    @contextlib.asynccontextmanager
    async def ready() -> AsyncIterator[None]:
        await asyncio.get_running_loop().run_in_executor(None, go.wait, BARRIER_TIMEOUT)
        started, cpu = time.time(), time.process_time()
        yield
        reports.put(Report(started, time.time(), time.process_time() - cpu))

    try:
        asyncio.run(WORKERS[name](url, ready))
    except BaseException as exc:
        reports.put(Report(0.0, 0.0, 0.0, f"{name} worker: {exc!r}"))
        raise


WORKERS: dict[str, Deliveries] = {
    "notifier": notifier_deliveries,
    "pgqueuer": pgqueuer_deliveries,
}
PRELOAD = {"notifier": preload, "pgqueuer": pgqueuer_preload}


def _collect(workers: list[Any], reports: multiprocessing.Queue[Report]) -> list[Report]:
    """Every worker's report; a worker that died without one fails the run at once rather
    than after the drain's whole timeout."""
    done: list[Report] = []
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while len(done) < len(workers):
        try:
            done.append(reports.get(timeout=1.0))
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead and reports.empty():
                raise RuntimeError(f"a worker died without a report (exit codes {dead})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the drain took more than {DRAIN_TIMEOUT:g}s") from None
    for worker in workers:
        worker.join()
    return done


def delivery(admin_url: str, system: str, instances: int, jobs: int) -> Rate:
    """Worker processes start draining together (a barrier, after their imports and
    connections); the rate is the jobs over the time from that start to the last one done."""
    spawn = multiprocessing.get_context("spawn")
    with fresh_database(admin_url, "notifier_bench") as url:
        asyncio.run(PRELOAD[system](url, jobs))
        reports: multiprocessing.Queue[Report] = spawn.Queue()
        go = spawn.Barrier(instances)
        workers = [
            spawn.Process(target=_worker, args=(system, url, go, reports)) for _ in range(instances)
        ]
        for worker in workers:
            worker.start()
        done = _collect(workers, reports)
        errors = [report.error for report in done if report.error]
        if errors:
            raise RuntimeError("; ".join(errors))
        left = asyncio.run(fetchval(url, LEFT[system]))
        if left:
            raise RuntimeError(f"{system}: {left} of {jobs} jobs left after the drain")
        seconds = max(r.finished for r in done) - min(r.started for r in done)
        return Rate(jobs / seconds, sum(r.cpu for r in done) / jobs * 1e6)


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


def _median(rates: list[Rate]) -> Rate:
    return Rate(
        statistics.median(r.per_s for r in rates), statistics.median(r.cpu_us for r in rates)
    )


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _ratios(ours: list[Rate], theirs: list[Rate]) -> list[float]:
    return [a.per_s / b.per_s for a, b in zip(ours, theirs, strict=True)]


def _target(name: str, ratios: list[float], goal: float) -> str:
    median = statistics.median(ratios)
    runs = " ".join(f"{r:.2f}x" for r in ratios)
    return _row(name, f">= {goal}x", f"{median:.2f}x", runs, "yes" if median >= goal else "NO")


Intakes = dict[tuple[str, str], list[Rate]]
Drains = dict[tuple[str, int], list[Rate]]


def measure(admin_url: str, systems: list[str], jobs: int, runs: int) -> tuple[Intakes, Drains]:
    """Each run measures every contender once, so ratios come from the same minutes."""
    taken: Intakes = {}
    delivered: Drains = {}
    for _ in range(runs):
        for shape, (connections, window) in SHAPES.items():
            taken.setdefault((shape, STREAMS), []).append(bare_intake(jobs, connections, window))
            for instances in (1, 2):
                taken.setdefault((shape, f"notifier x {instances}"), []).append(
                    intake(admin_url, instances, jobs, connections, window)
                )
        for system in systems:
            for instances in (1, 2):
                delivered.setdefault((system, instances), []).append(
                    delivery(admin_url, system, instances, jobs)
                )
    return taken, delivered


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--wakeups", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    admin_url = os.environ.get(URL_VARIABLE, DEFAULT_URL)
    systems = ["notifier"]
    try:
        import pgqueuer  # noqa: F401

        systems.append("pgqueuer")
    except ImportError:
        print("pgqueuer is not installed: measuring notifier only")
    load = f"{os.getloadavg()[0]:.1f}"
    taken, delivered = measure(admin_url, systems, args.jobs, args.runs)
    woken = {
        (system, instances): wakeup(admin_url, system, instances, args.wakeups)
        for system in systems
        for instances in (1, 2)
    }
    print(
        f"\n{args.jobs} jobs, {args.runs} runs (medians), {args.wakeups} wake-ups,"
        f" {os.cpu_count()} CPUs, one PostgreSQL; load average {load} at the start,"
        f" {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(_row("intake shape", "contender", "jobs/s", "CPU µs each"))
    print(_row("---", "---", "--:", "--:"))
    for (shape, contender), rates in taken.items():
        rate = _median(rates)
        print(_row(shape, contender, f"{rate.per_s:,.0f}", f"{rate.cpu_us:,.0f}"))
    print()
    print(
        _row(
            "system",
            "instances",
            "claim+deliver+ack jobs/s",
            "CPU µs each",
            "wake-up p50 ms",
            "wake-up p99 ms",
        )
    )
    print(_row("---", "--:", "--:", "--:", "--:", "--:"))
    for (system, instances), rates in delivered.items():
        rate = _median(rates)
        p50, p99 = woken[system, instances]
        print(
            _row(
                system,
                instances,
                f"{rate.per_s:,.0f}",
                f"{rate.cpu_us:,.0f}",
                f"{p50:.1f}",
                f"{p99:.1f}",
            )
        )
    print()
    print(_row("target (issue 14)", "goal", "median", "per run", "met"))
    print(_row("---", "--:", "--:", "---", "---"))
    for shape in SHAPES:
        ratios = _ratios(taken[shape, "notifier x 1"], taken[shape, STREAMS])
        print(_target(f"intake {shape}, one instance, vs bare streams", ratios, 0.35))
    if "pgqueuer" in systems:
        ratios = _ratios(delivered["notifier", 1], delivered["pgqueuer", 1])
        print(_target("claim+deliver+ack, one instance, vs pgqueuer", ratios, 1.5))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
