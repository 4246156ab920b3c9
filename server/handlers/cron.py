"""Cron routes: outside user auth, guarded by ``CRON_SECRET``; they enqueue, never work."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web

from server.keys import JOBS, SETTINGS
from server.middlewares import bearer_token
from server.params import int_param
from shared.errors import CronDisabled, Unauthorized
from shared.services.jobs import JobState

logger = logging.getLogger(__name__)

CLEANUP_JOB = "cleanup-delayed-messages"
DEFAULT_WAIT_S = 30
MAX_WAIT_S = 300


def require_cron_secret(request: web.Request) -> None:
    """503 without a configured secret; 401 unless the bearer token equals it (compared
    in constant time, as bytes so any header text compares safely)."""
    secret = request.app[SETTINGS].cron_secret
    if not secret:
        raise CronDisabled("cron endpoints are disabled: CRON_SECRET is not set")
    token = bearer_token(request, allow_query=False) or ""
    given = token.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, secret.encode("utf-8", "surrogateescape")):
        raise Unauthorized("invalid cron secret")


def run_result(state: JobState) -> dict[str, Any]:
    """The finished run as the route reports it."""
    result = state.result if isinstance(state.result, dict) else {}
    out: dict[str, Any] = {
        "job_id": state.job_id,
        "status": result.get("status", "succeeded" if state.success else "failed"),
        "deleted": result.get("deleted", 0),
        "batches": result.get("batches", 0),
        "duration_ms": result.get("duration_ms", 0.0),
    }
    error = result.get("error")
    if not state.success:
        # The job itself raised: its class only (a message may name hosts).
        error = (state.error or "error").partition(":")[0]
    if error:
        out["error"] = error
    if result.get("run_id") is not None:
        out["run_id"] = result["run_id"]
    return out


async def cleanup_delayed_messages(request: web.Request) -> web.Response:
    require_cron_secret(request)
    wait = int_param(request, "wait", default=DEFAULT_WAIT_S, minimum=0, maximum=MAX_WAIT_S)
    jobs = request.app[JOBS]
    job_id, joined = await jobs.enqueue(CLEANUP_JOB)
    logger.info("cron: cleanup job %s %s", job_id, "joined" if joined else "queued")
    state = await jobs.wait(job_id, max_wait_s=wait)
    if not state.done:
        return web.json_response({"job_id": job_id, "status": state.status}, status=202)
    return web.json_response(run_result(state))
