"""Two server "processes" (two apps on one PostgreSQL and Redis): a message posted over REST
on one reaches SSE subscribers on the other, through the one Redis subscription each."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from server.keys import HUB
from shared.constants import events_channel
from shared.settings import Settings
from tests.conftest import AuthUser
from tests.helpers import API, make_channel

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


class SSEReader:
    """Reads ``event:``/``id:``/``data:`` frames from a streaming response."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp

    async def frame(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.resp.content.readuntil(b"\n\n"), timeout)
        frame: dict[str, Any] = {}
        for line in raw.decode().splitlines():
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            frame[key] = json.loads(value) if key == "data" else value
        return frame

    async def next_event(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame of kind ``event``, skipping heartbeats."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no {event} event")
            frame = await self.frame(left)
            if frame.get("event") == event:
                return frame


async def all_subscribed(
    clients: list[TestClient[Any, Any]], redis: aioredis.Redis, settings: Settings
) -> None:
    """Every app's hub holds its subscription, as Redis itself reports it."""
    for c in clients:
        await asyncio.wait_for(c.app[HUB].subscribed.wait(), 5)
    channel = events_channel(settings.redis_db)
    deadline = asyncio.get_running_loop().time() + 5
    while asyncio.get_running_loop().time() < deadline:
        counts = dict(await redis.pubsub_numsub(channel))
        if counts.get(channel.encode(), 0) >= len(clients):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("hubs not subscribed")


@pytest.fixture
async def two(
    client: TestClient[Any, Any], make_client: MakeClient, redis: aioredis.Redis, settings: Settings
) -> tuple[TestClient[Any, Any], TestClient[Any, Any]]:
    other = await make_client()
    await all_subscribed([client, other], redis, settings)
    return client, other


async def open_stream(client: TestClient[Any, Any], channel_id: int, user: AuthUser) -> SSEReader:
    resp = await client.get(f"{API}/channels/{channel_id}/events", headers=user.headers)
    assert resp.status == 200, await resp.text()
    reader = SSEReader(resp)
    ready = await reader.frame()
    assert ready["event"] == "ready"
    assert ready["data"]["channel_id"] == channel_id
    return reader


async def test_message_posted_on_a_reaches_sse_on_b(
    two: tuple[TestClient[Any, Any], TestClient[Any, Any]], alice: AuthUser, bob: AuthUser
) -> None:
    a, b = two
    channel_id = await make_channel(a, alice, "x-proc")
    on_b = await open_stream(b, channel_id, bob)
    on_a = await open_stream(a, channel_id, alice)
    try:
        posted = []
        for text in ("one", "twö 🚀", "three\nlines"):
            resp = await a.post(
                f"{API}/channels/{channel_id}/messages", json={"body": text}, headers=alice.headers
            )
            assert resp.status == 201
            posted.append(await resp.json())
        for reader in (on_b, on_a):
            for message in posted:
                frame = await reader.next_event("message")
                assert frame["id"] == str(message["id"])
                assert frame["data"] == message  # exactly what REST returned
        # And the other way round: posted on B, seen on A.
        resp = await b.post(
            f"{API}/channels/{channel_id}/messages", json={"body": "from b"}, headers=bob.headers
        )
        back = await resp.json()
        assert (await on_a.next_event("message"))["data"] == back
        assert (await on_b.next_event("message"))["data"] == back
    finally:
        on_a.resp.close()
        on_b.resp.close()


async def test_other_channels_messages_do_not_leak(
    two: tuple[TestClient[Any, Any], TestClient[Any, Any]], alice: AuthUser
) -> None:
    a, b = two
    ids = []
    for name in ("quiet", "noisy"):
        ids.append(await make_channel(a, alice, name))
    reader = await open_stream(b, ids[0], alice)
    try:
        await a.post(f"{API}/channels/{ids[1]}/messages", json={"body": "x"}, headers=alice.headers)
        resp = await a.post(
            f"{API}/channels/{ids[0]}/messages", json={"body": "mine"}, headers=alice.headers
        )
        mine = await resp.json()
        frame = await reader.next_event("message")
        assert frame["data"] == mine  # the first message event is the quiet channel's own
    finally:
        reader.resp.close()


async def test_removal_on_a_revokes_stream_on_b(
    two: tuple[TestClient[Any, Any], TestClient[Any, Any]], alice: AuthUser, bob: AuthUser
) -> None:
    a, b = two
    channel_id = await make_channel(a, alice, "club", private=True)
    await a.post(
        f"{API}/channels/{channel_id}/members", json={"user_id": bob.id}, headers=alice.headers
    )
    reader = await open_stream(b, channel_id, bob)
    try:
        resp = await a.delete(
            f"{API}/channels/{channel_id}/members/{bob.id}", headers=alice.headers
        )
        assert resp.status == 204
        close = await reader.next_event("close")
        assert close["data"]["reason"] == "revoked"
        # B now refuses bob: the private channel is invisible to him.
        resp = await b.get(f"{API}/channels/{channel_id}/events", headers=bob.headers)
        assert resp.status == 404
    finally:
        reader.resp.close()


async def test_private_stream_invisible_on_every_process(
    two: tuple[TestClient[Any, Any], TestClient[Any, Any]], alice: AuthUser, bob: AuthUser
) -> None:
    a, b = two
    channel_id = await make_channel(a, alice, "vault", private=True)
    for c in (a, b):
        resp = await c.get(f"{API}/channels/{channel_id}/events", headers=bob.headers)
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "channel_not_found"


async def test_hub_resubscribes_after_losing_its_redis_connection(
    two: tuple[TestClient[Any, Any], TestClient[Any, Any]],
    alice: AuthUser,
    redis: aioredis.Redis,
    settings: Settings,
) -> None:
    a, b = two
    channel_id = await make_channel(a, alice, "sturdy")
    reader = await open_stream(b, channel_id, alice)
    try:
        # Kill both apps' subscriber connections on this test's Redis DB (and only those).
        clients = await redis.client_list(_type="pubsub")
        mine = [c for c in clients if c.get("db") == str(settings.redis_db)]
        assert len(mine) >= 2
        for c in mine:
            await redis.client_kill_filter(_id=c["id"])
        await all_subscribed([a, b], redis, settings)  # both came back on their own
        resp = await a.post(
            f"{API}/channels/{channel_id}/messages", json={"body": "after"}, headers=alice.headers
        )
        after = await resp.json()
        assert (await reader.next_event("message"))["data"] == after
    finally:
        reader.resp.close()


def test_hub_dispatch_survives_bad_events_and_bad_listeners(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from server.sse.hub import Hub
    from shared.bus import ChannelDeleted
    from shared.metrics import Metrics

    hub = Hub(redis=None, channel="unused", metrics=Metrics())  # type: ignore[arg-type]
    got: list[dict[str, Any]] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    hub.add_listener(broken)
    hub.add_listener(got.append)
    good = b'{"type": "channel_deleted", "channel_id": 3}'
    for data in (b"{not json", None, b"[1, 2]", b'"text"', b'{"type": "message"}', good):
        hub.dispatch(data)
    assert got == [ChannelDeleted(3)]  # decoded once; the second listener still ran
    assert "ignoring malformed bus event" in caplog.text
    assert "bus listener failed" in caplog.text
