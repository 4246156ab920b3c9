"""The worker's own ``/metrics`` and ``/health`` on ``HERALD_HOST:HERALD_WORKER_METRICS_PORT``.

A small aiohttp app started before the arq worker runs and stopped after it, so its
counters (deliveries, deletions, orphan scans, query timings) can be scraped and a
probe can ask this very process whether it is alive. arq's own figures (jobs complete,
failed, retried, running; when it last wrote its health key) are read from the Worker
at scrape time. A port that cannot be bound is logged and the worker runs without it:
its jobs matter more than its scrape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from arq import Worker
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.metrics import Metrics
from shared.settings import Settings
from worker.context import CTX_KEY, WorkerContext
from worker.supervisor import WorkerRef

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
# The health key is written every HEALTH_CHECK_INTERVAL_S (10 s); older than this is stale.
STALE_AFTER_S = 30.0

WORKER: web.AppKey[WorkerRef] = web.AppKey("worker", WorkerRef)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


class ArqFigures(Collector):
    """arq's counters as Prometheus families, read from the running Worker."""

    def __init__(self, worker: Worker | WorkerRef) -> None:
        self.ref = worker if isinstance(worker, WorkerRef) else WorkerRef(worker)

    def collect(self) -> list[Metric]:
        w = self.ref.worker
        jobs = CounterMetricFamily(
            "herald_worker_jobs", "Jobs this worker finished, by result", labels=["result"]
        )
        jobs.add_metric(["complete"], w.jobs_complete)
        jobs.add_metric(["failed"], w.jobs_failed)
        jobs.add_metric(["retried"], w.jobs_retried)
        running = GaugeMetricFamily("herald_worker_jobs_running", "Jobs running now")
        running.add_metric([], sum(not t.done() for t in w.tasks.values()))
        out: list[Metric] = [jobs, running]
        if w._last_health_check:
            beat = GaugeMetricFamily(
                "herald_worker_health_timestamp_seconds",
                "When this worker last wrote its health-check key (Unix time)",
            )
            beat.add_metric([], w._last_health_check)
            out.append(beat)
        return out


def context(worker: Worker) -> WorkerContext | None:
    value = worker.ctx.get(CTX_KEY) if worker.ctx else None
    return value if isinstance(value, WorkerContext) else None


async def _check(coro: Any, timeout_s: float) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(min(CHECK_TIMEOUT_S, timeout_s)):
            await coro
    except Exception as exc:
        # The class only: messages can carry hosts.
        return {"ok": False, "error": exc.__class__.__name__}
    return {"ok": True, "latency_ms": round((time.perf_counter() - start) * 1000, 2)}


async def serve_health(request: web.Request) -> web.Response:
    """ok: connected, health key fresh; degraded: one backend failing; down (503): not
    started yet, or the health key is stale (the job loop is not running)."""
    ref = request.app[WORKER]
    worker = ref.worker
    wctx = context(worker)
    last = worker._last_health_check
    age = round(time.time() - last, 3) if last else None
    body: dict[str, Any] = {
        "role": "worker",
        "jobs": {
            "complete": worker.jobs_complete,
            "failed": worker.jobs_failed,
            "retried": worker.jobs_retried,
            "running": sum(not t.done() for t in worker.tasks.values()),
        },
        "health_key_age_s": age,
        "state": ref.state,
    }
    if wctx is None:
        status = "down"
        # Not connected (yet, or again): say which, e.g. "reconnecting" in an outage.
        reason = "not_started" if ref.state == "starting" else ref.state
        body["checks"] = {"started": {"ok": False, "error": reason}}
    else:
        timeout_s = wctx.settings.backend_timeout_s
        database, redis = await asyncio.gather(
            _check(wctx.db.fetchval("SELECT 1"), timeout_s), _check(wctx.redis.ping(), timeout_s)
        )
        body["checks"] = {"database": database, "redis": redis}
        if wctx.db.monitor is not None:
            snap = wctx.db.monitor.snapshot()
            body["db"] = {k: snap[k] for k in ("queries_total", "slow_queries_total", "degraded")}
        if age is None or age > STALE_AFTER_S:
            status = "down"
        elif database["ok"] and redis["ok"]:
            status = "ok"
        else:
            status = "degraded"
    body = {"status": status, **body}
    return web.json_response(body, status=503 if status == "down" else 200)


async def serve_metrics(request: web.Request) -> web.Response:
    # The server's /metrics answers the same way (see NOTES: the content type is set
    # after construction, as aiohttp refuses a charset inside content_type).
    resp = web.Response(body=request.app[METRICS].render())
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp


def observe_app(worker: Worker | WorkerRef, metrics: Metrics) -> web.Application:
    app = web.Application()
    app[WORKER] = worker if isinstance(worker, WorkerRef) else WorkerRef(worker)
    app[METRICS] = metrics
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/health", serve_health)
    return app


class ObserveServer:
    """Start with :meth:`start` (None when the port is 0 or cannot be bound); stop once."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner = runner
        self.port = port

    @classmethod
    async def start(
        cls, settings: Settings, worker: Worker | WorkerRef, metrics: Metrics
    ) -> ObserveServer | None:
        """``worker``: the Worker, or the supervisor's reference to the current one."""
        port = settings.worker_metrics_port
        if port == 0:
            return None
        metrics.registry.register(figures := ArqFigures(worker))
        ref = figures.ref
        runner = web.AppRunner(observe_app(ref, metrics), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, port, reuse_address=True)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            logger.error(
                "worker metrics not served: cannot listen on %s:%d"
                " (HERALD_HOST/HERALD_WORKER_METRICS_PORT): %s",
                settings.host,
                port,
                exc.strerror or exc.__class__.__name__,
            )
            return None
        bound = int(runner.addresses[0][1]) if runner.addresses else port
        logger.info("worker metrics and health on http://%s:%d", settings.host, bound)
        return cls(runner, bound)

    async def stop(self) -> None:
        await self.runner.cleanup()
