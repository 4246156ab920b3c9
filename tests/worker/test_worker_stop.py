"""Stopping the worker daemon while a job runs: no traceback, everything closed."""

import asyncio
import os
import signal
import time

from arq.jobs import JobStatus

from shared.bus import arq_pool
from shared.constants import WORKER_HEALTH_KEY
from worker.app import run_worker


async def _wait_in_progress(job, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while await job.status() != JobStatus.in_progress:
        assert time.monotonic() < deadline, "the job never started"
        await asyncio.sleep(0.02)


async def test_sigterm_with_a_running_job_cancels_it_and_closes_cleanly(settings, redis):
    # job_completion_wait=0: arq cancels running jobs at once. Its Worker.close() alone
    # re-raises their CancelledError and leaves pools open; run_worker must not.
    task = asyncio.create_task(run_worker(settings, job_completion_wait=0, poll_delay=0.05))
    pool = await arq_pool(settings)
    try:
        job = await pool.enqueue_job("ping", seconds=30)
        await _wait_in_progress(job)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)  # returns normally: no CancelledError
        assert not await redis.exists(WORKER_HEALTH_KEY)
    finally:
        await pool.aclose()


async def test_sigterm_lets_a_short_running_job_finish(settings, redis):
    task = asyncio.create_task(run_worker(settings, job_completion_wait=5, poll_delay=0.05))
    pool = await arq_pool(settings)
    try:
        job = await pool.enqueue_job("ping", seconds=0.5)
        await _wait_in_progress(job)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)
        assert await job.result(timeout=1) == "pong"
        assert not await redis.exists(WORKER_HEALTH_KEY)
    finally:
        await pool.aclose()
