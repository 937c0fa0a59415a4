"""Scenarios 9, 10 and 11: what version 1.1 costs and gives, each compared within one run.

9. Callbacks: SMS throughput with a ``job.final`` callback per job (into a local receiver
   that answers at once) beside the same run without callbacks.
10. Priority: a backlog of normal email waits to go out through the 20 ms relay while high
    email arrives at a steady rate; the high jobs' latency from send to the sink.
11. Defaults: email and SMS delivered by a notifier on its own defaults (no tuned setting),
    beside the seed-style code (one ``smtplib.SMTP_SSL`` / ``requests.post`` per message).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench import baselines
from bench.delivery import (
    REQUESTS,
    SMS_DELAY,
    SMTP_DELAY,
    SMTPLIB,
    _delivered,
    _submit,
    one_by_one,
    via_notifier,
)
from bench.harness import Bench, Run, Sample, Scenario, Target, percentiles
from bench.jobs import email_job, sms_job
from bench.loadgen import paced

WITH_CALLBACKS = "notifier, a callback per job"
WITHOUT_CALLBACKS = "notifier, no callbacks"
HIGH = "notifier, high jobs behind a normal backlog"
DEFAULT_EMAIL = "notifier email, defaults only"
DEFAULT_SMS = "notifier sms, defaults only"


class _Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.posts += 1  # type: ignore[attr-defined]
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@contextmanager
def callback_receiver() -> Iterator[ThreadingHTTPServer]:
    """An app's callback endpoint on 127.0.0.1 that answers every POST with 204."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.daemon_threads = True
    server.request_queue_size = 1024
    server.posts = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def callbacks(bench: Bench) -> Run:
    count = bench.sizes.sms
    with callback_receiver() as receiver:
        host, port = receiver.server_address[:2]
        hook = f"http://{host!s}:{port}/hooks"
        with_hooks = via_notifier(
            bench, sms_job, count, delay=SMS_DELAY, NOTIFIER_CALLBACK_URL=hook
        )
    without = via_notifier(bench, sms_job, count, delay=SMS_DELAY)
    return {WITH_CALLBACKS: with_hooks, WITHOUT_CALLBACKS: without}


def priority(bench: Bench) -> Run:
    sizes = bench.sizes
    backlog = [email_job(number) for number in range(sizes.priority_backlog)]
    first_high = sizes.priority_backlog
    bench.sinks.reset(delay=SMTP_DELAY)
    with bench.notifier(**bench.channel_settings()) as served:
        _submit(served.port, backlog)

        def urgent(number: int) -> bytes:
            return email_job(first_high + number, sent=time.monotonic(), priority="high")

        asyncio.run(paced(served.port, urgent, count=sizes.priority_jobs, rate=sizes.priority_rate))
        seen = bench.sinks.wait(sizes.priority_backlog + sizes.priority_jobs, timeout=300)
    p50, p99 = percentiles(seen.latencies)
    missing = sizes.priority_backlog + sizes.priority_jobs - seen.distinct
    bench.log(f"  high jobs: p50 {p50:.0f} ms, p99 {p99:.0f} ms behind {len(backlog)} normal")
    return {HIGH: Sample(sizes.priority_jobs, sizes.priority_rate, p50, p99, missing=missing)}


def _on_defaults(bench: Bench, job: Callable[[int], bytes], count: int, *, delay: float) -> Sample:
    lines = [job(number) for number in range(count)]
    with bench.notifier(tuned=False, **bench.channel_settings()) as served:
        return _delivered(bench, count, lambda: _submit(served.port, lines), delay=delay)


def defaults(bench: Bench) -> Run:
    sizes = bench.sizes
    smtplib_send = baselines.smtplib_per_message(bench.smtp_port, bench.ca_file)
    requests_send = baselines.requests_per_message(bench.sms_url)
    return {
        DEFAULT_EMAIL: _on_defaults(bench, email_job, sizes.email, delay=SMTP_DELAY),
        SMTPLIB: one_by_one(bench, smtplib_send, sizes.email_per_message, delay=SMTP_DELAY),
        DEFAULT_SMS: _on_defaults(bench, sms_job, sizes.sms, delay=SMS_DELAY),
        REQUESTS: one_by_one(bench, requests_send, sizes.sms_per_message, delay=SMS_DELAY),
    }


SCENARIOS = (
    Scenario(
        "9",
        "callbacks: SMS with a job.final callback per job vs none",
        callbacks,
        (
            Target(
                "callbacks on >= 0.8x off", WITH_CALLBACKS, "rate", WITHOUT_CALLBACKS, at_least=0.8
            ),
        ),
    ),
    Scenario(
        "10",
        "priority: high email at 20/s behind a normal backlog, 20 ms relay",
        priority,
        (
            Target("high p99 < 1000 ms", HIGH, "p99", at_most=1000),
            Target("every message delivered (missing)", HIGH, "missing", at_most=0),
        ),
    ),
    Scenario(
        "11",
        "defaults only: email (20 ms relay) and SMS (50 ms gateway)",
        defaults,
        (
            Target("email >= 10x smtplib", DEFAULT_EMAIL, "rate", SMTPLIB, at_least=10),
            Target("sms >= 20x requests", DEFAULT_SMS, "rate", REQUESTS, at_least=20),
        ),
    ),
)
