"""Cleanup of finished delayed messages: batches, what it must not touch, run records."""

from __future__ import annotations

import asyncio

import pytest

from shared.services.delayed.cleanup import CleanupService, cleanup_summary
from shared.services.users import UserService


@pytest.fixture
async def author(db):
    user, _ = await UserService(db=db).create("author")
    return user


async def add_rows(db, author, n, *, status, finished_s_ago, created_s_ago=0):
    """``n`` rows in ``status``, finished ``finished_s_ago`` seconds ago (pending: due in
    an hour, created ``created_s_ago`` seconds ago)."""
    if status == "pending":
        await db.execute(
            "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at, created_at)"
            " SELECT 1, %s, 'p', now() + interval '1 hour', now() - %s * interval '1 second'"
            " FROM generate_series(1, %s)",
            (author.id, created_s_ago, n),
        )
        return
    await db.execute(
        "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at, status, reason,"
        " message_id, created_at, finished_at)"
        " SELECT 1, %s, 'f', now() - %s * interval '1 second', %s,"
        "   CASE WHEN %s = 'failed' THEN 'too_late' END,"
        "   CASE WHEN %s = 'delivered' THEN g END,"
        "   now() - %s * interval '1 second', now() - %s * interval '1 second'"
        " FROM generate_series(1, %s) g",
        (
            author.id,
            finished_s_ago,
            status,
            status,
            status,
            finished_s_ago + 10,
            finished_s_ago,
            n,
        ),
    )


def service(db, settings, **kw):
    return CleanupService(
        db=db,
        retention_s=kw.pop("retention_s", settings.queue_retention_s),
        batch_size=kw.pop("batch_size", settings.cleanup_batch),
        **kw,
    )


async def test_cleanup_deletes_old_rows_in_batches_and_leaves_the_rest(db, settings, author):
    day = settings.queue_retention_s
    await add_rows(db, author, 2000, status="delivered", finished_s_ago=day + 60)
    await add_rows(db, author, 2000, status="cancelled", finished_s_ago=day + 3600)
    await add_rows(db, author, 1000, status="failed", finished_s_ago=2 * day)
    await add_rows(db, author, 300, status="delivered", finished_s_ago=day - 60)  # fresh
    await add_rows(db, author, 200, status="pending", finished_s_ago=0, created_s_ago=3 * day)
    result = await service(db, settings).run(job_id="test-job")
    assert result["status"] == "succeeded" and result["error"] is None
    assert (result["deleted"], result["batches"]) == (5000, 5)
    assert result["max_batch_ms"] > 0 and result["duration_ms"] >= result["max_batch_ms"]
    left = {
        r["status"]: r["n"]
        for r in await db.fetch(
            "SELECT status, count(*) AS n FROM delayed_messages GROUP BY status"
        )
    }
    assert left == {"delivered": 300, "pending": 200}
    run = await db.fetchrow("SELECT * FROM delayed_cleanup_runs WHERE id = %s", (result["run_id"],))
    assert run["status"] == "succeeded" and run["job_id"] == "test-job"
    assert (run["deleted"], run["batches"]) == (5000, 5)
    assert run["started_at"] <= run["finished_at"] and run["duration_ms"] > 0
    summary = await cleanup_summary(db)
    assert summary["runs"] == 1 and summary["failures"] == 0 and summary["success_rate"] == 1.0
    assert summary["last_deleted"] == 5000 and summary["deleted_total"] == 5000
    assert summary["last_run_at"] is not None


async def test_a_partial_last_batch_and_an_empty_run(db, settings, author):
    await add_rows(
        db, author, 2500, status="delivered", finished_s_ago=settings.queue_retention_s + 1
    )
    first = await service(db, settings).run()
    assert (first["deleted"], first["batches"]) == (2500, 3)
    empty = await service(db, settings).run()
    assert (empty["status"], empty["deleted"], empty["batches"]) == ("succeeded", 0, 0)
    summary = await cleanup_summary(db)
    assert (summary["runs"], summary["deleted_total"], summary["last_deleted"]) == (2, 2500, 0)


async def test_dry_run_changes_and_records_nothing(db, settings, author):
    await add_rows(db, author, 1500, status="failed", finished_s_ago=settings.queue_retention_s + 1)
    result = await service(db, settings).run(dry_run=True)
    assert result["status"] == "dry_run" and result["would_delete"] == 1500
    assert result["deleted"] == 0 and result["batches"] == 2
    assert await db.fetchval("SELECT count(*) FROM delayed_messages") == 1500
    assert await db.fetchval("SELECT count(*) FROM delayed_cleanup_runs") == 0


async def test_statement_timeout_is_recorded_as_a_failure(db, settings, author):
    await add_rows(
        db, author, 10, status="delivered", finished_s_ago=settings.queue_retention_s + 1
    )
    cleanup = service(db, settings, statement_timeout_ms=200)
    async with db.transaction() as tx:
        # A SHARE lock blocks every DELETE: the batch waits until its statement timeout.
        await tx.execute("LOCK TABLE delayed_messages IN SHARE MODE")
        result = await cleanup.run()
    assert result["status"] == "failed" and result["deleted"] == 0
    assert result["error"].startswith("QueryCanceled: canceling statement due to statement timeout")
    run = await db.fetchrow("SELECT * FROM delayed_cleanup_runs WHERE id = %s", (result["run_id"],))
    assert run["status"] == "failed" and run["error"] == result["error"]
    summary = await cleanup_summary(db)
    assert (summary["runs"], summary["failures"], summary["success_rate"]) == (1, 1, 0.0)
    assert summary["last_status"] == "failed"
    # Rows are intact, and the next run (no lock) succeeds.
    assert await db.fetchval("SELECT count(*) FROM delayed_messages") == 10
    assert (await cleanup.run())["deleted"] == 10
    summary = await cleanup_summary(db)
    assert (summary["runs"], summary["failures"], summary["success_rate"]) == (2, 1, 0.5)


async def test_concurrent_runs_never_delete_a_row_twice(db, settings, author):
    await add_rows(
        db, author, 3000, status="delivered", finished_s_ago=settings.queue_retention_s + 1
    )
    results = await asyncio.gather(*(service(db, settings, batch_size=250).run() for _ in range(3)))
    assert sum(r["deleted"] for r in results) == 3000
    assert all(r["status"] == "succeeded" for r in results)
    assert (await cleanup_summary(db))["deleted_total"] == 3000


async def test_summary_without_any_run(db):
    summary = await cleanup_summary(db)
    assert summary == {
        "runs": 0,
        "failures": 0,
        "success_rate": None,
        "last_run_at": None,
        "last_deleted": 0,
        "deleted_total": 0,
        "last_status": None,
    }


async def test_old_run_records_are_pruned_but_totals_kept(db, settings):
    await db.execute(
        "INSERT INTO delayed_cleanup_runs (started_at, finished_at, status, deleted)"
        " VALUES (now() - interval '40 days', now() - interval '40 days', 'succeeded', 7)"
    )
    await service(db, settings).run()
    assert await db.fetchval("SELECT count(*) FROM delayed_cleanup_runs") == 1
    assert (await cleanup_summary(db))["runs"] == 1
