"""Waiting on conditions, never on time: poll until true or fail with a clear message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def wait_for(
    condition: Callable[[], Awaitable[T | None]], *, timeout: float = ..., what: str = ...
) -> T: ...


@overload
async def wait_for(
    condition: Callable[[], T | None], *, timeout: float = ..., what: str = ...
) -> T: ...


async def wait_for(
    condition: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Return the first truthy value of ``condition()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def wait_for_sync(
    condition: Callable[[], T | None], *, timeout: float = 10.0, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value
