"""The Redis metadata cache: hits, invalidation from any process, stampedes, privacy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from server.keys import CACHE, DB, METRICS, REDIS
from shared.cache import ChannelEntry, MetadataCache
from shared.constants import channel_cache_key, channel_gen_key, channel_lock_key
from shared.db.monitor import normalise
from shared.db.pool import Database
from shared.metrics import Metrics
from shared.models import Credential, User
from shared.services.channels import DETAIL_SQL
from shared.settings import Settings
from tests.conftest import AuthUser, UserFactory
from tests.helpers import API, make_channel

DETAIL = normalise(DETAIL_SQL)


def detail_loads(client: TestClient[Any, Any]) -> int:
    """How often this app loaded a channel detail from PostgreSQL."""
    monitor = client.app[DB].monitor
    assert monitor is not None
    stats = monitor.statements.get(DETAIL)
    return 0 if stats is None else stats.calls


def statements(client: TestClient[Any, Any]) -> int:
    """Statements run by requests so far (background loops are not in it)."""
    monitor = client.app[DB].monitor
    assert monitor is not None
    return monitor.request_statements_total


async def get(client: TestClient[Any, Any], user: AuthUser, channel_id: int) -> Any:
    resp = await client.get(f"{API}/channels/{channel_id}", headers=user.headers)
    return resp.status, await resp.json()


def entry(channel_id: int, *, name: str = "x", private: bool = False, members: Any = ()) -> Any:
    channel = {"id": channel_id, "name": name, "is_private": private, "member_count": 1}
    return ChannelEntry(channel, frozenset(members))


# -- hits and misses ---------------------------------------------------------------------
async def test_second_detail_read_is_a_hit_with_zero_queries(
    client: TestClient[Any, Any], alice: AuthUser, redis: aioredis.Redis
) -> None:
    cid = await make_channel(client, alice, "general")
    status, first = await get(client, alice, cid)
    assert status == 200 and detail_loads(client) == 1
    before = statements(client)
    status, second = await get(client, alice, cid)
    assert status == 200 and second == first
    assert statements(client) == before  # auth and detail both from Redis
    assert detail_loads(client) == 1
    ttl = await redis.ttl(channel_cache_key(cid))
    assert 0 < ttl <= client.app[CACHE].ttl_s
    stats = client.app[CACHE].stats()
    assert stats["channel"]["hits"] == 1 and stats["channel"]["misses"] == 1


async def test_cached_json_is_the_uncached_json(
    client: TestClient[Any, Any], make_client: Any, alice: AuthUser, bob: AuthUser
) -> None:
    cid = await make_channel(client, alice, "same-json", private=True)
    await client.post(
        f"{API}/channels/{cid}/members", json={"user_id": bob.id}, headers=alice.headers
    )
    uncached_app = await make_client(cache_ttl_s=0)
    _, plain = await get(uncached_app, alice, cid)
    await get(client, alice, cid)
    _, cached = await get(client, alice, cid)
    assert cached == plain
    assert plain["member_count"] == 2 and plain["is_private"] is True
    assert set(plain) == {
        "id", "name", "topic", "is_private", "created_by", "created_at", "updated_at",
        "member_count",
    }  # fmt: skip


async def test_ttl_zero_turns_caching_off(
    make_client: Any, make_user: UserFactory, redis: aioredis.Redis
) -> None:
    client = await make_client(cache_ttl_s=0)
    owner = await make_user("owner")
    cid = await make_channel(client, owner, "nocache")
    for _ in range(3):
        status, _ = await get(client, owner, cid)
        assert status == 200
    assert detail_loads(client) == 3
    assert [k async for k in redis.scan_iter("herald:cache:*") if not k.endswith(b":gen")] == []


# -- invalidation from any process -------------------------------------------------------
async def test_every_change_on_one_process_is_seen_by_another(
    client: TestClient[Any, Any], make_client: Any, alice: AuthUser, bob: AuthUser
) -> None:
    other = await make_client()
    cid = await make_channel(client, alice, "before")
    assert (await get(other, alice, cid))[1]["name"] == "before"
    await get(other, alice, cid)
    hits = other.app[CACHE].stats()["channel"]["hits"]
    assert hits == 1

    resp = await client.patch(
        f"{API}/channels/{cid}", json={"name": "after"}, headers=alice.headers
    )
    assert resp.status == 200
    assert (await get(other, alice, cid))[1]["name"] == "after"
    await client.patch(f"{API}/channels/{cid}", json={"topic": "new topic"}, headers=alice.headers)
    assert (await get(other, alice, cid))[1]["topic"] == "new topic"

    resp = await client.post(
        f"{API}/channels/{cid}/members", json={"user_id": bob.id}, headers=alice.headers
    )
    assert resp.status == 204
    assert (await get(other, alice, cid))[1]["member_count"] == 2
    resp = await client.delete(f"{API}/channels/{cid}/members/{bob.id}", headers=alice.headers)
    assert resp.status == 204
    assert (await get(other, alice, cid))[1]["member_count"] == 1

    resp = await client.delete(f"{API}/channels/{cid}", headers=alice.headers)
    assert resp.status == 204
    status, body = await get(other, alice, cid)
    assert status == 404 and body["error"]["code"] == "channel_not_found"
    assert client.app[CACHE].stats()["channel"]["invalidations"] == 6  # create + 5 changes


async def test_a_cached_absent_channel_is_dropped_when_created(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    # Ids are sequential: ask for the next one before it exists, then create it.
    assert (await get(client, alice, 1))[0] == 404
    assert (await get(client, alice, 1))[0] == 404  # now from the cache
    cid = await make_channel(client, alice, "late")
    assert cid == 1
    status, body = await get(client, alice, cid)
    assert status == 200 and body["name"] == "late"


# -- privacy -----------------------------------------------------------------------------
async def test_private_channel_never_served_to_a_non_member(
    client: TestClient[Any, Any],
    make_client: Any,
    alice: AuthUser,
    bob: AuthUser,
    admin: AuthUser,
) -> None:
    other = await make_client()
    cid = await make_channel(client, alice, "secret", private=True)
    assert (await get(client, alice, cid))[0] == 200  # cached now, members included
    loads = detail_loads(client) + detail_loads(other)
    status, body = await get(other, bob, cid)
    assert status == 404 and body["error"]["code"] == "channel_not_found"
    assert detail_loads(client) + detail_loads(other) == loads  # refused from the cache
    assert (await get(other, admin, cid))[0] == 200

    await client.post(
        f"{API}/channels/{cid}/members", json={"user_id": bob.id}, headers=alice.headers
    )
    assert (await get(other, bob, cid))[0] == 200
    await client.delete(f"{API}/channels/{cid}/members/{bob.id}", headers=alice.headers)
    assert (await get(other, bob, cid))[0] == 404  # revoked at once, not after the TTL
    # A public channel answers everyone from the same entry.
    pub = await make_channel(client, alice, "open")
    await get(client, alice, pub)
    assert (await get(other, bob, pub))[0] == 200


async def test_large_private_channel_membership(
    client: TestClient[Any, Any], alice: AuthUser, app_db: Database
) -> None:
    cid = await make_channel(client, alice, "big-private", private=True)
    await app_db.execute("INSERT INTO users (name) SELECT 'm' || g FROM generate_series(1, 3000) g")
    await app_db.execute(
        "INSERT INTO channel_members (channel_id, user_id)"
        " SELECT %s, id FROM users WHERE name LIKE 'm%%'",
        (cid,),
    )
    last = await app_db.fetchval("SELECT max(id) FROM users")
    channels = client.app[CACHE]
    member = User(int(last), "m3000", False)
    stranger = User(int(last) + 1, "nobody", False)
    loads = detail_loads(client)
    status, body = await get(client, alice, cid)
    assert status == 200 and body["member_count"] == 3001
    fields = await client.app[REDIS].hlen(channel_cache_key(cid))
    assert fields == 3002  # the JSON and one field per member
    load_calls = 0

    async def load() -> ChannelEntry:
        nonlocal load_calls
        load_calls += 1
        raise AssertionError("must be served from the cache")

    assert (await channels.channel_for(cid, member, load)) is not None
    assert (await channels.channel_for(cid, stranger, load)) is None
    assert load_calls == 0 and detail_loads(client) == loads + 1


# -- stampede ----------------------------------------------------------------------------
async def test_stampede_on_a_cold_key_loads_once_across_processes(
    client: TestClient[Any, Any], make_client: Any, alice: AuthUser
) -> None:
    other = await make_client()
    cid = await make_channel(client, alice, "hot")
    await client.get(f"{API}/me", headers=alice.headers)  # token cached in both
    results = await asyncio.gather(
        *(get(client if i % 2 else other, alice, cid) for i in range(40))
    )
    assert {status for status, _ in results} == {200}
    assert len({json.dumps(body, sort_keys=True) for _, body in results}) == 1
    assert detail_loads(client) + detail_loads(other) == 1


async def test_waiter_takes_the_entry_another_process_stored(
    settings: Settings, redis: aioredis.Redis
) -> None:
    mine = MetadataCache(redis=redis, settings=settings, metrics=Metrics())
    theirs = MetadataCache(redis=redis, settings=settings, metrics=Metrics())
    await redis.set(channel_lock_key(7), "their-token", px=5000)
    calls: list[str] = []

    async def my_load() -> ChannelEntry:
        calls.append("mine")
        return entry(7, name="mine")

    async def their_load() -> ChannelEntry:
        calls.append("theirs")
        return entry(7, name="theirs")

    user = User(1, "u", False)
    waiter = asyncio.create_task(mine.channel_for(7, user, my_load))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    # The other process, still holding its lock, finishes its load and stores it.
    stored = await theirs._load_and_store(7, their_load)
    assert stored.channel is not None and stored.channel["name"] == "theirs"
    got = await asyncio.wait_for(waiter, 2)
    assert got is not None and got["name"] == "theirs"
    assert calls == ["theirs"]
    assert "herald_cache_lock_waits_total 1.0" in mine.metrics.render().decode()


async def test_stuck_lock_holder_does_not_block_forever(
    settings: Settings, redis: aioredis.Redis
) -> None:
    cache = MetadataCache(redis=redis, settings=settings, metrics=Metrics(), lock_ttl_s=0.3)
    await redis.set(channel_lock_key(9), "crashed-process", px=60_000)

    async def load() -> ChannelEntry:
        return entry(9)

    start = time.monotonic()
    got = await asyncio.wait_for(cache.channel_for(9, User(1, "u", False), load), 3)
    assert got is not None and got["id"] == 9
    assert 0.25 <= time.monotonic() - start < 2.5


async def test_loader_error_reaches_every_waiter_and_frees_the_lock(
    settings: Settings, redis: aioredis.Redis
) -> None:
    cache = MetadataCache(redis=redis, settings=settings, metrics=Metrics())
    gate = asyncio.Event()

    async def failing() -> ChannelEntry:
        await gate.wait()
        raise RuntimeError("database fell over")

    user = User(1, "u", False)
    tasks = [asyncio.create_task(cache.channel_for(3, user, failing)) for _ in range(5)]
    await asyncio.sleep(0.02)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert not await redis.exists(channel_lock_key(3))

    async def fine() -> ChannelEntry:
        return entry(3)

    assert (await cache.channel_for(3, user, fine)) is not None


async def test_a_caller_that_leaves_does_not_cancel_the_shared_load(
    settings: Settings, redis: aioredis.Redis
) -> None:
    cache = MetadataCache(redis=redis, settings=settings, metrics=Metrics())
    gate = asyncio.Event()
    loads = 0

    async def slow() -> ChannelEntry:
        nonlocal loads
        loads += 1
        await gate.wait()
        return entry(4)

    user = User(1, "u", False)
    first = asyncio.create_task(cache.channel_for(4, user, slow))
    second = asyncio.create_task(cache.channel_for(4, user, slow))
    await asyncio.sleep(0.02)
    first.cancel()
    gate.set()
    assert (await second) is not None
    assert first.cancelled() and loads == 1
    assert await redis.exists(channel_cache_key(4))


# -- the stale write-back race -----------------------------------------------------------
async def test_a_load_that_raced_a_change_is_not_stored(
    settings: Settings, redis: aioredis.Redis
) -> None:
    cache = MetadataCache(redis=redis, settings=settings, metrics=Metrics())

    async def stale_load() -> ChannelEntry:
        # Read the old row, then a writer commits and invalidates before we store.
        old = entry(5, name="old", private=True, members={1, 2})
        await cache.invalidate_channel(5)
        return old

    got = await cache.channel_for(5, User(2, "removed", False), stale_load)
    assert got is not None and got["name"] == "old"  # this caller read before the change
    assert not await redis.exists(channel_cache_key(5))  # ... but nobody else gets it
    assert int(await redis.get(channel_gen_key(5))) == 1

    async def fresh_load() -> ChannelEntry:
        return entry(5, name="new", private=True, members={1})

    assert (await cache.channel_for(5, User(2, "removed", False), fresh_load)) is None
    assert await redis.exists(channel_cache_key(5))


async def test_a_caller_after_a_change_does_not_join_an_older_load(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A member is removed while a load that read the old membership is in flight: a
    request that starts after the removal (and its invalidation) must not be answered
    from that older load."""
    cache = MetadataCache(redis=redis, settings=settings, metrics=Metrics())
    gate, loading = asyncio.Event(), asyncio.Event()

    async def old_load() -> ChannelEntry:
        loading.set()
        await gate.wait()
        return entry(6, private=True, members={1, 2})

    async def new_load() -> ChannelEntry:
        return entry(6, private=True, members={1})

    removed = User(2, "removed", False)
    first = asyncio.create_task(cache.channel_for(6, User(1, "owner", False), old_load))
    await loading.wait()
    await cache.invalidate_channel(6)  # the removal committed, then invalidated
    later = asyncio.create_task(cache.channel_for(6, removed, new_load))
    await asyncio.sleep(0.02)
    gate.set()
    assert (await first) is not None
    assert (await later) is None  # not the member list read before the removal
    assert (await cache.channel_for(6, removed, new_load)) is None


# -- Redis trouble -----------------------------------------------------------------------
async def test_redis_down_falls_back_to_the_database(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    cache = MetadataCache(redis=dead, settings=settings, metrics=Metrics())
    try:

        async def load() -> ChannelEntry:
            return entry(8, private=True, members={1})

        assert (await cache.channel_for(8, User(1, "m", False), load)) is not None
        assert (await cache.channel_for(8, User(2, "x", False), load)) is None
        assert await cache.credential_for(b"\x00" * 32) is None
        await cache.remember_credential(b"\x00" * 32, Credential(User(1, "m", False), 1))
        assert not await cache.forget_credentials([b"\x00" * 32])
        await cache.invalidate_channel(8)  # logged, not raised
        # The first failure opens the breaker: the rest skip Redis without waiting on it.
        assert cache.counts["errors"] >= 2
        assert cache.counts["bypassed"] >= 3
        assert cache.stats()["breaker"] == "open"
        assert any("invalidation of channel 8 failed" in r.getMessage() for r in caplog.records)
    finally:
        await dead.aclose()


# -- token → user ------------------------------------------------------------------------
async def test_token_cache_is_keyed_by_hash_and_never_holds_the_token(
    client: TestClient[Any, Any], alice: AuthUser, redis: aioredis.Redis
) -> None:
    resp = await client.get(f"{API}/me", headers=alice.headers)
    assert resp.status == 200
    digest = hashlib.sha256(alice.token.encode()).hexdigest()
    key = f"herald:cache:token:{digest}".encode()
    assert await redis.exists(key)
    assert 0 < await redis.ttl(key) <= 60
    for k in [k async for k in redis.scan_iter("*")]:
        assert alice.token.encode() not in k
        if await redis.type(k) == b"string":
            assert alice.token.encode() not in (await redis.get(k) or b"")
    before = statements(client)
    resp = await client.get(f"{API}/me", headers=alice.headers)
    assert (await resp.json())["name"] == "alice"
    assert statements(client) == before
    # Wrong tokens are not cached (and still 401).
    keys_before = len([k async for k in redis.scan_iter("herald:cache:token:*")])
    resp = await client.get(f"{API}/me", headers={"Authorization": "Bearer hrd_nope"})
    assert resp.status == 401
    assert len([k async for k in redis.scan_iter("herald:cache:token:*")]) == keys_before


# -- counters ----------------------------------------------------------------------------
async def test_hits_misses_invalidations_in_metrics_and_health(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    cid = await make_channel(client, alice, "counted")
    await get(client, alice, cid)
    await get(client, alice, cid)
    await client.patch(f"{API}/channels/{cid}", json={"topic": "t"}, headers=alice.headers)
    text = (client.app[METRICS].render()).decode()
    assert 'herald_cache_hits_total{kind="channel"} 1.0' in text
    assert 'herald_cache_misses_total{kind="channel"} 1.0' in text
    assert 'herald_cache_invalidations_total{kind="channel"} 2.0' in text
    assert 'herald_cache_hits_total{kind="user"}' in text
    body = await (await client.get("/health")).json()
    cache = body["db"]["cache"]
    assert cache["enabled"] is True and cache["ttl_s"] == 300
    assert cache["channel"] == {"hits": 1, "misses": 1, "invalidations": 2, "hit_ratio": 0.5}


async def test_settings_ttl_bounds_user_entries(settings: Settings, redis: aioredis.Redis) -> None:
    short = MetadataCache(
        redis=redis, settings=replace(settings, cache_ttl_s=20), metrics=Metrics()
    )
    long = MetadataCache(
        redis=redis, settings=replace(settings, cache_ttl_s=3600), metrics=Metrics()
    )
    off = MetadataCache(redis=redis, settings=replace(settings, cache_ttl_s=0), metrics=Metrics())
    assert short.user_ttl_s == 20 and long.user_ttl_s == 60 and off.user_ttl_s == 0
    assert long.gen_ttl_s > long.ttl_s
