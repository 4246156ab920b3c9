"""A member removed while their stream request is between its visibility check and its
registration must not end up with a live stream on the private channel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.keys import CHANNELS, HUB, STREAMS
from shared.bus import MemberRemoved
from tests.helpers import make_channel


@pytest.mark.parametrize("private", [True, False])
async def test_revoke_during_the_visibility_check_is_not_missed(client, alice, bob, private):
    await asyncio.wait_for(client.app[HUB].subscribed.wait(), 5)
    channel_id = await make_channel(client, alice, "secret", private=private)
    resp = await client.post(
        f"/api/v1/channels/{channel_id}/members", json={"user_id": bob.id}, headers=alice.headers
    )
    assert resp.status == 204
    service = client.app[CHANNELS]
    real_get = service.get
    checked, release = asyncio.Event(), asyncio.Event()

    async def paused_get(user: Any, cid: int) -> Any:
        # The check has read "bob is a member"; hold its answer until the removal's
        # revoke event went by (an await after the read, as a cache miss has two).
        channel = await real_get(user, cid)
        if user.id == bob.id:
            checked.set()
            await release.wait()
        return channel

    revoked = asyncio.Event()
    client.app[HUB].add_listener(lambda e: revoked.set() if isinstance(e, MemberRemoved) else None)
    service.get = paused_get  # type: ignore[method-assign]
    stream_req = asyncio.create_task(
        client.get(f"/api/v1/channels/{channel_id}/events", headers=bob.headers)
    )
    await asyncio.wait_for(checked.wait(), 5)
    resp = await client.delete(
        f"/api/v1/channels/{channel_id}/members/{bob.id}", headers=alice.headers
    )
    assert resp.status == 204
    await asyncio.wait_for(revoked.wait(), 5)
    release.set()
    stream = await asyncio.wait_for(stream_req, 5)
    try:
        if private:
            # Refused outright (nothing was sent yet): the channel is private to bob now.
            assert stream.status == 404
            assert not [s for s in client.app[STREAMS].streams.values() if s.user_id == bob.id]
        else:
            assert stream.status == 200  # checked again: a public channel stays visible
    finally:
        stream.close()
