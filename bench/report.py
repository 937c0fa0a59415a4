"""The printed report: the machine, the settings, then two Markdown tables (results, targets).

Every number is the median over the runs; a target's value is computed within each run and
then the median taken, with the per-run values shown beside it.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from bench.harness import FAULT_SETTINGS, NOTIFIER_SETTINGS, Run, Scenario, Sizes


@dataclass
class Outcome:
    scenario: Scenario
    runs: list[Run]


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _cell(value: float | None, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header(*, runs: int, sizes: Sizes, quick: bool) -> str:
    settings = {**NOTIFIER_SETTINGS}
    return "\n".join(
        [
            f"notifier bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
            + (" (--quick: smoke sizes)" if quick else ""),
            f"machine: {os.cpu_count()} cores (nproc), {_cpu()}, Python {sys.version.split()[0]},"
            f" {platform.system()} {platform.release()}",
            f"median of {runs} runs; every server and sink in its own process, all on 127.0.0.1",
            "notifier settings: " + " ".join(f"{k}={v}" for k, v in settings.items()),
            "  fault run (8), both sides: "
            + " ".join(f"{k}={v}" for k, v in FAULT_SETTINGS.items()),
            f"  end to end (6): {sizes.e2e_jobs:,} jobs per channel at {sizes.e2e_rate:g} jobs/s",
        ]
    )


def results_table(outcomes: Sequence[Outcome]) -> str:
    rows = [
        "| # | scenario | contender | sent | per s | p50 ms | p99 ms | peak RSS MiB | CPU µs each"
        " | not ok |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for outcome in outcomes:
        for name in outcome.runs[0]:
            samples = [run[name] for run in outcome.runs]
            cells = [
                outcome.scenario.key,
                outcome.scenario.title,
                name,
                f"{samples[0].size:,}",
                _cell(_median([s.rate for s in samples])),
                _cell(_median([s.p50 for s in samples]), 2),
                _cell(_median([s.p99 for s in samples]), 2),
                _cell(_median([s.rss for s in samples])),
                _cell(_median([s.cpu for s in samples])),
                str(max(s.missing for s in samples)),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets_table(outcomes: Sequence[Outcome]) -> str:
    rows = ["| # | target | median | per run | met |", "|---|---|--:|---|---|"]
    for outcome in outcomes:
        for target in outcome.scenario.targets:
            values = [target.value(run) for run in outcome.runs]
            median = statistics.median(values)
            rows.append(
                f"| {outcome.scenario.key} | {target.text} | {target.show(median)} |"
                f" {' '.join(target.show(v) for v in values)} |"
                f" {'yes' if target.met(median) else 'NO'} |"
            )
    return "\n".join(rows)
