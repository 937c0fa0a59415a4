"""The I/O primitives of the two clients, and all that differs between them.

``_async.py`` is written against the ``Async*`` names and ``async_sleep``; ``scripts/unasync.py``
maps each to its ``Sync*``/``sync_sleep`` twin when it writes ``_sync.py``. So everything here
comes in pairs with the same methods, one on asyncio streams and one on blocking sockets (the
blocking client must not run an event loop: it would break inside a running one).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from typing import Any

from notifier.client._core import MAX_ANSWER_BYTES, bad_answer, connection_lost, parse_answer

AsyncLock = asyncio.Lock
SyncLock = threading.Lock
async_sleep = asyncio.sleep
sync_sleep = time.sleep


def _closed_by_server(peer: str) -> Exception:
    closed = ConnectionResetError("the server closed the connection")
    return connection_lost(f"no answer from {peer}", closed)


class AsyncConnection:
    """A stream connection; every wait on it is bounded by ``timeout``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float | None,
        peer: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._peer = peer

    @classmethod
    async def open(
        cls, host: str, port: int, context: ssl.SSLContext | None, timeout: float | None, peer: str
    ) -> AsyncConnection:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=context, limit=MAX_ANSWER_BYTES
                )
        except OSError as exc:
            raise connection_lost(f"cannot connect to {peer}", exc) from exc
        return cls(reader, writer, timeout, peer)

    async def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            async with asyncio.timeout(self._timeout):
                await self._writer.drain()
        except OSError as exc:
            raise connection_lost(f"cannot write to {self._peer}", exc) from exc

    async def readline(self) -> bytes:
        try:
            async with asyncio.timeout(self._timeout):
                line = await self._reader.readline()
        except OSError as exc:
            raise connection_lost(f"no answer from {self._peer}", exc) from exc
        except ValueError:
            raise bad_answer(f"longer than {MAX_ANSWER_BYTES} bytes") from None
        if not line.endswith(b"\n"):
            raise _closed_by_server(self._peer)
        return line

    async def request(self, line: bytes) -> dict[str, Any]:
        await self.write(line)
        return parse_answer(await self.readline())

    def close(self) -> None:
        """Close at once, without waiting: safe in a task that is being cancelled."""
        self._writer.close()

    async def aclose(self) -> None:
        """Close and wait for the TLS goodbye, for a clean end of the ``async with``."""
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class SyncConnection:
    """A connected socket, read through a buffer so that one read can take many answers."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._peer = peer

    @classmethod
    def open(
        cls, host: str, port: int, context: ssl.SSLContext | None, timeout: float | None, peer: str
    ) -> SyncConnection:
        sock = None
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise connection_lost(f"cannot connect to {peer}", exc) from exc
        return cls(sock, peer)

    def write(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise connection_lost(f"cannot write to {self._peer}", exc) from exc

    def readline(self) -> bytes:
        try:
            line = self._file.readline(MAX_ANSWER_BYTES)
        except OSError as exc:
            raise connection_lost(f"no answer from {self._peer}", exc) from exc
        if line.endswith(b"\n"):
            return line
        if len(line) >= MAX_ANSWER_BYTES:
            raise bad_answer(f"longer than {MAX_ANSWER_BYTES} bytes")
        raise _closed_by_server(self._peer)

    def request(self, line: bytes) -> dict[str, Any]:
        self.write(line)
        return parse_answer(self.readline())

    def close(self) -> None:
        self._file.close()
        self._sock.close()
