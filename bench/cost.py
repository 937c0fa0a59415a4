"""Scenarios 12 to 16: what one job costs notifier, path by path, beside the bare clients.

Each run pipelines ``Sizes.cost`` jobs (10,000) into a fresh ``notifier serve`` over one
connection, 100 in flight, and times them until the sink has them all, the providers
answering at once: the SMS gateway and the SMTP relay of ``bench.sinks``, or the outbox
directory (``.eml`` files, ``sms.jsonl`` lines, timed by their modification times). Beside
the rate goes the CPU the notifier process (every thread) spent per job, from
``/proc/<pid>/stat`` (utime + stime) before and after.

The bare clients (``bench.baselines``) send the same messages into the same sink in the same
run, and their CPU per message is the bench process's own (``time.process_time``) while
they send. Intake alone (16) is compared with the bare asyncio-streams server, by the CPU
of each server process.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from pathlib import Path

from bench import baselines
from bench.delivery import _delivered, _submit
from bench.harness import Bench, Run, Sample, Scenario, Served, Target
from bench.jobs import email_job, sms_job
from bench.loadgen import drive
from bench.marks import FAR_FUTURE

NOTIFIER = "notifier"
AIOHTTP = "bare aiohttp, 32 in flight"
HTTPX_AIOHTTP = "bare httpx over httpx-aiohttp, 32 in flight"
HTTPX = "bare httpx, 32 in flight"
AIOSMTPLIB = "bare aiosmtplib, 16 reused sessions"
STREAMS = "bare asyncio streams"

SMS_IN_FLIGHT = 32
SMTP_SESSIONS = 16
#: How long a run may take before the sink counts what it has (a stall shows as missing).
TIMEOUT = 300.0

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of process ``pid``, all its threads, so far (``/proc``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


def _per_job(sample: Sample, seconds: float) -> Sample:
    sample.cpu = seconds / sample.size * 1e6
    return sample


def _measured(served: Served, measure: Callable[[], Sample]) -> Sample:
    """``measure()``'s sample with the CPU the served process spent meanwhile, per job."""
    before = cpu_seconds(served.child.pid)
    sample = measure()
    return _per_job(sample, cpu_seconds(served.child.pid) - before)


def _lines(job: Callable[..., bytes], count: int, **fields: str) -> list[bytes]:
    return [job(number, **fields) for number in range(count)]


def into_sink(bench: Bench, job: Callable[..., bytes], **settings: str) -> Sample:
    """``job``s delivered by notifier into the sinks, which answer at once."""
    count = bench.sizes.cost
    lines = _lines(job, count)
    with bench.notifier(**bench.channel_settings(), **settings) as served:
        send_all = lambda: _submit(served.port, lines)  # noqa: E731
        return _measured(served, lambda: _delivered(bench, count, send_all, delay=0.0))


def bare(bench: Bench, client: Callable[[int], Awaitable[None]]) -> Sample:
    """A bare client's ``client(count)`` into the sinks, with the CPU it spent per message."""
    count = bench.sizes.cost
    spent = 0.0

    def send_all() -> None:
        nonlocal spent
        before = time.process_time()
        asyncio.run(client(count))
        spent = time.process_time() - before

    return _per_job(_delivered(bench, count, send_all, delay=0.0), spent)


def _outbox_written(found: Callable[[], tuple[int, float]], count: int) -> tuple[int, float]:
    """Poll ``found()`` (how many written, when the last was) until ``count`` or time out."""
    deadline = time.monotonic() + TIMEOUT
    while (seen := found())[0] < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def _emails(folder: Path) -> Callable[[], tuple[int, float]]:
    def found() -> tuple[int, float]:
        if not folder.exists():
            return 0, 0.0
        files = [e for e in os.scandir(folder) if e.name.endswith(".eml")]
        return len(files), max((e.stat().st_mtime for e in files), default=0.0)

    return found


def _sms_lines(file: Path) -> Callable[[], tuple[int, float]]:
    def found() -> tuple[int, float]:
        if not file.exists():
            return 0, 0.0
        return file.read_bytes().count(b"\n"), file.stat().st_mtime

    return found


def into_outbox(
    bench: Bench,
    job: Callable[..., bytes],
    found: Callable[[Path], Callable[[], tuple[int, float]]],
) -> Sample:
    """``job``s delivered into the outbox (no provider configured, notifier's default)."""
    count = bench.sizes.cost
    lines = _lines(job, count)
    with bench.notifier() as served:
        outbox = served.child.cwd / "outbox"

        def measure() -> Sample:
            started = time.time()  # the files' modification times are wall-clock times
            _submit(served.port, lines)
            written, last = _outbox_written(found(outbox), count)
            return Sample(count, written / (last - started), missing=count - written)

        return _measured(served, measure)


def intake_only(bench: Bench, start: Callable[[], AbstractContextManager[Served]]) -> Sample:
    """Jobs due far ahead: validated, stored durably and answered, nothing delivered."""
    lines = _lines(email_job, bench.sizes.cost, send_at=FAR_FUTURE)
    with start() as served:

        def measure() -> Sample:
            load = asyncio.run(drive(served.port, lines, connections=1, window=100))
            return Sample(len(lines), load.rate, missing=load.errors)

        return _measured(served, measure)


def sms_gateway(bench: Bench) -> Run:
    url = bench.sms_url
    return {
        NOTIFIER: into_sink(bench, sms_job),
        AIOHTTP: bare(bench, lambda n: baselines.aiohttp_posts(url, n, in_flight=SMS_IN_FLIGHT)),
        HTTPX_AIOHTTP: bare(
            bench,
            lambda n: baselines.httpx_posts(
                url, n, in_flight=SMS_IN_FLIGHT, aiohttp_transport=True
            ),
        ),
        HTTPX: bare(
            bench,
            lambda n: baselines.httpx_posts(
                url, n, in_flight=SMS_IN_FLIGHT, aiohttp_transport=False
            ),
        ),
    }


def email_smtp(bench: Bench) -> Run:
    port, ca_file = bench.smtp_port, bench.ca_file
    return {
        NOTIFIER: into_sink(bench, email_job, NOTIFIER_SMTP_POOL_SIZE=str(SMTP_SESSIONS)),
        AIOSMTPLIB: bare(
            bench, lambda n: baselines.aiosmtplib_sessions(port, ca_file, n, sessions=SMTP_SESSIONS)
        ),
    }


def email_outbox(bench: Bench) -> Run:
    return {NOTIFIER: into_outbox(bench, email_job, lambda outbox: _emails(outbox / "email"))}


def sms_outbox(bench: Bench) -> Run:
    return {NOTIFIER: into_outbox(bench, sms_job, lambda outbox: _sms_lines(outbox / "sms.jsonl"))}


def intake(bench: Bench) -> Run:
    return {
        NOTIFIER: intake_only(bench, bench.notifier),
        STREAMS: intake_only(bench, lambda: bench.bare("streams")),
    }


def _versus(times: float, label: str, other: str) -> Target:
    return Target(f"notifier >= {times:g}x {label}", NOTIFIER, "rate", other, at_least=times)


SCENARIOS = (
    Scenario(
        "12",
        "cost per job: SMS into an ihuyi-style gateway answering at once",
        sms_gateway,
        (_versus(0.5, "bare aiohttp", AIOHTTP),),
    ),
    Scenario(
        "13",
        "cost per job: email into the SMTP sink (implicit TLS, 16 sessions)",
        email_smtp,
        (_versus(0.9, "raw aiosmtplib", AIOSMTPLIB),),
    ),
    Scenario(
        "14",
        "cost per job: email into the outbox (the default)",
        email_outbox,
        (Target("outbox email >= 1,920/s (4x issue 14's 480/s)", NOTIFIER, "rate", at_least=1920),),
    ),
    Scenario("15", "cost per job: SMS into the outbox", sms_outbox),
    Scenario(
        "16",
        "cost per job: intake only (durable, nothing due), 100 in flight",
        intake,
        (_versus(0.5, "bare streams", STREAMS),),
    ),
)
