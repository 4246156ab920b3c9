"""The registry of this process's SSE streams and the fan-out of bus events to them."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from server.sse.frames import encode
from shared.metrics import Metrics
from shared.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Stream:
    """One open SSE response: its metadata and its queue of encoded frames."""

    channel_id: int
    user_id: int
    ip: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    connected_at: float = field(default_factory=time.time)
    last_write_at: float = field(default_factory=time.time)
    events_sent: int = 0
    pending: deque[bytes] = field(default_factory=deque)
    pending_bytes: int = 0
    close_reason: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, frame: bytes) -> None:
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        self.wake.set()

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.wake.set()

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ip": self.ip,
            "channel_id": self.channel_id,
            "user_id": self.user_id,
            "connected_at": self.connected_at,
            "last_write_at": self.last_write_at,
            "events_sent": self.events_sent,
        }


class StreamManager:
    """Registry keyed by id, indexed by channel and IP for O(1) limits and fan-out."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.streams: dict[str, Stream] = {}
        self.by_channel: dict[int, set[Stream]] = {}
        self.by_ip: dict[str, int] = {}
        self.peak = 0
        self.opened_total = 0
        self._seq = itertools.count()

    def register(self, stream: Stream) -> None:
        self.streams[stream.id] = stream
        self.by_channel.setdefault(stream.channel_id, set()).add(stream)
        self.by_ip[stream.ip] = self.by_ip.get(stream.ip, 0) + 1
        self.opened_total += 1
        self.peak = max(self.peak, len(self.streams))
        self.metrics.sse_opened.inc()
        self.metrics.sse_active.set(len(self.streams))
        self.metrics.sse_peak.set(self.peak)

    def unregister(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        subs = self.by_channel.get(stream.channel_id)
        if subs is not None:
            subs.discard(stream)
            if not subs:
                del self.by_channel[stream.channel_id]
        left = self.by_ip.get(stream.ip, 1) - 1
        if left > 0:
            self.by_ip[stream.ip] = left
        else:
            self.by_ip.pop(stream.ip, None)
        self.metrics.sse_active.set(len(self.streams))

    def on_event(self, event: dict[str, Any]) -> None:
        """Bus listener: encode a message once, queue it on every local subscriber."""
        kind = event.get("type")
        channel_id = event.get("channel_id")
        subs = self.by_channel.get(channel_id) if isinstance(channel_id, int) else None
        if not subs:
            return
        if kind == "message":
            message = event.get("message") or {}
            frame = encode("message", message, id=message.get("id"))
            for stream in subs:
                stream.push(frame)
        elif kind == "revoke":
            for stream in list(subs):
                if stream.user_id == event.get("user_id"):
                    stream.close("revoked")
        elif kind == "channel_deleted":
            for stream in list(subs):
                stream.close("revoked")

    def close_all(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            stream.close(reason)

    def snapshot(self) -> list[dict[str, Any]]:
        return [s.info() for s in self.streams.values()]
