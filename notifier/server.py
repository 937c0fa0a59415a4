"""The TCP transport: JSON lines in, one answer line per request, in order.

Each connection has a reader (this coroutine's loop) and an answer writer. The reader
frames, parses and admits each line (auth, rate limit, shutdown) and hands the request to
the handler, which starts it at once and gives back its answer to await, so a pipelining
client's sends join one group-commit batch while its answers still go out in order. What a
request does is the handler's business (``notifier.handler``); this module only tells ping
and auth apart, for the per-connection auth state. A bounded queue between reader and
writer is the backpressure: a client that does not read its answers stops being read.

Lines are read with a limit: an over-long line is answered ``line_too_long`` and skipped
without ever being held whole in memory. Bad input is answered, never fatal: no request can
close its connection or touch another.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from notifier.errors import (
    InternalError,
    LineTooLong,
    NotifierError,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from notifier.metrics import Metrics
from notifier.protocol import (
    AuthRequest,
    PingRequest,
    Request,
    decode_line,
    encode,
    error_answer,
    extract_ref,
    ok,
    parse_request,
)
from notifier.settings import Settings
from notifier.tokens import ANYONE, Tokens

log = logging.getLogger("notifier.server")

#: Seconds a TLS handshake may take at most (asyncio's default is 60).
TLS_HANDSHAKE_TIMEOUT = 10.0


class Started(Protocol):
    """A request the handler started: awaiting it gives the answer's fields or raises a
    NotifierError; ``done()`` says whether awaiting would wait (an ``asyncio.Future`` is one).
    """

    def done(self) -> bool: ...

    def __await__(self) -> Generator[Any, None, dict[str, Any]]: ...


class RequestHandler(Protocol):
    """The application seam (``notifier.handler.Handler``): ``handle`` starts the request at
    once (or raises a NotifierError). Anything else raised is answered ``internal``, logged.
    ``caller`` names the token the connection presented (``"token 2"``), never the token.
    """

    def handle(self, request: Request, *, caller: str) -> Started: ...


@dataclass(frozen=True, slots=True)
class _Pending:
    """An answer the handler is still working out, and the ``ref`` it will echo."""

    fields: Started
    ref: Any


#: A finished answer, or one to wait for; the writer keeps their order either way.
Answer = dict[str, Any] | _Pending


class _Skipped(enum.Enum):
    """A line the reader did not keep."""

    TOO_LONG = "too long"


class _TokenBucket:
    """Requests per second per connection, with bursts (``NOTIFIER_RATE_LIMIT``, 0 = off)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            raise RateLimited(f"more than {self.rate:g} requests/s on this connection; slow down")
        self.tokens -= 1


@dataclass(eq=False)
class _Connection:
    peer: str
    authenticated: bool
    #: None after the last answer: the writer stops there.
    answers: asyncio.Queue[Answer | None]
    task: asyncio.Task[Any] | None = None
    waiting: bool = False
    last_active: float = field(default_factory=time.monotonic)
    close_reason: str | None = None
    bucket: _TokenBucket | None = None
    peer_gone: bool = False
    #: Which token authenticated the connection, for per-token limits; no tokens, no name.
    caller: str = ANYONE


class Server:
    def __init__(self, settings: Settings, *, handler: RequestHandler, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.handler = handler
        self._tokens = Tokens(settings.auth_tokens)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closing = False
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def accepting(self) -> bool:
        return self._server is not None and not self._closing

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection,
            self.settings.host,
            self.settings.port,
            ssl=self.settings.tls_context(),
            ssl_handshake_timeout=self._handshake_timeout(),
            limit=self.settings.max_line_bytes + 2,
        )
        self._sweeper = asyncio.create_task(self._close_idle(), name="server-idle-sweeper")
        log.info(
            "listening on %s:%d%s",
            self.settings.host,
            self.port,
            " (TLS)" if self.settings.tls_enabled else "",
        )

    def _handshake_timeout(self) -> float | None:
        """A TLS handshake not done in 10 s (or the idle timeout, if shorter) is dropped: the
        connection is not counted or swept as idle until it is done, so it needs its own bound."""
        if not self.settings.tls_enabled:
            return None
        return min(self.settings.idle_timeout, TLS_HANDSHAKE_TIMEOUT)

    async def stop(self, grace: float) -> None:
        """Stop accepting; answer every line already read, then close the connections."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self._connections):
            self._interrupt(connection, "shutting down")
        tasks = [c.task for c in self._connections if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    def _interrupt(self, connection: _Connection, reason: str) -> None:
        """End a connection that is waiting for its next line (never one mid-request)."""
        connection.close_reason = reason
        if connection.waiting and connection.task is not None:
            connection.task.cancel()

    async def _close_idle(self) -> None:
        timeout = self.settings.idle_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            now = time.monotonic()
            for connection in list(self._connections):
                if connection.answers.empty() and now - connection.last_active > timeout:
                    self._interrupt(connection, f"idle for more than {timeout:g}s")

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = str(writer.get_extra_info("peername"))
        if self._closing or len(self._connections) >= self.settings.max_connections:
            reason = (
                "shutting down"
                if self._closing
                else (f"too many connections (limit {self.settings.max_connections})")
            )
            writer.write(encode(error_answer(Unavailable(reason))))
            await self._close_writer(writer)
            return
        connection = _Connection(
            peer=peer,
            authenticated=not self._tokens.required,
            answers=asyncio.Queue(self.settings.max_pipeline),
            task=asyncio.current_task(),
            bucket=_TokenBucket(self.settings.rate_limit, self.settings.rate_burst)
            if self.settings.rate_limit
            else None,
        )
        self._connections.add(connection)
        self.metrics.open_connections.inc()
        answering = asyncio.create_task(self._write_answers(connection, writer))
        try:
            await self._read_requests(connection, reader)
        except asyncio.CancelledError:
            if connection.close_reason is None:
                raise
        except ConnectionError:
            pass
        finally:
            self._connections.discard(connection)
            self.metrics.open_connections.dec()
            await self._finish(connection, answering, writer)

    async def _finish(
        self, connection: _Connection, answering: asyncio.Task[None], writer: asyncio.StreamWriter
    ) -> None:
        try:
            await connection.answers.put(None)
            await answering
            if connection.close_reason is not None:
                writer.write(encode(error_answer(Unavailable(connection.close_reason))))
        except (ConnectionError, asyncio.CancelledError):
            answering.cancel()
        await self._close_writer(writer)

    @staticmethod
    async def _close_writer(writer: asyncio.StreamWriter) -> None:
        """Close, waiting a moment at most: an idle TLS peer may never answer the goodbye."""
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_requests(self, connection: _Connection, reader: asyncio.StreamReader) -> None:
        while not self._closing and connection.close_reason is None:
            connection.waiting = True
            try:
                line = await self._read_line(reader)
            finally:
                connection.waiting = False
            if line is None:
                return
            connection.last_active = time.monotonic()
            if line is _Skipped.TOO_LONG:
                answer: Answer = error_answer(
                    LineTooLong(
                        f"line longer than {self.settings.max_line_bytes} bytes; it was skipped"
                    )
                )
            elif not line.strip():
                continue
            else:
                answer = self._answer(connection, line)
            await connection.answers.put(answer)

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | _Skipped | None:
        """The next line without its ending, or why it was skipped; None at EOF."""
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial or None
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
            await self._skip_rest_of_line(reader)
            return _Skipped.TOO_LONG
        line = line.rstrip(b"\n").removesuffix(b"\r")
        return _Skipped.TOO_LONG if len(line) > self.settings.max_line_bytes else line

    @staticmethod
    async def _skip_rest_of_line(reader: asyncio.StreamReader) -> None:
        while True:
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError as exc:
                await reader.readexactly(exc.consumed)

    def _answer(self, connection: _Connection, line: bytes) -> Answer:
        """Refuse the line now, or start the handler on it, in the order the lines came."""
        ref = None
        try:
            data = decode_line(line)
            ref = extract_ref(data)
            request = parse_request(data)
            self._authorize(connection, request)
            if connection.bucket is not None:
                connection.bucket.take()
            if self._closing:
                raise Unavailable("shutting down; try another instance or again shortly")
            return _Pending(self.handler.handle(request, caller=connection.caller), ref)
        except NotifierError as exc:
            return error_answer(exc, ref)
        except Exception:
            return _internal_error(connection, ref)

    def _authorize(self, connection: _Connection, request: Request) -> None:
        if connection.authenticated or isinstance(request, PingRequest):
            return
        if request.token is not None and (caller := self._tokens.caller(request.token)):
            connection.authenticated = True
            connection.caller = caller
            return
        if isinstance(request, AuthRequest):
            raise Unauthorized("token: not valid")
        raise Unauthorized('authenticate first: send {"op": "auth", "token": ...}')

    async def _write_answers(self, connection: _Connection, writer: asyncio.StreamWriter) -> None:
        """Write answers in order, coalescing the ones that are ready into one write (a syscall
        per answer costs more than the whole rest of a pipelined send). Every write waits for
        the transport's buffer to drain below its high-water mark, so a peer that does not
        read stops this writer, the queue fills, and the reader stops reading it.

        Once the peer is gone, keep consuming so the reader never blocks on a full queue; the
        sends behind those answers are committed all the same.
        """
        queue = connection.answers
        ready: list[bytes] = []
        while True:
            if ready and queue.empty():
                await self._write(connection, writer, ready)
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, _Pending):
                if ready and not item.fields.done():
                    await self._write(connection, writer, ready)
                answer = await _resolve(connection, item)
            else:
                answer = item
            if not answer["ok"]:
                self.metrics.rejected.labels(answer["error"]["code"]).inc()
            ready.append(encode(answer))
        await self._write(connection, writer, ready)

    @staticmethod
    async def _write(
        connection: _Connection, writer: asyncio.StreamWriter, ready: list[bytes]
    ) -> None:
        data = b"".join(ready)
        ready.clear()
        # uvloop raises RuntimeError on a write to a transport the peer's reset closed.
        if connection.peer_gone or writer.is_closing():
            connection.peer_gone = True
            return
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            connection.peer_gone = True
        connection.last_active = time.monotonic()


async def _resolve(connection: _Connection, pending: _Pending) -> dict[str, Any]:
    try:
        return ok(pending.ref, **await pending.fields)
    except NotifierError as exc:
        return error_answer(exc, pending.ref)
    except Exception:
        return _internal_error(connection, pending.ref)


def _internal_error(connection: _Connection, ref: Any) -> dict[str, Any]:
    """A bug answers ``internal`` without details (they may hold data) and is logged."""
    log.exception("request from %s failed", connection.peer)
    return error_answer(InternalError("internal error; see the server log"), ref)
