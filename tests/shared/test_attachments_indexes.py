"""EXPLAIN checks: the attachment and audit queries use the indexes built for them."""

from __future__ import annotations

import json

import pytest

from shared.services import audit
from shared.services.attachments.deletions import STALE_DELETING_S

ROWS = 20_000


async def plan(db, sql: str, params=()) -> str:
    rows = await db.fetch("EXPLAIN (FORMAT JSON) " + sql, params)
    return json.dumps(next(iter(rows[0].values())))


@pytest.fixture
async def populated(db):
    await db.execute("INSERT INTO users (name) SELECT 'u' || g FROM generate_series(1, 50) g")
    await db.execute("INSERT INTO channels (name, created_by) VALUES ('c', 1)")
    # Mostly settled rows, a few waiting for or failing file removal.
    await db.execute(
        "INSERT INTO attachments (channel_id, uploader_id, storage_key, filename, content_type,"
        " size, sha256, state, state_changed_at)"
        " SELECT 1, 1 + g %% 50, 'k/' || g, 'f', 'text/plain', 1, 'x',"
        "   CASE WHEN g %% 1000 = 0 THEN 'delete_failed' WHEN g %% 997 = 0 THEN 'deleting'"
        "        WHEN g %% 2 = 0 THEN 'deleted' ELSE 'active' END,"
        "   now() - g * interval '1 minute'"
        " FROM generate_series(1, %s) g",
        (ROWS,),
    )
    # Audit rows straight in (the chain is not under test here).
    await db.execute(
        "INSERT INTO audit_log (id, at, actor_id, action, target_type, target_id, result,"
        " prev_hash, hash)"
        " SELECT g, now() - g * interval '1 minute', 1,"
        "   (ARRAY['attachment.delete', 'orphan.detected', 'orphan.deleted',"
        "          'attachment.delete_denied'])[1 + g %% 4],"
        "   'attachment', (g %% 5000)::text, 'ok', '', ''"
        " FROM generate_series(1, %s) g",
        (ROWS,),
    )
    await db.execute(
        "INSERT INTO audit_log (id, at, action, target_type, target_id, result, prev_hash, hash)"
        " VALUES (%s, now(), 'orphan.scan', 'upload_dir', '-', 'ok', '', '')",
        (ROWS + 1,),
    )
    await db.execute("ANALYZE attachments")
    await db.execute("ANALYZE audit_log")
    return db


async def test_attachment_queries_use_their_indexes(populated):
    # Owner listings: this user's attachments in a state.
    text = await plan(
        populated,
        "SELECT id FROM attachments WHERE uploader_id = %s AND state = 'active'",
        (7,),
    )
    assert "attachments_uploader_state_idx" in text
    # The sweep and /health: the few rows waiting for or failing file removal.
    text = await plan(
        populated,
        "SELECT id FROM attachments WHERE id > 0 AND (state = 'delete_failed'"
        " OR (state = 'deleting' AND state_changed_at < now() - make_interval(secs => %s)))"
        " ORDER BY id LIMIT 500",
        (STALE_DELETING_S,),
    )
    assert "attachments_pending_idx" in text
    text = await plan(populated, "SELECT count(*) FROM attachments WHERE state = 'deleting'")
    assert "attachments_pending_idx" in text
    # The orphan scan's batch lookup (a batch is a small share of a big table).
    keys = [f"k/{i}" for i in range(1, 101)]
    text = await plan(
        populated,
        "SELECT storage_key FROM attachments WHERE storage_key = ANY(%s) AND state <> 'deleted'",
        (keys,),
    )
    assert "attachments_storage_key_key" in text


async def test_audit_queries_use_their_indexes(populated):
    text = await plan(
        populated,
        "SELECT id FROM audit_log WHERE target_type = %s AND target_id = %s"
        " ORDER BY id DESC LIMIT 100",
        ("attachment", "42"),
    )
    assert "audit_log_target_idx" in text
    text = await plan(
        populated,
        "SELECT id FROM audit_log WHERE at >= now() - interval '3 hours'"
        " AND at < now() - interval '2 hours' ORDER BY id DESC LIMIT 100",
    )
    assert "audit_log_at_idx" in text
    text = await plan(
        populated,
        "SELECT at, details FROM audit_log WHERE action = %s ORDER BY id DESC LIMIT 1",
        (audit.ORPHAN_SCAN,),
    )
    assert "audit_log_action_idx" in text
