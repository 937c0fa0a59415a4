"""The circuit breaker, on a clock the test moves: opening, the half-open probe, closing."""

from __future__ import annotations

import logging

import pytest

from notifier.channels.circuit import CircuitBreaker, CircuitState
from notifier.metrics import Metrics
from tests.support.clock import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, failures: int = 3, open_seconds: float = 30.0) -> CircuitBreaker:
    return CircuitBreaker("ihuyi", failures=failures, open_seconds=open_seconds, clock=clock)


def test_opens_after_consecutive_transient_failures_only(clock: Clock) -> None:
    circuit = breaker(clock)

    circuit.failed("HTTP 500")
    circuit.failed("HTTP 500")
    circuit.succeeded()  # the count starts again
    circuit.failed("HTTP 500")
    circuit.failed("timeout")
    assert circuit.state is CircuitState.CLOSED and circuit.allow()

    circuit.failed("timeout")

    assert circuit.state is CircuitState.OPEN
    assert not circuit.allow()
    assert circuit.reopens_in() == 30.0


def test_trip_opens_at_once(clock: Clock) -> None:
    circuit = breaker(clock)

    circuit.trip("code 405 (APIID or API key wrong)")

    assert circuit.state is CircuitState.OPEN


def test_half_open_lets_one_probe_through_and_its_success_closes(clock: Clock) -> None:
    circuit = breaker(clock, failures=1)
    circuit.failed("HTTP 503")

    clock.now += 29.9
    assert circuit.state is CircuitState.OPEN and not circuit.allow()
    clock.now += 0.1
    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.reopens_in() == 0.0

    assert circuit.allow()  # the probe
    assert not circuit.allow()  # nobody else while it is out
    circuit.succeeded()

    assert circuit.state is CircuitState.CLOSED
    assert circuit.allow() and circuit.allow()


def test_a_failed_probe_opens_again_for_the_full_time(clock: Clock) -> None:
    circuit = breaker(clock, failures=3)
    circuit.trip("balance too low")
    clock.now += 30
    assert circuit.allow()

    circuit.failed("balance too low")  # one failure is enough in half-open

    assert circuit.state is CircuitState.OPEN
    assert circuit.reopens_in() == 30.0


def test_a_probe_that_never_reports_frees_the_way_after_the_open_time(clock: Clock) -> None:
    circuit = breaker(clock, failures=1)
    circuit.failed("timeout")
    clock.now += 30
    assert circuit.allow()  # this probe's delivery is then cancelled: no verdict

    clock.now += 29
    assert not circuit.allow()
    clock.now += 1
    assert circuit.allow()


def test_transitions_are_logged(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    circuit = breaker(clock, failures=2)

    with caplog.at_level(logging.INFO, logger="notifier.circuit"):
        circuit.failed("HTTP 500")
        circuit.failed("HTTP 502")
        clock.now += 30
        assert circuit.state is CircuitState.HALF_OPEN
        circuit.succeeded()

    assert [r.getMessage() for r in caplog.records] == [
        "circuit ihuyi open: 2 consecutive failures, the last: HTTP 502; open for 30s",
        "circuit ihuyi half-open: open for 30s, the next send is a probe",
        "circuit ihuyi closed: a send went through",
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING, logging.INFO]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="failures >= 1"):
        CircuitBreaker("x", failures=0)


def test_metrics_show_each_circuit_as_it_is_when_scraped(clock: Clock) -> None:
    metrics = Metrics()
    ihuyi, twilio = breaker(clock, failures=1), CircuitBreaker("twilio", clock=clock)
    metrics.track_circuits([ihuyi, twilio])

    def state(provider: str) -> float | None:
        return metrics.registry.get_sample_value("notifier_circuit_state", {"provider": provider})

    assert (state("ihuyi"), state("twilio")) == (0, 0)
    ihuyi.failed("HTTP 500")
    assert state("ihuyi") == 2
    clock.now += 30
    assert state("ihuyi") == 1  # by the clock alone, no send needed
    assert b'notifier_circuit_state{provider="twilio"} 0.0' in metrics.render()
