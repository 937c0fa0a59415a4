"""A disk on which a test can make a SQLite database read-only while the service runs.

Remounting read-only is refused ("busy") while SQLite holds the file open for writing, and
file modes do not stop root. What does stop writes through descriptors already open is ext4's
immutable flag (``chattr +i``: every write and truncate fails with EPERM), so the disk is a
small ext4 image on a loop device. The flag goes on the database and its ``-wal``, not on the
``-shm``: SQLite maps that file, and a store into a mapped immutable page kills the process
with SIGBUS. Root is needed (CI runs as root); elsewhere the tests are skipped, but under CI
(``CI`` set) a refused mount fails them. Everything is undone at the end.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


class ExtDisk:
    """``path`` is the mount point; ``freeze`` makes a database there read-only, ``thaw``
    writable again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._frozen: list[Path] = []

    def freeze(self, database: Path) -> None:
        self._frozen = [database, database.with_name(f"{database.name}-wal")]
        _chattr("+i", self._frozen)

    def thaw(self) -> None:
        # The ``-wal`` is gone if SQLite closed the database meanwhile.
        if present := [path for path in self._frozen if path.exists()]:
            _chattr("-i", present)
        self._frozen = []


def _chattr(flag: str, paths: list[Path]) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def _refuse(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def ext_disk(tmp_path: Path) -> Iterator[ExtDisk]:
    """A 32 MB ext4 image at ``tmp_path / "disk"``, unmounted (its loop device freed) after."""
    image, path = tmp_path / "disk.img", tmp_path / "disk"
    path.mkdir()
    with open(image, "wb") as file:
        file.truncate(32 * 1024 * 1024)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        _refuse(f"cannot make an ext4 image: {made.stderr.strip()}")
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(path)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        _refuse(f"cannot mount an ext4 image (root is needed): {mounted.stderr.strip()}")
    disk = ExtDisk(path)
    try:
        yield disk
    finally:
        try:
            disk.thaw()
        finally:
            subprocess.run(["umount", "--lazy", str(path)], check=True)
