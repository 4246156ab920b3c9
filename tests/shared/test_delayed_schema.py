"""The delayed-message tables: constraints, and the query shapes each index serves."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg2.errors
import pytest

from shared.services.delayed.cleanup import DELETE_BATCH_SQL
from shared.services.delayed.delivery import DUE_SQL
from shared.services.users import UserService


@pytest.fixture
async def populated(db):
    """Many finished rows and a few pending ones, as a long-running queue looks."""
    users = [(await UserService(db=db).create(f"u{i}"))[0] for i in range(20)]
    for user in users:
        await db.execute(
            "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at, status,"
            " message_id, finished_at)"
            " SELECT 1, %s, 'old', now() - g * interval '1 minute', 'delivered', g,"
            "        now() - g * interval '1 minute'"
            " FROM generate_series(1, 1000) g",
            (user.id,),
        )
        await db.execute(
            "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at)"
            " SELECT 1, %s, 'soon', now() + g * interval '1 minute'"
            " FROM generate_series(1, 5) g",
            (user.id,),
        )
    await db.execute("ANALYZE delayed_messages")
    return users


async def plan(db, sql, params) -> str:
    rows = await db.fetch("EXPLAIN (FORMAT JSON) " + sql, params)
    return json.dumps(rows[0]["QUERY PLAN"])


async def test_due_query_uses_the_due_index(db, populated):
    text = await plan(db, DUE_SQL, (datetime.now(UTC), 200))
    assert "delayed_messages_due_idx" in text
    assert '"Seq Scan"' not in text


async def test_pending_counts_use_indexes(db, populated):
    total = await plan(db, "SELECT count(*) FROM delayed_messages WHERE status = 'pending'", ())
    assert "delayed_messages_due_idx" in total and '"Seq Scan"' not in total
    mine = await plan(
        db,
        "SELECT count(*) FROM delayed_messages WHERE author_id = %s AND status = 'pending'",
        (populated[0].id,),
    )
    assert "delayed_messages_author_idx" in mine and '"Seq Scan"' not in mine


async def test_cleanup_batch_uses_the_finished_index(db, populated):
    text = await plan(db, DELETE_BATCH_SQL, (datetime.now(UTC), 1000))
    assert "delayed_messages_finished_idx" in text


async def test_status_invariants_are_enforced(db, populated):
    user = populated[0]
    bad_rows = [
        ("pending", None, None, "now()"),  # pending with finished_at
        ("delivered", None, None, "now()"),  # delivered without message_id
        ("failed", None, None, "now()"),  # failed without a reason
        ("cancelled", None, None, "NULL"),  # finished without finished_at
        ("sent", None, None, "now()"),  # no such status
    ]
    for status, reason, message_id, finished in bad_rows:
        with pytest.raises(psycopg2.errors.CheckViolation):
            await db.execute(
                "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at, status,"
                " reason, message_id, finished_at)"
                f" VALUES (1, %s, 'x', now(), %s, %s, %s, {finished})",
                (user.id, status, reason, message_id),
            )
