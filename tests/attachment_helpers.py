"""Helpers shared by the attachment, orphan-scan and audit tests (not fixtures)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from shared.db.pool import Database
from shared.settings import Settings
from tests.helpers import API


def form(
    data: bytes,
    filename: str | None = "hello.txt",
    content_type: str = "text/plain",
    field: str = "file",
) -> aiohttp.FormData:
    fd = aiohttp.FormData()
    fd.add_field(field, data, filename=filename, content_type=content_type)
    return fd


async def upload(
    client: TestClient[Any, Any],
    user: Any,
    channel_id: int,
    data: bytes = b"hello world",
    **kw: Any,
) -> aiohttp.ClientResponse:
    return await client.post(
        f"{API}/channels/{channel_id}/attachments", data=form(data, **kw), headers=user.headers
    )


async def upload_ok(
    client: TestClient[Any, Any], user: Any, channel_id: int, data: bytes = b"x"
) -> dict[str, Any]:
    resp = await upload(client, user, channel_id, data)
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def row_of(db: Database, attachment_id: int) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM attachments WHERE id = %s", (attachment_id,))
    assert row is not None
    return row


async def file_of(db: Database, settings: Settings, attachment_id: int) -> Path:
    row = await row_of(db, attachment_id)
    return Path(settings.upload_dir) / row["storage_key"]


async def audit_rows(db: Database, action: str | None = None) -> list[dict[str, Any]]:
    if action is None:
        return await db.fetch("SELECT * FROM audit_log ORDER BY id")
    return await db.fetch("SELECT * FROM audit_log WHERE action = %s ORDER BY id", (action,))


def files_on_disk(root: Path) -> set[str]:
    """Every stored file (temporary area excluded), as keys relative to the root."""
    out = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".tmp" or rel.startswith(".tmp" + os.sep):
            continue
        for name in filenames:
            out.add(os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/"))
    return out


@contextmanager
def failing_unlink(
    monkeypatch: pytest.MonkeyPatch, names: Callable[[str], bool], err: int = errno.EIO
) -> Any:
    """Make ``os.unlink`` fail for real (raise OSError) for file names ``names`` accepts;
    everything else unlinks normally. Counts the failures."""
    real = os.unlink
    calls = {"failed": 0}

    def fake(path: Any, *args: Any, **kwargs: Any) -> None:
        if names(os.path.basename(os.fsdecode(path))):
            calls["failed"] += 1
            raise OSError(err, os.strerror(err))
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", fake)
    try:
        yield calls
    finally:
        monkeypatch.setattr(os, "unlink", real)
