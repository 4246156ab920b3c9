"""The worker's file-removal retries (1 s, 2 s, 4 s), delete_failed, and the retry sweep.

A failing disk is faked for real with a patched ``os.unlink`` that raises EIO for the
attachment's file (tests/attachment_helpers.py ``failing_unlink``)."""

from __future__ import annotations

import pytest
from arq import Retry

from shared.constants import (
    JOB_DELETE_ATTACHMENT_FILE,
    JOB_ORPHAN_SCAN,
    JOB_RETRY_ATTACHMENT_DELETIONS,
    QUEUE_NAME,
)
from shared.services.attachments import deletions as file_deletions
from shared.services.audit import AuditTrail
from tests.attachment_helpers import (
    audit_rows,
    failing_unlink,
    file_of,
    row_of,
    upload_ok,
)
from tests.helpers import API, make_channel
from worker.app import cron_jobs, functions
from worker.jobs.attachments import delete_attachment_file, retry_attachment_deletions

FAST = (0.02, 0.04, 0.08)


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(file_deletions, "DELETE_RETRY_BACKOFF_S", FAST)


async def delete_with_failing_disk(client, user, att_id):
    resp = await client.delete(f"{API}/attachments/{att_id}", headers=user.headers)
    assert resp.status == 204


def test_registered_functions_and_daily_cron():
    names = {getattr(f, "name", getattr(f, "__name__", None)): f for f in functions()}
    assert {JOB_DELETE_ATTACHMENT_FILE, JOB_ORPHAN_SCAN, JOB_RETRY_ATTACHMENT_DELETIONS} <= set(
        names
    )
    assert names[JOB_DELETE_ATTACHMENT_FILE].max_tries == 3
    [scan] = [c for c in cron_jobs() if JOB_ORPHAN_SCAN in c.name]
    assert len(scan.hour) == 1 and len(scan.minute) == 1  # once a day


async def test_production_schedule_is_1_2_4(client, alice, settings, db, monkeypatch, worker_ctx):
    """Each try computes its own defer from the real schedule; no waiting needed."""
    assert file_deletions.DELETE_RETRY_BACKOFF_S == (1.0, 2.0, 4.0)
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, settings, att["id"])
    with failing_unlink(monkeypatch, lambda n: n == path.name):
        await delete_with_failing_disk(client, alice, att["id"])
        defers = []
        for job_try in (1, 2):
            with pytest.raises(Retry) as info:
                await delete_attachment_file({**worker_ctx, "job_try": job_try}, att["id"])
            defers.append(info.value.defer_score)
        outcome = await delete_attachment_file({**worker_ctx, "job_try": 3}, att["id"])
    assert defers == [2000, 4000]  # the 1 s step was the server's enqueue delay
    assert outcome == file_deletions.GAVE_UP
    retries = await audit_rows(db, "attachment.file_delete_retry")
    assert [r["details"].get("retry_in_s") for r in retries] == [1, 2, 4, None]


async def test_three_failed_retries_end_in_delete_failed(
    client, alice, settings, db, fast_backoff, monkeypatch, burst_worker
):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel, b"keep me")
    path = await file_of(db, settings, att["id"])
    with failing_unlink(monkeypatch, lambda n: n == path.name) as calls:
        await delete_with_failing_disk(client, alice, att["id"])
        await burst_worker().async_run()
    assert calls["failed"] == 4  # the request's attempt + 3 retries
    assert path.read_bytes() == b"keep me"  # never a file without a record...
    row = await row_of(db, att["id"])
    assert row["state"] == "delete_failed"  # ...and the record says so
    assert "EIO" in row["delete_error"]
    retries = await audit_rows(db, "attachment.file_delete_retry")
    assert [(r["result"], r["details"]["attempt"]) for r in retries] == [
        ("failed", 0),
        ("failed", 1),
        ("failed", 2),
        ("failed", 3),
    ]
    [failed] = await audit_rows(db, "attachment.file_delete_failed")
    assert failed["result"] == "failed" and "EIO" in failed["details"]["error"]
    assert (await AuditTrail(db=db).verify()).ok
    health = await (await client.get("/health")).json()
    assert health["attachments"]["delete_failures_total"] == 1
    assert health["attachments"]["pending_file_deletions"] == 0
    # Still invisible to users.
    resp = await client.get(f"{API}/attachments/{att['id']}", headers=alice.headers)
    assert resp.status == 404


async def test_retry_succeeds_on_second_try(
    client, alice, settings, db, fast_backoff, monkeypatch, burst_worker
):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, settings, att["id"])
    budget = {"fail": 2}

    def flaky(name):
        if name == path.name and budget["fail"] > 0:
            budget["fail"] -= 1
            return True
        return False

    with failing_unlink(monkeypatch, flaky):
        await delete_with_failing_disk(client, alice, att["id"])
        await burst_worker().async_run()
    assert not path.exists()
    assert (await row_of(db, att["id"]))["state"] == "deleted"
    retries = await audit_rows(db, "attachment.file_delete_retry")
    assert [r["result"] for r in retries] == ["failed", "failed", "ok"]
    assert await audit_rows(db, "attachment.file_delete_failed") == []


async def test_retry_finds_file_already_gone(
    client, alice, settings, db, fast_backoff, monkeypatch, burst_worker
):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, settings, att["id"])
    with failing_unlink(monkeypatch, lambda n: n == path.name):
        await delete_with_failing_disk(client, alice, att["id"])
    # Someone removed it by hand before the retry ran.
    path.unlink()
    await burst_worker().async_run()
    assert (await row_of(db, att["id"]))["state"] == "deleted"
    retries = await audit_rows(db, "attachment.file_delete_retry")
    assert [r["result"] for r in retries] == ["failed", "missing"]


async def test_retry_job_for_unknown_or_done_rows_is_a_no_op(db, worker_ctx):
    assert await delete_attachment_file(worker_ctx, 12345) == file_deletions.SKIPPED
    assert await delete_attachment_file(worker_ctx, 12345, dry_run=True) == "dry_run"
    assert await audit_rows(db) == []


async def test_retry_sweep_recovers_delete_failed(
    client, alice, settings, db, redis, fast_backoff, monkeypatch, burst_worker, worker_ctx
):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, settings, att["id"])
    with failing_unlink(monkeypatch, lambda n: n == path.name):
        await delete_with_failing_disk(client, alice, att["id"])
        await burst_worker().async_run()
    assert (await row_of(db, att["id"]))["state"] == "delete_failed"
    dry = await retry_attachment_deletions(worker_ctx, dry_run=True)
    assert dry["candidates"] == 1 and dry["removed"] == 0 and dry["dry_run"] is True
    assert path.exists()
    # The operator fixed the disk; the sweep finishes the job.
    done = await retry_attachment_deletions(worker_ctx)
    assert done["removed"] == 1
    assert not path.exists()
    assert (await row_of(db, att["id"]))["state"] == "deleted"
    last = (await audit_rows(db, "attachment.file_delete_retry"))[-1]
    assert last["result"] == "ok" and last["details"]["source"] == "sweep"


async def test_sweep_takes_over_stale_deleting_rows(client, alice, settings, db, worker_ctx):
    """A 'deleting' row whose retry job was lost (worker crash, Redis down)."""
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, settings, att["id"])
    await db.execute(
        "UPDATE attachments SET state = 'deleting',"
        " state_changed_at = now() - interval '1 hour' WHERE id = %s",
        (att["id"],),
    )
    fresh = await upload_ok(client, alice, channel)
    await db.execute("UPDATE attachments SET state = 'deleting' WHERE id = %s", (fresh["id"],))
    summary = await retry_attachment_deletions(worker_ctx)
    assert summary["candidates"] == 1 and summary["removed"] == 1
    assert not path.exists()
    assert (await file_of(db, settings, fresh["id"])).exists()  # its own job still owns it


async def test_enqueued_retry_runs_via_queue_name(
    client, alice, settings, db, redis, fast_backoff, monkeypatch, burst_worker
):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, settings, att["id"])
    with failing_unlink(monkeypatch, lambda n: n == path.name):
        await delete_with_failing_disk(client, alice, att["id"])
    assert await redis.zcard(QUEUE_NAME) == 1
    await burst_worker().async_run()
    assert await redis.zcard(QUEUE_NAME) == 0
    assert not path.exists()
