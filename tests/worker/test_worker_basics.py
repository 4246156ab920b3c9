"""The arq worker's foundation: it starts, runs jobs with the shared services in its
context, writes its health-check key while alive and removes it when it stops."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from shared.bus import arq_pool
from shared.constants import QUEUE_NAME, WORKER_HEALTH_KEY
from shared.settings import Settings
from tests.worker.conftest import BurstWorker
from worker.app import functions, worker_alive
from worker.context import WorkerContext, herald

# Job functions live at module level: arq registers them under their __qualname__.
SEEN: dict[str, Any] = {}


async def probe(ctx: dict[str, Any]) -> int:
    wctx = herald(ctx)
    assert isinstance(wctx, WorkerContext)
    SEEN["settings"] = wctx.settings
    await wctx.redis.set("herald:probe", "1")
    return int(await wctx.db.fetchval("SELECT count(*) FROM users"))


async def broken(ctx: dict[str, Any]) -> None:
    raise RuntimeError("boom")


async def fine(ctx: dict[str, Any]) -> str:
    return "ok"


async def enqueue(settings: Settings, name: str, *args: Any, job_id: str | None = None) -> Job:
    pool: ArqRedis = await arq_pool(settings)
    try:
        job = await pool.enqueue_job(name, *args, _job_id=job_id, _queue_name=QUEUE_NAME)
        assert job is not None
        return job
    finally:
        await pool.aclose()


async def test_ping_job_runs_in_a_burst_worker(
    settings: Settings, burst_worker: BurstWorker
) -> None:
    assert "ping" in {getattr(f, "__name__", getattr(f, "name", None)) for f in functions()}
    job = await enqueue(settings, "ping", job_id="ping-1")
    worker = burst_worker()
    await worker.async_run()
    assert worker.jobs_complete >= 1 and worker.jobs_failed == 0
    pool = await arq_pool(settings)
    try:
        result = await Job("ping-1", pool, _queue_name=QUEUE_NAME).result(timeout=5)
        assert result == "pong"
        assert await Job("ping-1", pool, _queue_name=QUEUE_NAME).status() == JobStatus.complete
    finally:
        await pool.aclose()
    assert job.job_id == "ping-1"


async def test_duplicate_job_id_is_enqueued_once(settings: Settings) -> None:
    pool = await arq_pool(settings)
    try:
        first = await pool.enqueue_job("ping", _job_id="same", _queue_name=QUEUE_NAME)
        again = await pool.enqueue_job("ping", _job_id="same", _queue_name=QUEUE_NAME)
        assert first is not None and again is None
    finally:
        await pool.aclose()


async def test_jobs_get_the_shared_services(settings: Settings, burst_worker: BurstWorker) -> None:
    await enqueue(settings, "probe", job_id="probe-1")
    worker = burst_worker(functions=[probe], cron_jobs=[])
    await worker.async_run()
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    assert SEEN["settings"] is settings


async def test_health_key_while_alive_and_gone_after_close(
    settings: Settings, redis: aioredis.Redis, burst_worker: BurstWorker
) -> None:
    assert await worker_alive(settings) is False
    worker = burst_worker()
    await worker.async_run()
    assert await redis.exists(WORKER_HEALTH_KEY)
    ttl = await redis.ttl(WORKER_HEALTH_KEY)
    assert 0 < ttl <= 11  # the interval plus one second: stale soon after a crash
    assert await worker_alive(settings) is True
    await worker.close()
    assert await worker_alive(settings) is False


async def test_failing_job_does_not_stop_the_worker(
    settings: Settings, burst_worker: BurstWorker
) -> None:
    await enqueue(settings, "broken", job_id="b-1")
    await enqueue(settings, "fine", job_id="f-1")
    worker = burst_worker(functions=[broken, fine], cron_jobs=[])
    await worker.async_run()
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 1)
