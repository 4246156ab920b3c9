"""The error middleware: every failure is the contract's JSON, never a traceback or HTML."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.app import init_app
from shared.errors import Conflict, RetryLater
from shared.settings import Settings
from tests.conftest import AuthUser
from tests.helpers import API, expect_error

MIB = 1024 * 1024


async def test_unknown_routes_are_json_404(client: TestClient[Any, Any], alice: AuthUser) -> None:
    for path in ("/nope", f"{API}/nope", f"{API}/channels/1/nope", "/api/v2/channels", "/"):
        await expect_error(await client.get(path, headers=alice.headers), 404, "not_found")


WRONG_METHODS = [
    ("PUT", f"{API}/channels", {"GET", "POST"}),
    ("POST", f"{API}/me", {"GET"}),
    ("PUT", f"{API}/channels/1", {"GET", "PATCH", "DELETE"}),
    ("PUT", f"{API}/channels/1/members", {"GET", "POST"}),
    ("GET", f"{API}/channels/1/read", {"POST"}),
    ("POST", f"{API}/users", {"GET"}),
    ("DELETE", "/health", {"GET"}),
    ("POST", "/metrics", {"GET"}),
]
MALFORMED = [
    b"",
    b"{",
    b"{'name': 'x'}",
    b'{"name": "x",}',
    b"nul\x00l",
    b"\xff\xfe{}",
    b'{"name": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes: not UTF-8
    b"[" * 100_000,
    b'{"name": ' + b"1" * 5000 + b"}",  # int() refuses over 4300 digits
    b"NaN",  # Python's json takes these; JSON does not
    b'{"name": Infinity}',
    b"-Infinity",
]
NOT_OBJECTS = [b"[]", b"null", b'"name"', b"42", b"true", b"[{}]"]


async def test_wrong_method_is_json_405_with_allow(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    for method, path, allowed in WRONG_METHODS:
        resp = await client.request(method, path, headers=alice.headers)
        await expect_error(resp, 405, "method_not_allowed")
        assert allowed <= {m.strip() for m in resp.headers["Allow"].split(",")}, path


async def test_malformed_json_is_400(client: TestClient[Any, Any], alice: AuthUser) -> None:
    for raw in MALFORMED:
        resp = await client.post(
            f"{API}/channels",
            data=raw,
            headers={**alice.headers, "Content-Type": "application/json"},
        )
        await expect_error(resp, 400, "invalid_json", raw[:20])


async def test_json_not_an_object_is_422(client: TestClient[Any, Any], alice: AuthUser) -> None:
    for raw in NOT_OBJECTS:
        resp = await client.post(f"{API}/channels", data=raw, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", raw)


async def test_body_over_one_mib_is_413(client: TestClient[Any, Any], alice: AuthUser) -> None:
    big = b'{"name": "' + b"a" * MIB + b'"}'
    resp = await client.post(f"{API}/channels", data=io.BytesIO(big), headers=alice.headers)
    await expect_error(resp, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit is enforced while reading.
        for _ in range(20):
            yield b" " * (128 * 1024)

    resp = await client.post(f"{API}/channels", data=chunks(), headers=alice.headers)
    await expect_error(resp, 413, "payload_too_large")


async def test_body_just_under_one_mib_is_read(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    # Padding whitespace: a valid JSON object just under the limit parses fine.
    payload = b'{"name": "padded"}' + b" " * (MIB - 100)
    resp = await client.post(f"{API}/channels", data=io.BytesIO(payload), headers=alice.headers)
    assert resp.status == 201


async def error_app(settings: Settings) -> web.Application:
    app = init_app(settings)

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret detail /etc/passwd")

    async def busy(request: web.Request) -> web.Response:
        raise RetryLater("come back later", code="queue_full", retry_after=7)

    async def conflict(request: web.Request) -> web.Response:
        raise Conflict("taken", code="name_taken")

    async def teapot(request: web.Request) -> web.Response:
        raise web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/health")

    async def reset(request: web.Request) -> web.Response:
        raise ConnectionResetError("peer gone?")

    app.router.add_get("/test/boom", boom)
    app.router.add_get("/test/busy", busy)
    app.router.add_get("/test/conflict", conflict)
    app.router.add_get("/test/large", teapot)
    app.router.add_get("/test/redirect", redirect)
    app.router.add_get("/test/reset", reset)
    return app


async def test_unexpected_exception_is_json_500_without_details(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await aiohttp_client(await error_app(settings))
    with caplog.at_level(logging.ERROR, logger="server.middlewares"):
        resp = await client.get("/test/boom")
        await expect_error(resp, 500, "internal_error")
    text = await resp.text()
    assert "secret" not in text and "passwd" not in text and "RuntimeError" not in text
    assert "unhandled error on GET /test/boom" in caplog.text  # the operator sees it
    # A connection reset while our client is still there is a backing service's socket
    # (PostgreSQL, Redis) failing: 503, retry later.
    resp = await client.get("/test/reset")
    await expect_error(resp, 503, "service_unavailable")
    text = await resp.text()
    assert "peer" not in text


async def test_domain_errors_keep_status_code_and_headers(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], settings: Settings
) -> None:
    client = await aiohttp_client(await error_app(settings))
    resp = await client.get("/test/busy")
    await expect_error(resp, 503, "queue_full")
    assert resp.headers["Retry-After"] == "7"
    await expect_error(await client.get("/test/conflict"), 409, "name_taken")
    await expect_error(await client.get("/test/large"), 413, "payload_too_large")
    resp = await client.get("/test/redirect", allow_redirects=False)
    assert resp.status == 302  # not an error: passed through untouched


async def test_hostile_path_segments_never_500(
    client: TestClient[Any, Any], alice: AuthUser
) -> None:
    for segment in ("..%2F..%2Fetc%2Fpasswd", "%00", "1%00", "%2e%2e", "1;DROP", "%F0%9F%98%80"):
        resp = await client.get(f"{API}/channels/{segment}", headers=alice.headers)
        assert resp.status in (404, 422), (segment, resp.status)
        assert "error" in await resp.json()
