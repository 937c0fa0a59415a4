"""A throwaway PostgreSQL cluster of the test's own, to restart or stop at will.

The machine's server is shared and must never be restarted; this one lives in the test's
directory, on a free port, run by Debian's binaries as the ``postgres`` user (initdb refuses
root), trusting local connections, and is stopped at the end. Tests that need it are skipped
when the binaries are missing, unless CI is set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import free_port

BIN = Path(os.environ.get("NOTIFIER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class Cluster:
    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        command = [str(BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-w", *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -k {self.directory}"
        self._pg_ctl("-o", options, "-l", str(self.directory / "server.log"), "start")

    def stop(self) -> None:
        """A fast shutdown: every connection is cut, as when an operator restarts the server."""
        self._pg_ctl("-m", "fast", "stop")


@pytest.fixture
def pg_cluster() -> Iterator[Cluster]:
    if not (BIN / "initdb").exists() or (os.geteuid() == 0 and not shutil.which("runuser")):
        reason = f"no PostgreSQL binaries in {BIN} (set NOTIFIER_TEST_PG_BIN)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    # Not under tmp_path: pytest keeps that root-only, and the server runs as postgres.
    with tempfile.TemporaryDirectory(prefix="notifier-pg-") as name:
        directory = Path(name)
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
        cluster = Cluster(directory, free_port())
        initdb = [str(BIN / "initdb"), "-D", str(directory / "data"), "-U", "postgres"]
        initdb += ["--auth=trust", "--no-sync"]
        if os.geteuid() == 0:
            initdb = ["runuser", "-u", "postgres", "--", *initdb]
        subprocess.run(initdb, check=True, capture_output=True, timeout=120)
        cluster.start()
        try:
            yield cluster
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                cluster.stop()
