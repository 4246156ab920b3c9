"""``GET /health``: dependency checks plus each subsystem's figures.

Every section that waits on PostgreSQL or Redis runs at once, under one deadline of
HERALD_BACKEND_TIMEOUT_S: a frozen backend makes its sections answer ``ok: false`` (or
their figures null) in time, and never delays the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from aiohttp import web

from server.keys import ATTACHMENTS, CACHE, DB, DRAINING, QUEUE_STATS, REDIS, SETTINGS, STREAMS
from shared.constants import WORKER_HEALTH_KEY
from shared.eventloop import loop_name

logger = logging.getLogger(__name__)


def deadline_s(app: web.Application) -> float:
    return app[SETTINGS].backend_timeout_s


async def _timed(coro: Any, timeout_s: float) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await coro
    except Exception as exc:
        # The exception class only: messages can carry hosts or paths.
        return {"ok": False, "error": exc.__class__.__name__}
    return {"ok": True, "latency_ms": round((time.perf_counter() - start) * 1000, 2)}


async def check_database(app: web.Application) -> dict[str, Any]:
    return await _timed(app[DB].fetchval("SELECT 1"), deadline_s(app))


async def check_redis(app: web.Application) -> dict[str, Any]:
    return await _timed(app[REDIS].ping(), deadline_s(app))


async def check_worker(app: web.Application) -> dict[str, Any]:
    try:
        async with asyncio.timeout(deadline_s(app)):
            alive = await app[REDIS].exists(WORKER_HEALTH_KEY)
    except Exception as exc:
        return {"ok": False, "error": exc.__class__.__name__}
    return {"ok": bool(alive)} if alive else {"ok": False, "error": "no_fresh_heartbeat"}


def sse_section(app: web.Application) -> dict[str, Any]:
    """This process's streams (server/sse/manager.py); counts only, never addresses."""
    return app[STREAMS].stats()


async def queue_section(app: web.Application) -> dict[str, Any]:
    """The delayed-message queue, from the stores every process shares (queue_stats.py)."""
    try:
        async with asyncio.timeout(deadline_s(app)):
            return await app[QUEUE_STATS].section()
    except Exception as exc:
        # The body says so ("available": false); a probe every few seconds must not
        # write a line each time.
        logger.debug("queue figures unavailable: %s", exc.__class__.__name__)
    settings = app[SETTINGS]
    return {
        "size": None,
        "max_size": settings.queue_max,
        "max_seen": None,
        "avg_size": None,
        "growth_per_min": None,
        "alert": False,
        "alert_threshold": settings.queue_alert,
        "available": False,
        "cleanup": {
            "runs": None,
            "failures": None,
            "success_rate": None,
            "last_run_at": None,
            "last_deleted": None,
            "deleted_total": None,
        },
    }


def db_section(app: web.Application) -> dict[str, Any]:
    """This process's query monitor (shared/db/monitor.py) plus its cache counts."""
    monitor = app[DB].monitor
    if monitor is None:
        section: dict[str, Any] = {
            "queries_total": 0,
            "slow_queries_total": 0,
            "slow_threshold_ms": app[SETTINGS].slow_query_ms,
            "p95_ms": None,
            "degraded": False,
        }
    else:
        section = monitor.snapshot()
    if CACHE in app:
        section["cache"] = app[CACHE].stats()
    return section


async def attachments_section(app: web.Application) -> dict[str, Any]:
    """Deletion failures, pending removals and the last orphan scan's summary (counts and
    times only: no paths, no addresses)."""
    try:
        async with asyncio.timeout(deadline_s(app)):
            return await app[ATTACHMENTS].health_summary()
    except Exception as exc:
        return {
            "delete_failures_total": None,
            "pending_file_deletions": None,
            "last_orphan_scan": None,
            "error": exc.__class__.__name__,
        }


async def health(request: web.Request) -> web.Response:
    app = request.app
    # Each section catches its own errors and times out at the same deadline.
    database, redis, worker, queue, attachments = await asyncio.gather(
        check_database(app),
        check_redis(app),
        check_worker(app),
        queue_section(app),
        attachments_section(app),
    )
    body: dict[str, Any] = {
        "checks": {"database": database, "redis": redis, "worker": worker},
        "sse": sse_section(app),
        "db": db_section(app),
        "queue": queue,
        "attachments": attachments,
    }
    draining = app[DRAINING][0]
    if draining or not (database["ok"] and redis["ok"]):
        status = "down"
    elif not worker["ok"] or body["db"]["degraded"] or body.get("queue", {}).get("alert"):
        status = "degraded"
    else:
        status = "ok"
    # Which process answered: with `herald serve --processes N` each answer (and each
    # figure in it) is one process's; pid and index tell them apart.
    body["process"] = {
        "pid": os.getpid(),
        "index": app[SETTINGS].process_index,
        "loop": loop_name(),
    }
    body = {"status": status, "draining": draining, **body}
    return web.json_response(body, status=503 if status == "down" else 200)
