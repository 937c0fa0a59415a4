"""A JSON-lines server on 127.0.0.1 that records each request and answers as it is told.

For client tests of ops the real service does not have yet, or answers it never gives (a
garbled one). ``FakeSuppressions`` answers the suppression ops of PROTOCOL.md from a dict::

    async with line_server(FakeSuppressions()) as server:
        ... Client("127.0.0.1", server.port).suppress("ada@example.com") ...
        assert server.requests[-1]["op"] == "suppress"
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

Responder = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class LineServer:
    respond: Responder
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            with contextlib.suppress(ConnectionError):
                while line := await reader.readline():
                    request = json.loads(line)
                    self.requests.append(request)
                    writer.write(json.dumps(self.respond(request)).encode() + b"\n")
                    await writer.drain()
        finally:
            self.writers.discard(writer)
            writer.close()


@asynccontextmanager
async def line_server(respond: Responder) -> AsyncIterator[LineServer]:
    server = LineServer(respond)
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for writer in list(server.writers):
            writer.close()
        await listener.wait_closed()


class FakeSuppressions:
    """The ``suppressions``, ``suppress`` and ``unsuppress`` ops over a dict; ``send`` and
    ``ping`` answered as the service would, every other op ``unknown_op``."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op", "send")
        if op == "suppressions":
            return {"ok": True, "suppressions": list(self.entries.values())}
        if op == "suppress":
            address = request["address"]
            entry = {"address": address, "reason": request.get("reason")}
            self.entries[address] = {**entry, "created_at": "2030-01-01T10:00:00.000Z"}
            return {"ok": True}
        if op == "unsuppress":
            return {"ok": True, "removed": self.entries.pop(request["address"], None) is not None}
        if op == "send":
            return {"ok": True, "id": "job-1", "status": "queued"}
        if op == "ping":
            return {"ok": True}
        return {"ok": False, "error": {"code": "unknown_op", "message": f"op: {op}"}}
