"""Running the real service for tests: in-process on port 0, or as a `notifier serve` process.

In-process (``running_server``) is for most protocol and delivery tests; the subprocess
(``ServerProcess``) is for what only a real process shows: kill -9, SIGTERM, restarts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from notifier.service import Service
from notifier.settings import Settings
from tests.support.waiting import wait_for_sync


def isolated_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings isolated in ``tmp_path``; ports chosen by the OS."""
    values: dict[str, Any] = {
        "port": 0,
        "http_port": 0,
        "database_url": f"sqlite:///{tmp_path}/notifier.db",
        "outbox_dir": tmp_path / "outbox",
        "templates_dir": tmp_path / "templates",
        "retry_base_delay": 0.05,
        "retry_max_delay": 0.2,
        "poll_interval": 0.2,
        "shutdown_grace": 5.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class RunningServer:
    service: Service

    @property
    def settings(self) -> Settings:
        return self.service.settings

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def outbox(self) -> Path:
        return self.settings.outbox_dir


@asynccontextmanager
async def running_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    """The real service in this event loop, stopped (gracefully) on exit."""
    service = Service(isolated_settings(tmp_path, **overrides))
    await service.start()
    try:
        yield RunningServer(service)
    finally:
        await service.stop()


class LineConnection:
    """A raw protocol connection: write request lines, read answer lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", **kwargs: Any) -> LineConnection:
        reader, writer = await asyncio.open_connection(host, port, limit=2**24, **kwargs)
        return cls(reader, writer)

    async def send(self, *requests: dict[str, Any] | bytes) -> None:
        for request in requests:
            if isinstance(request, bytes):
                self.writer.write(request)
            else:
                self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()

    async def answer(self, timeout: float = 10.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert line, "connection closed before an answer"
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def request(self, request: dict[str, Any] | bytes) -> dict[str, Any]:
        await self.send(request)
        return await self.answer()

    async def status(self, job_id: str) -> dict[str, Any]:
        """The job's status answer, which must be ``ok``."""
        answer = await self.request({"op": "status", "id": job_id})
        assert answer["ok"], answer
        return answer

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    """``python -m notifier serve`` in a subprocess, configured only by its environment."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.tmp_path = tmp_path
        self.port = int(env.pop("NOTIFIER_PORT", free_port()))
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")},
            "NOTIFIER_PORT": str(self.port),
            "NOTIFIER_HTTP_PORT": "0",
            "NOTIFIER_DATABASE_URL": f"sqlite:///{tmp_path}/notifier.db",
            "NOTIFIER_OUTBOX_DIR": str(tmp_path / "outbox"),
            "NOTIFIER_TEMPLATES_DIR": str(tmp_path / "templates"),
            "NOTIFIER_POLL_INTERVAL": "0.2",
            **env,
        }
        self.log_path = tmp_path / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def outbox(self) -> Path:
        return Path(self.env["NOTIFIER_OUTBOX_DIR"])

    def start(self, timeout: float = 20.0) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "notifier", "serve"],
            env=self.env,
            cwd=self.tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_sync(self._answers_ping, timeout=timeout, what=f"notifier on port {self.port}")
        return self

    def _answers_ping(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"notifier exited with {self.process.returncode}:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b'{"op":"ping"}\n')
                return conn.makefile("rb").readline().startswith(b'{"ok":true')
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    @property
    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        self.signal(signal.SIGKILL)
        self.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
