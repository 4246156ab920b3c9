"""The worker's delayed-message jobs, run by real burst-mode arq workers."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from shared.bus import arq_pool
from shared.constants import (
    JOB_CLEANUP_DELAYED,
    JOB_DELIVER_DELAYED,
    QUEUE_ALERT_KEY,
    QUEUE_MAX_SEEN_KEY,
    QUEUE_NAME,
    QUEUE_SAMPLES_KEY,
)
from shared.metrics import Metrics
from shared.services.delayed.queue_stats import QueueStats
from shared.services.jobs import JobService
from shared.services.users import UserService
from tests.helpers import API, make_channel
from worker.app import cron_jobs, functions


@pytest.fixture
async def arq(settings):
    pool = await arq_pool(settings)
    yield pool
    await pool.aclose()


@pytest.fixture
async def author(db):
    return (await UserService(db=db).create("writer"))[0]


async def public_channel(db, author) -> int:
    channel = await db.fetchval(
        "INSERT INTO channels (name, created_by) VALUES ('room', %s) RETURNING id", (author.id,)
    )
    await db.execute(
        "INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)", (channel, author.id)
    )
    return channel


def test_jobs_are_registered():
    names = {getattr(f, "name", getattr(f, "__name__", None)) for f in functions()}
    assert {JOB_DELIVER_DELAYED, JOB_CLEANUP_DELAYED} <= names
    crons = {c.name: c for c in cron_jobs()}
    cleanup = crons[f"cron:{JOB_CLEANUP_DELAYED}"]
    assert cleanup.minute == set(range(0, 60, 5)) and cleanup.second == 0 and cleanup.unique
    sweep = crons[f"cron:{JOB_DELIVER_DELAYED}"]
    assert sweep.run_at_startup and sweep.unique


async def test_scheduled_message_is_delivered_on_time(client, alice, settings, db, burst_worker):
    channel = await make_channel(client, alice, "room")
    due = datetime.now(UTC) + timedelta(seconds=0.6)
    resp = await client.post(
        f"{API}/channels/{channel}/delayed-messages",
        json={"body": "punctual", "deliver_at": due.isoformat()},
        headers=alice.headers,
    )
    assert resp.status == 202
    delayed_id = (await resp.json())["id"]
    await burst_worker().async_run()  # burst mode waits for the deferred tick job
    row = await db.fetchrow("SELECT * FROM delayed_messages WHERE id = %s", (delayed_id,))
    assert row["status"] == "delivered"
    lateness = (row["finished_at"] - row["deliver_at"]).total_seconds()
    assert 0 <= lateness < 1.0, lateness
    resp = await client.get(f"{API}/channels/{channel}/messages", headers=alice.headers)
    assert [m["body"] for m in (await resp.json())["items"]] == ["punctual"]


async def test_two_workers_deliver_exactly_once(settings, db, arq, author, burst_worker):
    channel = await public_channel(db, author)
    await db.execute(
        "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at)"
        " SELECT %s, %s, 'w' || g, now() - interval '1 second' FROM generate_series(1, 400) g",
        (channel, author.id),
    )
    for i in range(6):  # several jobs, so both workers get some
        await arq.enqueue_job(JOB_DELIVER_DELAYED, _job_id=f"test-{i}", _queue_name=QUEUE_NAME)
    await asyncio.gather(burst_worker().async_run(), burst_worker().async_run())
    assert await db.fetchval("SELECT count(*) FROM messages") == 400
    assert await db.fetchval("SELECT count(DISTINCT body) FROM messages") == 400
    assert (
        await db.fetchval(
            "SELECT count(DISTINCT message_id) FROM delayed_messages WHERE status = 'delivered'"
        )
        == 400
    )


async def test_sweep_delivers_what_lost_its_job(settings, db, redis, author, burst_worker):
    """Rows without any queued job (e.g. Redis was flushed): the startup sweep finds them."""
    channel = await public_channel(db, author)
    await db.execute(
        "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at)"
        " VALUES (%s, %s, 'orphaned', now() - interval '10 seconds')",
        (channel, author.id),
    )
    assert await redis.zcard(QUEUE_NAME) == 0
    await burst_worker().async_run()
    assert await db.fetchval("SELECT status FROM delayed_messages") == "delivered"


async def test_cleanup_job_real_and_dry_run(settings, db, arq, author, burst_worker):
    await db.execute(
        "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at, status,"
        " finished_at) SELECT 1, %s, 'c', now() - interval '3 days', 'cancelled',"
        " now() - interval '2 days' FROM generate_series(1, 30)",
        (author.id,),
    )
    jobs = JobService(arq=arq)
    dry_id, _ = await jobs.enqueue("cleanup-delayed-messages", dry_run=True)
    real_id, joined = await jobs.enqueue("cleanup-delayed-messages")
    again_id, joined_again = await jobs.enqueue("cleanup-delayed-messages")
    assert not joined and joined_again and again_id == real_id
    await burst_worker(replace(settings, cleanup_batch=7)).async_run()
    dry = await jobs.state(dry_id)
    assert dry.ok and dry.result["status"] == "dry_run" and dry.result["would_delete"] == 30
    real = await jobs.state(real_id)
    assert real.ok and real.result["deleted"] == 30 and real.result["batches"] == 5
    run = await db.fetchrow("SELECT * FROM delayed_cleanup_runs")
    assert run["job_id"] == real_id and run["status"] == "succeeded"
    # The finished run no longer counts as active: the next request starts a new one.
    fresh_id, joined = await jobs.enqueue("cleanup-delayed-messages")
    assert fresh_id != real_id and not joined


async def test_sampler_records_history_and_logs_alert_once_per_crossing(
    settings, db, redis, author, caplog
):
    await public_channel(db, author)
    stats = QueueStats(
        db=db, redis=redis, settings=replace(settings, queue_alert=5), metrics=Metrics()
    )

    async def pending(n):
        await db.execute("DELETE FROM delayed_messages")
        await db.execute(
            "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at)"
            " SELECT 1, %s, 'p', now() + interval '1 hour' FROM generate_series(1, %s)",
            (author.id, n),
        )

    caplog.set_level(logging.INFO, logger="shared.services.delayed.queue_stats")
    for n in (2, 6, 7, 3, 8):
        await pending(n)
        await stats.sample()
    alerts = [r for r in caplog.records if "ALERT" in r.getMessage()]
    cleared = [r for r in caplog.records if "cleared" in r.getMessage()]
    assert len(alerts) == 2 and len(cleared) == 1
    assert all(r.levelno == logging.WARNING for r in alerts)
    assert await redis.zcard(QUEUE_SAMPLES_KEY) == 5
    assert await redis.zscore(QUEUE_MAX_SEEN_KEY, "max") == 8
    assert await redis.get(QUEUE_ALERT_KEY) == b"1"
    section = await stats.section()
    assert section["size"] == 8 and section["max_seen"] == 8 and section["alert"] is True
    assert section["avg_size"] == pytest.approx((2 + 6 + 7 + 3 + 8) / 5)
    assert section["samples"] == 5
