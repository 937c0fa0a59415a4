"""Scenarios 1, 2, 3 and 7: how fast notifier answers ``send``, and what a backlog costs.

Every job carries ``send_at`` far in the future, so nothing is delivered while intake is
measured: the jobs are validated, stored durably (SQLite, group commit) and answered, and
the dispatcher has nothing due. The bare servers get the same lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager

from bench.harness import Bench, Run, Sample, Scenario, Served, Target, percentiles
from bench.jobs import email_job
from bench.loadgen import drive
from bench.marks import FAR_FUTURE

NOTIFIER = "notifier (SQLite, durable)"
STREAMS = "bare asyncio streams"
PROTOCOL = "bare asyncio.Protocol"
SMALL = "notifier, small backlog"
LARGE = "notifier, large backlog"

Start = Callable[[], AbstractContextManager[Served]]


def _lines(count: int) -> list[bytes]:
    return [email_job(number, send_at=FAR_FUTURE) for number in range(count)]


def _load(start: Start, lines: list[bytes], *, connections: int, window: int) -> Sample:
    with start() as served:
        load = asyncio.run(drive(served.port, lines, connections=connections, window=window))
        rss = served.child.peak_rss_mib()
    p50, p99 = percentiles(load.latencies)
    return Sample(len(lines), load.rate, p50, p99, rss, missing=load.errors)


def _side_by_side(bench: Bench, count: int, *, connections: int, window: int) -> Run:
    lines = _lines(count)
    servers: dict[str, Start] = {
        NOTIFIER: bench.notifier,
        STREAMS: lambda: bench.bare("streams"),
        PROTOCOL: lambda: bench.bare("protocol"),
    }
    return {
        name: _load(start, lines, connections=connections, window=window)
        for name, start in servers.items()
    }


def pipelined(bench: Bench) -> Run:
    return _side_by_side(bench, bench.sizes.pipelined, connections=1, window=100)


def concurrent(bench: Bench) -> Run:
    return _side_by_side(bench, bench.sizes.concurrent, connections=50, window=10)


def one_at_a_time(bench: Bench) -> Run:
    return _side_by_side(bench, bench.sizes.one_at_a_time, connections=1, window=1)


def backlog(bench: Bench) -> Run:
    sizes = {SMALL: bench.sizes.small_backlog, LARGE: bench.sizes.backlog}
    return {
        name: _load(bench.notifier, _lines(count), connections=1, window=100)
        for name, count in sizes.items()
    }


VERSUS_BARE = (
    Target("notifier >= 0.5x bare streams", NOTIFIER, "rate", STREAMS, at_least=0.5),
    Target("notifier >= 0.25x bare Protocol (reach)", NOTIFIER, "rate", PROTOCOL, at_least=0.25),
)

SCENARIOS = (
    Scenario("1", "intake, pipelined: 1 connection, 100 in flight", pipelined, VERSUS_BARE),
    Scenario(
        "2",
        "intake, concurrent: 50 connections, 10 in flight each",
        concurrent,
        VERSUS_BARE,
    ),
    Scenario("3", "intake, one at a time: 1 connection, 1 in flight", one_at_a_time),
    Scenario(
        "7",
        "memory: peak RSS with a backlog waiting (send_at far ahead)",
        backlog,
        (Target("large backlog within 1.5x small backlog RSS", LARGE, "rss", SMALL, at_most=1.5),),
        max_runs=1,
    ),
)
