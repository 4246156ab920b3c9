"""Channels over REST: create, list (with counts and cursors), get, patch, delete."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import AuthUser, UserFactory
from tests.helpers import API, expect_error


async def create(
    client: TestClient[Any, Any], user: AuthUser, name: str, **extra: Any
) -> dict[str, Any]:
    resp = await client.post(f"{API}/channels", json={"name": name, **extra}, headers=user.headers)
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def listing(client: TestClient[Any, Any], user: AuthUser, **query: Any) -> dict[str, Any]:
    resp = await client.get(f"{API}/channels", params=query, headers=user.headers)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def test_create_returns_the_channel(client: TestClient[Any, Any], alice: AuthUser) -> None:
    chan = await create(client, alice, "general", topic="All things", is_private=False)
    assert set(chan) >= {"id", "name", "topic", "is_private", "created_by", "created_at"}
    assert chan["name"] == "general"
    assert chan["topic"] == "All things"
    assert chan["is_private"] is False
    assert chan["created_by"] == alice.id
    assert chan["member_count"] == 1
    assert chan["created_at"].endswith("Z")
    resp = await client.get(f"{API}/channels/{chan['id']}", headers=alice.headers)
    assert resp.status == 200
    assert await resp.json() == chan


async def test_create_defaults(client: TestClient[Any, Any], alice: AuthUser) -> None:
    chan = await create(client, alice, "x", topic=None, is_private=None)
    assert (chan["topic"], chan["is_private"]) == ("", False)


VALID_NAMES = ["a", "a" * 80, "dev-ops_2", "0", "-", "_"]
INVALID_NAMES = [
    "",
    "a" * 81,
    "General",
    "has space",
    "dot.name",
    "slash/",
    "é",
    "\uff46\uff55\uff4c\uff4c",  # fullwidth "full"
    "a\n",
    " a",
    "😀",
]
INVALID_CREATES: list[dict[str, Any]] = [
    {},
    {"name": None},
    {"name": 5},
    {"name": ["a"]},
    {"name": "ok", "topic": 5},
    {"name": "ok", "topic": "t" * 1001},
    {"name": "ok", "is_private": "yes"},
    {"name": "ok", "is_private": 1},
    {"name": "ok", "owner": 1},
]


async def test_name_rules(client: TestClient[Any, Any], alice: AuthUser) -> None:
    for name in VALID_NAMES:
        assert (await create(client, alice, name))["name"] == name
    for name in INVALID_NAMES:
        resp = await client.post(f"{API}/channels", json={"name": name}, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", name)


async def test_create_validation(client: TestClient[Any, Any], alice: AuthUser) -> None:
    for payload in INVALID_CREATES:
        resp = await client.post(f"{API}/channels", json=payload, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", payload)
    # A topic of 1000 characters is the longest allowed.
    assert (await create(client, alice, "long", topic="€" * 1000))["topic"] == "€" * 1000


async def test_name_taken(client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser) -> None:
    await create(client, alice, "dup")
    resp = await client.post(f"{API}/channels", json={"name": "dup"}, headers=bob.headers)
    await expect_error(resp, 409, "name_taken")
    # A private channel's name is taken too (names are global).
    await create(client, alice, "hidden", is_private=True)
    resp = await client.post(f"{API}/channels", json={"name": "hidden"}, headers=bob.headers)
    await expect_error(resp, 409, "name_taken")


async def test_concurrent_creation_of_one_name(
    client: TestClient[Any, Any], make_user: UserFactory
) -> None:
    users = [await make_user(f"racer{i}") for i in range(20)]
    resps = await asyncio.gather(
        *(client.post(f"{API}/channels", json={"name": "race"}, headers=u.headers) for u in users)
    )
    statuses = sorted(r.status for r in resps)
    assert statuses == [201] + [409] * 19
    for r in resps:
        if r.status == 409:
            await expect_error(r, 409, "name_taken")
    assert [c["name"] for c in (await listing(client, users[0]))["items"]] == ["race"]


async def test_get_patch_delete_by_creator(client: TestClient[Any, Any], alice: AuthUser) -> None:
    chan = await create(client, alice, "old", topic="t0")
    url = f"{API}/channels/{chan['id']}"
    resp = await client.patch(url, json={"name": "new"}, headers=alice.headers)
    assert resp.status == 200
    patched = await resp.json()
    assert (patched["name"], patched["topic"]) == ("new", "t0")
    assert patched["updated_at"] >= chan["updated_at"]
    resp = await client.patch(url, json={"topic": "t1", "name": None}, headers=alice.headers)
    assert (await resp.json())["topic"] == "t1"
    resp = await client.patch(url, json={}, headers=alice.headers)
    assert resp.status == 200 and (await resp.json())["name"] == "new"
    resp = await client.get(url, headers=alice.headers)
    assert (await resp.json())["name"] == "new"
    resp = await client.delete(url, headers=alice.headers)
    assert resp.status == 204
    assert await resp.read() == b""
    await expect_error(await client.get(url, headers=alice.headers), 404)
    await expect_error(await client.delete(url, headers=alice.headers), 404)


async def test_patch_validation_and_conflict(client: TestClient[Any, Any], alice: AuthUser) -> None:
    one = await create(client, alice, "one")
    await create(client, alice, "two")
    url = f"{API}/channels/{one['id']}"
    for payload in ({"name": "Bad Name"}, {"name": 1}, {"topic": ["x"]}, {"is_private": True}):
        await expect_error(await client.patch(url, json=payload, headers=alice.headers), 422)
    await expect_error(
        await client.patch(url, json={"name": "two"}, headers=alice.headers), 409, "name_taken"
    )
    resp = await client.patch(url, json={"name": "one"}, headers=alice.headers)
    assert resp.status == 200  # renaming to its own name is not a conflict


async def test_only_creator_or_admin_may_patch_or_delete(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser, admin: AuthUser
) -> None:
    chan = await create(client, alice, "mine")
    url = f"{API}/channels/{chan['id']}"
    await client.post(f"{url}/members", json={"user_id": bob.id}, headers=alice.headers)
    await expect_error(
        await client.patch(url, json={"topic": "x"}, headers=bob.headers), 403, "forbidden"
    )
    await expect_error(await client.delete(url, headers=bob.headers), 403, "forbidden")
    resp = await client.patch(url, json={"topic": "by admin"}, headers=admin.headers)
    assert resp.status == 200 and (await resp.json())["topic"] == "by admin"
    assert (await client.delete(url, headers=admin.headers)).status == 204


async def test_private_channel_invisible_on_channel_routes(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser, admin: AuthUser
) -> None:
    chan = await create(client, alice, "secret", is_private=True)
    url = f"{API}/channels/{chan['id']}"
    missing = f"{API}/channels/{chan['id'] + 1000}"
    for target in (url, missing):
        a = await expect_error(await client.get(target, headers=bob.headers), 404)
        b = await expect_error(
            await client.patch(target, json={"topic": "x"}, headers=bob.headers), 404
        )
        c = await expect_error(await client.delete(target, headers=bob.headers), 404)
        # Same answer whether the channel exists or not: nothing leaks.
        assert a == b == c == {"code": "channel_not_found", "message": "channel not found"}
    assert (await listing(client, bob))["items"] == []
    assert [c["name"] for c in (await listing(client, admin))["items"]] == ["secret"]
    assert (await client.get(url, headers=admin.headers)).status == 200
    # Once a member, bob sees it (but still may not manage it).
    await client.post(f"{url}/members", json={"user_id": bob.id}, headers=alice.headers)
    assert (await client.get(url, headers=bob.headers)).status == 200
    assert [c["name"] for c in (await listing(client, bob))["items"]] == ["secret"]
    await expect_error(await client.delete(url, headers=bob.headers), 403)


async def test_listing_pagination_covers_every_visible_channel_once(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser
) -> None:
    visible = set()
    for i in range(23):
        private = i % 4 == 0
        owner = alice if i % 3 else bob
        chan = await create(client, owner, f"c{i:02d}", is_private=private)
        if not private or owner is bob:
            visible.add(chan["id"])
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        query: dict[str, Any] = {"limit": 5}
        if cursor:
            query["cursor"] = cursor
        page = await listing(client, bob, **query)
        pages += 1
        assert len(page["items"]) <= 5
        seen += [c["id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(visible)  # each exactly once, in id order
    assert pages == -(-len(visible) // 5)
    full = await listing(client, bob, limit=1000)
    assert [c["id"] for c in full["items"]] == seen and full["next_cursor"] is None


async def test_listing_counts(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser, make_user: UserFactory
) -> None:
    carol = await make_user("carol")
    empty = await create(client, alice, "empty")
    busy = await create(client, alice, "busy")
    busy_url = f"{API}/channels/{busy['id']}"
    for user in (bob, carol):
        resp = await client.post(
            f"{busy_url}/members", json={"user_id": user.id}, headers=alice.headers
        )
        assert resp.status == 204
    for i in range(3):
        await client.post(f"{busy_url}/messages", json={"body": f"a{i}"}, headers=alice.headers)
    resp = await client.post(f"{busy_url}/messages", json={"body": "from bob"}, headers=bob.headers)
    last = await resp.json()

    def by_name(page: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in page["items"]}

    for_alice = by_name(await listing(client, alice))
    assert for_alice["empty"]["member_count"] == 1
    assert for_alice["empty"]["last_message"] is None
    assert for_alice["empty"]["unread_count"] == 0
    assert for_alice["busy"]["member_count"] == 3
    assert for_alice["busy"]["last_message"] == last
    assert for_alice["busy"]["unread_count"] == 1  # bob's; her own count as read
    for_carol = by_name(await listing(client, carol))
    assert for_carol["busy"]["unread_count"] == 4
    assert for_carol["empty"]["unread_count"] == 0  # not a member: nothing unread
    # Reading the newest messages marks the channel read.
    await client.get(f"{busy_url}/messages?limit=2", headers=carol.headers)
    assert by_name(await listing(client, carol))["busy"]["unread_count"] == 0
    # A new member starts with nothing unread.
    dave = await make_user("dave")
    await client.post(f"{busy_url}/members", json={"user_id": dave.id}, headers=alice.headers)
    assert by_name(await listing(client, dave))["busy"]["unread_count"] == 0
    assert empty["id"] < busy["id"]


BAD_LIMITS = ["0", "-1", "1001", "abc", "1.5", "1e2", "--5", "99999999999999999999", "-"]
BAD_CURSORS = [
    "garbage!",
    "YzotMQ",  # "c:-1"
    "Yzph",  # "c:a"
    "eDox",  # "x:1"
    "%00",
    "ü",
    "A" * 65,
    "Yzo5OTk5OTk5OTk5OTk5OTk5OTk5OTk5",  # 20 digits
]


async def test_listing_bad_limit_and_garbage_cursor(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    for limit in BAD_LIMITS:
        resp = await client.get(f"{API}/channels", params={"limit": limit}, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", limit)
    for cursor in BAD_CURSORS:
        resp = await client.get(f"{API}/channels", params={"cursor": cursor}, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", cursor)


async def test_listing_cursor_past_the_end(client: TestClient[Any, Any], alice: AuthUser) -> None:
    await create(client, alice, "only")
    first = await listing(client, alice, limit=1)
    assert first["next_cursor"] is None
    from shared.services.channels import encode_cursor

    page = await listing(client, alice, cursor=encode_cursor(10**6))
    assert page == {"items": [], "next_cursor": None}
