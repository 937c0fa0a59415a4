"""A TCP proxy that loses answers: the request reaches the server, its answer never comes back.

That is the failure a client's safe retry exists for: the server has stored the job (it
answered), but the client cannot know. ``DroppingProxy`` forwards bytes both ways and cuts
the first connection after it has forwarded ``forward`` answer lines, when the next one
arrives; that answer is kept in ``dropped`` for the test to check. Later connections pass
through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any


class LocalProxy:
    """A listener on 127.0.0.1 (port 0) that hands each connection to ``_serve``, which
    registers its task in ``_tasks`` so that ``stop`` can cut it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @staticmethod
    async def _relay(
        requests: Coroutine[Any, Any, None],
        answers: Coroutine[Any, Any, None],
        upstream: asyncio.StreamWriter,
    ) -> None:
        """Pass ``answers`` on while ``requests`` run beside them; then cut the upstream."""
        pumping = asyncio.create_task(requests)
        try:
            await answers
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
            upstream.transport.abort()


class DroppingProxy(LocalProxy):
    def __init__(self, upstream_port: int, *, forward: int) -> None:
        super().__init__(upstream_port)
        self.forward = forward
        self.connections = 0
        self.dropped: list[bytes] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut_after = self.forward if self.connections == 1 else None
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port, limit=2**24
        )
        await self._relay(
            _pipe(reader, up_writer), self._answers(up_reader, writer, cut_after), up_writer
        )

    async def _answers(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut_after: int | None
    ) -> None:
        forwarded = 0
        while line := await reader.readline():
            if forwarded == cut_after:
                self.dropped.append(line)
                return
            writer.write(line)
            await writer.drain()
            forwarded += 1


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@asynccontextmanager
async def dropping_proxy(upstream_port: int, *, forward: int = 0) -> AsyncIterator[DroppingProxy]:
    proxy = DroppingProxy(upstream_port, forward=forward)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
