"""Reading one sample out of the Prometheus text format, as a scraper would."""

from __future__ import annotations

import re


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of ``name{labels}`` in ``text``, 0 when absent (as a counter never moved)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0
