"""Durable replay: ``Last-Event-ID`` → every later message from PostgreSQL, then live.

The stream is registered (so its channels' feeds buffer for it) before the feeds'
heads are read; the replay then covers exactly (client's position, head] of each
channel, and the buffer everything after the head. ``StreamManager.go_live`` writes
the buffer, skipping what the replay sent. A channel with more than ``REPLAY_MAX``
missed is not replayed: ``reset`` tells the client to refetch it over REST.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from aiohttp import web

from server.sse import cursor, frames
from server.sse.cursor import Cursor
from server.sse.manager import StreamManager
from server.sse.stream import Stream
from shared.errors import ValidationError
from shared.services.messages import MessageService
from shared.validation import MAX_BIGINT

logger = logging.getLogger(__name__)

# More missed than this: nothing is replayed, ``reset`` tells the client to refetch.
REPLAY_MAX = 1000
# Messages read from PostgreSQL at a time while replaying.
REPLAY_PAGE = 100
HEADER = "Last-Event-ID"
QUERY = "last_event_id"


def raw_last_event_id(request: web.Request) -> tuple[str, str] | None:
    """The client's resume point as sent, with where it came from, or None. The header
    wins over the query parameter (browsers keep the URL they started with and update
    the header). An empty value means none."""
    raw = request.headers.get(HEADER)
    source = HEADER
    if raw is None or not raw.strip():
        raw = request.query.get(QUERY)
        source = QUERY
    if raw is None or not raw.strip():
        return None
    return raw.strip(" \t"), source


def parse_last_event_id(request: web.Request) -> int | None:
    """A per-channel stream's resume point: a message id, or None."""
    found = raw_last_event_id(request)
    return None if found is None else last_event_id(*found)


def last_event_id(raw: str, source: str = HEADER) -> int:
    text = raw.strip(" \t")
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise ValidationError(f"{source}: must be a message id (a whole number 0 or more)")
    value = int(text)
    if value > MAX_BIGINT:
        raise ValidationError(f"{source}: out of range")
    return value


def parse_resume(
    request: web.Request, key: bytes, channels: Iterable[int] | None = None
) -> Cursor | None:
    """A multi-channel stream's resume point: a cursor Herald wrote, or a message id
    (after it in every channel); None without one; 422 for anything else. ``channels``:
    the stream's list, for cursors written against it."""
    found = raw_last_event_id(request)
    if found is None:
        return None
    raw, source = found
    if raw.isascii() and raw.isdigit():
        return Cursor(last_event_id(raw, source), {})
    return cursor.decode(key, raw, source, channels)


async def replay(
    stream: Stream,
    response: web.StreamResponse,
    messages: MessageService,
    manager: StreamManager,
    after_id: int,
    head: int,
) -> None:
    """Per-channel stream: every message with ``after_id`` < id <= ``head`` (the feed's
    head when the stream registered), or ``reset``; a slow reader slows the replay, it
    does not grow our memory."""
    channel_id = stream.channel_id
    stream.sent_id = after_id
    if after_id >= head:
        if after_id > head:
            # The client's id is beyond what this channel has written: a restored
            # database, or another deployment's id. What it holds is not ours.
            newest = await messages.newest_id(channel_id)
            if newest < after_id:
                await write_reset(stream, response, manager, newest)
        return
    span = {channel_id: (after_id, head)}
    missed = (await messages.count_between(span, REPLAY_MAX + 1))[channel_id]
    if missed > REPLAY_MAX:
        await write_reset(stream, response, manager, head)
        return
    sent = 0
    position = after_id
    while sent < missed and stream.close_reason is None:
        rows = await messages.between(span, position, REPLAY_PAGE)
        for row in rows:
            if stream.close_reason is not None:
                break
            manager.note_write(stream)
            await response.write(frames.message(row).raw)
            stream.events_sent += 1
            position = stream.sent_id = row["id"]
            sent += 1
        if len(rows) < REPLAY_PAGE:
            break
    manager.replayed.inc(n=sent)
    manager.count_sent("message", sent)


async def write_reset(
    stream: Stream, response: web.StreamResponse, manager: StreamManager, newest: int
) -> None:
    stream.sent_id = newest
    manager.note_write(stream)
    await response.write(frames.reset(newest))
    stream.events_sent += 1
    manager.resets.inc()
    manager.count_sent("reset")


def setup_cursor(stream: Stream, key: bytes) -> bytes:
    """An ``id:`` frame for a stream still replaying (its buffer not yet written, so
    the process's watermark is not yet its own): every position spelled out against
    the smallest one. Empty if that would be longer than a cursor may be."""
    positions = stream.positions or {}
    if not positions:
        return b""
    base = min(positions.values())
    text = cursor.encode(
        key, base, {c: p for c, p in positions.items() if p != base}, stream.channels
    )
    return frames.cursor_id(text) if len(text) <= cursor.MAX_CHARS else b""


async def replay_many(
    stream: Stream,
    response: web.StreamResponse,
    messages: MessageService,
    manager: StreamManager,
    resume: Cursor,
    heads: Mapping[int, int],
) -> None:
    """Multi-channel stream: for each channel, the messages after the cursor's position
    up to the feed's head, all in id order (which keeps each channel's order); a
    channel with more than ``REPLAY_MAX`` missed gets ``reset`` instead."""
    positions = stream.positions
    assert positions is not None
    key = manager.cursor_key
    spans: dict[int, tuple[int, int]] = {}
    for channel_id, head in heads.items():
        after = resume.after(channel_id)
        positions[channel_id] = after
        if after < head:
            spans[channel_id] = (after, head)
    counts = await messages.count_between(spans, REPLAY_MAX + 1)
    for channel_id, missed in sorted(counts.items()):
        if missed > REPLAY_MAX:
            head = spans.pop(channel_id)[1]
            positions[channel_id] = head
            manager.note_write(stream)
            await response.write(frames.reset_multi(channel_id, head) + setup_cursor(stream, key))
            stream.events_sent += 1
            manager.resets.inc()
            manager.count_sent("reset")
        elif missed == 0:
            spans.pop(channel_id, None)
    sent = 0
    position = 0
    while spans and stream.close_reason is None:
        rows = await messages.between(spans, position, REPLAY_PAGE)
        if not rows or stream.close_reason is not None:
            break
        for row in rows:
            positions[row["channel_id"]] = row["id"]
        position = rows[-1]["id"]
        manager.note_write(stream)
        await response.write(
            b"".join(frames.message_frames(r).bare.raw for r in rows) + setup_cursor(stream, key)
        )
        stream.events_sent += len(rows)
        sent += len(rows)
        if len(rows) < REPLAY_PAGE:
            break
    manager.replayed.inc(n=sent)
    manager.count_sent("message", sent)
