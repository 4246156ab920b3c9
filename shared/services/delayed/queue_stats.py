"""Delayed-message queue health, the same on every process.

The size now is counted in PostgreSQL (exact, one index-only scan). The history lives in
Redis: the worker samples the size every few seconds into a sorted set (average and
growth over a window come from it), and a ``max_seen`` only ever rises (``ZADD GT``, also
raised by servers as they accept messages). Cleanup figures come from the run records in
PostgreSQL. Every server reads the same stores, so every server shows the same figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.constants import QUEUE_ALERT_KEY, QUEUE_MAX_SEEN_KEY, QUEUE_SAMPLES_KEY
from shared.db.pool import Database
from shared.logcontext import FAILURE_LOG_INTERVAL_S, Throttle
from shared.metrics import Metrics
from shared.services.delayed.cleanup import cleanup_summary
from shared.settings import Settings

logger = logging.getLogger(__name__)

WINDOW_S = 600
SAMPLE_INTERVAL_S = 10
REFRESH_INTERVAL_S = 5.0


def parse_samples(raw: list[tuple[bytes, float]]) -> list[tuple[float, int]]:
    """Members ``"<time>:<size>"`` scored by time → ``[(time, size)]`` in time order."""
    out = []
    for member, score in raw:
        _, _, size = member.decode("ascii", "replace").rpartition(":")
        if size.isdigit():
            out.append((float(score), int(size)))
    return out


def growth_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of size over time, per minute (0.0 with fewer than 2 points)."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_s = sum(s for _, s in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (s - mean_s) for t, s in samples)
    return round(cov / var * 60, 3)


class QueueStats:
    def __init__(
        self, *, db: Database, redis: aioredis.Redis, settings: Settings, metrics: Metrics
    ) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self._throttle = Throttle(FAILURE_LOG_INTERVAL_S)

    async def pending_count(self) -> int:
        """Pending delayed messages, all users (index-only scan of the due index)."""
        return int(
            await self.db.fetchval("SELECT count(*) FROM delayed_messages WHERE status = 'pending'")
        )

    async def note_size(self, size: int) -> None:
        """Raise ``max_seen`` to ``size`` if larger; a Redis error only loses a figure."""
        try:
            await self.redis.zadd(QUEUE_MAX_SEEN_KEY, {"max": size}, gt=True)
        except (RedisError, OSError) as exc:
            logger.warning("queue max_seen not updated: %s", exc.__class__.__name__)

    async def sample(self) -> dict[str, Any]:
        """Worker side: record the size now, raise max_seen, log an alert crossing once."""
        size = await self.pending_count()
        now = time.time()
        alert = size >= self.settings.queue_alert
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(QUEUE_SAMPLES_KEY, {f"{now:.3f}:{size}": now})
            pipe.zremrangebyscore(QUEUE_SAMPLES_KEY, "-inf", now - WINDOW_S)
            pipe.zadd(QUEUE_MAX_SEEN_KEY, {"max": size}, gt=True)
            # GETSET is atomic: of several workers sampling, only one sees the change.
            pipe.getset(QUEUE_ALERT_KEY, "1" if alert else "0")
            results = await pipe.execute()
        previous = results[-1]
        was_alert = previous == b"1"
        if alert and not was_alert:
            logger.warning(
                "delayed-message queue ALERT: %d pending >= HERALD_QUEUE_ALERT %d (max %d)",
                size,
                self.settings.queue_alert,
                self.settings.queue_max,
            )
        elif was_alert and not alert:
            logger.info(
                "delayed-message queue alert cleared: %d pending < %d",
                size,
                self.settings.queue_alert,
            )
        return {"size": size, "alert": alert, "at": now}

    async def section(self) -> dict[str, Any]:
        """The contract's ``/health`` → ``queue`` section; also refreshes the metrics."""
        size = await self.pending_count()
        samples: list[tuple[float, int]] = []
        max_seen = 0
        history_ok = True
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrangebyscore(
                    QUEUE_SAMPLES_KEY, time.time() - WINDOW_S, "+inf", withscores=True
                )
                pipe.zscore(QUEUE_MAX_SEEN_KEY, "max")
                raw, seen = await pipe.execute()
            samples = parse_samples(raw)
            max_seen = int(seen or 0)
        except (RedisError, OSError) as exc:
            history_ok = False
            left_out = self._throttle.allow("history")
            if left_out is not None:
                logger.warning(
                    "queue history unavailable: %s (%d more not logged since the last line)",
                    exc.__class__.__name__,
                    left_out,
                )
        avg = sum(s for _, s in samples) / len(samples) if samples else float(size)
        section: dict[str, Any] = {
            "size": size,
            "max_size": self.settings.queue_max,
            "max_seen": max(max_seen, size),
            "avg_size": round(avg, 2),
            "growth_per_min": growth_per_min(samples),
            "alert": size >= self.settings.queue_alert,
            "alert_threshold": self.settings.queue_alert,
            "max_per_user": self.settings.queue_max_per_user,
            "window_s": WINDOW_S,
            "samples": len(samples),
            "history_ok": history_ok,
            "cleanup": await cleanup_summary(self.db),
        }
        self._export(section)
        return section

    def _export(self, section: dict[str, Any]) -> None:
        fig = self.metrics.queue_figures
        cleanup = section["cleanup"]
        fig.set("herald_delayed_queue_size", section["size"])
        fig.set("herald_delayed_queue_max_size", section["max_size"])
        fig.set("herald_delayed_queue_max_seen", section["max_seen"])
        fig.set("herald_delayed_queue_alert", 1 if section["alert"] else 0)
        fig.set("herald_delayed_cleanup_runs_total", cleanup["runs"])
        fig.set("herald_delayed_cleanup_failures_total", cleanup["failures"])
        fig.set("herald_delayed_cleanup_deleted_total", cleanup["deleted_total"])
        fig.set("herald_delayed_cleanup_last_deleted", cleanup["last_deleted"])
        if cleanup["last_run_at"] is not None:
            last = datetime.fromisoformat(cleanup["last_run_at"]).timestamp()
            fig.set("herald_delayed_cleanup_last_run_timestamp_seconds", last)

    async def refresh_forever(self, interval: float = REFRESH_INTERVAL_S) -> None:
        """Server side: keep the exported figures fresh for ``/metrics`` scrapes."""
        failing = False
        task = asyncio.current_task()
        while True:
            try:
                await self.section()
                failing = False
            except Exception as exc:
                if not failing:  # log a failure once, not every few seconds
                    logger.warning("queue figures refresh failed: %s", exc.__class__.__name__)
                failing = True
            if task is not None and task.cancelling():
                # On Python 3.11, asyncio.wait_for (inside aiopg and redis) can swallow a
                # cancellation that races a result; the request is still counted here.
                raise asyncio.CancelledError
            await asyncio.sleep(interval)
