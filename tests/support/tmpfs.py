"""A small disk of its own for a test: a tmpfs mounted in the test's directory, to fill.

Mounting needs root (CI runs as root); elsewhere the tests that need it are skipped, but
under CI (``CI`` set) a refused mount fails them. The mount is always undone at the end.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


class SmallDisk:
    """``path`` is the mount point; ``fill`` takes every free byte, ``free`` gives it back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def fill(self) -> None:
        """Write until the disk refuses: ENOSPC for every write that follows."""
        with open(self._filler, "ab") as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        # What a page smaller than the chunk still fits goes too.
        with open(self._filler, "ab", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 512)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    @property
    def full(self) -> bool:
        stats = os.statvfs(self.path)
        return stats.f_bavail == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 16 MB tmpfs at ``tmp_path / "disk"``, unmounted after the test."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs (root is needed): {mounted.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)
