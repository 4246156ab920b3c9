"""The arq worker: its functions, cron jobs and lifecycle, built from Settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence
from signal import Signals
from typing import Any

from arq import Worker
from arq.cron import CronJob
from arq.worker import Function
from redis.exceptions import RedisError

from shared.bus import arq_settings, close_redis, close_sentinels, redis_client
from shared.constants import HEALTH_CHECK_INTERVAL_S, QUEUE_NAME, WORKER_HEALTH_KEY
from shared.entry import configure_logging, describe, run_command
from shared.eventloop import run as run_on_loop
from shared.metrics import Metrics
from shared.sdnotify import Notifier
from shared.settings import Settings
from worker.context import CTX_KEY, close_context, open_context
from worker.jobs.attachments import attachment_cron_jobs, attachment_functions
from worker.jobs.delayed import delayed_cron_jobs, delayed_functions
from worker.observe import ObserveServer

logger = logging.getLogger(__name__)

JOB_COMPLETION_WAIT_S = 10
# Waits between attempts to resume after Redis was lost: doubling from the first.
RESUME_FIRST_S, RESUME_MAX_S = 0.2, 5.0
# In arq's ctx: how often on_startup ran, i.e. arq's loop reached Redis and started.
STARTS_KEY = "herald_starts"


async def ping(ctx: dict[str, Any], seconds: float = 0.0) -> str:
    """A no-op job: proves a worker picks jobs up (``seconds``: stay busy that long,
    at most a minute, to exercise a stop while a job runs)."""
    if seconds > 0:
        await asyncio.sleep(min(float(seconds), 60.0))
    return "pong"


def functions() -> list[Function | Any]:
    return [ping, *attachment_functions(), *delayed_functions()]


def cron_jobs() -> list[CronJob]:
    return [*attachment_cron_jobs(), *delayed_cron_jobs()]


class NotifyingWorker(Worker):
    """arq's Worker, telling systemd when a stop begins: arq's own signal handlers are
    the first to see SIGTERM and offer no hook before they wait for running jobs."""

    def __init__(self, *args: Any, notifier: Notifier, **kwargs: Any) -> None:
        self.notifier = notifier
        super().__init__(*args, **kwargs)

    def handle_sig(self, signum: Signals) -> None:
        self.notifier.stopping("cancelling running jobs")
        super().handle_sig(signum)

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        self.notifier.stopping("finishing running jobs")
        super().handle_sig_wait_for_completion(signum)


def build_worker(
    settings: Settings,
    *,
    notifier: Notifier | None = None,
    metrics: Metrics | None = None,
    **overrides: Any,
) -> Worker:
    """A Worker for ``settings``; tests pass ``burst=True, handle_signals=False`` etc."""
    notifier = notifier or Notifier()

    async def on_startup(ctx: dict[str, Any]) -> None:
        # arq runs this each time its main loop starts, and run_worker restarts that
        # loop after a lost Redis: the context opened the first time is kept.
        ctx[STARTS_KEY] = ctx.get(STARTS_KEY, 0) + 1
        if CTX_KEY in ctx:
            logger.info("worker resumed")
            return
        # arq put its own pool in ctx["redis"]: the services enqueue through that one.
        ctx[CTX_KEY] = await open_context(settings, metrics, arq=ctx["redis"])
        logger.info("worker started")
        # arq has connected to Redis and runs this last before polling the queue.
        notifier.ready("connected, taking jobs")

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        if CTX_KEY in ctx:
            # Popped first: the health endpoint must not use pools being closed.
            await close_context(ctx.pop(CTX_KEY))

    kwargs: dict[str, Any] = {
        "functions": functions(),
        "cron_jobs": cron_jobs(),
        "redis_settings": arq_settings(settings),
        "queue_name": QUEUE_NAME,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "health_check_key": WORKER_HEALTH_KEY,
        "max_jobs": 20,
        "job_timeout": 600,
        "keep_result": 3600,
        # How often the queue is polled: a deferred job (a delayed message's delivery
        # tick) starts at most this late. arq's default is 0.5 s.
        "poll_delay": 0.2,
        # On SIGTERM/SIGINT: stop picking jobs, let running ones finish for up to this
        # long, then cancel the rest (arq re-runs a cancelled job on the next start).
        "job_completion_wait": JOB_COMPLETION_WAIT_S,
    }
    kwargs.update(overrides)
    return NotifyingWorker(notifier=notifier, **kwargs)


async def run_until_stopped(worker: Worker) -> None:
    """arq's main loop, resumed whenever it ends on a lost Redis, until a signal stops
    it (or a burst ends). arq 0.28's ``async_run()`` raises the connection error and has
    no retry of its own; its pool reconnects on the next command — through the
    Sentinels, when set, to whichever master they name by then (a failover)."""
    stopped = asyncio.Event()
    # arq calls on_stop last in both of its signal handlers (cancel now, or after the
    # running jobs had their JOB_COMPLETION_WAIT_S): from then on, nothing resumes.
    worker.on_stop = lambda _signum: stopped.set()
    delay = RESUME_FIRST_S
    lost = False
    while True:
        starts = worker.ctx.get(STARTS_KEY, 0)
        try:
            await worker.async_run()
            return
        except (RedisError, OSError) as exc:
            if stopped.is_set():
                return
            if worker.ctx.get(STARTS_KEY, 0) > starts:
                lost, delay = False, RESUME_FIRST_S  # it had been running: a new outage
            if not lost:  # one line per outage, not one per attempt
                logger.warning("worker lost Redis (%s); resuming when it answers", describe(exc))
                lost = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stopped.wait()
        if stopped.is_set():
            return
        delay = min(delay * 2, RESUME_MAX_S)


async def run_worker(settings: Settings, **overrides: Any) -> None:
    """Run until SIGTERM/SIGINT, then close connections."""
    notifier = Notifier.from_settings(settings)
    metrics = Metrics()
    worker = build_worker(settings, notifier=notifier, metrics=metrics, **overrides)
    observe = await ObserveServer.start(settings, worker, metrics)  # /metrics, /health
    try:
        await run_until_stopped(worker)
    except asyncio.CancelledError:
        pass  # arq's signal handler cancels the main task: that is a normal stop
    finally:
        # Jobs cancelled by the signal end with CancelledError; Worker.close() gathers
        # them without return_exceptions and would re-raise it before closing anything.
        # Collect them here first, so close() deletes the health key and closes pools.
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        worker.tasks.clear()
        pool = worker.pool  # arq's own; close() forgets it
        try:
            await worker.close()
            await close_sentinels(pool)
        finally:
            if observe is not None:
                await observe.stop()
            await notifier.close()


async def worker_alive(settings: Settings) -> bool:
    """True when a worker's health-check key is fresh (written within its interval)."""
    client = redis_client(settings)
    try:
        return bool(await client.exists(WORKER_HEALTH_KEY))
    finally:
        await close_redis(client)


def worker_command(settings: Settings, *, check: bool = False) -> int:
    """``herald worker``: run until SIGTERM/SIGINT (exit 0); with ``check``, exit 0 only
    if a worker's health-check key is fresh."""
    if check:
        ok = asyncio.run(worker_alive(settings))
        print("worker: healthy" if ok else "worker: no fresh health-check key")
        return 0 if ok else 1
    configure_logging(settings)
    run_on_loop(run_worker(settings), settings)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m worker``: the same as ``herald worker``."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=worker_command.__doc__)
    parser.add_argument("--check", action="store_true", help="exit 0 if a worker is alive")
    args = parser.parse_args(argv)
    return run_command(lambda settings: worker_command(settings, check=args.check))
