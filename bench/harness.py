"""The harness: what a scenario measures, its targets, and the processes it runs against.

A scenario is a function from the ``Bench`` (ports, sinks, sizes, how to start a server) to
one ``Run``: a ``Sample`` per contender. The runner calls it several times; every target is
computed within each run (so a ratio compares contenders measured side by side, on the same
machine load) and reported as the median over the runs, like every number in the table.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Literal

from bench.procs import Child, bench_module, free_port

Field = Literal["rate", "p50", "p99", "rss", "missing", "cpu"]


@dataclass
class Sample:
    """One contender in one run: how many it sent, per second, milliseconds, MiB, how
    many were refused or never arrived, and the CPU microseconds it spent per message."""

    size: int
    rate: float | None = None
    p50: float | None = None
    p99: float | None = None
    rss: float | None = None
    missing: int = 0
    cpu: float | None = None

    def get(self, name: Field) -> float:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name} was not measured")
        return float(value)


Run = dict[str, Sample]


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 of latencies in seconds, in milliseconds (nearest rank)."""
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return at(0.50), at(0.99)


@dataclass(frozen=True)
class Target:
    """``contender``'s ``field``, or its ratio to ``versus``'s, against a bound."""

    text: str
    contender: str
    field: Field
    versus: str | None = None
    at_least: float | None = None
    at_most: float | None = None

    def value(self, run: Run) -> float:
        value = run[self.contender].get(self.field)
        return value / run[self.versus].get(self.field) if self.versus else value

    def met(self, value: float) -> bool:
        low = self.at_least is None or value >= self.at_least
        return low and (self.at_most is None or value <= self.at_most)

    def show(self, value: float) -> str:
        if self.versus:
            return f"{value:.2f}x"
        return {
            "p50": "{:.1f} ms",
            "p99": "{:.1f} ms",
            "missing": "{:.0f}",
            "cpu": "{:.0f} µs",
        }.get(self.field, "{:.1f}").format(value)


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    measure: Callable[[Bench], Run]
    targets: tuple[Target, ...] = ()
    max_runs: int | None = None  # for a number that does not vary run to run (memory)


@dataclass(frozen=True)
class Sizes:
    """How much each scenario sends; ``QUICK`` is a smoke run of the same code."""

    pipelined: int = 100_000
    concurrent: int = 100_000
    one_at_a_time: int = 2_000
    email: int = 2_000
    email_per_message: int = 150
    sms: int = 2_000
    sms_per_message: int = 60
    e2e_rate: float = 200.0
    e2e_jobs: int = 1_500
    backlog: int = 200_000
    small_backlog: int = 1_000
    #: Scenario 10: normal jobs queued ahead, and high jobs sent at a steady rate meanwhile.
    priority_backlog: int = 3_000
    priority_jobs: int = 100
    priority_rate: float = 20.0
    #: Scenarios 12-16: jobs per cost-per-job run.
    cost: int = 10_000


QUICK = Sizes(
    pipelined=5_000,
    concurrent=5_000,
    one_at_a_time=200,
    email=200,
    email_per_message=20,
    sms=200,
    sms_per_message=10,
    e2e_jobs=200,
    backlog=10_000,
    priority_backlog=400,
    priority_jobs=20,
    cost=1_000,
)

#: What a user sending to a provider that answers in tens of milliseconds would set: enough
#: SMTP sessions and HTTP requests in flight to cover the provider's latency. The fault run
#: also shortens NOTIFIER_RETRY_BASE_DELAY (default 2 s) to FAULT_SETTINGS.
NOTIFIER_SETTINGS = {
    "NOTIFIER_SMS_CONCURRENCY": "32",
    "NOTIFIER_MAX_PIPELINE": "1000",
}
FAULT_SETTINGS = {"NOTIFIER_RETRY_BASE_DELAY": "0.1"}


@dataclass
class SinkStats:
    distinct: int
    refused: int
    first: float | None
    last: float | None
    latencies: list[float]
    cpu: float


class SinkControl:
    """The control port of ``bench.sinks``: reset the records, wait for messages."""

    def __init__(self, port: int) -> None:
        self._conn = socket.create_connection(("127.0.0.1", port))
        self._lines = self._conn.makefile("rwb")

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self._lines.write(json.dumps(request).encode() + b"\n")
        self._lines.flush()
        answer: dict[str, Any] = json.loads(self._lines.readline())
        return answer

    def reset(self, *, delay: float, fail_rate: float = 0.0) -> None:
        self._ask({"op": "reset", "delay": delay, "fail_rate": fail_rate})

    def wait(self, distinct: int, *, timeout: float) -> SinkStats:
        answer = self._ask({"op": "wait", "count": distinct, "timeout": timeout})
        return SinkStats(
            answer["distinct"],
            answer["refused"],
            answer["first"],
            answer["last"],
            answer["latencies"],
            answer["cpu"],
        )

    def close(self) -> None:
        self._lines.close()
        self._conn.close()


@dataclass
class Bench:
    """What scenarios share: sizes, the sink process, a scratch directory, server starters."""

    work: Path
    sizes: Sizes
    sinks: SinkControl
    smtp_port: int
    http_port: int
    ca_file: Path
    log: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr))
    _ids: Iterator[int] = field(default_factory=count)

    @property
    def sms_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/webservice/sms.php?method=Submit"

    def channel_settings(self) -> dict[str, str]:
        """Both channels pointed at the sinks: SMTP with the sink's CA, SMS as ihuyi."""
        return {
            "NOTIFIER_SMTP_HOST": "127.0.0.1",
            "NOTIFIER_SMTP_PORT": str(self.smtp_port),
            "NOTIFIER_SMTP_SECURITY": "ssl",
            "NOTIFIER_SMTP_CA_FILE": str(self.ca_file),
            "NOTIFIER_SMTP_FROM": "Bench <bench@example.com>",
            "NOTIFIER_SMS_PROVIDER": "ihuyi",
            "NOTIFIER_SMS_URL": self.sms_url,
            "NOTIFIER_SMS_ACCOUNT": "bench",
            "NOTIFIER_SMS_API_KEY": "bench-key",
        }

    @contextmanager
    def notifier(self, *, tuned: bool = True, **settings: str) -> Iterator[Served]:
        """``notifier serve`` in its own process, on a fresh SQLite file and a free port;
        with the bench's NOTIFIER_SETTINGS unless ``tuned`` is false (defaults only)."""
        port = free_port()
        home = self.work / f"notifier-{next(self._ids)}"
        home.mkdir()
        env = {
            "NOTIFIER_PORT": str(port),
            "NOTIFIER_HTTP_PORT": "0",
            "NOTIFIER_DATABASE_URL": f"sqlite:///{home}/notifier.db",
            "NOTIFIER_OUTBOX_DIR": str(home / "outbox"),
            "NOTIFIER_TEMPLATES_DIR": str(home / "templates"),
            **(NOTIFIER_SETTINGS if tuned else {}),
            **settings,
        }
        argv = [sys.executable, "-m", "notifier", "serve"]
        with Child("notifier", argv, ports=[port], log_dir=home, env=env, cwd=home) as child:
            yield Served(port, child)

    @contextmanager
    def bare(self, kind: Literal["streams", "protocol"]) -> Iterator[Served]:
        port = free_port()
        with Child(
            f"bare-{kind}", bench_module("bare", kind, port), ports=[port], log_dir=self.work
        ) as child:
            yield Served(port, child)


@dataclass
class Served:
    port: int
    child: Child
