"""``python -m bench``: every scenario, several runs each, then the tables.

Starts the sinks (one process) with a throwaway CA, then for each scenario and run starts
the servers it compares (each in its own process, fresh state) and measures them. Raw
samples are written as JSON next to the printed report (``bench/results/``, not tracked).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import trustme

from bench import cost, delivery, intake, traffic
from bench.harness import QUICK, Bench, Scenario, SinkControl, Sizes
from bench.procs import ROOT, Child, bench_module, free_port
from bench.report import Outcome, header, results_table, targets_table

SCENARIOS: tuple[Scenario, ...] = tuple(
    sorted(
        (*intake.SCENARIOS, *delivery.SCENARIOS, *traffic.SCENARIOS, *cost.SCENARIOS),
        key=lambda s: int(s.key),
    )
)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke sizes (about a minute)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument(
        "--only", default="", help="comma-separated scenario numbers, e.g. 1,4 (default all)"
    )
    return parser.parse_args(argv)


def _certificates(work: Path) -> tuple[Path, Path]:
    """A throwaway CA (trusted by the clients) and the sinks' certificate chain and key."""
    ca = trustme.CA()
    ca_file, chain = work / "bench-ca.pem", work / "sink.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(chain))
    return ca_file, chain


def _measure(bench: Bench, scenarios: tuple[Scenario, ...], runs: int) -> list[Outcome]:
    outcomes = []
    for scenario in scenarios:
        outcome = Outcome(scenario, [])
        times = min(runs, scenario.max_runs or runs)
        for number in range(1, times + 1):
            started = time.monotonic()
            outcome.runs.append(scenario.measure(bench))
            bench.log(
                f"{scenario.key}. {scenario.title}: run {number}/{times}"
                f" {time.monotonic() - started:.1f}s"
            )
        outcomes.append(outcome)
    return outcomes


def run(sizes: Sizes, scenarios: tuple[Scenario, ...], runs: int) -> list[Outcome]:
    with tempfile.TemporaryDirectory(prefix="notifier-bench-") as scratch:
        work = Path(scratch)
        ca_file, chain = _certificates(work)
        smtp, http, control = free_port(), free_port(), free_port()
        argv = bench_module(
            "sinks", "--smtp-port", smtp, "--http-port", http, "--control-port", control,
            "--cert", chain,
        )  # fmt: skip
        with Child("sinks", argv, ports=[smtp, http, control], log_dir=work):
            sinks = SinkControl(control)
            try:
                bench = Bench(work, sizes, sinks, smtp, http, ca_file)
                return _measure(bench, scenarios, runs)
            finally:
                sinks.close()


def _save(outcomes: list[Outcome], report: str) -> Path:
    folder = ROOT / "bench" / "results"
    folder.mkdir(exist_ok=True)
    path = folder / time.strftime("%Y%m%d-%H%M%S.json")
    raw = {o.scenario.key: [{k: asdict(v) for k, v in r.items()} for r in o.runs] for o in outcomes}
    path.write_text(json.dumps({"report": report, "runs": raw}, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    sizes = QUICK if args.quick else Sizes()
    wanted = {key.strip() for key in args.only.split(",") if key.strip()}
    scenarios = tuple(s for s in SCENARIOS if not wanted or s.key in wanted)
    started = time.monotonic()
    outcomes = run(sizes, scenarios, args.runs)
    report = "\n\n".join(
        [
            header(runs=args.runs, sizes=sizes, quick=args.quick),
            results_table(outcomes),
            targets_table(outcomes),
            f"total time {time.monotonic() - started:.0f} s",
        ]
    )
    print(report)
    print(f"(raw samples: {_save(outcomes, report)})", file=sys.stderr)
    return 0
