"""The arq worker: its functions, cron jobs and lifecycle, built from Settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Sequence
from signal import Signals
from typing import Any

from arq import Worker
from arq.cron import CronJob
from arq.worker import Function

from shared.bus import arq_settings, close_redis, redis_client
from shared.constants import HEALTH_CHECK_INTERVAL_S, QUEUE_NAME, WORKER_HEALTH_KEY
from shared.entry import configure_logging, run_command
from shared.eventloop import run as run_on_loop
from shared.metrics import Metrics
from shared.sdnotify import Notifier
from shared.settings import Settings
from worker.context import CTX_KEY, close_context, open_context
from worker.jobs.attachments import attachment_cron_jobs, attachment_functions
from worker.jobs.delayed import delayed_cron_jobs, delayed_functions
from worker.observe import ObserveServer
from worker.supervisor import Supervisor, WorkerRef

logger = logging.getLogger(__name__)

JOB_COMPLETION_WAIT_S = 10


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
    on_connected: Callable[[], None] | None = None,
    **overrides: Any,
) -> Worker:
    """A Worker for ``settings``; tests pass ``burst=True, handle_signals=False`` etc.
    ``on_connected`` is called once the run's Redis and PostgreSQL answered."""
    notifier = notifier or Notifier()

    async def on_startup(ctx: dict[str, Any]) -> None:
        # arq put its own pool in ctx["redis"]: the services enqueue through that one.
        ctx[CTX_KEY] = await open_context(settings, metrics, arq=ctx["redis"])
        logger.info("worker started")
        if on_connected is not None:
            on_connected()
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


async def run_worker(settings: Settings, **overrides: Any) -> None:
    """Run until SIGTERM/SIGINT, through any Redis or PostgreSQL outage (reconnecting
    with backoff, worker/supervisor.py), then close every connection."""
    notifier = Notifier.from_settings(settings)
    metrics = Metrics()
    supervisor: Supervisor | None = None

    def connected() -> None:
        if supervisor is not None:
            supervisor.connected()

    def make() -> Worker:
        return build_worker(
            settings, notifier=notifier, metrics=metrics, on_connected=connected, **overrides
        )

    ref = WorkerRef(make())
    supervisor = Supervisor(settings, make, ref, notifier)
    observe = await ObserveServer.start(settings, ref, metrics)  # /metrics, /health
    notifier.start_watchdog()
    try:
        await supervisor.run()
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
