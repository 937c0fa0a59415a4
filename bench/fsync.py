"""``python -m bench.fsync [DIR]``: what durability would cost the outbox, per ``.eml`` file.

Writes 500 files of an outbox email's size as the outbox does (a temporary file renamed into
place), three ways: no fsync (what the outbox does, see ``notifier.channels.outbox``); an
fsync of each file and of the directory after each rename; an fsync of each file and one of
the directory per batch of 32 (the dispatcher's usual batch). Prints microseconds of wall
time per file, median of 3; the directory defaults to a temporary one.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

FILES = 500
BATCH = 32
DATA = b"x" * 700


def _sync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(folder: Path, *, file_sync: bool, directory_every: int | None) -> float:
    """Microseconds per file written into ``folder``."""
    started = time.perf_counter()
    for number in range(FILES):
        temporary = folder / f".{number}.tmp"
        with open(temporary, "wb") as file:
            file.write(DATA)
            if file_sync:
                os.fsync(file.fileno())
        os.replace(temporary, folder / f"{number}.eml")
        if directory_every is not None and (number + 1) % directory_every == 0:
            _sync_directory(folder)
    return (time.perf_counter() - started) / FILES * 1e6


def main() -> None:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    ways: dict[str, tuple[bool, int | None]] = {
        "no fsync (the outbox)": (False, None),
        "fsync file + directory per file": (True, 1),
        f"fsync file, directory per {BATCH}": (True, BATCH),
    }
    for name, (file_sync, every) in ways.items():
        runs = []
        for _ in range(3):
            with tempfile.TemporaryDirectory(prefix="notifier-fsync-", dir=base) as scratch:
                runs.append(write(Path(scratch), file_sync=file_sync, directory_every=every))
        print(f"{name}: {statistics.median(runs):,.0f} µs per file")


if __name__ == "__main__":
    main()
