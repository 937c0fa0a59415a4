"""The ceiling for a Python server of this protocol: parse each JSON line, answer an id.

``python -m bench.bare streams PORT`` serves on asyncio streams (a readline loop, as most
asyncio servers are written); ``python -m bench.bare protocol PORT`` on ``asyncio.Protocol``
(callbacks, every complete line of a read answered in one write). Neither validates,
stores or delivers anything: whatever notifier does on top of this is what it costs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys

_ids = itertools.count(1)


def answer(line: bytes) -> bytes:
    try:
        json.loads(line)
    except ValueError:
        return b'{"ok": false, "error": {"code": "invalid_json"}}\n'
    return b'{"ok": true, "id": %d}\n' % next(_ids)


async def serve_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        if line.strip():
            writer.write(answer(line))
            await writer.drain()
    writer.close()


class LineProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        self.transport.write(b"".join(answer(line) for line in lines if line.strip()))


async def main(kind: str, port: int) -> None:
    if kind == "streams":
        server = await asyncio.start_server(serve_streams, "127.0.0.1", port)
    else:
        server = await asyncio.get_running_loop().create_server(LineProtocol, "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
