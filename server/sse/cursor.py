"""Resume cursors of multi-channel streams (the ``id:`` of ``GET /api/v1/events``).

A cursor says, for every channel of a stream at once, what the client has: a
watermark W ("every message with id <= W of each channel, and nothing later") plus the
channels where that is not the truth, each with its own last id. The process's
watermark advances with every reconcile (server/sse/feeds.py), so the exceptions are
only the channels that got a message since the last one, or that are still catching
up: the cursor stays short (about 20 bytes for a quiet stream, under 512 at 100 busy
channels). It is bytes (varints) in URL-safe base64, signed with a key every process
of the deployment shares (table ``server_keys``), so a cursor Herald did not write, or
a cut one, is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import ValidationError

VERSION = 1
MAC_BYTES = 8
MAX_CHARS = 512


@dataclass(frozen=True, slots=True)
class Cursor:
    watermark: int
    positions: dict[int, int]

    def after(self, channel_id: int) -> int:
        return self.positions.get(channel_id, self.watermark)


def _varint(out: bytearray, value: int) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def _unzigzag(value: int) -> int:
    return value >> 1 if not value & 1 else -((value + 1) >> 1)


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()[:MAC_BYTES]


def encode(key: bytes, watermark: int, positions: Mapping[int, int]) -> str:
    out = bytearray()
    _varint(out, VERSION)
    _varint(out, watermark)
    _varint(out, len(positions))
    prev = 0
    for channel_id in sorted(positions):
        _varint(out, channel_id - prev)
        _varint(out, _zigzag(positions[channel_id] - watermark))
        prev = channel_id
    payload = bytes(out)
    return base64.urlsafe_b64encode(payload + _mac(key, payload)).rstrip(b"=").decode("ascii")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def varint(self) -> int:
        value = shift = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise ValueError("truncated")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value


def decode(key: bytes, text: str, source: str = "Last-Event-ID") -> Cursor:
    """The cursor in ``text``; 422 naming ``source`` unless Herald wrote it."""
    bad = ValidationError(f"{source}: not a cursor this server wrote")
    if not text.isascii() or len(text) > MAX_CHARS or len(text) < 4:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise bad from None
    payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if len(raw) <= MAC_BYTES or not hmac.compare_digest(mac, _mac(key, payload)):
        raise bad
    try:
        reader = _Reader(payload)
        if reader.varint() != VERSION:
            raise bad
        watermark = reader.varint()
        positions: dict[int, int] = {}
        channel_id = 0
        for _ in range(reader.varint()):
            channel_id += reader.varint()
            positions[channel_id] = max(0, watermark + _unzigzag(reader.varint()))
        if reader.pos != len(payload):
            raise bad
    except ValueError:
        raise bad from None
    return Cursor(watermark, positions)
