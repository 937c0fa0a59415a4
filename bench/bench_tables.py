"""Whether intake and claim+deliver stay as cheap when the jobs table has grown, and whether
purging a million finished jobs stalls intake.

    python -m bench.bench_tables [--rows-queued 1000000] [--rows-finished 5000000]
        [--purge 1000000] [--jobs 5000] [--batch 50]

Per store (SQLite in a temporary file; PostgreSQL from ``NOTIFIER_TEST_POSTGRES_URL`` in a
throwaway database, when it answers), straight on the store as the server and dispatcher
call it:

1. empty table: intake (``--jobs`` due jobs, ``enqueue`` batches of ``--batch``) in jobs/s,
   then claim+deliver (``claim`` and ``record`` batches of 32, as in ``bench.bench_store``)
   of those jobs in jobs/s;
2. the table grown by SQL (``tests.support.grown``): ``--rows-queued`` jobs due in a year,
   ``--rows-finished`` delivered 60 to 30 days ago; then the same intake and
   claim+deliver, and their ratio to the empty figures (the target: at least 0.67);
3. a purge of the oldest ``--purge`` finished jobs while intake goes on: the p50/p99
   latency of each intake batch during the purge, beside the p99 of step 2's batches,
   and the purge's rows/s.

CI does not run this (generating millions of rows takes minutes); the tests prove the plans
and the purge batching on small grown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta

from bench.bench_store import backends, drain, new_jobs
from notifier.models import utcnow
from notifier.settings import Settings
from notifier.store import Store, open_store
from notifier.store.sqlite import database_path
from tests.support.grown import FINISHED_OVER, FINISHED_SINCE, grow_postgres, grow_sqlite

CLAIM_BATCH = 32


@dataclass
class Phase:
    intake: float  # jobs/s
    deliver: float  # jobs/s
    latencies: list[float]  # seconds per intake batch


def p(latencies: list[float], share: float) -> float:
    """The ``share`` quantile in milliseconds."""
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


async def intake(store: Store, jobs: int, batch: int) -> tuple[float, list[float]]:
    latencies = []
    started = time.perf_counter()
    for start in range(0, jobs, batch):
        sent = time.perf_counter()
        await store.enqueue(new_jobs(min(batch, jobs - start)))
        latencies.append(time.perf_counter() - sent)
    return jobs / (time.perf_counter() - started), latencies


async def phase(store: Store, jobs: int, batch: int) -> Phase:
    rate, latencies = await intake(store, jobs, batch)
    started = time.perf_counter()
    costs = await drain(store, jobs=jobs, batch=CLAIM_BATCH)
    return Phase(rate, costs.jobs / (time.perf_counter() - started), latencies)


async def grow(settings: Settings, queued: int, finished: int) -> None:
    if settings.database_url.startswith("sqlite"):
        await asyncio.to_thread(
            grow_sqlite, database_path(settings.database_url), queued=queued, finished=finished
        )
    else:
        await grow_postgres(settings.database_url, queued=queued, finished=finished)


async def purge_under_intake(
    store: Store, batch: int, *, share: float
) -> tuple[int, float, list[float]]:
    """Purge the oldest ``share`` of the finished jobs while intake batches keep coming."""
    latencies: list[float] = []
    cutoff = utcnow() - timedelta(seconds=FINISHED_SINCE - share * FINISHED_OVER)
    started = time.perf_counter()
    purge = asyncio.create_task(store.purge(before=cutoff))
    while not purge.done():
        sent = time.perf_counter()
        await store.enqueue(new_jobs(batch, run_at_offset=86400))
        latencies.append(time.perf_counter() - sent)
    purged = await purge
    return purged, time.perf_counter() - started, latencies


async def run(settings: Settings, args: argparse.Namespace) -> None:
    store = open_store(settings)
    await store.open()
    try:
        empty = await phase(store, args.jobs, args.batch)
        grow_started = time.perf_counter()
        await grow(settings, args.rows_queued, args.rows_finished)
        print(f"  grown in {time.perf_counter() - grow_started:.0f} s")
        grown = await phase(store, args.jobs, args.batch)
        share = min(1.0, args.purge / max(args.rows_finished, 1))
        purged, seconds, during = await purge_under_intake(store, args.batch, share=share)
    finally:
        await store.close()
    print(f"  {'':22} {'empty':>10} {'grown':>10} {'ratio':>7}")
    for name, a, b in (
        ("intake jobs/s", empty.intake, grown.intake),
        ("claim+deliver jobs/s", empty.deliver, grown.deliver),
    ):
        print(f"  {name:22} {a:10.0f} {b:10.0f} {b / a:7.2f}")
    print(
        f"  purge: {purged} jobs in {seconds:.1f} s ({purged / seconds:.0f}/s);"
        f" intake batch latency during it p50 {p(during, 0.5):.1f} ms,"
        f" p99 {p(during, 0.99):.1f} ms ({len(during)} batches);"
        f" without a purge p99 {p(grown.latencies, 0.99):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows-queued", type=int, default=1_000_000)
    parser.add_argument("--rows-finished", type=int, default=5_000_000)
    parser.add_argument("--purge", type=int, default=1_000_000, help="finished jobs to purge")
    parser.add_argument("--jobs", type=int, default=5000, help="intake and deliver per phase")
    parser.add_argument("--batch", type=int, default=50, help="jobs per intake batch")
    args = parser.parse_args()
    print(
        f"{args.rows_queued} queued for later, {args.rows_finished} finished;"
        f" {args.jobs} jobs per phase, intake batches of {args.batch}"
    )
    for name, settings_of in backends():
        print(name)
        with settings_of() as settings:
            asyncio.run(run(settings, args))


if __name__ == "__main__":
    main()
