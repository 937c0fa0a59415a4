"""A circuit breaker per provider: stop knocking on a door that keeps failing.

After ``failures`` transient failures in a row the circuit opens and ``allow()`` says no,
so deliveries go elsewhere (or wait for their retry) at once instead of each paying a
timeout. After ``open_seconds`` one probe is let through (half-open): its success closes the
circuit, its failure opens it for another ``open_seconds``. A probe that never reports (its
task cancelled) does not hold the circuit half-open for ever: after another ``open_seconds``
the next caller probes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError(f"circuit {name}: failures must be at least 1, got {failures}")
        if open_seconds < 0:
            raise ValueError(f"circuit {name}: open_seconds must not be negative")
        self.name = name
        self._threshold = failures
        self._open_seconds = open_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing_since: float | None = None

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._probing_since is not None or self._due(self._opened_at):
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """Whether a call may go through now; in half-open, only the probe does."""
        if self._opened_at is None:
            return True
        since = self._probing_since if self._probing_since is not None else self._opened_at
        if not self._due(since):
            return False
        self._probing_since = self._clock()
        return True

    def record_success(self) -> None:
        if self._opened_at is not None:
            log.info("circuit %s closed: the probe succeeded", self.name)
        self._failures = 0
        self._opened_at = None
        self._probing_since = None

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing_since is not None or (
            self._opened_at is None and self._failures >= self._threshold
        ):
            log.warning(
                "circuit %s open for %gs after %d failures in a row",
                self.name,
                self._open_seconds,
                self._failures,
            )
            self._opened_at = self._clock()
            self._probing_since = None

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state!r})"

    def _due(self, since: float) -> bool:
        return self._clock() - since >= self._open_seconds
