"""The shared test toolkit (not fixtures; those live in the conftest files).

Test modules import what they share from here or from the other helper modules
(tests/attachment_helpers.py, tests/health_fields.py, ...), never from each other:
tests/test_test_imports.py keeps it so."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp.test_utils import TestClient

    from tests.conftest import AuthUser

API = "/api/v1"


async def make_channel(
    client: TestClient[Any, Any], user: AuthUser, name: str = "general", *, private: bool = False
) -> int:
    """Create a channel over REST as ``user`` and return its id (names are global: a test
    that makes several passes a ``name`` for each)."""
    resp = await client.post(
        f"{API}/channels", json={"name": name, "is_private": private}, headers=user.headers
    )
    assert resp.status == 201, await resp.text()
    return int((await resp.json())["id"])


def channel_path(channel_id: int) -> str:
    """The channel's REST path, e.g. ``channel_path(await make_channel(...)) + "/members"``."""
    return f"{API}/channels/{channel_id}"


async def expect_error(
    resp: Any, status: int, code: str | None = None, what: Any = None
) -> dict[str, Any]:
    """Assert ``resp`` is the contract's error answer and return its ``error`` object.

    The contract: ``status``, JSON, exactly ``{"error": {"code": ..., "message": ...}}``
    with a non-empty message, and never a traceback or an HTML page. ``code`` is checked
    when given; ``what`` is shown when an assertion fails (e.g. the input that was sent).
    """
    text = await resp.text()
    assert resp.status == status, (what, text)
    assert resp.content_type == "application/json", (what, text)
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, (what, body)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], (what, body)
    assert "Traceback" not in text and "<html" not in text.lower(), (what, text)
    if code is not None:
        assert body["error"]["code"] == code, (what, body)
    return dict(body["error"])


async def wait_for(
    check: Callable[[], object | Awaitable[object]],
    timeout: float = 5.0,
    what: str = "",
    *,
    interval: float = 0.01,
) -> None:
    """Poll ``check`` (plain or async) every ``interval`` seconds until it returns
    something true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(interval)
