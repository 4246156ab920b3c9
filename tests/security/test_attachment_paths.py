"""Nothing outside HERALD_UPLOAD_DIR is ever read or deleted: tampered keys, symlinks
inside the root pointing out, symlinked folders, directories where files should be."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shared.services.attachments.storage import PathRejected, Storage, split_key
from tests.attachment_helpers import audit_rows, file_of, row_of, upload_ok
from tests.helpers import API, make_channel
from worker.context import CTX_KEY, close_context, open_context
from worker.jobs.attachments import delete_attachment_file


@pytest.fixture
def outside(tmp_path) -> Path:
    target = tmp_path / "outside" / "secret.txt"
    target.parent.mkdir()
    target.write_bytes(b"precious")
    return target


async def uploaded(client, alice, db, settings):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel, b"inside")
    return att, await file_of(db, settings, att["id"])


async def assert_refused(client, alice, db, att_id, outside: Path):
    resp = await client.delete(f"{API}/attachments/{att_id}", headers=alice.headers)
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "path_rejected"
    assert outside.read_bytes() == b"precious"
    row = await row_of(db, att_id)
    assert row["state"] == "delete_failed" and row["delete_error"].startswith("path rejected")
    [entry] = await audit_rows(db, "attachment.path_rejected")
    assert entry["result"] == "denied" and entry["actor_id"] == alice.id
    assert entry["client_ip"] == "127.0.0.1"
    assert await audit_rows(db, "attachment.delete") == []


@pytest.mark.parametrize("style", ["relative", "absolute"])
async def test_tampered_key_pointing_outside(client, alice, db, settings, outside, style):
    att, _ = await uploaded(client, alice, db, settings)
    key = os.path.relpath(outside, settings.upload_dir) if style == "relative" else str(outside)
    await db.execute("UPDATE attachments SET storage_key = %s WHERE id = %s", (key, att["id"]))
    resp = await client.get(f"{API}/attachments/{att['id']}/content", headers=alice.headers)
    assert resp.status == 409
    assert await resp.read() != b"precious"
    await db.execute("TRUNCATE audit_log")
    await assert_refused(client, alice, db, att["id"], outside)


async def test_symlink_inside_root_pointing_out(client, alice, db, settings, outside):
    att, path = await uploaded(client, alice, db, settings)
    path.unlink()
    path.symlink_to(outside)
    resp = await client.get(f"{API}/attachments/{att['id']}/content", headers=alice.headers)
    assert resp.status == 409
    await db.execute("TRUNCATE audit_log")
    await assert_refused(client, alice, db, att["id"], outside)
    assert path.is_symlink()


async def test_symlinked_folder_pointing_out(client, alice, db, settings, outside):
    att, path = await uploaded(client, alice, db, settings)
    shard = path.parent
    shutil.rmtree(shard)
    twin = outside.parent / path.name
    twin.write_bytes(b"precious")
    shard.symlink_to(outside.parent, target_is_directory=True)
    await assert_refused(client, alice, db, att["id"], twin)


async def test_symlink_to_another_file_inside_root(client, alice, db, settings):
    """Even a link inside the root is refused: it could point at someone else's file."""
    att, path = await uploaded(client, alice, db, settings)
    channel = await make_channel(client, alice, "other")
    other = await upload_ok(client, alice, channel, b"precious")
    other_path = await file_of(db, settings, other["id"])
    path.unlink()
    path.symlink_to(other_path)
    await assert_refused(client, alice, db, att["id"], other_path)


async def test_directory_where_the_file_was_expected(client, alice, db, settings):
    att, path = await uploaded(client, alice, db, settings)
    path.unlink()
    path.mkdir()
    (path / "keep.txt").write_bytes(b"precious")
    await assert_refused(client, alice, db, att["id"], path / "keep.txt")
    assert path.is_dir()


async def test_key_into_temporary_area_refused(client, alice, db, settings, outside):
    att, _ = await uploaded(client, alice, db, settings)
    temp = settings.upload_dir / ".tmp" / "upload.part"
    temp.write_bytes(b"precious")
    await db.execute(
        "UPDATE attachments SET storage_key = '.tmp/upload.part' WHERE id = %s", (att["id"],)
    )
    await assert_refused(client, alice, db, att["id"], temp)


async def test_worker_retry_refuses_a_path_turned_symlink(client, alice, db, settings, outside):
    att, path = await uploaded(client, alice, db, settings)
    await db.execute("UPDATE attachments SET state = 'deleting' WHERE id = %s", (att["id"],))
    path.unlink()
    path.symlink_to(outside)
    wctx = await open_context(settings)
    try:
        outcome = await delete_attachment_file({CTX_KEY: wctx, "job_try": 1}, att["id"])
    finally:
        await close_context(wctx)
    assert outcome == "rejected"
    assert outside.read_bytes() == b"precious"
    assert (await row_of(db, att["id"]))["state"] == "delete_failed"
    [entry] = await audit_rows(db, "attachment.path_rejected")
    assert entry["details"]["source"] == "worker"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a//b",
        "./a",
        "a/.",
        "a\\..\\b",
        "a\x00b",
        ".tmp/x.part",
        "x" * 2000,
    ],
)
def test_split_key_rejects(key):
    with pytest.raises(PathRejected):
        split_key(key)


def test_storage_unlink_never_follows_a_swapped_parent(tmp_path, outside):
    """The check and the unlink walk the same descriptors: a folder swapped for a symlink
    after any earlier check is refused, not followed."""
    storage = Storage(tmp_path / "root")
    storage.ensure()
    (outside.parent / "f").write_bytes(b"precious")
    (tmp_path / "root" / "ab").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(PathRejected):
        storage.unlink("ab/f")
    with pytest.raises(PathRejected):
        storage.open_read("ab/f")
    assert (outside.parent / "f").read_bytes() == b"precious"


@pytest.mark.parametrize(
    "path",
    [
        "/attachments/..%2F..%2Fetc%2Fpasswd/content",
        "/attachments/%2e%2e/content",
        "/attachments/1%00/content",
        "/attachments/1;rm -rf/content",
        "/attachments/%E2%80%AE1/content",
    ],
)
async def test_hostile_urls(client, alice, path):
    resp = await client.get(API + path, headers=alice.headers)
    assert 400 <= resp.status < 500
