"""Helpers for the SSE tests: a stream reader that parses frames, a real in-process
server (aiohttp's production runner, not the test server, which cancels handlers when
clients leave), a raw socket client that never reads."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from server.keys import CHANNELS, MESSAGES, STREAMS, USERS
from server.runner import HeraldServer
from server.sse.manager import StreamManager
from shared.models import User
from shared.settings import Settings
from tests.helpers import API


@dataclass
class Event:
    event: str
    data: Any
    id: int | str | None = None
    retry: int | None = None


def parse_frame(block: str) -> Event:
    fields: dict[str, str] = {}
    for line in block.split("\n"):
        name, _, value = line.partition(": ")
        fields[name] = value
    raw_id = fields.get("id")
    return Event(
        # A frame with neither event nor data (multi-channel streams' ``id:``-only
        # cursor frame) dispatches nothing in a browser: call it "id".
        event=fields.get("event", "message" if "data" in fields else "id"),
        data=json.loads(fields["data"]) if "data" in fields else None,
        # Message ids are numbers; multi-channel cursors are opaque text.
        id=None if raw_id is None else int(raw_id) if raw_id.isdigit() else raw_id,
        retry=int(fields["retry"]) if "retry" in fields else None,
    )


class SSEReader:
    """Reads frames from an aiohttp client response (or any StreamReader)."""

    def __init__(self, content: aiohttp.StreamReader | asyncio.StreamReader) -> None:
        self.content = content
        self.raw = b""

    async def next(self, timeout: float = 5.0) -> Event | None:
        """The next frame, or None at the end of the stream."""
        async with asyncio.timeout(timeout):
            lines: list[str] = []
            while True:
                line = await self.content.readline()
                self.raw += line
                if not line:
                    return None
                text = line.decode("utf-8").rstrip("\n")
                if text == "":
                    if lines:
                        return parse_frame("\n".join(lines))
                    continue
                lines.append(text)

    async def until(self, event: str, timeout: float = 5.0) -> Event:
        """Skip frames (heartbeats...) until one of kind ``event``."""
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.next(max(0.01, deadline - time.monotonic()))
            assert ev is not None, f"stream ended before {event!r}"
            if ev.event == event:
                return ev

    async def collect(self, timeout: float = 5.0, stop: str = "close") -> list[Event]:
        """Every frame until ``stop`` (included) or the end of the stream."""
        out: list[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.next(max(0.01, deadline - time.monotonic()))
            if ev is None:
                return out
            out.append(ev)
            if ev.event == stop:
                return out


@dataclass
class Live:
    """A running server plus handy shortcuts."""

    server: HeraldServer
    url: str

    @property
    def manager(self) -> StreamManager:
        return self.server.app[STREAMS]

    async def user(self, name: str, admin: bool = False) -> tuple[User, str]:
        return await self.server.app[USERS].create(name, is_admin=admin)

    async def channel(self, owner: User, name: str = "general", private: bool = False) -> int:
        channel = await self.server.app[CHANNELS].create(owner, name, "", private)
        return int(channel["id"])

    async def post(self, author: User, channel_id: int, body: str) -> dict[str, Any]:
        return await self.server.app[MESSAGES].post(author, channel_id, body)

    def events_url(self, channel_id: int, **query: str) -> str:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{self.url}{API}/channels/{channel_id}/events" + (f"?{qs}" if qs else "")


@asynccontextmanager
async def live_server(
    settings: Settings, host: str = "127.0.0.1", port: int = 0, **changes: Any
) -> AsyncIterator[Live]:
    server = HeraldServer(replace(settings, **changes))
    await server.start(host, port)
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
    try:
        yield Live(server, f"http://{connect_host}:{server.port}")
    finally:
        await server.stop()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def raw_stream(port: int, path: str, token: str, ip: str, rcvbuf: int) -> socket.socket:
    """A client that asks for a stream and then never reads (tiny receive buffer)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((ip, 0))
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock
