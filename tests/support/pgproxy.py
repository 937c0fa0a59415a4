"""A TCP proxy to PostgreSQL that loses the answer to one statement after it committed.

It reads the server's side of the wire protocol message by message (a type byte and a
length). On the first connection whose client sends ``marker`` (the statement's text, which
travels in its Parse message), the first ``UPDATE n`` (n > 0) the server completes is not
forwarded: the proxy waits for the server's ReadyForQuery, so the statement's implicit
transaction has committed, and then cuts both sides. The client sees its connection die
without an answer; the rows are changed all the same. Later traffic passes through.

Connect with ``sslmode=disable``: the proxy does not speak TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from tests.support.proxy import LocalProxy

#: The dispatcher's claim statement, as it starts its SET list.
CLAIM = b"SET status = 'sending', attempts = attempts + 1"


class AnswerLosingProxy(LocalProxy):
    def __init__(self, upstream_port: int, *, marker: bytes = CLAIM) -> None:
        super().__init__(upstream_port)
        self.marker = marker
        self.dropped = 0

    def url(self, upstream_url: str) -> str:
        """``upstream_url`` through the proxy, TLS off."""
        parts = urlsplit(upstream_url)
        host = f"{parts.username}@" if parts.username else ""
        query = "&".join(filter(None, [parts.query, "sslmode=disable"]))
        return urlunsplit(parts._replace(netloc=f"{host}127.0.0.1:{self.port}", query=query))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        armed = asyncio.Event()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self._relay(
                self._requests(reader, up_writer, armed),
                self._answers(up_reader, writer, armed),
                up_writer,
            )

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, armed: asyncio.Event
    ) -> None:
        tail = b""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if not self.dropped and self.marker in tail + data:
                    armed.set()
                tail = data[-len(self.marker) :]
                writer.write(data)
                await writer.drain()

    async def _answers(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, armed: asyncio.Event
    ) -> None:
        losing = False
        while True:
            header = await reader.readexactly(5)
            kind, length = header[:1], struct.unpack("!I", header[1:])[0]
            body = await reader.readexactly(length - 4)
            if armed.is_set() and not self.dropped and kind == b"C" and _changed_rows(body):
                losing = True
            if losing:
                if kind == b"Z":  # committed: now the connection dies, unanswered
                    self.dropped += 1
                    return
                continue
            writer.write(header + body)
            await writer.drain()


def _changed_rows(tag: bytes) -> bool:
    """Whether a CommandComplete tag is ``UPDATE n`` with n > 0."""
    words = tag.rstrip(b"\0").split()
    return len(words) == 2 and words[0] == b"UPDATE" and int(words[1]) > 0


@asynccontextmanager
async def answer_losing_proxy(upstream_url: str) -> AsyncIterator[AnswerLosingProxy]:
    proxy = AnswerLosingProxy(urlsplit(upstream_url).port or 5432)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
