"""Revocable, expiring tokens over HTTP: a revoked or expired token gets 401 within 2 s
(the user's other tokens keep working), and open streams of both kinds opened with it
get ``close`` ``revoked`` and end — by the bus event, by the per-server sweep when the
event and the cache delete are lost, and at the token's expiry."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.keys import DB, HUB, REDIS, STREAMS, USERS
from shared.services.users import hash_token
from tests.conftest import AuthUser
from tests.helpers import API, expect_error, make_channel, wait_for
from tests.sse_helpers import SSEReader

BOUND_S = 2.0


async def me(client: TestClient[Any, Any], token: str) -> int:
    resp = await client.get(f"{API}/me", headers={"Authorization": f"Bearer {token}"})
    await resp.read()
    return resp.status


async def second_token(client: TestClient[Any, Any], user: AuthUser, **kw: Any) -> tuple[int, str]:
    info, token = await client.app[USERS].create_token(user.user, **kw)
    return info.id, token


async def test_revoked_token_is_401_and_the_users_other_tokens_work(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    token_id, token = await second_token(client, alice)
    assert await me(client, token) == 200  # cached now
    assert await me(client, alice.token) == 200
    await client.app[USERS].revoke_token(token_id)
    resp = await client.get(f"{API}/me", headers={"Authorization": f"Bearer {token}"})
    await expect_error(resp, 401, "unauthorized")  # at once: the revoke dropped the entry
    assert await me(client, alice.token) == 200
    resp = await client.post(f"{API}/channels", json={"name": "still-works"}, headers=alice.headers)
    assert resp.status == 201
    # On the stream route too, header or query.
    channel_id = await make_channel(client, alice, "after")
    for kw in (
        {"headers": {"Authorization": f"Bearer {token}"}},
        {"params": {"access_token": token}},
    ):
        resp = await client.get(f"{API}/channels/{channel_id}/events", **kw)
        await expect_error(resp, 401)
        resp = await client.get(f"{API}/events", **kw)
        await expect_error(resp, 401)


async def test_expired_token_is_401_before_and_after_first_use(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    db = client.app[DB]
    token_id, token = await second_token(client, alice, expires_in_days=1)
    await db.execute(
        "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = %s",
        (token_id,),
    )
    assert await me(client, token) == 401
    # Used (and cached) while valid, then expiring: refused within 2 s of its expiry.
    token_id, token = await second_token(client, alice, expires_in_days=1)
    await db.execute(
        "UPDATE api_tokens SET expires_at = now() + interval '1 second' WHERE id = %s",
        (token_id,),
    )
    assert await me(client, token) == 200
    expires = await db.fetchval(
        "SELECT extract(epoch FROM expires_at)::float8 FROM api_tokens WHERE id = %s",
        (token_id,),
    )

    async def refused() -> bool:
        return await me(client, token) == 401

    await wait_for(refused, 5, "expired token refused", interval=0.05)
    assert time.time() - expires < BOUND_S
    assert await me(client, alice.token) == 200


async def test_revoke_with_the_cache_delete_and_event_lost_still_refused_within_2s(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    token_id, token = await second_token(client, alice)
    assert await me(client, token) == 200
    # Revoked in PostgreSQL only: no cache delete, no bus event.
    await client.app[DB].execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE id = %s", (token_id,)
    )
    started = time.monotonic()

    async def refused() -> bool:
        return await me(client, token) == 401

    await wait_for(refused, 5, "revoked token refused", interval=0.05)
    assert time.monotonic() - started < BOUND_S
    assert await me(client, alice.token) == 200


async def open_stream(client: TestClient[Any, Any], path: str, token: str) -> tuple[Any, SSEReader]:
    resp = await client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, await resp.text()
    reader = SSEReader(resp.content)
    await reader.until("ready")
    return resp, reader


async def ends_revoked(reader: SSEReader, within: float) -> float:
    """Read until ``close``: it says ``revoked`` (with its retry line) and the body ends
    right after. Returns when close arrived (monotonic)."""
    close = await reader.until("close", within)
    at = time.monotonic()
    assert close.data["reason"] == "revoked"
    assert close.retry == close.data["reconnect_after_ms"]
    assert await reader.next(5) is None  # the response ends
    return at


@pytest.mark.parametrize("how", ["bus", "sweep"])
async def test_streams_of_a_revoked_token_close_revoked(
    client: TestClient[Any, Any], alice: AuthUser, how: str
) -> None:
    await asyncio.wait_for(client.app[HUB].subscribed.wait(), 5)
    channel_id = await make_channel(client, alice, "watched")
    token_id, token = await second_token(client, alice)
    one = await open_stream(client, f"{API}/channels/{channel_id}/events", token)
    many = await open_stream(client, f"{API}/events", token)
    chosen = await open_stream(client, f"{API}/events?channels={channel_id}", token)
    other = await open_stream(client, f"{API}/channels/{channel_id}/events", alice.token)
    try:
        started = time.monotonic()
        if how == "bus":
            await client.app[USERS].revoke_token(token_id)
        else:  # the event and the cache delete lost: PostgreSQL only
            await client.app[DB].execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE id = %s", (token_id,)
            )
        for _, reader in (one, many, chosen):
            assert await ends_revoked(reader, 5) - started < BOUND_S
        # The user's stream on another token stays open and gets what is posted.
        resp = await client.post(
            f"{API}/channels/{channel_id}/messages", json={"body": "hi"}, headers=alice.headers
        )
        assert resp.status == 201
        assert (await other[1].until("message")).data["body"] == "hi"
        assert [s.token_id for s in client.app[STREAMS].streams.values()] == [
            (await client.app[USERS].authenticate(alice.token)).token_id  # type: ignore[union-attr]
        ]
    finally:
        for resp, _ in (one, many, chosen, other):
            resp.close()


async def test_stream_closes_revoked_when_its_token_expires(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    channel_id = await make_channel(client, alice, "expiring")
    token_id, token = await second_token(client, alice, expires_in_days=1)
    db = client.app[DB]
    await db.execute(
        "UPDATE api_tokens SET expires_at = now() + interval '1.5 seconds' WHERE id = %s",
        (token_id,),
    )
    resp, reader = await open_stream(client, f"{API}/channels/{channel_id}/events", token)
    try:
        expires = await db.fetchval(
            "SELECT extract(epoch FROM expires_at)::float8 FROM api_tokens WHERE id = %s",
            (token_id,),
        )
        await ends_revoked(reader, 6)
        assert time.time() - expires < BOUND_S
    finally:
        resp.close()


async def test_token_cache_entry_holds_no_token(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    assert await me(client, alice.token) == 200
    raw = await client.app[REDIS].get(f"herald:cache:token:{hash_token(alice.token).hex()}")
    assert raw is not None and b'"tok"' in raw
    assert alice.token.encode() not in raw and alice.token[4:].encode() not in raw
