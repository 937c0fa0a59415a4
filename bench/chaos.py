"""``python -m bench.chaos``: issue 15's chaos figures, as counts, for SQLite and PostgreSQL.

Runs the soak (20,000 jobs, half email and half SMS, every provider faulty, callbacks on)
and the kill loop (10,000 jobs, five kill -9s at seeded points, each followed by a restart;
on PostgreSQL one of three instances is the one killed) on each store, and prints accepted,
delivered, failed, lost, duplicated (and how many of those are explained), recovered.

The runs are those of tests/test_chaos.py (``tests.support.chaos``), which asserts what this
prints; a command of its own rather than a scenario of ``python -m bench`` because these are
counts from minutes-long runs, not rates compared with a baseline, and they need the test
sinks' fault plan and ledger. Exits 1 when a job was lost or ended for the wrong reason, or
a duplicate is unexplained.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import trustme

from tests.support.chaos import Figures, kill_loop, soak
from tests.support.faults import FaultPlan
from tests.support.postgres import DEFAULT_URL, UNREACHABLE, URL_VARIABLE, fetchval, fresh_database

#: The faults column: what the providers did, by the ledger's name.
FAULTS = (("refused", "refused for now"), ("permanent", "550"), ("lost", "answers lost"))

Run = Callable[[Path, trustme.CA, str | None], Awaitable[Figures]]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tenth of the jobs (smoke)")
    parser.add_argument(
        "--postgres",
        default=os.environ.get(URL_VARIABLE, DEFAULT_URL),
        help=f"admin URL of a PostgreSQL server (default ${URL_VARIABLE} or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--patience",
        type=float,
        default=1800.0,
        help="seconds to wait for every job to be final before counting the rest as lost"
        " (default 1800: a loaded machine is slow, and counts matter here, not speed)",
    )
    return parser.parse_args(argv)


def _runs(scale: int, patience: float) -> list[tuple[str, Run]]:
    def killed(work: Path, ca: trustme.CA, url: str | None) -> Awaitable[Figures]:
        instances = 1 if url is None else 3
        return kill_loop(
            work, ca, database_url=url, instances=instances, count=10_000 // scale,
            name="kill", timeout=patience,
        )  # fmt: skip

    def soaked(work: Path, ca: trustme.CA, url: str | None) -> Awaitable[Figures]:
        return soak(
            work, ca, database_url=url, count=20_000 // scale, name="soak", timeout=patience
        )

    return [("kill loop", killed), ("soak", soaked)]


def _postgres_reachable(url: str) -> bool:
    try:
        asyncio.run(fetchval(url, "SELECT 1"))
    except UNREACHABLE as exc:
        print(f"PostgreSQL at {url} unreachable ({exc!r}): its runs are skipped", file=sys.stderr)
        return False
    return True


def _run(run: Run, ca: trustme.CA, postgres: str | None) -> Figures:
    with tempfile.TemporaryDirectory(prefix="notifier-chaos-") as scratch:
        if postgres is None:
            return asyncio.run(run(Path(scratch), ca, None))
        with fresh_database(postgres, prefix="notifier_chaos") as url:
            return asyncio.run(run(Path(scratch), ca, url))


def _row(name: str, store: str, f: Figures) -> str:
    faults = ", ".join(f"{f.faults[took]:,} {name}" for took, name in FAULTS if took in f.faults)
    callbacks = "" if f.callbacks_once is None else f"{f.callbacks_once:,}"
    cells = [
        name, store, f"{f.jobs:,}", f"{f.accepted:,}", f"{f.delivered:,}", f"{f.failed:,}",
        f"{f.lost:,}", f"{f.misjudged:,}", f"{f.duplicated:,}", f"{f.explained:,}",
        f"{f.recovered:,}", str(f.kills), callbacks, faults or "none", f"{f.seconds:.0f}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    plan = FaultPlan()
    load = os.getloadavg()
    print(
        f"notifier chaos, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        + (" (--quick: a tenth of the jobs)" if args.quick else "")
        + f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]},"
        f" {platform.system()} {platform.release()}, load average {load[0]:.1f} at start"
        f"\nsoak fault plan (seed {plan.seed}): SMTP DATA {plan.smtp_451:.0%} 451,"
        f" {plan.smtp_550:.0%} 550, {plan.smtp_drop:.0%} dropped before the answer;"
        f" gateway {plan.gateway_500:.0%} HTTP 500, {plan.gateway_429:.0%} 429,"
        f" {plan.gateway_timeout:.0%} timeouts; callback receiver {plan.callback_500:.0%} 500"
    )
    stores: list[tuple[str, str | None]] = [("SQLite", None)]
    if _postgres_reachable(args.postgres):
        stores.append(("PostgreSQL", args.postgres))
    ca = trustme.CA()
    print(
        "| run | store | jobs | accepted | delivered | failed | lost | wrong reason"
        " | duplicated | explained | recovered | kills | job.final once | faults | s |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|",
        flush=True,
    )
    sound = True
    for name, run in _runs(10 if args.quick else 1, args.patience):
        for store, postgres in stores:
            figures = _run(run, ca, postgres)
            for problem in figures.wrong:
                print(f"  {name}, {store}: {problem}", file=sys.stderr)
            sound = sound and not (figures.lost or figures.misjudged or figures.unexplained)
            print(_row(name, store, figures), flush=True)
    return 0 if sound else 1


if __name__ == "__main__":
    raise SystemExit(main())
