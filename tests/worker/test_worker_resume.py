"""The worker rides out a lost Redis: arq's loop ends on the connection error and
``run_until_stopped`` resumes it, with the context it opened first, once Redis answers;
a stop during the wait between attempts ends it at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import replace

import redis.asyncio as aioredis

from shared.constants import WORKER_HEALTH_KEY
from tests.faults.delivery_procs import RedisServer
from tests.helpers import wait_for
from worker.app import build_worker, run_until_stopped
from worker.context import CTX_KEY


async def test_worker_resumes_after_redis_comes_back(settings, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="worker.app")
    server = RedisServer(tmp_path / "redis")
    await server.start()
    own = replace(settings, redis_url=server.url)
    worker = build_worker(own, handle_signals=False, poll_delay=0.05, health_check_interval=1)
    client = aioredis.Redis.from_url(server.url)
    run = asyncio.create_task(run_until_stopped(worker))
    try:
        await wait_for(lambda: client.exists(WORKER_HEALTH_KEY), 10, "the health key")
        context = worker.ctx[CTX_KEY]
        await server.stop()
        await wait_for(lambda: "worker lost Redis" in caplog.text, 10, "the lost line")
        await server.start()  # empty: the key must be written anew
        await wait_for(lambda: client.exists(WORKER_HEALTH_KEY), 15, "the key after")
        assert "worker resumed" in caplog.text
        assert worker.ctx[CTX_KEY] is context  # not opened twice
        assert not run.done()
        # A stop while Redis is away (between attempts) ends the run.
        await server.stop()
        await wait_for(lambda: caplog.text.count("worker lost Redis") == 2, 10, "2nd outage")
        worker.handle_sig(signal.SIGUSR1)
        async with asyncio.timeout(5):
            with contextlib.suppress(asyncio.CancelledError):
                await run
    finally:
        run.cancel()
        with contextlib.suppress(BaseException):
            await run
        await server.start()
        await worker.close()
        await client.aclose()
        await server.close()
