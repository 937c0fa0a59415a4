"""Child processes of the bench: every server and sink runs in a process of its own.

A ``Child`` is started from an argv and an environment, counts as ready once each of its
ports accepts a TCP connection, reports its peak resident memory (``VmHWM``) and is stopped
with SIGTERM (SIGKILL after a grace period). Its output goes to a log file that is shown
when it dies early.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def bench_module(module: str, *args: object) -> list[str]:
    """The argv running ``python -m bench.<module> args...`` with this interpreter."""
    return [sys.executable, "-m", f"bench.{module}", *(str(a) for a in args)]


class Child:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ports: Sequence[int],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ports = list(ports)
        self.log_path = log_dir / f"{name.replace(' ', '-')}.log"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
        self.env = {**inherited, "PYTHONPATH": str(ROOT), **(env or {})}
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Self:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while not _accepts(port):
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not listening on {port} after {timeout}s")
                time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def peak_rss_mib(self) -> float:
        """The most resident memory the process has had so far (``VmHWM``), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc: peak RSS needs Linux")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
