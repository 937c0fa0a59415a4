"""Prometheus metrics, one registry per service so tests and embedded uses don't collide.

Counters move where the events happen (intake, dispatcher, server); queue depth is read from
the store when ``/metrics`` is scraped, so it is exact rather than a running guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from notifier.channels.aimd import AIMDWindow
from notifier.channels.circuit import CircuitBreaker
from notifier.models import JobStatus, Priority

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._circuits = _CircuitCollector()
        r.register(self._circuits)
        self.accepted = Counter(
            "notifier_jobs_accepted", "Jobs stored at intake.", ["channel"], registry=r
        )
        self.duplicates = Counter(
            "notifier_jobs_duplicate",
            "Sends answered with an existing job (idempotency key).",
            ["channel"],
            registry=r,
        )
        self.delivered = Counter(
            "notifier_jobs_delivered", "Jobs delivered.", ["channel", "provider"], registry=r
        )
        self.failed = Counter(
            "notifier_jobs_failed", "Jobs failed for good.", ["channel", "provider"], registry=r
        )
        self.retried = Counter(
            "notifier_jobs_retried",
            "Attempts that failed transiently and were rescheduled.",
            ["channel", "provider"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "notifier_queue_depth", "Jobs in the store by status.", ["status"], registry=r
        )
        self.queue_waiting = Gauge(
            "notifier_queue_waiting",
            "Jobs waiting to be sent (queued or retrying) by channel and priority.",
            ["channel", "priority"],
            registry=r,
        )
        self.intake_seconds = Histogram(
            "notifier_intake_seconds",
            "From a send request read to its job committed.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.accept_to_delivered_seconds = Histogram(
            "notifier_accept_to_delivered_seconds",
            "From a job accepted to it delivered.",
            ["channel"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "notifier_delivery_attempt_seconds",
            "One delivery attempt, by provider.",
            ["channel", "provider"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.open_connections = Gauge(
            "notifier_open_connections", "Open protocol connections.", registry=r
        )
        self.callbacks = Counter(
            "notifier_callbacks",
            "Callback POSTs by outcome: sent, retried, failed (given up).",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "notifier_requests_rejected",
            "Requests answered with an error, by code.",
            ["code"],
            registry=r,
        )
        self.receipts = Counter(
            "notifier_receipts",
            "Delivery reports taken from providers (ignored: an interim state, passed on to none).",
            ["provider", "state"],
            registry=r,
        )
        self.receipts_rejected = Counter(
            "notifier_receipts_rejected",
            "Requests to the receipts listener answered with an error, by reason.",
            ["provider", "reason"],
            registry=r,
        )
        self.smtp_sessions_window = Gauge(
            "notifier_smtp_sessions_window",
            "SMTP sessions a relay may have in use now (the adaptive window).",
            ["relay"],
            registry=r,
        )

    def track_circuits(self, circuits: Iterable[CircuitBreaker]) -> None:
        """Show these providers' circuits in ``notifier_circuit_state`` from now on."""
        self._circuits.circuits.extend(circuits)

    def watch_smtp_windows(self, windows: Mapping[str, AIMDWindow]) -> None:
        """Read each relay's window at scrape time (``Channel.windows``)."""
        for relay, window in windows.items():
            self.smtp_sessions_window.labels(relay).set_function(_size_of(window))

    def set_queue_depth(
        self, counts: dict[JobStatus, int], waiting: dict[tuple[str, Priority], int]
    ) -> None:
        for status, count in counts.items():
            self.queue_depth.labels(status.value).set(count)
        self.queue_waiting.clear()
        for (channel, priority), count in waiting.items():
            self.queue_waiting.labels(channel, priority.value).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CircuitCollector(Collector):
    """Reads each circuit when scraped: an open circuit turns half-open by the clock alone."""

    def __init__(self) -> None:
        self.circuits: list[CircuitBreaker] = []

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for circuit in self.circuits:
            family.add_metric([circuit.name], int(circuit.state))
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "notifier_circuit_state",
            "Each provider's circuit: 0 closed, 1 half-open, 2 open.",
            labels=["provider"],
        )


def _size_of(window: AIMDWindow) -> Callable[[], float]:
    return lambda: window.size
