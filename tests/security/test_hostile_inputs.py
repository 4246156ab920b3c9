"""Hostile input to every foundation endpoint: a clear 4xx, never a 500, nothing lost."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import AuthUser
from tests.helpers import API, make_channel

# Every endpoint that reads a JSON body: (method, path template, a valid body).
BODY_ROUTES = [
    ("POST", "/channels", '{"name": "fresh"}'),
    ("PATCH", "/channels/{cid}", '{"topic": "t"}'),
    ("POST", "/channels/{cid}/members", '{"user_id": {uid}}'),
    ("POST", "/channels/{cid}/messages", '{"body": "hi"}'),
]
# Every route with ids in its path: (method, path template).
ID_ROUTES = [
    ("GET", "/channels/{id}"),
    ("PATCH", "/channels/{id}"),
    ("DELETE", "/channels/{id}"),
    ("POST", "/channels/{id}/members"),
    ("DELETE", "/channels/{cid}/members/{id}"),
    ("DELETE", "/channels/{id}/members/1"),
    ("POST", "/channels/{id}/messages"),
    ("GET", "/channels/{id}/messages"),
    ("GET", "/channels/{id}/events"),
]
BAD_IDS = [
    "abc",
    "0",
    "-1",
    "1.0",
    "1e3",
    "0x1F",
    "9223372036854775808",  # bigint + 1
    "9" * 40,
    "%00",
    "1%00",
    "%2e%2e",
    "..%2F..%2Fetc%2Fpasswd",
    "%EF%BC%91",  # fullwidth digit one
    "1'%20OR%20'1'='1",
    "%F0%9F%98%80",
    "%ED%A0%80",  # an encoded lone surrogate
    " 1",
]
MALFORMED = [b"", b"{", b'{"name": }', b"{'a': 1}", b"\xff", b"[" * 50_000, b"\x00"]
NOT_OBJECTS = [b"[]", b"null", b"1", b'"s"', b"[1, 2]", b"false"]
HUGE_NUMBER = b'{"user_id": ' + b"9" * 5000 + b"}"


@pytest.fixture
async def ids(client: TestClient[Any, Any], alice: AuthUser, bob: AuthUser) -> dict[str, int]:
    return {"cid": await make_channel(client, alice, "target"), "uid": bob.id}


def fill(template: str, ids: dict[str, int]) -> str:
    return template.replace("{cid}", str(ids["cid"])).replace("{uid}", str(ids["uid"]))


async def send(
    client: TestClient[Any, Any], user: AuthUser, method: str, path: str, raw: bytes
) -> Any:
    return await client.request(
        method,
        API + path,
        data=raw,
        headers={**user.headers, "Content-Type": "application/json"},
    )


async def expect(resp: Any, status: int, code: str | None = None, what: Any = None) -> None:
    text = await resp.text()
    assert resp.status == status, (what, text)
    body = await resp.json()
    if code is not None:
        assert body["error"]["code"] == code, (what, text)


async def test_malformed_and_non_object_json(
    client: TestClient[Any, Any], alice: AuthUser, ids: dict[str, int]
) -> None:
    for method, path, good in BODY_ROUTES:
        url = fill(path, ids)
        for raw in MALFORMED:
            resp = await send(client, alice, method, url, raw)
            await expect(resp, 400, "invalid_json", (url, raw[:10]))
        for raw in NOT_OBJECTS:
            resp = await send(client, alice, method, url, raw)
            await expect(resp, 422, "validation_error", (url, raw))
        unknown = fill(good, ids)[:-1] + ', "admin": true}'
        await expect(await send(client, alice, method, url, unknown.encode()), 422, None, url)
        await expect(await send(client, alice, method, url, HUGE_NUMBER), 400, "invalid_json")
        big = io.BytesIO(b'{"x": "' + b"y" * (1024 * 1024) + b'"}')
        resp = await client.request(method, API + url, data=big, headers=alice.headers)
        await expect(resp, 413, "payload_too_large", url)
        # The good body still works after all that.
        resp = await send(client, alice, method, url, fill(good, ids).encode())
        assert resp.status in (200, 201, 204), (url, await resp.text())


TEXT_FIELDS = [
    ("POST", "/channels", "name"),
    ("POST", "/channels", "topic"),
    ("PATCH", "/channels/{cid}", "name"),
    ("PATCH", "/channels/{cid}", "topic"),
    ("POST", "/channels/{cid}/messages", "body"),
]
# Raw JSON escapes: json.loads turns these into NUL or lone surrogates.
UNSTORABLE = ["\\u0000", "a\\u0000b", "\\ud800", "x\\udfff", "\\udc00\\ud800", "\\ud800\\u0041"]


async def test_text_postgresql_cannot_store_is_422(
    client: TestClient[Any, Any], alice: AuthUser, ids: dict[str, int]
) -> None:
    for method, path, field in TEXT_FIELDS:
        for escape in UNSTORABLE:
            extra = ', "name": "okname"' if field == "topic" and method == "POST" else ""
            raw = f'{{"{field}": "{escape}"{extra}}}'.encode()
            resp = await send(client, alice, method, fill(path, ids), raw)
            await expect(resp, 422, "validation_error", raw)
    # Nothing was stored on the way.
    resp = await client.get(f"{API}/channels", headers=alice.headers)
    assert [c["name"] for c in (await resp.json())["items"]] == ["target"]
    resp = await client.get(f"{API}/channels/{ids['cid']}/messages", headers=alice.headers)
    assert (await resp.json())["items"] == []


async def test_unstorable_text_in_keys(
    client: TestClient[Any, Any], alice: AuthUser, ids: dict[str, int]
) -> None:
    for key in ("\\u0000", "\\ud800", "name\\u0000"):
        raw = f'{{"{key}": "x"}}'.encode()
        await expect(await send(client, alice, "POST", "/channels", raw), 422, "validation_error")


async def test_valid_surrogate_pair_is_fine(
    client: TestClient[Any, Any], alice: AuthUser, ids: dict[str, int]
) -> None:
    raw = b'{"body": "\\ud83d\\ude00 ok"}'
    resp = await send(client, alice, "POST", fill("/channels/{cid}/messages", ids), raw)
    assert resp.status == 201
    assert (await resp.json())["body"] == "\U0001f600 ok"


SQL_TEXTS = [
    "'; DROP TABLE channels; --",
    '" OR ""="',
    "1; SELECT pg_sleep(10)",
    "%s %(name)s %% $1 ::text",
    "\\' \\\\ \\x00",
    "E'\\x41' || chr(0)",
    "/* */ UNION SELECT token_hash FROM users --",
]


async def test_sql_metacharacters_stored_and_returned_verbatim(
    client: TestClient[Any, Any], alice: AuthUser, ids: dict[str, int]
) -> None:
    url = f"{API}/channels/{ids['cid']}"
    for text in SQL_TEXTS:
        resp = await client.patch(url, json={"topic": text}, headers=alice.headers)
        assert resp.status == 200
        assert (await resp.json())["topic"] == text
        resp = await client.get(url, headers=alice.headers)
        assert (await resp.json())["topic"] == text
        resp = await client.post(f"{url}/messages", json={"body": text}, headers=alice.headers)
        assert resp.status == 201
        assert (await resp.json())["body"] == text
    resp = await client.get(f"{url}/messages", headers=alice.headers)
    assert [m["body"] for m in (await resp.json())["items"]] == SQL_TEXTS
    resp = await client.post(f"{API}/channels", json={"name": "a'; drop"}, headers=alice.headers)
    await expect(resp, 422, "validation_error")
    # Everything is still there.
    resp = await client.get(f"{API}/channels", headers=alice.headers)
    assert [c["name"] for c in (await resp.json())["items"]] == ["target"]


async def test_bad_path_ids(
    client: TestClient[Any, Any], alice: AuthUser, ids: dict[str, int]
) -> None:
    for method, path in ID_ROUTES:
        for bad in BAD_IDS:
            if bad == "%2e%2e" and path == "/channels/{id}/events":
                # The client resolves /channels/../events to /events: a real stream.
                continue
            url = API + path.replace("{cid}", str(ids["cid"])).replace("{id}", bad)
            resp = await client.request(method, url, json={}, headers=alice.headers)
            assert resp.status in (404, 422), (url, resp.status, await resp.text())
            assert "error" in await resp.json()
        # The largest bigint is a valid id that simply does not exist.
        url = API + path.replace("{cid}", str(ids["cid"])).replace("{id}", str(2**63 - 1))
        body = None
        if method in ("POST", "PATCH"):
            body = {"members": {"user_id": 1}, "messages": {"body": "x"}}.get(
                path.rsplit("/", 1)[-1], {"topic": "x"}
            )
        resp = await client.request(method, url, json=body, headers=alice.headers)
        assert resp.status == 404, (url, await resp.text())
    # The target channel survived every attempt.
    resp = await client.get(f"{API}/channels/{ids['cid']}", headers=alice.headers)
    assert resp.status == 200


LISTING_QUERIES = [
    "limit=%00",
    "limit=1%00",
    "limit=%F0%9F%98%80",
    "limit=1&limit=2000",
    "cursor=%00%00",
    "cursor=" + "A" * 500,
    "cursor=%ED%A0%80",
    "cursor=Yzo5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5",
]
MESSAGE_QUERIES = ["before=%00", "after=%ED%A0%80", "limit=%EF%BC%91", "after=1e5", "before=-0"]


async def test_hostile_queries(
    client: TestClient[Any, Any], alice: AuthUser, ids: dict[str, int]
) -> None:
    for query in LISTING_QUERIES:
        resp = await client.get(f"{API}/channels?{query}", headers=alice.headers)
        assert resp.status in (200, 422), (query, await resp.text())
        if resp.status == 200:
            assert "items" in await resp.json()
    url = f"{API}/channels/{ids['cid']}/messages"
    for query in MESSAGE_QUERIES:
        resp = await client.get(f"{url}?{query}", headers=alice.headers)
        await expect(resp, 422, "validation_error", query)


async def test_concurrent_hostile_and_valid_traffic_loses_nothing(
    client: TestClient[Any, Any], alice: AuthUser, ids: dict[str, int]
) -> None:
    url = f"{API}/channels/{ids['cid']}/messages"
    good = [f"msg {i} ' \" ; -- ✓" for i in range(30)]
    hostile = [b'{"body": "\\u0000"}', b"{", b"[]", b'{"body": ""}', HUGE_NUMBER] * 6
    tasks = [client.post(url, json={"body": g}, headers=alice.headers) for g in good]
    tasks += [send(client, alice, "POST", url[len(API) :], raw) for raw in hostile]
    resps = await asyncio.gather(*tasks)
    statuses = [r.status for r in resps]
    assert statuses[: len(good)] == [201] * len(good)
    assert all(400 <= s < 500 for s in statuses[len(good) :])
    resp = await client.get(f"{url}?limit=1000", headers=alice.headers)
    assert sorted(m["body"] for m in (await resp.json())["items"]) == sorted(good)
