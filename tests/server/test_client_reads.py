"""What a chat client reads: a channel's members, user lookup by name prefix, and the
read position (GET /channels/{id}/members, GET /users, POST /channels/{id}/read)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import AuthUser, UserFactory
from tests.helpers import API, channel_path, expect_error, make_channel

BAD_LIMITS = ["0", "-1", "1001", "abc", "1.5", "99999999999999999999"]


async def add(client: TestClient[Any, Any], url: str, by: AuthUser, user_id: int) -> None:
    resp = await client.post(f"{url}/members", json={"user_id": user_id}, headers=by.headers)
    assert resp.status == 204, await resp.text()


async def post(client: TestClient[Any, Any], url: str, by: AuthUser, body: str = "hi") -> int:
    resp = await client.post(f"{url}/messages", json={"body": body}, headers=by.headers)
    assert resp.status == 201, await resp.text()
    return int((await resp.json())["id"])


async def unread(client: TestClient[Any, Any], user: AuthUser, channel_id: int) -> int:
    resp = await client.get(f"{API}/channels", headers=user.headers)
    assert resp.status == 200
    (item,) = [c for c in (await resp.json())["items"] if c["id"] == channel_id]
    return int(item["unread_count"])


async def users(client: TestClient[Any, Any], user: AuthUser, **params: Any) -> list[str]:
    resp = await client.get(f"{API}/users", params=params, headers=user.headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"items"}
    assert all(set(item) == {"id", "name"} for item in body["items"])
    return [item["name"] for item in body["items"]]


# -- GET /channels/{id}/members --------------------------------------------------------


async def test_members_pages_without_gap_or_duplicate(
    client: TestClient[Any, Any], alice: AuthUser, make_user: UserFactory
) -> None:
    url = channel_path(await make_channel(client, alice, "crowd"))
    others = [await make_user(f"m{i}") for i in range(11)]
    for user in others:
        await add(client, url, alice, user.id)
    mid = await post(client, url, alice)
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        resp = await client.get(f"{url}/members", params=params, headers=alice.headers)
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        assert set(page) == {"items", "next_cursor"} and len(page["items"]) <= 3
        seen += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 4  # 12 members, 3 a page: the last page is full and says so
    ids = [m["user_id"] for m in seen]
    assert ids == sorted({alice.id, *(u.id for u in others)})
    by_id = {m["user_id"]: m for m in seen}
    assert set(by_id[alice.id]) == {"user_id", "name", "joined_at", "last_read_id"}
    assert by_id[alice.id]["name"] == "alice"
    assert by_id[alice.id]["last_read_id"] == mid  # she posted it
    assert by_id[others[0].id]["last_read_id"] == 0  # joined before any message
    assert by_id[alice.id]["joined_at"].endswith("Z")


async def test_members_visibility(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser, admin: AuthUser
) -> None:
    secret = channel_path(await make_channel(client, alice, "secret", private=True))
    public = channel_path(await make_channel(client, alice, "public"))
    await expect_error(
        await client.get(f"{secret}/members", headers=bob.headers), 404, "channel_not_found"
    )
    # The same answer as for a channel that does not exist.
    await expect_error(
        await client.get(f"{API}/channels/999999/members", headers=bob.headers),
        404,
        "channel_not_found",
    )
    resp = await client.get(f"{secret}/members", headers=admin.headers)
    assert resp.status == 200
    assert [m["user_id"] for m in (await resp.json())["items"]] == [alice.id]
    resp = await client.get(f"{public}/members", headers=bob.headers)  # not a member
    assert resp.status == 200
    await add(client, secret, alice, bob.id)
    resp = await client.get(f"{secret}/members", headers=bob.headers)
    assert resp.status == 200
    assert {m["user_id"] for m in (await resp.json())["items"]} == {alice.id, bob.id}
    resp = await client.get(f"{secret}/members")
    await expect_error(resp, 401)


async def test_members_bad_limits_and_cursors(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    url = channel_path(await make_channel(client, alice, "limits"))
    for limit in BAD_LIMITS:
        resp = await client.get(f"{url}/members", params={"limit": limit}, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", limit)
    from shared.services.channels import encode_cursor

    channel_cursor = encode_cursor(1)  # a GET /channels cursor is not a members cursor
    for cursor in ["!!!", "ü", "x" * 65, "bTo", "bTot", "bTox" * 10, channel_cursor, "a\x00"]:
        resp = await client.get(f"{url}/members", params={"cursor": cursor}, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", cursor)
    for bad_id in ["0", "abc", "-1", "99999999999999999999"]:
        resp = await client.get(f"{API}/channels/{bad_id}/members", headers=alice.headers)
        await expect_error(resp, 422, "validation_error", bad_id)
    resp = await client.get(f"{url}/members", params={"limit": 1000}, headers=alice.headers)
    assert resp.status == 200


# -- GET /users --------------------------------------------------------------------------


async def test_users_prefix_is_case_insensitive_and_ordered(
    client: TestClient[Any, Any], alice: AuthUser, make_user: UserFactory
) -> None:
    for name in ["Alfred", "ALBERT", "alan", "bert", "Émile", "émilie", "Zoë"]:
        await make_user(name)
    # In order of the lower-cased name.
    assert await users(client, alice, prefix="AL") == ["alan", "ALBERT", "Alfred", "alice"]
    assert await users(client, alice, prefix="al", limit=2) == ["alan", "ALBERT"]
    assert await users(client, alice, prefix="Él") == []
    assert set(await users(client, alice, prefix="éM")) == {"Émile", "émilie"}
    assert await users(client, alice, prefix="ZOË") == ["Zoë"]
    assert await users(client, alice, prefix="alfredo") == []
    assert len(await users(client, alice)) == 8  # no prefix: everyone, up to the limit
    assert len(await users(client, alice, prefix="", limit=3)) == 3
    assert len(await users(client, alice, prefix="a", limit=2)) == 2


async def test_users_wildcards_are_literal(
    client: TestClient[Any, Any], alice: AuthUser, make_user: UserFactory
) -> None:
    for name in ["a%b", "a_b", "axb", "a\\b", "a\\\\b", "100%"]:
        await make_user(name)
    assert await users(client, alice, prefix="a%") == ["a%b"]
    assert await users(client, alice, prefix="a_") == ["a_b"]
    assert await users(client, alice, prefix="a\\") == ["a\\\\b", "a\\b"]
    assert await users(client, alice, prefix="a\\\\") == ["a\\\\b"]
    assert await users(client, alice, prefix="%") == []
    assert await users(client, alice, prefix="_") == []
    assert await users(client, alice, prefix="\\") == []
    assert await users(client, alice, prefix="100%") == ["100%"]
    assert await users(client, alice, prefix="'; DROP TABLE users; --") == []
    assert "alice" in await users(client, alice, prefix="ali")


async def test_users_hostile_input(client: TestClient[Any, Any], alice: AuthUser) -> None:
    for limit in ["0", "-1", "101", "abc", "1e3"]:
        resp = await client.get(f"{API}/users", params={"limit": limit}, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", limit)
    for prefix in ["a\x00", "x" * 81, "é" * 81, "x" * 8000, "é" * 1300]:
        resp = await client.get(f"{API}/users", params={"prefix": prefix}, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", prefix[:20])
    # 10 KB does not fit aiohttp's 8190-byte request line: its parser refuses it (a 4xx)
    # before any handler runs.
    resp = await client.get(f"{API}/users", params={"prefix": "x" * 10_240}, headers=alice.headers)
    assert 400 <= resp.status < 500
    resp = await client.get(f"{API}/users?prefix=%ED%A0%80", headers=alice.headers)
    assert resp.status in (200, 422), await resp.text()  # never a 500
    assert await users(client, alice, prefix="x" * 80) == []
    assert await users(client, alice, prefix="🙂") == []
    assert await users(client, alice, limit=100) == ["alice"]
    await expect_error(await client.get(f"{API}/users"), 401)


# -- POST /channels/{id}/read ------------------------------------------------------------


async def test_mark_read_moves_forward_only_and_unread_follows(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser
) -> None:
    cid = await make_channel(client, alice, "reads")
    url = channel_path(cid)
    await add(client, url, alice, bob.id)
    ids = [await post(client, url, alice, f"m{i}") for i in range(5)]
    assert await unread(client, bob, cid) == 5
    resp = await client.post(f"{url}/read", json={"message_id": ids[2]}, headers=bob.headers)
    assert resp.status == 204 and await resp.read() == b""
    assert await unread(client, bob, cid) == 2
    # Back: accepted, and nothing moves.
    resp = await client.post(f"{url}/read", json={"message_id": ids[0]}, headers=bob.headers)
    assert resp.status == 204
    assert await unread(client, bob, cid) == 2
    resp = await client.post(f"{url}/read", json={"message_id": ids[4]}, headers=bob.headers)
    assert resp.status == 204
    assert await unread(client, bob, cid) == 0
    resp = await client.get(f"{url}/members", headers=bob.headers)
    by_id = {m["user_id"]: m for m in (await resp.json())["items"]}
    assert by_id[bob.id]["last_read_id"] == ids[4]
    # Another member's position is their own.
    assert by_id[alice.id]["last_read_id"] == ids[4]


async def test_mark_read_errors(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser, admin: AuthUser
) -> None:
    cid = await make_channel(client, alice, "mine")
    other = channel_path(await make_channel(client, alice, "other"))
    secret = channel_path(await make_channel(client, alice, "secret", private=True))
    url = channel_path(cid)
    mid = await post(client, url, alice)
    foreign = await post(client, other, alice)
    hidden = await post(client, secret, alice)

    async def mark(path: str, body: Any, user: AuthUser = alice) -> Any:
        return await client.post(f"{path}/read", json=body, headers=user.headers)

    # A message of another channel, or none: 404, and the position stays.
    await expect_error(await mark(url, {"message_id": foreign}), 404, "message_not_found")
    await expect_error(await mark(url, {"message_id": 10**12}), 404, "message_not_found")
    await expect_error(await mark(url, {"message_id": hidden}), 404, "message_not_found")
    resp = await client.get(f"{url}/members", headers=alice.headers)
    assert (await resp.json())["items"][0]["last_read_id"] == mid
    # Not a member of a channel one can see: 403; cannot see it: 404.
    await expect_error(await mark(url, {"message_id": mid}, bob), 403, "forbidden")
    await expect_error(await mark(secret, {"message_id": hidden}, bob), 404, "channel_not_found")
    await expect_error(await mark(secret, {"message_id": hidden}, admin), 403, "forbidden")
    await expect_error(
        await mark(f"{API}/channels/999999", {"message_id": mid}), 404, "channel_not_found"
    )
    for body in [
        {},
        {"message_id": None},
        {"message_id": "1"},
        {"message_id": 0},
        {"message_id": -5},
        {"message_id": True},
        {"message_id": 1.5},
        {"message_id": 2**63},
        {"message_id": mid, "extra": 1},
        [mid],
        "x",
    ]:
        await expect_error(await mark(url, body), 422, "validation_error", body)
    resp = await client.post(
        f"{url}/read",
        data=b"{not json",
        headers={**alice.headers, "Content-Type": "application/json"},
    )
    await expect_error(resp, 400, "invalid_json")
    resp = await client.post(f"{url}/read", json={"message_id": mid})
    await expect_error(resp, 401)


async def test_concurrent_marks_end_at_the_maximum(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser
) -> None:
    cid = await make_channel(client, alice, "race")
    url = channel_path(cid)
    await add(client, url, alice, bob.id)
    ids = [await post(client, url, alice, f"m{i}") for i in range(30)]
    # Every id, highest first, so the low ones arrive after it has moved.
    marks = [
        client.post(f"{url}/read", json={"message_id": mid}, headers=bob.headers)
        for mid in reversed(ids)
    ]
    for resp in await asyncio.gather(*marks):
        assert resp.status == 204
    resp = await client.get(f"{url}/members", headers=bob.headers)
    by_id = {m["user_id"]: m for m in (await resp.json())["items"]}
    assert by_id[bob.id]["last_read_id"] == max(ids)
    assert await unread(client, bob, cid) == 0
