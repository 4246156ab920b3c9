"""`herald jobs list` and job progress, against a real Redis and real burst workers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from arq.connections import create_pool

from shared.bus import arq_settings
from shared.constants import JOB_DELIVER_DELAYED, QUEUE_NAME, job_progress_key
from shared.services.jobs import JobProgress, JobService

OLD = time.time() - 7200


def orphans(root: Path, count: int) -> None:
    for i in range(count):
        path = root / f"{i % 50:02d}" / f"orphan-{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (OLD, OLD))


async def test_listing_shows_queued_then_finished_newest_first(settings, burst_worker):
    pool = await create_pool(arq_settings(settings))
    try:
        jobs = JobService(arq=pool)
        first, _ = await jobs.enqueue("cleanup-delayed-messages", dry_run=True)
        second, _ = await jobs.enqueue("retry-attachment-deletions", dry_run=True)
        queued = await jobs.listing()
        assert [s.job_id for s in queued.active] == [first, second]
        assert {s.status for s in queued.active} == {"queued"}
        assert queued.finished == [] and queued.hidden == 0

        await burst_worker(cron_jobs=[]).async_run()
        done = await jobs.listing()
        assert done.active == []
        assert [s.job_id for s in done.finished] == [second, first]
        assert all(s.ok for s in done.finished)
        assert (await jobs.listing(limit=1)).finished[0].job_id == second
    finally:
        await pool.aclose()


async def test_routine_results_are_counted_not_shown(settings, burst_worker):
    pool = await create_pool(arq_settings(settings))
    try:
        jobs = JobService(arq=pool)
        # A delivery tick with nothing due: a routine run like the worker's own.
        await pool.enqueue_job(
            JOB_DELIVER_DELAYED, _job_id="herald:deliver:1", _queue_name=QUEUE_NAME
        )
        operator, _ = await jobs.enqueue("cleanup-delayed-messages", dry_run=True)
        await burst_worker(cron_jobs=[]).async_run()
        default = await jobs.listing()
        assert [s.job_id for s in default.finished] == [operator] and default.hidden == 1
        everything = await jobs.listing(include_routine=True)
        assert {s.job_id for s in everything.finished} == {operator, "herald:deliver:1"}
        assert everything.hidden == 0
    finally:
        await pool.aclose()


async def test_listing_survives_unreadable_and_vanishing_entries(settings, redis):
    pool = await create_pool(arq_settings(settings))
    try:
        # A queue entry whose job key is gone (arq drops it as expired when it gets to
        # it: listed as queued, function unknown) and a result that is not arq's pickle.
        await redis.zadd(QUEUE_NAME, {"ghost": 1})
        await redis.set("arq:result:garbage", b"\x00not a pickle")
        listing = await JobService(arq=pool).listing()
        assert [(s.job_id, s.status, s.function) for s in listing.active] == [
            ("ghost", "queued", None)
        ]
        assert [(s.job_id, s.error) for s in listing.finished] == [("garbage", "unreadable")]
    finally:
        await pool.aclose()


async def test_orphan_scan_reports_progress_to_the_end(settings, burst_worker, redis):
    orphans(settings.upload_dir, 2500)  # three lookup batches
    pool = await create_pool(arq_settings(settings))
    try:
        jobs = JobService(arq=pool)
        job_id, _ = await jobs.enqueue("orphan-scan", dry_run=True)
        await burst_worker(cron_jobs=[]).async_run()
        state = await jobs.state(job_id)
        assert state.ok and state.result["scanned"] == 2500 and state.result["orphans"] == 2500
        # The last report names the last phase; its counts are the scan's final ones.
        figures = await jobs.progress(job_id)
        assert figures == {"phase": "rows", "scanned": 2500, "orphans": 2500}
        assert 0 < await redis.ttl(job_progress_key(job_id)) <= 3600
    finally:
        await pool.aclose()


async def test_progress_writes_are_throttled_but_phase_changes_go_through(settings, redis):
    pool = await create_pool(arq_settings(settings))
    try:
        progress = JobProgress(pool, "job-1")
        key = job_progress_key("job-1")
        await progress({"phase": "files", "scanned": 1})
        await progress({"phase": "files", "scanned": 2})  # within the interval: skipped
        assert json.loads(await redis.get(key))["scanned"] == 1
        await progress({"phase": "rows", "scanned": 2})
        assert json.loads(await redis.get(key)) == {"phase": "rows", "scanned": 2}
        assert await JobService(arq=pool).progress("no-such-job") is None
        await redis.set(job_progress_key("bad"), "[1, 2")
        assert await JobService(arq=pool).progress("bad") is None
    finally:
        await pool.aclose()
