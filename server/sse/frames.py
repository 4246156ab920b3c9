"""Server-Sent Events wire format: each frame encoded once, written to many streams."""

from __future__ import annotations

import json
from typing import Any


def encode(event: str, data: Any, *, id: int | None = None, retry: int | None = None) -> bytes:
    """One SSE frame; ``data`` is always a single line of JSON."""
    lines = []
    if retry is not None:
        lines.append(f"retry: {int(retry)}")
    lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {int(id)}")
    # json.dumps escapes newlines inside strings, so the payload stays on one line.
    lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
    return ("\n".join(lines) + "\n\n").encode("utf-8")
