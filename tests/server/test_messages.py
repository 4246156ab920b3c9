"""Messages over REST: posting (length in characters) and paging with before/after/limit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import AuthUser
from tests.helpers import API, channel_path, expect_error, make_channel


@pytest.fixture
async def channel_url(client: TestClient[Any, Any], alice: AuthUser) -> str:
    return channel_path(await make_channel(client, alice, "talk"))


async def post(client: TestClient[Any, Any], url: str, user: AuthUser, body: str) -> Any:
    return await client.post(f"{url}/messages", json={"body": body}, headers=user.headers)


async def page(client: TestClient[Any, Any], url: str, user: AuthUser, **query: Any) -> list[int]:
    resp = await client.get(f"{url}/messages", params=query, headers=user.headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"items"}
    return [m["id"] for m in body["items"]]


async def test_post_returns_the_message(
    client: TestClient[Any, Any], channel_url: str, alice: AuthUser
) -> None:
    resp = await post(client, channel_url, alice, "hello")
    assert resp.status == 201
    msg = await resp.json()
    assert set(msg) == {"id", "channel_id", "author", "body", "created_at"}
    assert msg["body"] == "hello"
    assert msg["author"] == {"id": alice.id, "name": "alice"}
    assert channel_url.endswith(f"/{msg['channel_id']}")
    assert msg["created_at"].endswith("Z")
    resp = await client.get(f"{channel_url}/messages", headers=alice.headers)
    assert (await resp.json())["items"] == [msg]


GOOD_BODIES = [
    "x",
    "x" * 10_000,
    "é" * 10_000,  # 2 bytes each
    "€" * 10_000,  # 3 bytes each
    "😀" * 10_000,  # 4 bytes each: 40000 bytes, still 10000 characters
    "line1\nline2\r\n\ttabbed",
    "   ",
    "Robert'); DROP TABLE messages;--",
    "%s %(body)s %% \\ ' \" ; -- /* */",
    "\u202eRTL \u200b zero-width \ufeff BOM",
]
INVALID_POSTS: list[dict[str, Any]] = [
    {},
    {"body": ""},
    {"body": "x" * 10_001},
    {"body": "😀" * 10_001},
    {"body": None},
    {"body": 5},
    {"body": ["x"]},
    {"body": {"text": "x"}},
    {"body": "ok", "author_id": 1},
]


async def test_bodies_stored_verbatim(
    client: TestClient[Any, Any], channel_url: str, alice: AuthUser
) -> None:
    for body in GOOD_BODIES:
        resp = await post(client, channel_url, alice, body)
        assert resp.status == 201, (body[:20], await resp.text())
        assert (await resp.json())["body"] == body
    resp = await client.get(f"{channel_url}/messages", headers=alice.headers)
    assert [m["body"] for m in (await resp.json())["items"]] == GOOD_BODIES


async def test_post_validation(
    client: TestClient[Any, Any], channel_url: str, alice: AuthUser
) -> None:
    for payload in INVALID_POSTS:
        resp = await client.post(f"{channel_url}/messages", json=payload, headers=alice.headers)
        error = await expect_error(resp, 422)
        assert error["code"] == "validation_error", payload
    assert await page(client, channel_url, alice) == []


async def test_paging(client: TestClient[Any, Any], channel_url: str, alice: AuthUser) -> None:
    ids = []
    for i in range(12):
        resp = await post(client, channel_url, alice, f"m{i}")
        ids.append((await resp.json())["id"])
    assert await page(client, channel_url, alice) == ids  # default limit 50, oldest first
    assert await page(client, channel_url, alice, limit=5) == ids[-5:]
    assert await page(client, channel_url, alice, before=ids[5], limit=3) == ids[2:5]
    assert await page(client, channel_url, alice, after=ids[5], limit=3) == ids[6:9]
    assert await page(client, channel_url, alice, after=ids[2], before=ids[6]) == ids[3:6]
    assert await page(client, channel_url, alice, after=0) == ids
    assert await page(client, channel_url, alice, after=ids[-1]) == []
    assert await page(client, channel_url, alice, before=ids[0]) == []
    assert await page(client, channel_url, alice, before=0) == []
    assert await page(client, channel_url, alice, before=2**63 - 1, limit=1) == ids[-1:]
    assert await page(client, channel_url, alice, limit=1000) == ids
    # Walking backwards with `before` covers everything exactly once.
    seen: list[int] = []
    before = None
    while True:
        query = {"limit": 5} | ({"before": before} if before else {})
        chunk = await page(client, channel_url, alice, **query)
        if not chunk:
            break
        seen = chunk + seen
        before = chunk[0]
    assert seen == ids


BAD_QUERIES = [
    {"limit": "0"},
    {"limit": "1001"},
    {"limit": "-5"},
    {"limit": "ten"},
    {"limit": "2.5"},
    {"before": "-1"},
    {"before": "abc"},
    {"after": "1.5"},
    {"after": "9" * 25},
    {"after": "0x10"},
]


async def test_list_bad_query(
    client: TestClient[Any, Any], channel_url: str, alice: AuthUser
) -> None:
    for query in BAD_QUERIES:
        resp = await client.get(f"{channel_url}/messages", params=query, headers=alice.headers)
        error = await expect_error(resp, 422)
        assert error["code"] == "validation_error", query


async def test_private_channel_messages_invisible(
    client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser
) -> None:
    url = channel_path(await make_channel(client, alice, "dm", private=True))
    assert (await post(client, url, alice, "secret")).status == 201
    await expect_error(await post(client, url, bob, "let me in"), 404, "channel_not_found")
    await expect_error(
        await client.get(f"{url}/messages", headers=bob.headers), 404, "channel_not_found"
    )
    assert len(await page(client, url, alice)) == 1


async def test_non_member_may_post_and_read_public(
    client: TestClient[Any, Any], channel_url: str, bob: AuthUser
) -> None:
    assert (await post(client, channel_url, bob, "drive-by")).status == 201
    assert len(await page(client, channel_url, bob)) == 1


async def test_missing_channel(client: TestClient[Any, Any], alice: AuthUser) -> None:
    await expect_error(await post(client, f"{API}/channels/424242", alice, "x"), 404)
    await expect_error(
        await client.get(f"{API}/channels/424242/messages", headers=alice.headers), 404
    )


async def test_concurrent_posts_lose_nothing(
    client: TestClient[Any, Any], channel_url: str, alice: AuthUser, bob: AuthUser
) -> None:
    bodies = [f"{who.id}-{i}" for who in (alice, bob) for i in range(25)]
    resps = await asyncio.gather(
        *(
            post(client, channel_url, alice if b.startswith(str(alice.id)) else bob, b)
            for b in bodies
        )
    )
    assert {r.status for r in resps} == {201}
    resp = await client.get(f"{channel_url}/messages?limit=1000", headers=alice.headers)
    items = (await resp.json())["items"]
    assert sorted(m["body"] for m in items) == sorted(bodies)
    assert [m["id"] for m in items] == sorted(m["id"] for m in items)


async def test_posting_while_the_channel_is_deleted(
    client: TestClient[Any, Any], channel_url: str, alice: AuthUser
) -> None:
    """A post racing a delete gets 201 (then cascaded away) or 404, never a 500."""
    posts = [post(client, channel_url, alice, f"r{i}") for i in range(30)]
    delete = client.delete(channel_url, headers=alice.headers)
    resps = await asyncio.gather(*posts[:15], delete, *posts[15:])
    statuses = [r.status for r in resps]
    assert statuses[15] == 204
    assert set(statuses[:15] + statuses[16:]) <= {201, 404}
