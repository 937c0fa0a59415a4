"""What every bench message carries, so the sinks can tell messages apart and time them.

A message's text holds ``bench #<n>`` (which message it is: the sinks count distinct
numbers, so a retried message counts once) and, for end-to-end runs, ``sent <t>``: the
sender's ``time.monotonic()`` when it handed the job over. ``CLOCK_MONOTONIC`` is one clock
for every process on the machine, so a sink subtracts it from its own reading.
"""

from __future__ import annotations

import re

FAR_FUTURE = "2999-01-01T00:00:00Z"

_MARK = re.compile(r"bench #(\d+)(?: sent (\d+\.\d+))?")


def mark(number: int, sent: float | None = None) -> str:
    return f"bench #{number}" if sent is None else f"bench #{number} sent {sent:.6f}"


def read_mark(text: str) -> tuple[int, float | None] | None:
    """The message number and the time it was sent (if it says), or None if unmarked."""
    found = _MARK.search(text)
    if found is None:
        return None
    return int(found[1]), float(found[2]) if found[2] else None
