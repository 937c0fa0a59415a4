"""Where a ``send`` spends its time, from bytes to committed row, stage by stage.

    python -m bench.intake_stages [--jobs 20000] [--batch 100] [--postgres] [--channel sms]

Runs notifier's own intake functions in this process on the bench's email lines (the ones
scenarios 1 and 2 send; with ``--channel sms`` the SMS lines bench_postgres sends), one stage
at a time over every line, and prints µs per job:
framing (a read buffer split into lines), JSON, validation (the request model), prepare
(channel checks, id, message), insert (the store's ``enqueue`` in batches of ``--batch``,
on a fresh SQLite file, or a fresh PostgreSQL database with ``--postgres``) and answer
(its line encoded). Stages run apart, so the figures leave out the event loop and the
socket; scenario 1 measures those. CPU time of this process (every thread, so the
store's thread too; not the fsync waits, nor PostgreSQL's own CPU), medians of 5 passes: a
loaded machine inflates it less than wall time, but still some (caches, frequency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.jobs import email_job, sms_job
from bench.marks import FAR_FUTURE
from notifier.intake import Intake
from notifier.metrics import Metrics
from notifier.models import NewJob
from notifier.protocol import SendRequest, decode_line, encode, ok, parse_request
from notifier.settings import load_settings
from notifier.store import Store, open_store
from notifier.templates import Templates
from tests.support.postgres import DEFAULT_URL, URL_VARIABLE, fresh_database

PASSES = 5
READ_SIZE = 65536


def _timed(stage: Callable[[], object], jobs: int) -> float:
    """µs per job: the median of several passes of ``stage`` over every job."""
    passes = []
    for _ in range(PASSES):
        started = time.process_time()
        stage()
        passes.append(time.process_time() - started)
    return statistics.median(passes) / jobs * 1e6


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]


def _frame(chunks: Sequence[bytes]) -> list[bytes]:
    """Whole lines out of reads, as the server's reader splits them."""
    lines: list[bytes] = []
    rest = b""
    for chunk in chunks:
        *whole, rest = (rest + chunk).split(b"\n")
        lines.extend(whole)
    return lines


@contextlib.contextmanager
def _store_url(postgres: bool, work: Path) -> Iterator[str]:
    if not postgres:
        yield f"sqlite:///{work}/notifier.db"
        return
    admin = os.environ.get(URL_VARIABLE, DEFAULT_URL)
    with fresh_database(admin, "notifier_stages") as url:
        yield url


async def _insert(store: Store, jobs: list[NewJob], batch: int) -> float:
    """µs per job of ``enqueue``, one pass (each job is stored once)."""
    started = time.process_time()
    for start in range(0, len(jobs), batch):
        await store.enqueue(jobs[start : start + batch])
    return (time.process_time() - started) / len(jobs) * 1e6


def _fresh_jobs(intake: Intake, requests: list[SendRequest]) -> list[NewJob]:
    return [intake.prepare(request) for request in requests]


async def measure(url: str, count: int, batch: int, channel: str) -> dict[str, float]:
    job = email_job if channel == "email" else sms_job
    lines = [job(number, send_at=FAR_FUTURE) for number in range(count)]
    chunks = _chunks(b"".join(lines))
    framed = _frame(chunks)
    decoded = [decode_line(line) for line in framed]
    requests: list[Any] = [parse_request(data) for data in decoded]
    answers = [ok(number, id=f"{number:032x}", status="queued") for number in range(count)]
    figures = {
        "framing": _timed(lambda: _frame(chunks), count),
        "JSON": _timed(lambda: [decode_line(line) for line in framed], count),
        "validation": _timed(lambda: [parse_request(data) for data in decoded], count),
    }
    with tempfile.TemporaryDirectory() as scratch:
        store = open_store(load_settings(database_url=url))
        intake = Intake(
            store,
            channels=[channel],
            templates=Templates(Path(scratch)),
            sender="bench@example.com",
            metrics=Metrics(),
        )
        figures["prepare"] = _timed(lambda: _fresh_jobs(intake, requests), count)
        await store.open()
        try:
            inserts = [
                await _insert(store, _fresh_jobs(intake, requests), batch) for _ in range(PASSES)
            ]
        finally:
            await store.close()
    figures["insert"] = statistics.median(inserts)
    figures["answer"] = _timed(lambda: [encode(answer) for answer in answers], count)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake_stages", description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100, help="jobs per enqueue (default 100)")
    parser.add_argument("--postgres", action="store_true", help=f"PostgreSQL from {URL_VARIABLE}")
    parser.add_argument("--channel", choices=["email", "sms"], default="email")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, _store_url(args.postgres, Path(scratch)) as url:
        figures = asyncio.run(measure(url, args.jobs, args.batch, args.channel))
    store = "PostgreSQL" if args.postgres else "SQLite"
    print(
        f"| stage ({args.channel} into {store}, {args.jobs:,} jobs, batches of {args.batch})"
        " | µs per job |"
    )
    print("|---|---|")
    for stage, micros in figures.items():
        print(f"| {stage} | {micros:.1f} |")
    print(f"| total | {sum(figures.values()):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
