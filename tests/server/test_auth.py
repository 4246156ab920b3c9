"""Bearer auth on every /api/v1 route; ``?access_token=`` on the SSE routes only."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.keys import AUTH_LIMIT
from tests.conftest import AuthUser
from tests.helpers import API, make_channel

# Every authenticated foundation route (method, path, JSON body).
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/me", None),
    ("POST", "/channels", {"name": "x"}),
    ("GET", "/channels", None),
    ("GET", "/channels/1", None),
    ("PATCH", "/channels/1", {"topic": "x"}),
    ("DELETE", "/channels/1", None),
    ("POST", "/channels/1/members", {"user_id": 1}),
    ("DELETE", "/channels/1/members/1", None),
    ("POST", "/channels/1/messages", {"body": "x"}),
    ("GET", "/channels/1/messages", None),
    ("GET", "/channels/1/events", None),
    ("GET", "/admin/connections", None),
]

BAD_AUTH = [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Bearer    ",
    "Bearer not-a-real-token",
    "Bearer hrd_" + "A" * 43,
    "Bearer " + "x" * 4000,  # over the token limit, under the HTTP header limit
    "Basic dXNlcjpwYXNz",
    "Token abc",
    "Bearer ' OR '1'='1",
]


async def expect_401(resp: Any, what: Any = None) -> None:
    assert resp.status == 401, (what, await resp.text())
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["code"] == "unauthorized"
    assert resp.headers.get("Content-Type", "").startswith("application/json")


async def test_missing_invalid_or_malformed_bearer(
    client: TestClient[Any, Any], alice: AuthUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many bad tokens from one address: above HERALD_AUTH_FAIL_LIMIT (tests/faults/).
    monkeypatch.setattr(client.app[AUTH_LIMIT], "limit", 10_000)
    for method, path, body in ROUTES:
        for auth in BAD_AUTH:
            headers = {} if auth is None else {"Authorization": auth}
            resp = await client.request(method, API + path, json=body, headers=headers)
            await expect_401(resp, (method, path, auth))


async def test_token_of_another_format_still_401(client: TestClient[Any, Any]) -> None:
    # Bearer with the real token of nobody (all users gone) and a stray scheme casing.
    resp = await client.get(f"{API}/me", headers={"Authorization": "BEARER hrd_missing"})
    await expect_401(resp)


async def test_valid_token_and_me(
    client: TestClient[Any, Any], alice: AuthUser, admin: AuthUser
) -> None:
    resp = await client.get(f"{API}/me", headers=alice.headers)
    assert resp.status == 200
    assert await resp.json() == {"id": alice.id, "name": "alice", "is_admin": False}
    resp = await client.get(f"{API}/me", headers={"Authorization": f"bearer  {admin.token} "})
    assert resp.status == 200
    assert (await resp.json())["is_admin"] is True


async def test_query_token_is_ignored_off_the_sse_route(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    for method, path, body in ROUTES:
        if path.endswith("/events"):
            continue
        resp = await client.request(
            method, API + path, params={"access_token": alice.token}, json=body
        )
        await expect_401(resp, (method, path))


async def test_query_token_ignored_on_lookalike_path(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    # GET /channels/events is the channel-detail route (id "events"), not the stream.
    resp = await client.get(f"{API}/channels/events", params={"access_token": alice.token})
    await expect_401(resp)


@pytest.mark.parametrize("multi", [False, True])
async def test_query_token_accepted_on_the_sse_routes(
    client: TestClient[Any, Any], alice: AuthUser, multi: bool
) -> None:
    channel_id = await make_channel(client, alice, "live")
    url = f"{API}/events?channels={channel_id}" if multi else f"{API}/channels/{channel_id}/events"
    resp = await client.get(url, params={"access_token": alice.token})
    try:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await resp.content.readuntil(b"\n\n")
        assert b"event: ready" in first
    finally:
        resp.close()
    for bad in ("", "nope", "x" * 300, "\u00e9\u0000", alice.token + "x"):
        await expect_401(await client.get(url, params={"access_token": bad}))
    # A valid header wins over a bad query token.
    resp = await client.get(url, params={"access_token": "nope"}, headers=alice.headers)
    try:
        assert resp.status == 200
    finally:
        resp.close()


async def test_query_token_accepted_on_the_multi_channel_stream(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    # Found while writing the OpenAPI document: GET /events refused ?access_token=,
    # so a browser's EventSource could not open it at all.
    channel_id = await make_channel(client, alice, "multi")
    url = f"{API}/events"
    resp = await client.get(url, params={"access_token": alice.token, "channels": channel_id})
    try:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert b"event: ready" in first
    finally:
        resp.close()
    await expect_401(await client.get(url, params={"access_token": "nope"}))
    # Still only the streams: the same token in the URL of a REST route is refused.
    await expect_401(await client.get(f"{API}/me", params={"access_token": alice.token}))


async def test_unauthenticated_unknown_route_is_404_and_wrong_method_405(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.get(f"{API}/nothing-here")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    resp = await client.put(f"{API}/channels")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_non_api_routes_need_no_token(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_admin_route_needs_admin(
    client: TestClient[Any, Any], alice: AuthUser, admin: AuthUser
) -> None:
    resp = await client.get(f"{API}/admin/connections", headers=alice.headers)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"
    resp = await client.get(f"{API}/admin/connections", headers=admin.headers)
    assert resp.status == 200
    assert (await resp.json())["items"] == []
