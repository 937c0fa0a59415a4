"""What a claim batch and a record batch cost per job, on each store.

    python -m bench.bench_store [--jobs 20000] [--batch 32] [--runs 3]

A preloaded queue of SMS jobs is drained by ``claim`` (``--batch`` at a time) and ``record``
(every claimed job delivered, with a provider id as an SMS gateway answers), straight on the
store, no dispatcher and no channel. Printed per store: wall µs per job of each verb and the
process CPU µs per job (this process: the event loop, and aiosqlite's thread for SQLite; the
PostgreSQL server's own work is not in it), medians of ``--runs`` drains.

SQLite in a file in a temporary directory; PostgreSQL from ``NOTIFIER_TEST_POSTGRES_URL``
(default: the local test server) in a throwaway database, skipped when it does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta

from notifier.models import JobStatus, Message, NewJob, Outcome, utcnow
from notifier.settings import Settings, load_settings
from notifier.store import Store, open_store
from tests.support.postgres import DEFAULT_URL, UNREACHABLE, URL_VARIABLE, fetchval, fresh_database

PRELOAD_BATCH = 1000


@dataclass
class Costs:
    """Seconds spent in each verb, and how many jobs they handled."""

    jobs: int = 0
    claim: float = 0.0
    record: float = 0.0
    claim_cpu: float = 0.0
    record_cpu: float = 0.0

    def micros(self, seconds: float) -> float:
        return seconds / max(self.jobs, 1) * 1e6


def new_jobs(count: int, *, run_at_offset: float | None = None) -> list[NewJob]:
    """SMS jobs as intake stores them (due now, or ``run_at_offset`` seconds from now)."""
    run_at = None if run_at_offset is None else utcnow() + timedelta(seconds=run_at_offset)
    return [
        NewJob(
            Message(
                id=uuid.uuid4().hex,
                channel="sms",
                to=(f"+86138{n:08d}",),
                text=f"Code {n:04d}. Your order has shipped.",
            ),
            run_at=run_at,
        )
        for n in range(count)
    ]


async def preload(store: Store, count: int) -> None:
    for start in range(0, count, PRELOAD_BATCH):
        await store.enqueue(new_jobs(min(PRELOAD_BATCH, count - start)))


async def drain(store: Store, *, jobs: int, batch: int, owner: str = "bench") -> Costs:
    """Claim and record until ``jobs`` jobs are delivered; the time of each verb."""
    costs = Costs()
    while costs.jobs < jobs:
        started, cpu_started = time.perf_counter(), time.process_time()
        claimed = await store.claim("sms", owner=owner, limit=batch, lease_seconds=300)
        claimed_at, cpu_claimed = time.perf_counter(), time.process_time()
        if not claimed:
            break
        outcomes = [
            Outcome(
                job.id,
                JobStatus.DELIVERED,
                results={"delivered": {job.message.to[0]: f"ref-{job.id}"}},
            )
            for job in claimed
        ]
        cpu_outcomes = time.process_time()
        await store.record(owner, outcomes)
        done, cpu_done = time.perf_counter(), time.process_time()
        costs.jobs += len(claimed)
        costs.claim += claimed_at - started
        costs.record += done - claimed_at
        costs.claim_cpu += cpu_claimed - cpu_started
        costs.record_cpu += cpu_done - cpu_outcomes
    return costs


@contextmanager
def sqlite_settings() -> Iterator[Settings]:
    with tempfile.TemporaryDirectory() as work:
        yield load_settings(database_url=f"sqlite:///{work}/bench.db", log_level="WARNING")


@contextmanager
def postgres_settings() -> Iterator[Settings]:
    admin = os.environ.get(URL_VARIABLE, DEFAULT_URL)
    with fresh_database(admin, "notifier_bench") as url:
        yield load_settings(database_url=url, log_level="WARNING")


def postgres_answers() -> bool:
    try:
        asyncio.run(fetchval(os.environ.get(URL_VARIABLE, DEFAULT_URL), "SELECT 1"))
    except UNREACHABLE:
        return False
    return True


Backend = Callable[[], AbstractContextManager[Settings]]


def backends() -> list[tuple[str, Backend]]:
    """SQLite, and PostgreSQL when it answers."""
    found: list[tuple[str, Backend]] = [("sqlite", sqlite_settings)]
    if postgres_answers():
        found.append(("postgres", postgres_settings))
    else:
        print(f"PostgreSQL does not answer at {os.environ.get(URL_VARIABLE, DEFAULT_URL)}: skipped")
    return found


async def one_run(settings: Settings, jobs: int, batch: int) -> Costs:
    store = open_store(settings)
    await store.open()
    try:
        await preload(store, jobs)
        return await drain(store, jobs=jobs, batch=batch)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.jobs} jobs, claim/record batches of {args.batch}, median of {args.runs} runs")
    print("µs per job: wall (what a dispatcher waits) and this process's CPU")
    headings = ("claim wall", "claim CPU", "record wall", "record CPU")
    print(f"{'store':10}" + "".join(f"{h:>13}" for h in headings))
    for name, settings_of in backends():
        runs = []
        for _ in range(args.runs):
            with settings_of() as settings:
                runs.append(asyncio.run(one_run(settings, args.jobs, args.batch)))
        figures = [
            statistics.median(r.micros(getattr(r, verb)) for r in runs)
            for verb in ("claim", "claim_cpu", "record", "record_cpu")
        ]
        print(f"{name:10}" + "".join(f"{f:13.1f}" for f in figures))


if __name__ == "__main__":
    main()
