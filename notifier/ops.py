"""The operations listener (/healthz, /readyz, /metrics, the dashboard) and the embedded
HTTP server.

Each HTTP side of the service is a Starlette app served by uvicorn inside the service's own
event loop, with uvicorn's signal handling left out so the service keeps its own. The
operations app takes no jobs; ``HTTPServer`` serves it, and the receipts app on another port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from notifier.dashboard import Dashboard
from notifier.metrics import Metrics
from notifier.store import Store, StoreUnavailable

log = logging.getLogger("notifier.ops")

_READ_ONLY = ["GET", "HEAD"]


class OpsApp(Starlette):
    """/healthz, /readyz and /metrics, open to probes and scrapers; the dashboard's pages
    beside them ask for a token where the service does."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        accepting: Callable[[], bool],
        dashboard: Dashboard,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.accepting = accepting
        super().__init__(
            routes=[
                Route("/healthz", self._health, methods=_READ_ONLY),
                Route("/readyz", self._readiness, methods=_READ_ONLY),
                Route("/metrics", self._metrics, methods=_READ_ONLY),
                *dashboard.routes,
            ],
            exception_handlers={404: _not_found, 405: _method_not_allowed},
        )

    async def _health(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def _readiness(self, request: Request) -> Response:
        if not self.accepting():
            return PlainTextResponse("not accepting work (shutting down)\n", 503)
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            return PlainTextResponse(f"store cannot take jobs: {exc}\n", 503)
        return PlainTextResponse("ready\n")

    async def _metrics(self, request: Request) -> Response:
        try:
            self.metrics.set_queue_depth(
                await self.store.count_by_status(), await self.store.count_waiting()
            )
        except StoreUnavailable as exc:
            log.warning("metrics: queue depth unavailable: %s", exc)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


async def _not_found(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("not found: try /, /jobs, /healthz, /readyz or /metrics\n", 404)


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("method not allowed\n", 405)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the service owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HTTPServer:
    """Any ASGI app on host:port, in the running loop; ``port`` 0 picks a free one."""

    def __init__(self, app: ASGIApp, *, host: str, port: int, name: str = "http") -> None:
        config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", log_config=None, access_log=False
        )
        self._server = _EmbeddedUvicorn(config)
        self._name = name
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve in the background; return once listening (or raise why it could not).

        The socket is bound here, not by uvicorn, whose answer to a port in use is
        ``sys.exit`` from inside the task.
        """
        host, port = self._server.config.host, self._server.config.port
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise OSError(
                f"the {self._name} listener cannot listen on {host}:{port}: {exc}"
            ) from exc
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=self._name)
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"the {self._name} listener stopped at start-up")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        port: int = self._server.servers[0].sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
