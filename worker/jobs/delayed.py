"""Delayed-message jobs: delivery (per tick and a sweep), cleanup, queue sampling."""

from __future__ import annotations

import logging
from typing import Any

from arq import func
from arq.cron import CronJob, cron
from arq.worker import Function

from shared.constants import JOB_CLEANUP_DELAYED, JOB_DELIVER_DELAYED, JOB_SAMPLE_QUEUE
from shared.errors import BackendUnavailable
from shared.services.delayed.queue_stats import SAMPLE_INTERVAL_S
from worker.context import herald

logger = logging.getLogger(__name__)

# The sweep delivers whatever the per-tick jobs missed (worker down, Redis flushed).
SWEEP_EVERY_S = 5
CLEANUP_EVERY_MIN = 5
# Long enough for `herald jobs status` and the cron route to read a run's result.
CLEANUP_KEEP_RESULT_S = 3600
# A tick job's id is never reused (its tick is in the future when queued): no need to
# keep its result for long.
DELIVERY_KEEP_RESULT_S = 60


async def deliver_delayed_message(ctx: dict[str, Any]) -> dict[str, Any]:
    """Deliver every due delayed message (a tick's job and the periodic sweep alike).
    PostgreSQL away: nothing was taken (delivery commits per batch), so nothing is lost;
    one line, no traceback, and the next sweep after the outage delivers."""
    try:
        report = await herald(ctx).services.delivery.deliver_due()
    except BackendUnavailable as exc:
        logger.warning("delayed delivery skipped: %s; the next sweep delivers", exc.message)
        return {"skipped": "database_unavailable"}
    return report.as_dict()


async def cleanup_delayed_messages(ctx: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    """Delete finished delayed messages past the retention in batches; the run's record
    (also for a failure) is the result."""
    return await herald(ctx).services.cleanup.run(dry_run=dry_run, job_id=ctx.get("job_id"))


async def sample_delayed_queue(ctx: dict[str, Any]) -> dict[str, Any]:
    """Record the queue size for /health's history and log alert crossings."""
    try:
        return await herald(ctx).services.queue_stats.sample()
    except BackendUnavailable as exc:
        logger.warning("queue sample skipped: %s", exc.message)
        return {"skipped": "database_unavailable"}


def delayed_functions() -> list[Function]:
    return [
        func(deliver_delayed_message, name=JOB_DELIVER_DELAYED, keep_result=DELIVERY_KEEP_RESULT_S),
        func(cleanup_delayed_messages, name=JOB_CLEANUP_DELAYED, keep_result=CLEANUP_KEEP_RESULT_S),
    ]


def delayed_cron_jobs() -> list[CronJob]:
    # arq enqueues a cron job with an id made of its name and tick (unique=True), so with
    # any number of workers each tick runs once.
    return [
        cron(
            deliver_delayed_message,
            name=f"cron:{JOB_DELIVER_DELAYED}",
            second=set(range(0, 60, SWEEP_EVERY_S)),
            run_at_startup=True,
        ),
        cron(
            cleanup_delayed_messages,
            name=f"cron:{JOB_CLEANUP_DELAYED}",
            minute=set(range(0, 60, CLEANUP_EVERY_MIN)),
            second=0,
            keep_result=CLEANUP_KEEP_RESULT_S,
        ),
        cron(
            sample_delayed_queue,
            name=f"cron:{JOB_SAMPLE_QUEUE}",
            second=set(range(0, 60, SAMPLE_INTERVAL_S)),
            run_at_startup=True,
        ),
    ]
