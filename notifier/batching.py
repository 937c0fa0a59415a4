"""Group commit: requests that arrive together share one store transaction.

Many connections (or one pipelining connection) submit items; one flusher task writes
whatever has gathered in a single call, and while that commit runs the next batch gathers.
Durability then costs one fsync per batch, not per job, with no added wait when idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self, flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *, max_size: int = 1000
    ) -> None:
        self._flush = flush
        self._max_size = max_size
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    def put(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves once it is part of a flushed batch.

        Cancelling the future does not take the item back: it is flushed all the same.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="batcher-flush")
        return future

    async def _run(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_size]
                del self._pending[: self._max_size]
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._task = None

    async def drain(self) -> None:
        """Wait until everything submitted so far is flushed (for shutdown)."""
        while self._task is not None:
            await asyncio.shield(self._task)
