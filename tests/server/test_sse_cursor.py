"""Multi-channel cursors (server/sse/cursor.py): what Herald writes comes back as it was
written; anything else is a 422; the cursor stays short."""

from __future__ import annotations

import base64
import random

import pytest

from server.sse import cursor
from shared.errors import ValidationError

KEY = b"k" * 32


@pytest.mark.parametrize(
    ("watermark", "positions"),
    [
        (0, {}),
        (7, {1: 9}),
        (10_000, {3: 10_005, 9: 9_990, 2**40: 0}),  # ahead, behind, far away
        (2**62, {1: 2**62 + 1}),
    ],
)
def test_round_trip(watermark, positions):
    text = cursor.encode(KEY, watermark, positions)
    assert text.isascii() and " " not in text and "," not in text
    back = cursor.decode(KEY, text)
    assert back.watermark == watermark and back.positions == positions
    assert back.after(1) == positions.get(1, watermark)


def test_short_for_a_quiet_stream_and_under_512_at_100_busy_channels():
    assert len(cursor.encode(KEY, 5_000_000, {})) <= 24
    rng = random.Random(1)
    channels = rng.sample(range(1, 1_000_000), 100)
    # 100 channels, each with a message since the last watermark (ids a little ahead).
    positions = {c: 5_000_000 + rng.randint(1, 5_000) for c in channels}
    text = cursor.encode(KEY, 5_000_000, positions, channels)
    assert len(text) <= cursor.MAX_CHARS, len(text)
    assert cursor.decode(KEY, text, channels=channels).positions == positions


def test_anything_herald_did_not_write_is_refused():
    good = cursor.encode(KEY, 100, {4: 120})
    raw = base64.urlsafe_b64decode(good + "=" * (-len(good) % 4))
    forged_payload = bytearray(raw)
    forged_payload[2] ^= 0x01  # another watermark, the old signature
    forged = base64.urlsafe_b64encode(bytes(forged_payload)).rstrip(b"=").decode()
    for bad in (
        "garbage",
        good[:-3],  # truncated
        good + "AA",  # lengthened
        forged,
        cursor.encode(b"another deployment".ljust(32), 100, {4: 120}),
        "A" * 10_000,
        "é" * 10,
        "!!!!!!!!",
        "",
    ):
        with pytest.raises(ValidationError) as exc:
            cursor.decode(KEY, bad, "Last-Event-ID")
        assert "Last-Event-ID" in exc.value.message


def test_many_busy_channels_with_far_apart_ids_use_the_list_form():
    rng = random.Random(2)
    channels = sorted(rng.sample(range(1, 5_000_000), 100))
    positions = {c: 9_000_000 + rng.randint(-50, 5_000) for c in channels}
    text = cursor.encode(KEY, 9_000_000, positions, channels)
    assert len(text) <= cursor.MAX_CHARS, len(text)
    assert cursor.decode(KEY, text, channels=channels).positions == positions
    # Read against another list (a membership changed meanwhile): every channel resumes
    # from the lowest position: repeats are possible, gaps are not.
    other = cursor.decode(KEY, text, channels=channels[1:])
    assert other.positions == {} and other.watermark == min(9_000_000, *positions.values())
