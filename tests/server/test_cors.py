"""CORS per the contract: allowed origins get the headers on every /api/v1 answer."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.app import init_app
from shared.settings import Settings
from tests.conftest import AuthUser
from tests.helpers import API

ORIGIN = "https://app.example.com"
LOCAL = "http://localhost:3000"
CORS_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "Access-Control-Allow-Credentials",
    "Access-Control-Max-Age",
)
DISALLOWED = [
    "null",
    "https://evil.example.com",
    "http://app.example.com",  # another scheme
    "https://app.example.com:8443",  # another port
    "https://app.example.com.evil.com",
    "https://sub.app.example.com",
    "https://app.example.co",
    "https://app.example.com/",
    "https://APP.example.com",  # not as a browser sends it: no exact match
    "HTTPS://app.example.com",
    "*",
    "",
]

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def cors_client(make_client: MakeClient) -> TestClient[Any, Any]:
    return await make_client(cors_origins=frozenset({ORIGIN, LOCAL}))


def assert_allowed(resp: Any, origin: str = ORIGIN) -> None:
    assert resp.headers.get("Access-Control-Allow-Origin") == origin
    assert "Origin" in resp.headers.getall("Vary", [])
    exposed = resp.headers.get("Access-Control-Expose-Headers", "")
    assert "retry-after" in exposed.lower()


def assert_no_cors(resp: Any, what: Any = None) -> None:
    for name in CORS_HEADERS:
        assert name not in resp.headers, (name, what)


async def test_allowed_origin_on_success(
    cors_client: TestClient[Any, Any], alice: AuthUser
) -> None:
    for origin in (ORIGIN, LOCAL):
        resp = await cors_client.get(f"{API}/me", headers={**alice.headers, "Origin": origin})
        assert resp.status == 200
        assert_allowed(resp, origin)
    resp = await cors_client.post(
        f"{API}/channels", json={"name": "c"}, headers={**alice.headers, "Origin": ORIGIN}
    )
    assert resp.status == 201
    assert_allowed(resp)


ERROR_CASES: list[tuple[str, str, bool, Any, int]] = [
    ("GET", "/me", False, None, 401),
    ("GET", "/channels/999", True, None, 404),
    ("GET", "/no/such/route", False, None, 404),
    ("PUT", "/channels", False, None, 405),
    ("POST", "/channels", True, {"name": "Bad Name"}, 422),
    ("POST", "/channels", True, b"{oops", 400),
    ("GET", "/admin/connections", True, None, 403),
]


async def test_allowed_origin_on_errors(cors_client: TestClient[Any, Any], alice: AuthUser) -> None:
    for method, path, auth, body, status in ERROR_CASES:
        headers = {"Origin": ORIGIN, **(alice.headers if auth else {})}
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        resp = await cors_client.request(method, API + path, headers=headers, **kwargs)
        assert resp.status == status, (method, path)
        assert "error" in await resp.json()
        assert_allowed(resp)


async def test_allowed_origin_on_too_large(
    cors_client: TestClient[Any, Any], alice: AuthUser
) -> None:
    resp = await cors_client.post(
        f"{API}/channels",
        data=io.BytesIO(b"x" * (1024 * 1024 + 1)),
        headers={**alice.headers, "Origin": ORIGIN, "Content-Type": "application/json"},
    )
    assert resp.status == 413
    assert_allowed(resp)


async def test_allowed_origin_on_the_sse_response(
    cors_client: TestClient[Any, Any], alice: AuthUser
) -> None:
    resp = await cors_client.post(f"{API}/channels", json={"name": "live"}, headers=alice.headers)
    channel_id = (await resp.json())["id"]
    resp = await cors_client.get(
        f"{API}/channels/{channel_id}/events",
        params={"access_token": alice.token},
        headers={"Origin": ORIGIN},
    )
    try:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert_allowed(resp)
        assert b"event: ready" in await resp.content.readuntil(b"\n\n")
    finally:
        resp.close()
    # A refused stream request (bad token) carries them too, so the page can read the 401.
    resp = await cors_client.get(
        f"{API}/channels/{channel_id}/events",
        params={"access_token": "wrong"},
        headers={"Origin": ORIGIN},
    )
    assert resp.status == 401
    assert_allowed(resp)


async def test_disallowed_origin_gets_no_cors_header(
    cors_client: TestClient[Any, Any], alice: AuthUser
) -> None:
    for origin in DISALLOWED:
        resp = await cors_client.get(f"{API}/me", headers={**alice.headers, "Origin": origin})
        assert resp.status == 200
        assert_no_cors(resp, origin)
        resp = await cors_client.get(f"{API}/me", headers={"Origin": origin})
        assert resp.status == 401
        assert_no_cors(resp, origin)
        resp = await cors_client.options(
            f"{API}/channels",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert_no_cors(resp, origin)


async def test_no_origins_configured_means_no_cors(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    resp = await client.get(f"{API}/me", headers={**alice.headers, "Origin": ORIGIN})
    assert resp.status == 200
    assert_no_cors(resp)


async def test_no_origin_header_means_no_cors(
    cors_client: TestClient[Any, Any], alice: AuthUser
) -> None:
    resp = await cors_client.get(f"{API}/me", headers=alice.headers)
    assert_no_cors(resp)


async def test_preflight(cors_client: TestClient[Any, Any]) -> None:
    for path in ("/channels", "/channels/1", "/channels/1/events", "/channels/1/members/2"):
        resp = await cors_client.options(
            API + path,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "authorization, content-type, last-event-id",
            },
        )
        assert 200 <= resp.status < 300
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in resp.headers.getall("Vary", [])
        methods = {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")}
        assert {"GET", "POST", "PATCH", "DELETE"} <= methods
        headers = resp.headers["Access-Control-Allow-Headers"]
        allowed = {h.strip().lower() for h in headers.split(",")}
        assert {"authorization", "content-type", "last-event-id"} <= allowed


async def test_preflight_needs_no_token_and_has_no_body(cors_client: TestClient[Any, Any]) -> None:
    resp = await cors_client.options(
        f"{API}/channels/1/messages",
        headers={"Origin": LOCAL, "Access-Control-Request-Method": "POST"},
    )
    assert resp.status == 204
    assert await resp.read() == b""
    assert resp.headers["Access-Control-Allow-Origin"] == LOCAL


async def test_outside_the_api_prefix_no_cors(cors_client: TestClient[Any, Any]) -> None:
    resp = await cors_client.get("/health", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_vary_set_by_a_handler_keeps_origin(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    alice: AuthUser,
) -> None:
    app = init_app(replace(settings, cors_origins=frozenset({ORIGIN})))

    async def varied(request: web.Request) -> web.Response:
        return web.Response(text="x", headers={"Vary": "Accept-Encoding"})

    app.router.add_get(f"{API}/test/varied", varied)
    client = await aiohttp_client(app)
    resp = await client.get(f"{API}/test/varied", headers={**alice.headers, "Origin": ORIGIN})
    assert resp.status == 200
    assert resp.headers["Vary"] == "Accept-Encoding, Origin"
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
