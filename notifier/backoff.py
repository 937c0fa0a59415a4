"""Waits between attempts, shared by deliveries and callbacks."""

from __future__ import annotations

import tenacity


class Backoff:
    """Exponential backoff with jitter (tenacity's wait strategies), capped, except that a
    provider's Retry-After is honoured even when it is longer than the cap."""

    def __init__(self, base: float, cap: float) -> None:
        self.cap = cap
        self._wait = tenacity.wait_exponential(multiplier=base, max=cap) + tenacity.wait_random(
            0, base
        )
        self._retrying = tenacity.AsyncRetrying()

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        state = tenacity.RetryCallState(self._retrying, None, (), {})
        state.attempt_number = attempt
        return max(min(self._wait(state), self.cap), retry_after or 0.0)
