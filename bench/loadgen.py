"""The load generator: JSON lines over TCP, a window of requests in flight per connection.

Written on ``asyncio.Protocol`` callbacks with the request lines encoded beforehand, so the
client costs as little as it can and the server is what gets measured. Answers come in
order on a connection, so the latency of each is the time since the oldest unanswered
request was written.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

_OK = re.compile(rb'^\{"ok":\s*true')


@dataclass
class Load:
    """What a load run saw: answers, refusals, the wall time, every answer's latency (s)."""

    answered: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.answered / self.seconds


class _Connection(asyncio.Protocol):
    def __init__(self, lines: Iterator[bytes], *, window: int, expected: int, load: Load) -> None:
        self.lines = lines
        self.window = window
        self.expected = expected
        self.load = load
        self.sent: deque[float] = deque()
        self.buffer = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.refill()

    def push(self, line: bytes) -> None:
        assert self.transport is not None
        self.sent.append(time.perf_counter())
        self.transport.write(line)

    def refill(self) -> None:
        assert self.transport is not None
        now = time.perf_counter()
        batch = []
        while len(self.sent) < self.window and (line := next(self.lines, None)) is not None:
            batch.append(line)
            self.sent.append(now)
        self.transport.write(b"".join(batch))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        *answers, self.buffer = (self.buffer + data).split(b"\n")
        for answer in answers:
            self.load.latencies.append(now - self.sent.popleft())
            if not _OK.match(answer):
                self.load.errors += 1
        self.load.answered += len(answers)
        self.expected -= len(answers)
        if self.expected <= 0 and not self.done.done():
            self.done.set_result(None)
        self.refill()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed with {self.expected} unanswered"))


async def _open(
    port: int, lines: Sequence[bytes], *, window: int, expected: int, load: Load
) -> _Connection:
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(
        lambda: _Connection(iter(lines), window=window, expected=expected, load=load),
        "127.0.0.1",
        port,
    )
    return connection


async def drive(port: int, lines: Sequence[bytes], *, connections: int, window: int) -> Load:
    """Send ``lines`` over ``connections`` connections, ``window`` in flight on each."""
    load = Load()
    share = -(-len(lines) // connections)
    started = time.perf_counter()
    opened = await asyncio.gather(
        *(
            _open(port, part, window=window, expected=len(part), load=load)
            for part in (lines[i * share : (i + 1) * share] for i in range(connections))
        )
    )
    await asyncio.gather(*(c.done for c in opened))
    load.seconds = time.perf_counter() - started
    for connection in opened:
        assert connection.transport is not None
        connection.transport.close()
    return load


async def paced(port: int, make: Callable[[int], bytes], *, count: int, rate: float) -> Load:
    """Send ``count`` lines on one connection at a steady ``rate`` per second (open loop:
    the next request never waits for an answer). ``make(i)`` builds line ``i`` when sent."""
    load = Load()
    connection = await _open(port, (), window=0, expected=count, load=load)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(count):
        await asyncio.sleep(max(0.0, started + i / rate - loop.time()))
        connection.push(make(i))
    await connection.done
    load.seconds = loop.time() - started
    assert connection.transport is not None
    connection.transport.close()
    return load
