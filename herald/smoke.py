"""``herald smoke --url URL --token TOKEN``: a running deployment, end to end.

Steps, in order, each with its own deadline: health (``/health`` answers 200 and is
not down), auth (``/api/v1/me``), a throwaway channel, a stream on it (``ready``), a
message posted and received over the stream, a delayed message delivered by the worker
and received over the stream, then the channel deleted again. Exit 0 when every step
passed; 1 naming the first that failed. It runs as a client only: nothing of Herald's
is imported, so it works from any machine with the package installed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

API = "/api/v1"
STEP_TIMEOUT_S = 10.0
DELAYED_TIMEOUT_S = 30.0


class StepFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass
class Smoke:
    url: str
    token: str
    say: Callable[[str], None] = print

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=STEP_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await self.step("health", self.health(session))
            await self.step("auth", self.me(session))
            channel_id = await self.step("channel", self.create_channel(session))
            failure: StepFailed | None = None
            try:
                async with self.stream(session, channel_id) as events:
                    await self.step("stream", self.expect(events, "ready"))
                    await self.step("post", self.post_and_receive(session, channel_id, events))
                    await self.step(
                        "delayed",
                        self.delayed_and_receive(session, channel_id, events),
                        DELAYED_TIMEOUT_S,
                    )
            except StepFailed as exc:
                failure = exc
            try:
                await self.step("cleanup", self.delete_channel(session, channel_id))
            except StepFailed:
                if failure is None:
                    raise
            if failure is not None:
                raise failure

    async def step(self, name: str, work: Awaitable[Any], timeout_s: float = STEP_TIMEOUT_S) -> Any:
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                result = await work
        except StepFailed:
            raise
        except TimeoutError:
            raise StepFailed(name, f"no answer within {timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise StepFailed(name, f"{exc.__class__.__name__}: {exc}") from None
        self.say(f"ok {name} ({(time.monotonic() - started) * 1000:.0f} ms)")
        return result

    async def health(self, session: aiohttp.ClientSession) -> None:
        async with session.get(f"{self.url}/health") as resp:
            body = await resp.json(content_type=None)
            status = body.get("status") if isinstance(body, dict) else None
            if resp.status != 200 or status not in ("ok", "degraded"):
                raise StepFailed("health", f"HTTP {resp.status}, status {status!r}")

    async def me(self, session: aiohttp.ClientSession) -> None:
        async with session.get(f"{self.url}{API}/me", headers=self.headers) as resp:
            if resp.status != 200:
                raise StepFailed("auth", f"HTTP {resp.status} for /api/v1/me (bad token?)")

    async def create_channel(self, session: aiohttp.ClientSession) -> int:
        name = f"smoke-{secrets.token_hex(4)}"
        body = {"name": name, "topic": "herald smoke test", "is_private": True}
        async with session.post(
            f"{self.url}{API}/channels", json=body, headers=self.headers
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 201:
                raise StepFailed("channel", f"HTTP {resp.status}: {error_text(data)}")
            return int(data["id"])

    async def delete_channel(self, session: aiohttp.ClientSession, channel_id: int) -> None:
        async with session.delete(
            f"{self.url}{API}/channels/{channel_id}", headers=self.headers
        ) as resp:
            if resp.status != 204:
                raise StepFailed("cleanup", f"HTTP {resp.status} deleting channel {channel_id}")

    def stream(self, session: aiohttp.ClientSession, channel_id: int) -> _EventStream:
        return _EventStream(session, f"{self.url}{API}/channels/{channel_id}/events", self.headers)

    async def expect(
        self, events: AsyncIterator[tuple[str, Any]], kind: str, body: str | None = None
    ) -> Any:
        async for event, data in events:
            if event == kind and (body is None or data.get("body") == body):
                return data
        raise StepFailed(kind, "the stream ended")

    async def post_and_receive(
        self, session: aiohttp.ClientSession, channel_id: int, events: _EventStream
    ) -> None:
        body = f"smoke {secrets.token_hex(4)}"
        async with session.post(
            f"{self.url}{API}/channels/{channel_id}/messages",
            json={"body": body},
            headers=self.headers,
        ) as resp:
            if resp.status != 201:
                raise StepFailed("post", f"HTTP {resp.status}")
        await self.expect(events, "message", body)

    async def delayed_and_receive(
        self, session: aiohttp.ClientSession, channel_id: int, events: _EventStream
    ) -> None:
        body = f"smoke delayed {secrets.token_hex(4)}"
        async with session.post(
            f"{self.url}{API}/channels/{channel_id}/delayed-messages",
            json={"body": body, "delay_seconds": 1},
            headers=self.headers,
        ) as resp:
            if resp.status != 202:
                raise StepFailed("delayed", f"HTTP {resp.status}")
        await self.expect(events, "message", body)


def error_text(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", ""))
    return ""


class _EventStream:
    """One SSE stream as ``(event, data)`` pairs."""

    def __init__(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self.session = session
        self.url = url
        self.headers = headers
        self.resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> _EventStream:
        self.resp = await self.session.get(self.url, headers=self.headers)
        if self.resp.status != 200:
            status = self.resp.status
            self.resp.release()
            raise StepFailed("stream", f"HTTP {status}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.resp is not None:
            self.resp.close()

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> tuple[str, Any]:
        assert self.resp is not None
        event, data = "message", None
        while True:
            line = await self.resp.content.readline()
            if not line:
                raise StopAsyncIteration
            text = line.decode("utf-8").rstrip("\r\n")
            if not text:
                if data is not None:
                    return event, data
                event = "message"
                continue
            field, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data = json.loads(value)


def run_smoke(url: str, token: str) -> int:
    """The command: 0 if every step passed, 1 naming the one that did not."""
    try:
        asyncio.run(Smoke(url.rstrip("/"), token).run())
    except StepFailed as exc:
        print(f"FAILED {exc.step}: {exc.reason}")
        return 1
    print("smoke test passed")
    return 0
