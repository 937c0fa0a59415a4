"""The operations listener: /healthz, /readyz and /metrics over HTTP for orchestrators.

A small ASGI app served by uvicorn inside the service's own event loop, with uvicorn's
signal handling left out so the service keeps its own. It takes no jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import uvicorn

from notifier.metrics import Metrics
from notifier.store import Store, StoreUnavailable

log = logging.getLogger("notifier.ops")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class OpsApp:
    def __init__(self, store: Store, metrics: Metrics, accepting: Callable[[], bool]) -> None:
        self.store = store
        self.metrics = metrics
        self.accepting = accepting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n")
        elif path == "/healthz":
            await _respond(send, 200, b"ok\n")
        elif path == "/readyz":
            status, body = await self._readiness()
            await _respond(send, status, body)
        elif path == "/metrics":
            await self._metrics(send)
        else:
            await _respond(send, 404, b"not found: try /healthz, /readyz or /metrics\n")

    async def _readiness(self) -> tuple[int, bytes]:
        if not self.accepting():
            return 503, b"not accepting work (shutting down)\n"
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            return 503, f"store unreachable: {exc}\n".encode()
        return 200, b"ready\n"

    async def _metrics(self, send: Send) -> None:
        try:
            self.metrics.set_queue_depth(await self.store.count_by_status())
        except StoreUnavailable as exc:
            log.warning("metrics: queue depth unavailable: %s", exc)
        await _respond(send, 200, self.metrics.render(), content_type=b"text/plain; version=0.0.4")


async def _respond(
    send: Send, status: int, body: bytes, *, content_type: bytes = b"text/plain; charset=utf-8"
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the service owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn exits the process when it cannot listen; here the service must unwind."""
        try:
            await super().startup(sockets)
        except SystemExit as exc:
            raise OSError(f"operations listener: {exc.__context__ or 'cannot listen'}") from None


class OpsServer:
    def __init__(self, app: OpsApp, *, host: str, port: int) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", log_config=None, access_log=False
        )
        self._server = _EmbeddedUvicorn(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve in the background; return once listening (or raise why it could not)."""
        self._task = asyncio.create_task(self._server.serve(), name="ops-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError("the operations listener stopped at start-up")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        port: int = self._server.servers[0].sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
