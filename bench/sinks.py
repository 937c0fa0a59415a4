"""The bench's stand-ins for providers, in a process of their own (``python -m bench.sinks``).

- SMTP over implicit TLS (aiosmtpd), answering each DATA after ``delay`` seconds, and
  ``451 4.3.0`` instead for a ``fail_rate`` share of them (seeded, so runs are alike);
- an HTTP gateway emulating ihuyi's Submit API (``{"code": 2, "smsid": ...}``), answering
  each request after ``delay`` seconds, HTTP/1.1 keep-alive;
- a control port speaking JSON lines: ``{"op": "reset", "delay": .., "fail_rate": ..}``
  clears the records; ``{"op": "wait", "count": n, "timeout": s}`` answers once ``n``
  distinct messages arrived (or the time is up) with what was recorded.

Why not ``tests/support``'s sinks: those run inside the caller's event loop or threads and
have no pacing, fault rate or arrival clock; a benchmark needs the sink's CPU out of the
process it measures, and the arrival times of each message.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import itertools
import json
import random
import ssl
import time
from typing import Any
from urllib.parse import unquote_plus

from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.marks import read_mark

IHUYI_MSG = "提交成功"


class Recorder:
    """What arrived: distinct messages, refusals, arrival times and end-to-end latencies."""

    def __init__(self) -> None:
        self.reset(delay=0.0, fail_rate=0.0)

    def reset(self, *, delay: float, fail_rate: float) -> None:
        self.delay = delay
        self.fail_rate = fail_rate
        self.rng = random.Random(5)
        self.seen: set[int] = set()
        self.accepted = 0
        self.refused = 0
        self.connections = 0
        self.first: float | None = None
        self.last: float | None = None
        self.latencies: list[float] = []
        self.cpu_at_reset = time.process_time()

    def should_fail(self) -> bool:
        return self.fail_rate > 0 and self.rng.random() < self.fail_rate

    def accept(self, text: str, received: float) -> None:
        self.accepted += 1
        found = read_mark(text)
        if found is None:
            return
        number, sent = found
        if number in self.seen:
            return
        self.seen.add(number)
        self.first = received if self.first is None else self.first
        self.last = received
        if sent is not None:
            self.latencies.append(received - sent)

    def summary(self) -> dict[str, Any]:
        return {
            "cpu": time.process_time() - self.cpu_at_reset,
            "distinct": len(self.seen),
            "accepted": self.accepted,
            "refused": self.refused,
            "connections": self.connections,
            "first": self.first,
            "last": self.last,
            "latencies": self.latencies,
        }


def email_text(data: bytes) -> str:
    """The text to find the mark in: the raw message when the mark is there in clear (cheap),
    else the subject and every text part decoded (Apprise sends base64)."""
    raw = data.decode("utf-8", "replace")
    if read_mark(raw) is not None:
        return raw
    message = email.message_from_bytes(data, policy=email.policy.default)
    parts = [str(message.get("Subject", ""))]
    for part in message.walk():
        if part.get_content_maintype() == "text":
            parts.append(part.get_content())
    return "\n".join(parts)


class SMTPHandler:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        received = time.monotonic()
        await asyncio.sleep(self.recorder.delay)
        if self.recorder.should_fail():
            self.recorder.refused += 1
            return "451 4.3.0 try again later (bench fault)"
        assert isinstance(envelope.content, bytes)
        self.recorder.accept(email_text(envelope.content), received)
        return "250 2.0.0 Ok: queued"


class IhuyiGateway(asyncio.Protocol):
    """One HTTP/1.1 connection: requests answered in order, each after the delay."""

    smsids = itertools.count(1)

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.buffer = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.recorder.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next_request()

    def _next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if self.busy or end < 0:
            return
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head)}
        size = end + 4 + int(headers.get("content-length", "0"))
        if len(self.buffer) < size:
            return
        body = bytes(self.buffer[end + 4 : size])
        del self.buffer[:size]
        close = headers.get("connection", "").lower() == "close" or head[0].endswith("/1.0")
        self.busy = True
        asyncio.get_running_loop().call_later(
            self.recorder.delay, self._answer, body, time.monotonic(), close
        )

    def _answer(self, body: bytes, received: float, close: bool) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.recorder.accept(unquote_plus(body.decode()), received)
        answer = {"code": 2, "msg": IHUYI_MSG, "smsid": f"{next(self.smsids):016d}"}
        payload = json.dumps(answer, ensure_ascii=False).encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s"
            % (len(payload), b"Connection: close\r\n" if close else b"", payload)
        )
        if close:
            self.transport.close()
            return
        self.busy = False
        self._next_request()


class Sinks:
    def __init__(self) -> None:
        self.recorder = Recorder()

    def smtp(self) -> SMTP:
        self.recorder.connections += 1
        return SMTP(SMTPHandler(self.recorder), hostname="sink.bench")

    def http(self) -> IhuyiGateway:
        return IhuyiGateway(self.recorder)

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            request = json.loads(line)
            if request["op"] == "reset":
                self.recorder.reset(delay=request["delay"], fail_rate=request["fail_rate"])
                answer: dict[str, Any] = {"ok": True}
            else:
                deadline = time.monotonic() + request["timeout"]
                while len(self.recorder.seen) < request["count"] and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                answer = self.recorder.summary()
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.cert)
    sinks = Sinks()
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(sinks.smtp, "127.0.0.1", args.smtp_port, ssl=tls),
        await loop.create_server(sinks.http, "127.0.0.1", args.http_port),
        await asyncio.start_server(sinks.control, "127.0.0.1", args.control_port),
    ]
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--cert", required=True, help="PEM with the key and certificate chain")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
