"""The AIMD window on its own: an injected clock, tasks for callers, no servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from notifier.channels.aimd import AIMDWindow, Slot
from tests.support.waiting import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def window(clock: FakeClock, *, floor: int = 2, ceiling: int = 8) -> AIMDWindow:
    return AIMDWindow(floor=floor, ceiling=ceiling, prompt=1.0, clock=clock)


async def held(window: AIMDWindow, count: int, stack: AsyncExitStack) -> list[Slot]:
    return [await stack.enter_async_context(window.slot()) for _ in range(count)]


async def queued(limits: AIMDWindow, stack: AsyncExitStack) -> asyncio.Task[list[Slot]]:
    """A caller waiting for a slot of the full window."""
    task = asyncio.create_task(held(limits, 1, stack))
    await wait_for(lambda: limits.waiting == 1, what="a waiter")
    return task


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def test_it_starts_at_the_floor_and_makes_the_next_caller_wait(
    clock: FakeClock, stack: AsyncExitStack
) -> None:
    limits = window(clock)
    await held(limits, 2, stack)

    third = await queued(limits, stack)

    assert limits.size == 2 and limits.in_use == 2
    assert not third.done()
    third.cancel()


async def test_a_prompt_success_under_demand_grows_it_by_one(
    clock: FakeClock, stack: AsyncExitStack
) -> None:
    limits = window(clock)
    first, second = await held(limits, 2, stack)  # full: demand

    first.succeeded()
    assert limits.size == 3
    second.succeeded()  # a slot is free now: no demand

    assert limits.size == 3


async def test_after_push_back_it_grows_by_one_per_window(
    clock: FakeClock, stack: AsyncExitStack
) -> None:
    limits = window(clock)
    async with limits.slot() as refused:
        refused.overloaded()  # at the floor already, but the window has seen push-back
    first, second = await held(limits, 2, stack)

    first.succeeded()
    assert limits.size == 2  # half a window's worth
    second.succeeded()

    assert limits.size == 3


async def test_it_does_not_grow_without_demand_or_when_answers_are_slow(
    clock: FakeClock, stack: AsyncExitStack
) -> None:
    limits = window(clock)
    (alone,) = await held(limits, 1, stack)
    for _ in range(10):
        alone.succeeded()
    slow = await stack.enter_async_context(limits.slot())
    clock.now += 1.5
    for _ in range(10):
        slow.succeeded()

    assert limits.size == 2


async def test_growth_stops_at_the_ceiling_and_lets_waiters_in(
    clock: FakeClock, stack: AsyncExitStack
) -> None:
    limits = window(clock, ceiling=3)
    slots = await held(limits, 2, stack)
    waiter = await queued(limits, stack)

    for _ in range(20):
        slots[0].succeeded()

    assert limits.size == 3
    await asyncio.wait_for(waiter, 5)
    assert limits.in_use == 3


async def grown(limits: AIMDWindow, size: int, stack: AsyncExitStack) -> list[Slot]:
    """Slots filling the window, with prompt successes until it has ``size`` of them."""
    slots = await held(limits, limits.size, stack)
    while limits.size < size:
        slots += await held(limits, limits.size - limits.in_use, stack)
        slots[-1].succeeded()
    return slots + await held(limits, limits.size - limits.in_use, stack)


async def test_one_episode_of_push_back_halves_it_once(clock: FakeClock) -> None:
    limits = window(clock, ceiling=16)
    async with AsyncExitStack() as crowd_stack:
        crowd = await grown(limits, 8, crowd_stack)
        assert limits.size == len(crowd) == 8

        for slot in crowd:
            slot.overloaded()  # all taken before the decrease: one episode

        assert limits.size == 4
    async with limits.slot() as later:
        later.overloaded()  # taken after it: a new episode

    assert limits.size == 2


async def test_it_never_shrinks_below_the_floor(clock: FakeClock) -> None:
    limits = window(clock, floor=3)
    for _ in range(3):
        async with limits.slot() as slot:
            slot.overloaded()

    assert limits.size == 3


async def test_a_cancelled_waiter_gives_its_place_away(
    clock: FakeClock, stack: AsyncExitStack
) -> None:
    limits = window(clock)
    await held(limits, 2, stack)
    doomed = await queued(limits, stack)

    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)

    assert limits.waiting == 0 and limits.in_use == 2


@pytest.mark.parametrize(("floor", "ceiling"), [(0, 4), (5, 4)])
def test_bad_bounds_are_refused(floor: int, ceiling: int) -> None:
    with pytest.raises(ValueError, match="floor <= ceiling"):
        AIMDWindow(floor=floor, ceiling=ceiling, prompt=1.0)
