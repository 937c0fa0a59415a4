"""A real HTTP server on 127.0.0.1 that records requests and answers as it is told.

It runs in a thread (``http.server``, HTTP/1.1 keep-alive), so it serves sync and async
callers alike and can stand in for an SMS gateway in any test or benchmark::

    with running_http_sink() as sink:              # or the ``http_sink`` fixture
        sink.respond_with(ihuyi_gateway())         # every request: ihuyi's success answer
        sink.answer(Reply(503, headers={"Retry-After": "7"}))  # but the next one: 503
        ... NOTIFIER_SMS_URL = sink.url + "/webservice/sms.php?method=Submit" ...
        sink.wait_for_requests(2)

Scripted replies (``answer``) are used first, in order; then the responder. ``DROP``
closes the connection without an answer. ``ihuyi_gateway`` emulates ihuyi's Submit API:
code 2 and a fresh ``smsid`` for each request, or the code a ``codes`` map gives a number.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def form(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.body.decode()).items()}

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes | str | Mapping[str, Any] | list[Any] = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if isinstance(self.body, bytes):
            return self.body, headers
        if isinstance(self.body, str):
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
            return self.body.encode(), headers
        headers.setdefault("Content-Type", "application/json")
        return json.dumps(self.body, ensure_ascii=False).encode(), headers


#: A scripted reply that closes the connection without answering.
DROP = Reply(status=0)

Responder = Callable[[Recorded], Reply]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    #: A gateway's listen backlog, not socketserver's 5: connections over it are reset, which
    #: would read as a provider failing (and open its circuit) when only the sink is busy.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request (timeouts, killed instances) is not news."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class HTTPSink:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._scripted: deque[Reply] = deque()
        self._responder: Responder = lambda request: Reply(200)
        self._changed = threading.Condition()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def answer(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order, before the responder."""
        with self._changed:
            self._scripted.extend(replies)

    def respond_with(self, responder: Responder) -> None:
        """Answer requests without a scripted reply by calling ``responder``."""
        self._responder = responder

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[Recorded]:
        """Block until ``count`` requests have arrived; fail after ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {count} requests"
                    f" ({len(self.requests)} arrived)"
                )
            return list(self.requests)

    def _reply_to(self, request: Recorded) -> Reply:
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
            if self._scripted:
                return self._scripted.popleft()
        return self._responder(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Recorded(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length),
                )
                reply = sink._reply_to(request)
                if reply is DROP:
                    self.close_connection = True
                    return
                body, headers = reply.encoded()
                self.send_response(reply.status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the recorded requests are the log."""

        return Handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@contextmanager
def running_http_sink() -> Iterator[HTTPSink]:
    sink = HTTPSink()
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
def http_sink() -> Iterator[HTTPSink]:
    with running_http_sink() as sink:
        yield sink


def ihuyi_gateway(codes: Mapping[str, int] | None = None) -> Responder:
    """A responder acting as ihuyi's Submit API: ``codes`` maps a mobile to an error code."""
    smsids = itertools.count(1)
    failing = dict(codes or {})

    def respond(request: Recorded) -> Reply:
        mobile = request.form().get("mobile", "")
        if mobile in failing:
            return Reply(body={"code": failing[mobile], "msg": "emulated failure", "smsid": "0"})
        return Reply(body={"code": 2, "msg": "提交成功", "smsid": f"{next(smsids):016d}"})

    return respond
