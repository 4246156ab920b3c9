"""Durable replay: ``Last-Event-ID`` → every later message from PostgreSQL, then live.

The stream is registered (and so buffers live events) before the database is read, so
a message committed during the replay is either in the query's result or in the
buffer, or both; ``StreamManager.go_live`` writes the buffer skipping what was sent.
"""

from __future__ import annotations

import logging

from aiohttp import web

from server.sse import frames
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


def parse_last_event_id(request: web.Request) -> int | None:
    """The client's last seen message id, or None. The header wins over the query
    parameter (browsers keep the URL they started with and update the header). An
    empty value means none; anything but a decimal 0..2**63-1 is a 422."""
    raw = request.headers.get(HEADER)
    source = HEADER
    if raw is None or not raw.strip():
        raw = request.query.get(QUERY)
        source = QUERY
    if raw is None or not raw.strip():
        return None
    return last_event_id(raw, source)


def last_event_id(raw: str, source: str = HEADER) -> int:
    text = raw.strip(" \t")
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise ValidationError(f"{source}: must be a message id (a whole number 0 or more)")
    value = int(text)
    if value > MAX_BIGINT:
        raise ValidationError(f"{source}: out of range")
    return value


async def replay(
    stream: Stream,
    response: web.StreamResponse,
    messages: MessageService,
    manager: StreamManager,
    after_id: int,
) -> None:
    """Write every message of the channel with id > ``after_id`` (or ``reset``), with
    backpressure: a slow reader slows the replay, it does not grow our memory."""
    channel_id = stream.channel_id
    stream.sent_id = after_id
    missed = await messages.count_since(channel_id, after_id, REPLAY_MAX + 1)
    if missed > REPLAY_MAX:
        await write_reset(stream, response, manager, await messages.newest_id(channel_id))
        return
    if not missed:
        # Nothing missed, unless the client's id is larger than any this channel has
        # (a restored database): then what it holds is not ours; it must refetch.
        newest = await messages.newest_id(channel_id)
        if newest < after_id:
            await write_reset(stream, response, manager, newest)
        return
    replayed: set[int] = set()
    stream.replayed = replayed
    sent = 0
    cursor = after_id
    # Page by page: a reconnect storm of many streams must not hold 1000 full messages
    # each. The counted ones are the first ``missed`` ids after ``after_id`` (posts into
    # a channel commit in id order); anything newer is also in the stream's live buffer.
    while sent < missed and stream.close_reason is None:
        rows = await messages.since(channel_id, cursor, REPLAY_PAGE)
        for row in rows:
            if stream.close_reason is not None:
                break
            frame = frames.message(row)
            manager.note_write(stream)
            await response.write(frame.raw)
            stream.events_sent += 1
            replayed.add(int(row["id"]))
            cursor = int(row["id"])
            sent += 1
        if len(rows) < REPLAY_PAGE:
            break
    manager.replayed_total += sent
    manager.count_sent("message", sent)
    manager.metrics.sse_replayed.inc(sent)


async def write_reset(
    stream: Stream, response: web.StreamResponse, manager: StreamManager, newest: int
) -> None:
    stream.sent_id = newest
    manager.note_write(stream)
    await response.write(frames.reset(newest))
    stream.events_sent += 1
    manager.resets_total += 1
    manager.count_sent("reset")
    manager.metrics.sse_resets.inc()
