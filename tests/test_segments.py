"""Segment counting: GSM-7 with its extension table, UCS-2 in UTF-16 code units."""

from __future__ import annotations

import pytest

from notifier.channels.sms.segments import Segments, count_segments


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", Segments("GSM-7", 0, 0)),
        ("Your code is 1234", Segments("GSM-7", 17, 1)),
        ("a" * 160, Segments("GSM-7", 160, 1)),
        ("a" * 161, Segments("GSM-7", 161, 2)),
        ("a" * 306, Segments("GSM-7", 306, 2)),
        ("a" * 307, Segments("GSM-7", 307, 3)),
        ("Grüße aus Köln, £5 @ 10:00", Segments("GSM-7", 26, 1)),
        # the extension table counts two septets a character
        ("€" * 80, Segments("GSM-7", 160, 1)),
        ("{" * 81, Segments("GSM-7", 162, 2)),
        ("[x]^{y}\\~|€", Segments("GSM-7", 20, 1)),
        # 306 septets would fit two segments, but the escape pair of "€" is not split
        ("a" * 152 + "€" + "a" * 152, Segments("GSM-7", 306, 3)),
        ("a" * 151 + "€" + "a" * 153, Segments("GSM-7", 306, 2)),
        # anything outside GSM-7 makes the whole text UCS-2
        ("您的验证码是 1234。", Segments("UCS-2", 12, 1)),
        ("ç" * 70, Segments("UCS-2", 70, 1)),  # lower-case ç is not in GSM-7 (Ç is)
        ("中" * 71, Segments("UCS-2", 71, 2)),
        ("中" * 134, Segments("UCS-2", 134, 2)),
        ("中" * 135, Segments("UCS-2", 135, 3)),
        # outside the BMP: two UTF-16 code units each, a surrogate pair never split
        ("😀" * 35, Segments("UCS-2", 70, 1)),
        ("a" * 66 + "😀" + "a" * 66, Segments("UCS-2", 134, 3)),
        ("a" * 65 + "😀" + "a" * 67, Segments("UCS-2", 134, 2)),
    ],
)
def test_count_segments(text: str, expected: Segments) -> None:
    assert count_segments(text) == expected
