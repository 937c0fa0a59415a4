"""Scenarios 4, 5, 6 and 8: delivery into the sinks, notifier against one-call-per-message.

Throughput is messages over the time from the first send to the last distinct message the
sink accepted (a message retried after a fault counts once). notifier gets all its jobs over
one pipelined connection and delivers them with the settings in ``harness``; the baselines
send one message per call, one after another, as the common code does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bench import baselines
from bench.harness import FAULT_SETTINGS, Bench, Run, Sample, Scenario, Target, percentiles
from bench.jobs import email_job, sms_job
from bench.loadgen import drive, paced

#: How long the sinks take to answer, as providers do: SMTP DATA, the SMS gateway's POST.
SMTP_DELAY = 0.020
SMS_DELAY = 0.050
FAULT_RATE = 0.10

NOTIFIER = "notifier"
SMTPLIB = "smtplib.SMTP_SSL per message"
REQUESTS = "requests.post per message"
APPRISE_EMAIL = "Apprise mailtos:// per message"
APPRISE_FORM = "Apprise form:// per message"
CLEAN = "notifier, no faults"
FAULTY = "notifier, 10% answered 451"
E2E_EMAIL = "notifier, email"
E2E_SMS = "notifier, sms (ihuyi)"


def _delivered(
    bench: Bench,
    count: int,
    send_all: Callable[[], object],
    *,
    delay: float,
    fail_rate: float = 0.0,
    timeout: float = 300.0,
) -> Sample:
    bench.sinks.reset(delay=delay, fail_rate=fail_rate)
    started = time.monotonic()
    send_all()
    seen = bench.sinks.wait(count, timeout=timeout)
    elapsed = (seen.last or time.monotonic()) - started
    bench.log(f"  {count} messages in {elapsed:.2f}s, sink CPU {seen.cpu:.2f}s")
    rate = seen.distinct / elapsed
    return Sample(count, rate, missing=count - seen.distinct)


def _submit(port: int, lines: list[bytes]) -> None:
    load = asyncio.run(drive(port, lines, connections=1, window=100))
    if load.errors:
        raise RuntimeError(f"notifier refused {load.errors} of {len(lines)} jobs")


def via_notifier(
    bench: Bench,
    job: Callable[[int], bytes],
    count: int,
    *,
    delay: float,
    fail_rate: float = 0.0,
    **settings: str,
) -> Sample:
    lines = [job(number) for number in range(count)]
    with bench.notifier(**bench.channel_settings(), **settings) as served:
        send_all = lambda: _submit(served.port, lines)  # noqa: E731
        return _delivered(bench, count, send_all, delay=delay, fail_rate=fail_rate)


def one_by_one(bench: Bench, send: baselines.Send, count: int, *, delay: float) -> Sample:
    def send_all() -> None:
        for number in range(count):
            send(number)

    return _delivered(bench, count, send_all, delay=delay)


def email(bench: Bench) -> Run:
    sizes = bench.sizes
    smtplib_send = baselines.smtplib_per_message(bench.smtp_port, bench.ca_file)
    with baselines.trusting(bench.ca_file):
        apprise_send = baselines.apprise_email(bench.smtp_port)
        apprise = one_by_one(bench, apprise_send, sizes.email_per_message, delay=SMTP_DELAY)
    return {
        NOTIFIER: via_notifier(bench, email_job, sizes.email, delay=SMTP_DELAY),
        SMTPLIB: one_by_one(bench, smtplib_send, sizes.email_per_message, delay=SMTP_DELAY),
        APPRISE_EMAIL: apprise,
    }


def sms(bench: Bench) -> Run:
    sizes = bench.sizes
    requests_send = baselines.requests_per_message(bench.sms_url)
    apprise_send = baselines.apprise_form(bench.http_port)
    return {
        NOTIFIER: via_notifier(bench, sms_job, sizes.sms, delay=SMS_DELAY),
        REQUESTS: one_by_one(bench, requests_send, sizes.sms_per_message, delay=SMS_DELAY),
        APPRISE_FORM: one_by_one(bench, apprise_send, sizes.sms_per_message, delay=SMS_DELAY),
    }


def faults(bench: Bench) -> Run:
    count = bench.sizes.email
    return {
        name: via_notifier(
            bench, email_job, count, delay=SMTP_DELAY, fail_rate=fail_rate, **FAULT_SETTINGS
        )
        for name, fail_rate in ((CLEAN, 0.0), (FAULTY, FAULT_RATE))
    }


def _latency(bench: Bench, job: Callable[..., bytes], *, delay: float) -> Sample:
    """Jobs at a steady rate; at the sink, arrival minus the moment each was sent."""
    count, rate = bench.sizes.e2e_jobs, bench.sizes.e2e_rate
    bench.sinks.reset(delay=delay)
    with bench.notifier(**bench.channel_settings()) as served:
        make = lambda number: job(number, sent=time.monotonic())  # noqa: E731
        asyncio.run(paced(served.port, make, count=count, rate=rate))
        seen = bench.sinks.wait(count, timeout=60)
    p50, p99 = percentiles(seen.latencies)
    return Sample(count, rate, p50, p99, missing=count - seen.distinct)


def end_to_end(bench: Bench) -> Run:
    return {
        E2E_EMAIL: _latency(bench, email_job, delay=SMTP_DELAY),
        E2E_SMS: _latency(bench, sms_job, delay=SMS_DELAY),
    }


def _faster(times: float, *labelled: str) -> tuple[Target, ...]:
    """notifier's throughput at least ``times`` that of each (label, contender) pair."""
    pairs = zip(labelled[::2], labelled[1::2], strict=True)
    return tuple(
        Target(f"notifier >= {times:g}x {label}", NOTIFIER, "rate", other, at_least=times)
        for label, other in pairs
    )


SCENARIOS = (
    Scenario(
        "4",
        "email: SMTP implicit TLS, each DATA answered after 20 ms",
        email,
        _faster(10, "smtplib", SMTPLIB, "Apprise", APPRISE_EMAIL),
    ),
    Scenario(
        "5",
        "SMS: ihuyi gateway answering after 50 ms",
        sms,
        _faster(20, "requests", REQUESTS, "Apprise", APPRISE_FORM),
    ),
    Scenario(
        "6",
        "end to end: sent to received at the sink, steady 200 jobs/s",
        end_to_end,
        (
            Target("email p99 < 100 ms", E2E_EMAIL, "p99", at_most=100),
            Target("sms p99 < 100 ms", E2E_SMS, "p99", at_most=100),
        ),
    ),
    Scenario(
        "8",
        "faults: email with 10% of DATA answered 451",
        faults,
        (
            Target("faults >= 0.8x no-fault throughput", FAULTY, "rate", CLEAN, at_least=0.8),
            Target("every message delivered (missing)", FAULTY, "missing", at_most=0),
        ),
    ),
)
