"""How many SMS segments a text costs (3GPP TS 23.038), which is how providers bill it.

A text that only uses the GSM 7-bit default alphabet travels as GSM-7: 160 septets in a
single message, 153 per segment when it is split (the user data header takes the rest).
Characters of the extension table (``^{}\\[~]|€`` and form feed) take two septets, and
an escape pair is never split across segments. Anything else makes the whole text UCS-2:
70 UTF-16 code units alone, 67 per segment; a character outside the BMP (most emoji) is
two code units, and a surrogate pair is never split either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

SINGLE = {"GSM-7": 160, "UCS-2": 70}
PER_SEGMENT = {"GSM-7": 153, "UCS-2": 67}


@dataclass(frozen=True, slots=True)
class Segments:
    encoding: Literal["GSM-7", "UCS-2"]
    #: Septets (GSM-7) or UTF-16 code units (UCS-2) of the whole text.
    units: int
    count: int


def _units(text: str) -> tuple[Literal["GSM-7", "UCS-2"], list[int]]:
    """The encoding, and the units each character takes in it."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        return "GSM-7", [2 if c in GSM7_EXTENSION else 1 for c in text]
    return "UCS-2", [2 if ord(c) > 0xFFFF else 1 for c in text]


def count_segments(text: str) -> Segments:
    encoding, sizes = _units(text)
    units = sum(sizes)
    if units <= SINGLE[encoding]:
        return Segments(encoding, units, 1 if text else 0)
    room, count, used = PER_SEGMENT[encoding], 1, 0
    for size in sizes:
        if used + size > room:
            count, used = count + 1, 0
        used += size
    return Segments(encoding, units, count)
