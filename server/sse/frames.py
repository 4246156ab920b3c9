"""Server-Sent Events wire format: each frame encoded once, written to many streams.

A frame exists in two forms: ``raw`` (the SSE bytes) and ``chunked`` (the same bytes in
one HTTP/1.1 chunk). Streams are written straight to their transport, bypassing
aiohttp's payload writer, so the chunk framing is done here, once per event rather than
once per subscriber. HTTP/1.0 streams (no chunked encoding) take the raw form.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from shared.models import MessageJson

# The ``retry:`` sent with ``ready``: how long a browser waits before reconnecting after
# the connection drops without a ``close`` event.
READY_RETRY_MS = 3000


class Frame(NamedTuple):
    raw: bytes
    chunked: bytes


def encode(
    event: str, data: Any, *, id: int | str | None = None, retry: int | None = None
) -> bytes:
    """One SSE frame; ``data`` is always a single line of JSON."""
    lines = []
    if retry is not None:
        lines.append(f"retry: {int(retry)}")
    lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {id}")
    # json.dumps escapes newlines inside strings, so the payload stays on one line.
    lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def chunk(raw: bytes) -> bytes:
    """``raw`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(raw), raw)


def frame(event: str, data: Any, *, id: int | None = None, retry: int | None = None) -> Frame:
    raw = encode(event, data, id=id, retry=retry)
    return Frame(raw, chunk(raw))


def ready(connection_id: str, channel_id: int, heartbeat_s: float) -> bytes:
    return encode(
        "ready",
        {"connection_id": connection_id, "channel_id": channel_id, "heartbeat_s": heartbeat_s},
        retry=READY_RETRY_MS,
    )


class MessageFrames(NamedTuple):
    """One message, encoded once for every stream that gets it: ``with_id`` (the
    per-channel stream's, ``id:`` = the message id) and ``bare`` (multi-channel streams',
    whose ``id:`` is the stream's own cursor, sent after it in its own frame)."""

    with_id: Frame
    bare: Frame


def message(msg: MessageJson | Mapping[str, Any]) -> Frame:
    """A ``message`` event: the only kind (with ``reset``) that carries ``id:``."""
    return frame("message", msg, id=int(msg["id"]))


def message_frames(msg: MessageJson) -> MessageFrames:
    data = b"data: " + json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
    with_id = b"event: message\nid: %d\n" % msg["id"] + data
    bare = b"event: message\n" + data
    return MessageFrames(Frame(with_id, chunk(with_id)), Frame(bare, chunk(bare)))


def cursor_id(cursor: str) -> bytes:
    """An ``id:``-only frame: dispatches no event, but browsers take it as the stream's
    last event id (WHATWG HTML, "dispatch the event", step 1) and send it back as
    ``Last-Event-ID`` when they reconnect."""
    return b"id: " + cursor.encode("ascii") + b"\n\n"


def ready_multi(connection_id: str, channels: Sequence[int], heartbeat_s: float) -> bytes:
    return encode(
        "ready",
        {"connection_id": connection_id, "channels": list(channels), "heartbeat_s": heartbeat_s},
        retry=READY_RETRY_MS,
    )


def subscribed(channel_id: int) -> bytes:
    return encode("subscribed", {"channel_id": channel_id})


def unsubscribed(channel_id: int, reason: str = "revoked") -> bytes:
    return encode("unsubscribed", {"channel_id": channel_id, "reason": reason})


def reset_multi(channel_id: int, last_id: int) -> bytes:
    """A channel of a multi-channel stream missed too much: refetch it up to ``last_id``
    (the stream's cursor frame follows)."""
    return encode("reset", {"channel_id": channel_id, "last_id": last_id})


def heartbeat(ts: float | None = None) -> Frame:
    return frame("heartbeat", {"ts": int(time.time() if ts is None else ts)})


def reset(last_id: int) -> bytes:
    """More was missed than replay covers: the client refetches up to ``last_id``."""
    return encode("reset", {"last_id": last_id}, id=last_id)


def close(reason: str, reconnect_after_ms: int) -> Frame:
    """``retry:`` first, since browsers honour only that, then the ``close`` event."""
    return frame(
        "close",
        {"reason": reason, "reconnect_after_ms": reconnect_after_ms},
        retry=reconnect_after_ms,
    )
