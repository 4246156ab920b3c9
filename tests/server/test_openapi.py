"""The OpenAPI document: valid OpenAPI 3.1, the router's routes exactly, served without
auth."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from server.openapi import DOCUMENT
from server.routes import setup_routes
from shared.constants import API_PREFIX

METHODS = {"get", "put", "post", "patch", "delete", "options", "head", "trace"}


def router_operations() -> set[tuple[str, str]]:
    app = web.Application()
    setup_routes(app)
    ops = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if not path.startswith(API_PREFIX + "/") or route.method == "HEAD":
            continue
        ops.add((path.removeprefix(API_PREFIX), route.method.lower()))
    return ops


def document_operations() -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in METHODS
    }


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)


def test_document_and_router_name_the_same_operations() -> None:
    assert document_operations() == router_operations()
    assert DOCUMENT["servers"] == [{"url": API_PREFIX}]


def test_every_operation_documents_its_errors_with_the_error_body() -> None:
    responses = DOCUMENT["components"]["responses"]
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            codes = set(op["responses"])
            assert "503" in codes, (method, path)
            if op.get("security") != []:
                assert {"401", "429"} <= codes, (method, path)
            if "requestBody" in op or "parameters" in op or "parameters" in item:
                assert "422" in codes, (method, path)
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    name = answer["$ref"].rpartition("/")[2]
                    schema = responses[name]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}
                    if status in ("429", "503"):
                        assert "Retry-After" in responses[name]["headers"]


def test_streams_are_described_as_event_streams() -> None:
    for path in ("/channels/{channel_id}/events", "/events"):
        op = DOCUMENT["paths"][path]["get"]
        assert set(op["responses"]["200"]["content"]) == {"text/event-stream"}
        for event in ("ready", "message", "heartbeat", "reset", "close"):
            assert f"`{event}`" in op["description"], (path, event)
    multi = DOCUMENT["paths"]["/events"]["get"]["description"]
    assert "`subscribed`" in multi and "`unsubscribed`" in multi


async def test_served_without_auth_and_equal_to_the_document(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.get(f"{API_PREFIX}/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert json.loads(await resp.read()) == json.loads(json.dumps(DOCUMENT))


async def test_served_with_cors_headers_like_the_rest(
    make_client: Any,
) -> None:
    origin = "https://app.example.com"
    cors_client = await make_client(cors_origins=frozenset({origin}))
    resp = await cors_client.get(f"{API_PREFIX}/openapi.json", headers={"Origin": origin})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert "Origin" in resp.headers["Vary"]


async def test_other_methods_still_need_nothing_but_get_405(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.post(f"{API_PREFIX}/openapi.json")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
