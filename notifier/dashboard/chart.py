"""The overview's chart: delivered and failed jobs per minute as stacked bars, in SVG.

Drawn on the server from the store's per-minute counts, so the page needs no chart script
and shows the same numbers with JavaScript off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from notifier.models import MinuteOutcomes

WIDTH = 600
HEIGHT = 120
MINUTES = 60
SLOT = WIDTH / MINUTES


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    minute: datetime
    delivered: int
    failed: int
    #: Heights in pixels; the failed part sits on top of the delivered part.
    delivered_height: float
    failed_height: float


@dataclass(frozen=True, slots=True)
class Chart:
    bars: list[Bar]
    peak: int
    delivered: int
    failed: int
    width: int = WIDTH
    height: int = HEIGHT
    slot: float = SLOT


def start_of_window(now: datetime) -> datetime:
    """The first of the last ``MINUTES`` minutes, the one ending now included."""
    return now.replace(second=0, microsecond=0) - timedelta(minutes=MINUTES - 1)


def chart(minutes: Sequence[MinuteOutcomes], now: datetime) -> Chart:
    """Bars for the last hour, a minute each (minutes without any outcome stay empty)."""
    first = start_of_window(now)
    by_minute = {m.minute: m for m in minutes}
    peak = max((m.delivered + m.failed for m in minutes), default=0)
    scale = HEIGHT / peak if peak else 0.0
    bars = []
    for slot in range(MINUTES):
        minute = first + timedelta(minutes=slot)
        outcome = by_minute.get(minute, MinuteOutcomes(minute))
        bars.append(
            Bar(
                slot * SLOT,
                minute,
                outcome.delivered,
                outcome.failed,
                outcome.delivered * scale,
                outcome.failed * scale,
            )
        )
    return Chart(
        bars,
        peak,
        sum(bar.delivered for bar in bars),
        sum(bar.failed for bar in bars),
    )
