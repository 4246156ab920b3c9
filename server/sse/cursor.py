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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shared.errors import ValidationError

VERSION = 1  # channels spelled out: stands on its own
VERSION_LIST = 2  # channels as a bitmap over the stream's own channel list
MAC_BYTES = 8
MAX_CHARS = 512
# Past this, the bitmap form is tried too and the shorter one sent.
SHORT_CHARS = 160


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


def _sign(key: bytes, payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload + _mac(key, payload)).rstrip(b"=").decode("ascii")


def list_digest(channels: Sequence[int]) -> bytes:
    """Four bytes naming a sorted channel list (which list a bitmap is over)."""
    out = bytearray()
    for channel_id in channels:
        _varint(out, channel_id)
    return hashlib.blake2b(bytes(out), digest_size=4).digest()


def encode(
    key: bytes,
    watermark: int,
    positions: Mapping[int, int],
    channels: Iterable[int] | None = None,
) -> str:
    """The cursor; with the stream's ``channels``, a long one (many busy channels with
    far-apart ids) is written as a bitmap over that list when that is shorter."""
    out = bytearray()
    _varint(out, VERSION)
    _varint(out, watermark)
    _varint(out, len(positions))
    prev = 0
    for channel_id in sorted(positions):
        _varint(out, channel_id - prev)
        _varint(out, _zigzag(positions[channel_id] - watermark))
        prev = channel_id
    text = _sign(key, bytes(out))
    if len(text) <= SHORT_CHARS or channels is None:
        return text
    listed = sorted(channels)
    if not set(positions) <= set(listed):
        return text
    out = bytearray()
    _varint(out, VERSION_LIST)
    _varint(out, watermark)
    # The lowest position: where every channel resumes if the list is not the same.
    _varint(out, watermark - min(watermark, *positions.values()))
    out += list_digest(listed)
    bits = bytearray((len(listed) + 7) // 8)
    for i, channel_id in enumerate(listed):
        if channel_id in positions:
            bits[i // 8] |= 1 << (i % 8)
    out += bits
    for channel_id in listed:
        if channel_id in positions:
            _varint(out, _zigzag(positions[channel_id] - watermark))
    other = _sign(key, bytes(out))
    return other if len(other) < len(text) else text


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


def decode(
    key: bytes,
    text: str,
    source: str = "Last-Event-ID",
    channels: Iterable[int] | None = None,
) -> Cursor:
    """The cursor in ``text``; 422 naming ``source`` unless Herald wrote it. A bitmap
    cursor is read against ``channels`` (the reconnecting stream's list); over another
    list it resumes every channel from its lowest position (repeats, never gaps)."""
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
        version = reader.varint()
        if version == VERSION_LIST:
            return _decode_list(reader, payload, sorted(channels or ()), bad)
        if version != VERSION:
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


def _decode_list(reader: _Reader, payload: bytes, listed: list[int], bad: Exception) -> Cursor:
    watermark = reader.varint()
    lowest = max(0, watermark - reader.varint())
    digest = payload[reader.pos : reader.pos + 4]
    reader.pos += 4
    if len(digest) != 4:
        raise ValueError("truncated")
    if digest != list_digest(listed):
        return Cursor(lowest, {})
    size = (len(listed) + 7) // 8
    bits = payload[reader.pos : reader.pos + size]
    reader.pos += size
    if len(bits) != size:
        raise ValueError("truncated")
    positions: dict[int, int] = {}
    for i, channel_id in enumerate(listed):
        if bits[i // 8] >> (i % 8) & 1:
            positions[channel_id] = max(0, watermark + _unzigzag(reader.varint()))
    if reader.pos != len(payload):
        raise bad
    return Cursor(watermark, positions)
