"""A circuit breaker per provider, so a channel with several stops waiting on a dead one.

Closed: every send goes through; ``failures`` consecutive transient failures open it (a
provider that refuses our account opens it at once, ``trip``). Open: nothing goes through
for ``open_seconds``. Then half-open: one probe goes through; its success closes the
circuit, its failure opens it again. A probe that never reports (its delivery was
cancelled) frees the way for another after ``open_seconds``, so the circuit cannot stick.

State lives in memory, per instance: each instance learns on its own that a provider is
down, which costs at most ``failures`` attempts each. Every transition is logged and the
state is read by ``notifier_circuit_state`` (``Metrics.track_circuits``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import IntEnum

log = logging.getLogger("notifier.circuit")


class CircuitState(IntEnum):
    """The values are those of the ``notifier_circuit_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        open_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or open_seconds <= 0:
            raise ValueError("a circuit needs failures >= 1 and open_seconds > 0")
        self.name = name
        self.failures = failures
        self.open_seconds = open_seconds
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_at: float | None = None

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self.reopens_in() == 0.0:
            self._move(
                CircuitState.HALF_OPEN, "open for %gs, the next send is a probe", self.open_seconds
            )
        return self._state

    def reopens_in(self) -> float:
        """Seconds until an open circuit lets a probe through; 0 when it would now."""
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.open_seconds - self._clock())

    def allow(self) -> bool:
        """May a send go through now? In half-open, only one (the probe) at a time."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        now = self._clock()
        if self._probe_at is not None and now - self._probe_at < self.open_seconds:
            return False
        self._probe_at = now
        return True

    def succeeded(self) -> None:
        """The provider answered (even to refuse the message): it is up."""
        self._consecutive = 0
        if self._state is not CircuitState.CLOSED:
            self._move(CircuitState.CLOSED, "a send went through")

    def failed(self, reason: str) -> None:
        """A transient failure: count it; a failed probe opens the circuit again."""
        self._consecutive += 1
        if self._state is CircuitState.HALF_OPEN:
            self._open(f"the probe failed: {reason}")
        elif self._state is CircuitState.CLOSED and self._consecutive >= self.failures:
            self._open(f"{self._consecutive} consecutive failures, the last: {reason}")

    def trip(self, reason: str) -> None:
        """The provider refused our account: open now, whatever the count."""
        self._open(reason)

    def _open(self, reason: str) -> None:
        self._opened_at = self._clock()
        if self._state is CircuitState.OPEN:
            return
        self._move(CircuitState.OPEN, "%s; open for %gs", reason, self.open_seconds)

    def _move(self, state: CircuitState, why: str, *args: object) -> None:
        self._state = state
        self._probe_at = None
        level = logging.INFO if state is CircuitState.CLOSED else logging.WARNING
        log.log(
            level,
            "circuit %s %s: " + why,
            self.name,
            state.name.lower().replace("_", "-"),
            *args,
            extra={"provider": self.name, "circuit": state.name.lower()},
        )
