"""The orphan scan: grace window, dry run, uploads in progress, dangling rows, symlinks."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from arq.connections import create_pool

from shared.bus import arq_settings
from shared.constants import JOB_ORPHAN_SCAN, QUEUE_NAME, AdvisoryLock
from shared.metrics import Metrics
from shared.services.attachments.storage import STALE_TEMP_S, new_key
from shared.services.audit import AuditTrail
from shared.services.wiring import attachment_files
from tests.attachment_helpers import audit_rows, file_of, files_on_disk, upload_ok
from tests.helpers import make_channel

OLD = time.time() - 7200  # well past the test grace window


@pytest.fixture
def scan_settings(settings):
    return replace(settings, orphan_grace_s=600)


def scanner(db, s):
    return attachment_files(db=db, settings=s, metrics=Metrics(), audit=AuditTrail(db=db)).orphans


def put(root: Path, rel: str, data: bytes = b"orphan", mtime: float | None = OLD) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


async def age_all_files(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for n in names:
            os.utime(os.path.join(dirpath, n), (OLD, OLD))


async def test_removes_old_orphans_keeps_claimed_and_young(client, alice, scan_settings, db):
    root = scan_settings.upload_dir
    channel = await make_channel(client, alice)
    kept = [await upload_ok(client, alice, channel, b"%d" % i) for i in range(3)]
    await age_all_files(root)
    o1 = put(root, "ab/" + "a" * 32, b"12345")
    o2 = put(root, "deep/er/still/orphan.bin", b"1234567")
    o3 = put(root, "loose.txt", b"1")
    young = put(root, "cd/" + "c" * 32, b"young", mtime=None)
    summary = await scanner(db, scan_settings).scan()
    assert summary["scanned"] == 7
    assert summary["orphans"] == 3 and summary["deleted"] == 3
    assert summary["bytes_freed"] == 13
    assert summary["young_skipped"] == 1
    assert summary["dangling_rows"] == 0
    assert not (o1.exists() or o2.exists() or o3.exists())
    assert young.exists()
    for att in kept:
        assert (await file_of(db, scan_settings, att["id"])).exists()
    detected = await audit_rows(db, "orphan.detected")
    deleted = await audit_rows(db, "orphan.deleted")
    assert sorted(r["target_id"] for r in detected) == sorted(
        ["ab/" + "a" * 32, "deep/er/still/orphan.bin", "loose.txt"]
    )
    assert {r["result"] for r in deleted} == {"ok"} and len(deleted) == 3
    [scan] = await audit_rows(db, "orphan.scan")
    assert scan["result"] == "ok" and scan["details"]["deleted"] == 3
    assert (await AuditTrail(db=db).verify()).ok
    health = (await (await client.get("/health")).json())["attachments"]
    last = health["last_orphan_scan"]
    assert last["scanned"] == 7 and last["orphans"] == 3 and last["bytes_freed"] == 13
    assert {"deleted", "dangling_rows", "at"} <= set(last)
    assert str(root) not in str(health) and "loose.txt" not in str(health)


async def test_grace_window_protects_recent_files(scan_settings, db):
    root = scan_settings.upload_dir
    just_inside = put(root, "aa/x", mtime=time.time() - 500)  # grace is 600 s
    just_outside = put(root, "aa/y", mtime=time.time() - 700)
    summary = await scanner(db, scan_settings).scan()
    assert just_inside.exists() and not just_outside.exists()
    assert summary["young_skipped"] == 1 and summary["deleted"] == 1


async def test_dry_run_only_reports(scan_settings, db):
    root = scan_settings.upload_dir
    paths = [put(root, f"{i:02x}/{'e' * 32}", b"abc") for i in range(5)]
    summary = await scanner(db, scan_settings).scan(dry_run=True)
    assert all(p.exists() for p in paths)
    assert summary["dry_run"] is True
    assert summary["orphans"] == 5 and summary["deleted"] == 0 and summary["bytes_freed"] == 0
    assert summary["orphan_bytes"] == 15
    detected = await audit_rows(db, "orphan.detected")
    assert len(detected) == 5 and {r["result"] for r in detected} == {"dry_run"}
    assert await audit_rows(db, "orphan.deleted") == []
    [scan] = await audit_rows(db, "orphan.scan")
    assert scan["result"] == "dry_run"


async def test_uploads_in_progress_are_never_touched(client, alice, scan_settings, db):
    """Both stages: bytes still streaming into the temporary area, and a file already
    renamed into place whose row has not committed yet (its key's lock is held)."""
    root = scan_settings.upload_dir
    channel = await make_channel(client, alice)
    streaming = put(root, ".tmp/" + "f" * 32 + ".part", b"partial")
    key = new_key()
    placed = put(root, key, b"placed")
    zero_grace = replace(scan_settings, orphan_grace_s=0)
    async with db.transaction() as tx:
        await tx.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (AdvisoryLock.UPLOAD_KEY, key)
        )
        await tx.execute(
            "INSERT INTO attachments (channel_id, uploader_id, storage_key, filename,"
            " content_type, size, sha256) VALUES (%s, %s, %s, 'f', 'text/plain', 6, 'x')",
            (channel, alice.id, key),
        )
        summary = await scanner(db, zero_grace).scan()
    assert streaming.exists() and placed.exists()
    assert summary["in_progress_skipped"] == 1 and summary["deleted"] == 0
    assert await db.fetchval("SELECT count(*) FROM attachments WHERE storage_key = %s", (key,)) == 1
    # Committed now: a later scan leaves it alone because a row claims it.
    summary = await scanner(db, zero_grace).scan()
    assert placed.exists() and summary["orphans"] == 0


async def test_stale_temporary_files_are_cleaned(scan_settings, db):
    root = scan_settings.upload_dir
    stale = put(root, ".tmp/old.part", mtime=time.time() - STALE_TEMP_S - 10)
    fresh = put(root, ".tmp/new.part", mtime=time.time() - 700)
    summary = await scanner(db, scan_settings).scan(dry_run=True)
    assert stale.exists() and summary["stale_temp_files"] == 1
    summary = await scanner(db, scan_settings).scan()
    assert not stale.exists() and fresh.exists()
    assert summary["stale_temp_files"] == 1 and summary["scanned"] == 0


async def test_dangling_rows_are_reported_not_changed(client, alice, scan_settings, db):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    other = await upload_ok(client, alice, channel)
    (await file_of(db, scan_settings, att["id"])).unlink()
    await age_all_files(scan_settings.upload_dir)
    summary = await scanner(db, scan_settings).scan()
    assert summary["dangling_rows"] == 1 and summary["orphans"] == 0
    [entry] = await audit_rows(db, "orphan.detected")
    assert entry["target_type"] == "attachment" and entry["target_id"] == str(att["id"])
    assert entry["result"] == "missing"
    state = await db.fetchval("SELECT state FROM attachments WHERE id = %s", (att["id"],))
    assert state == "active"
    assert (await file_of(db, scan_settings, other["id"])).exists()


async def test_file_of_a_deleted_row_is_an_orphan(client, alice, scan_settings, db):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, scan_settings, att["id"])
    await db.execute("UPDATE attachments SET state = 'deleted' WHERE id = %s", (att["id"],))
    await age_all_files(scan_settings.upload_dir)
    summary = await scanner(db, scan_settings).scan()
    assert summary["deleted"] == 1 and not path.exists()


async def test_files_of_deleting_and_failed_rows_are_not_orphans(client, alice, scan_settings, db):
    channel = await make_channel(client, alice)
    a = await upload_ok(client, alice, channel)
    b = await upload_ok(client, alice, channel)
    await db.execute("UPDATE attachments SET state = 'deleting' WHERE id = %s", (a["id"],))
    await age_all_files(scan_settings.upload_dir)
    summary = await scanner(db, scan_settings).scan()
    assert summary["orphans"] == 0
    assert (await file_of(db, scan_settings, a["id"])).exists()
    assert (await file_of(db, scan_settings, b["id"])).exists()


async def test_scan_retries_delete_failed_rows(client, alice, scan_settings, db):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, scan_settings, att["id"])
    await db.execute(
        "UPDATE attachments SET state = 'delete_failed', delete_error = 'EIO' WHERE id = %s",
        (att["id"],),
    )
    summary = await scanner(db, scan_settings).scan(dry_run=True)
    assert summary["retried"] == 1 and path.exists()
    summary = await scanner(db, scan_settings).scan()
    assert summary["retried"] == 1 and summary["retry_removed"] == 1
    assert not path.exists()
    state = await db.fetchval("SELECT state FROM attachments WHERE id = %s", (att["id"],))
    assert state == "deleted"


async def test_symlinks_are_never_followed(scan_settings, db, tmp_path):
    root = scan_settings.upload_dir
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = put(outside, "secret.txt", b"do not touch")
    (root / "ab").mkdir(parents=True)
    os.symlink(secret, root / "ab" / "link-to-file")
    os.symlink(outside, root / "linked-dir")
    os.symlink(tmp_path / "nowhere", root / "dangling-link")
    summary = await scanner(db, replace(scan_settings, orphan_grace_s=0)).scan()
    assert secret.read_bytes() == b"do not touch"
    assert (root / "ab" / "link-to-file").is_symlink()
    assert summary["deleted"] == 0
    assert summary["special_files"] == 3  # reported, left in place
    denied = await audit_rows(db, "orphan.detected")
    assert {r["result"] for r in denied} == {"denied"}


async def test_undecodable_file_name_is_handled(scan_settings, db):
    root = scan_settings.upload_dir
    root.mkdir(parents=True, exist_ok=True)
    raw = os.path.join(os.fsencode(root), b"bad-\xff\xfe-name")
    with open(raw, "wb") as f:
        f.write(b"x")
    os.utime(raw, (OLD, OLD))
    summary = await scanner(db, scan_settings).scan()
    assert summary["deleted"] == 1 and not os.path.exists(raw)
    [entry] = await audit_rows(db, "orphan.deleted")
    assert entry["target_id"].startswith("bad-")
    assert (await AuditTrail(db=db).verify()).ok


async def test_a_second_concurrent_scan_is_skipped(scan_settings, db):
    async with db.connection() as other:
        await other.execute("SELECT pg_advisory_lock(%s)", (AdvisoryLock.ORPHAN_SCAN,))
        try:
            result = await scanner(db, scan_settings).scan()
        finally:
            await other.execute("SELECT pg_advisory_unlock(%s)", (AdvisoryLock.ORPHAN_SCAN,))
    assert "skipped" in result
    assert await audit_rows(db, "orphan.scan") == []


async def test_missing_upload_dir_is_an_empty_scan(scan_settings, db):
    summary = await scanner(db, scan_settings).scan()
    assert summary["scanned"] == 0 and summary["orphans"] == 0


async def test_operator_job_through_the_worker(scan_settings, db, redis, burst_worker):
    root = scan_settings.upload_dir
    orphan = put(root, "ab/" + "b" * 32)
    pool = await create_pool(arq_settings(scan_settings))
    try:
        job = await pool.enqueue_job(JOB_ORPHAN_SCAN, dry_run=True, _queue_name=QUEUE_NAME)
        assert job is not None
        await burst_worker(scan_settings).async_run()
        result = await job.result(timeout=5)
    finally:
        await pool.aclose()
    assert result["dry_run"] is True and result["orphans"] == 1
    assert orphan.exists()
    assert files_on_disk(root) == {"ab/" + "b" * 32}
