"""LISTEN on one dedicated connection, outside the pool, reconnecting when it drops.

A pooled connection would lose its LISTEN whenever it is reset or replaced, so the listener
owns its own. A drop is noticed at once through asyncpg's termination callback, and a
silently dead connection by a periodic ``SELECT 1``. After every (re)connect the callback
runs once, because notifications sent while nobody listened are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

log = logging.getLogger("notifier.store.postgres")

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class Listener:
    def __init__(
        self,
        connect: Connect,
        channel: str,
        callback: Callable[[], None],
        *,
        check_interval: float,
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self._connect = connect
        self._channel = channel
        self._callback = callback
        self._check_interval = check_interval
        self._errors = errors
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="postgres-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._listen()
                delay = 0.1
            except self._errors as exc:
                log.warning("listener: %s; reconnecting in %.1fs", exc, delay)
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._check_interval)

    async def _listen(self) -> None:
        """Listen until the connection is lost (returns) or fails (raises)."""
        lost = asyncio.Event()
        conn = await self._connect()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(self._channel, self._on_notification)
            self.connected.set()
            self._callback()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self._check_interval)
                if not lost.is_set():
                    await conn.fetchval("SELECT 1", timeout=self._check_interval)
            log.warning("listener: connection lost")
        finally:
            conn.terminate()

    def _on_notification(self, *_args: Any) -> None:
        self._callback()
