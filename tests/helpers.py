"""The shared test toolkit (not fixtures; those live in the conftest files).

Test modules import what they share from here or from the other helper modules
(tests/attachment_helpers.py, tests/health_fields.py, ...), never from each other:
tests/test_test_imports.py keeps it so."""

from __future__ import annotations

from typing import Any

API = "/api/v1"


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
