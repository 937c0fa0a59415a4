"""A concurrency window that adapts the way TCP's congestion window does (AIMD).

A fixed pool is either too small for a fast relay or too large for one that limits its
clients, so the number of sessions (or requests) in flight moves between a floor and a
ceiling. While every slot is taken (callers wait) and answers come promptly it grows: by one
per success until the far end first pushes back (TCP's slow start, so a fresh window reaches
a fast relay's pace within a few rounds), then by one per window's worth of successes
(congestion avoidance, so it does not hammer a relay that just refused). It halves when the
far end pushes back: a refusal, a failed connection, a timeout. Postfix starts each
destination at 2 sessions for the same reason.

One push-back episode shrinks the window once: a failure counts only if its slot was taken
after the last decrease, so ten sessions refused at the same moment halve the window once,
not ten times::

    window = AIMDWindow(floor=2, ceiling=32, prompt=3.0)
    async with window.slot() as slot:
        ...                     # one transaction
        slot.succeeded()        # or slot.overloaded()

A slot that reports neither (a refusal of the message itself) leaves the window as it is.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class AIMDWindow:
    """How many slots may be in use at once, adapted to the far end's answers."""

    def __init__(
        self,
        *,
        floor: int,
        ceiling: int,
        prompt: float,
        decrease: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"AIMD window: need 1 <= floor <= ceiling, got {floor}, {ceiling}")
        if not 0 < decrease < 1:
            raise ValueError(f"AIMD window: decrease must be between 0 and 1, got {decrease}")
        self.floor = floor
        self.ceiling = ceiling
        self.prompt = prompt
        self._decrease = decrease
        self._clock = clock
        self._limit = float(floor)
        self._epoch = 0
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def size(self) -> int:
        """Slots that may be in use at once now."""
        return int(self._limit)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Wait for a free slot and hold it for the block."""
        await self._acquire()
        try:
            yield Slot(self, self._epoch, self._clock())
        finally:
            self.in_use -= 1
            self._wake()

    def __repr__(self) -> str:
        return f"AIMDWindow(size={self.size}, in_use={self.in_use}, waiting={self.waiting})"

    async def _acquire(self) -> None:
        if self.in_use < self.size and not self._waiters:
            self.in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.in_use -= 1  # granted and cancelled at once: hand the slot on
                self._wake()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.size:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)

    def _grow(self, slot: Slot) -> None:
        in_demand = bool(self._waiters) or self.in_use >= self.size
        if in_demand and self._clock() - slot.started <= self.prompt:
            step = 1.0 if self._epoch == 0 else 1 / self.size
            self._limit = min(float(self.ceiling), self._limit + step)
            self._wake()

    def _shrink(self, slot: Slot) -> None:
        if slot.epoch == self._epoch:
            self._limit = max(float(self.floor), self._limit * self._decrease)
            self._epoch += 1


class Slot:
    """One slot of a window, taken at ``started``; reports how its use went."""

    __slots__ = ("_window", "epoch", "started")

    def __init__(self, window: AIMDWindow, epoch: int, started: float) -> None:
        self._window = window
        self.epoch = epoch
        self.started = started

    def succeeded(self) -> None:
        """The far end answered: grow, if callers wait and the answer came promptly."""
        self._window._grow(self)

    def overloaded(self) -> None:
        """The far end pushed back or failed: shrink, once per episode."""
        self._window._shrink(self)
