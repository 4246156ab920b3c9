"""Channel members over REST: add (POST .../members) and remove (DELETE .../members/{id})."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import AuthUser, UserFactory
from tests.helpers import API, channel_path, expect_error, make_channel


async def member_count(client: TestClient[Any, Any], url: str, user: AuthUser) -> int:
    resp = await client.get(url, headers=user.headers)
    assert resp.status == 200
    return int((await resp.json())["member_count"])


async def test_add_and_remove(client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser) -> None:
    url = channel_path(await make_channel(client, alice, "team"))
    resp = await client.post(f"{url}/members", json={"user_id": bob.id}, headers=alice.headers)
    assert resp.status == 204 and await resp.read() == b""
    assert await member_count(client, url, alice) == 2
    # Adding again is harmless.
    resp = await client.post(f"{url}/members", json={"user_id": bob.id}, headers=alice.headers)
    assert resp.status == 204
    assert await member_count(client, url, alice) == 2
    resp = await client.delete(f"{url}/members/{bob.id}", headers=alice.headers)
    assert resp.status == 204
    assert await member_count(client, url, alice) == 1
    await expect_error(
        await client.delete(f"{url}/members/{bob.id}", headers=alice.headers),
        404,
        "member_not_found",
    )


async def test_join_and_leave_public_channel_yourself(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser
) -> None:
    url = channel_path(await make_channel(client, alice, "open"))
    resp = await client.post(f"{url}/members", json={"user_id": bob.id}, headers=bob.headers)
    assert resp.status == 204
    resp = await client.delete(f"{url}/members/{bob.id}", headers=bob.headers)
    assert resp.status == 204


async def test_permissions(
    client: TestClient[Any, Any],
    alice: AuthUser,
    bob: AuthUser,
    admin: AuthUser,
    make_user: UserFactory,
) -> None:
    carol = await make_user("carol")
    url = channel_path(await make_channel(client, alice, "perm"))
    await client.post(f"{url}/members", json={"user_id": bob.id}, headers=bob.headers)
    # A plain member may not add or remove others.
    await expect_error(
        await client.post(f"{url}/members", json={"user_id": carol.id}, headers=bob.headers),
        403,
        "forbidden",
    )
    await expect_error(
        await client.delete(f"{url}/members/{alice.id}", headers=bob.headers), 403, "forbidden"
    )
    # An admin may.
    resp = await client.post(f"{url}/members", json={"user_id": carol.id}, headers=admin.headers)
    assert resp.status == 204
    resp = await client.delete(f"{url}/members/{carol.id}", headers=admin.headers)
    assert resp.status == 204


async def test_private_channel_members_routes_are_404_for_outsiders(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser
) -> None:
    url = channel_path(await make_channel(client, alice, "hush", private=True))
    # Joining yourself needs the channel to be visible first.
    await expect_error(
        await client.post(f"{url}/members", json={"user_id": bob.id}, headers=bob.headers),
        404,
        "channel_not_found",
    )
    await expect_error(
        await client.delete(f"{url}/members/{alice.id}", headers=bob.headers),
        404,
        "channel_not_found",
    )
    resp = await client.post(f"{url}/members", json={"user_id": bob.id}, headers=alice.headers)
    assert resp.status == 204
    assert await member_count(client, url, bob) == 2
    # Once removed, bob cannot see it any more.
    assert (await client.delete(f"{url}/members/{bob.id}", headers=alice.headers)).status == 204
    await expect_error(await client.get(url, headers=bob.headers), 404)


async def test_unknown_user_and_channel(client: TestClient[Any, Any], alice: AuthUser) -> None:
    url = channel_path(await make_channel(client, alice, "x"))
    await expect_error(
        await client.post(f"{url}/members", json={"user_id": 987654}, headers=alice.headers),
        404,
        "user_not_found",
    )
    await expect_error(
        await client.post(
            f"{API}/channels/987654/members", json={"user_id": alice.id}, headers=alice.headers
        ),
        404,
        "channel_not_found",
    )
    await expect_error(
        await client.delete(f"{API}/channels/987654/members/{alice.id}", headers=alice.headers),
        404,
    )


INVALID_ADDS: list[dict[str, Any]] = [
    {},
    {"user_id": None},
    {"user_id": "1"},
    {"user_id": 1.0},
    {"user_id": 1.5},
    {"user_id": True},
    {"user_id": 0},
    {"user_id": -1},
    {"user_id": 2**63},
    {"user_id": [1]},
    {"user_id": 1, "role": "admin"},
]
BAD_USER_IDS = [
    "abc",
    "0",
    "-1",
    "1.5",
    "9" * 30,
    "%20",
    "\u0661",  # Arabic-Indic digit one
    "9223372036854775808",
]


async def test_add_validation(client: TestClient[Any, Any], alice: AuthUser) -> None:
    url = channel_path(await make_channel(client, alice, "v"))
    for payload in INVALID_ADDS:
        resp = await client.post(f"{url}/members", json=payload, headers=alice.headers)
        error = await expect_error(resp, 422)
        assert error["code"] == "validation_error", payload


async def test_remove_bad_user_id(client: TestClient[Any, Any], alice: AuthUser) -> None:
    url = channel_path(await make_channel(client, alice, "w"))
    for user_id in BAD_USER_IDS:
        resp = await client.delete(f"{url}/members/{user_id}", headers=alice.headers)
        error = await expect_error(resp, 422)
        assert error["code"] == "validation_error", user_id


async def test_remove_huge_but_valid_user_id(client: TestClient[Any, Any], alice: AuthUser) -> None:
    url = channel_path(await make_channel(client, alice, "h"))
    resp = await client.delete(f"{url}/members/{2**63 - 1}", headers=alice.headers)
    await expect_error(resp, 404, "member_not_found")


async def test_concurrent_adds_and_removes(
    client: TestClient[Any, Any], alice: AuthUser, make_user: UserFactory
) -> None:
    url = channel_path(await make_channel(client, alice, "busy"))
    users = [await make_user(f"m{i}") for i in range(15)]
    adds = await asyncio.gather(
        *(
            client.post(f"{url}/members", json={"user_id": u.id}, headers=alice.headers)
            for u in users
            for _ in range(2)  # each added twice at once
        )
    )
    assert {r.status for r in adds} == {204}
    assert await member_count(client, url, alice) == 16
    removes = await asyncio.gather(
        *(
            client.delete(f"{url}/members/{u.id}", headers=alice.headers)
            for u in users
            for _ in range(2)
        )
    )
    assert sorted(r.status for r in removes) == [204] * 15 + [404] * 15
    assert await member_count(client, url, alice) == 1


async def test_adding_while_the_channel_is_deleted(
    client: TestClient[Any, Any], alice: AuthUser, make_user: UserFactory
) -> None:
    """An add racing a delete gets 204 or 404, never a 500."""
    url = channel_path(await make_channel(client, alice, "doomed"))
    users = [await make_user(f"late{i}") for i in range(20)]
    adds = [
        client.post(f"{url}/members", json={"user_id": u.id}, headers=alice.headers) for u in users
    ]
    resps = await asyncio.gather(*adds[:10], client.delete(url, headers=alice.headers), *adds[10:])
    statuses = [r.status for r in resps]
    assert statuses[10] == 204
    assert set(statuses[:10] + statuses[11:]) <= {204, 404}
