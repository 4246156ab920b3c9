"""Operator jobs (``herald jobs``, the cron route): enqueue, join, wait, report.

A real (not dry) run of an operator job is deduplicated: while one is queued or running,
asking again joins it (same job id) instead of stacking a second run behind it. The id
of the current run is kept under ``active_job_key(name)``; a finished or vanished run
no longer counts, so the next request starts a fresh one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arq.connections import ArqRedis
from arq.jobs import Job, JobResult, JobStatus

from shared.constants import OPERATOR_JOBS, QUEUE_NAME, active_job_key
from shared.errors import ValidationError
from shared.models import iso

ACTIVE_TTL_S = 3600
# Between claiming the active key and the job landing in the queue there is a moment when
# the id is claimed but not queued yet; a claim this fresh counts as active.
FRESH_CLAIM_MS = 5000
ACTIVE = (JobStatus.queued, JobStatus.deferred, JobStatus.in_progress)
MAX_JOB_ID_CHARS = 200
NOT_FOUND_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class JobState:
    job_id: str
    status: str
    function: str | None = None
    success: bool | None = None
    result: Any = None
    error: str | None = None
    enqueued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None

    @property
    def done(self) -> bool:
        return self.status == JobStatus.complete.value

    @property
    def ok(self) -> bool:
        """Finished, did not raise, and did not report a failure in its result."""
        failed_result = isinstance(self.result, dict) and self.result.get("status") == "failed"
        return self.done and bool(self.success) and not failed_result

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "function": self.function,
            "success": self.success,
            "result": self.result,
            "error": self.error,
            "enqueued_at": self.enqueued_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


def _time(value: datetime | None) -> str | None:
    return iso(value) if isinstance(value, datetime) else None


class JobService:
    def __init__(self, *, arq: ArqRedis) -> None:
        self.arq = arq

    async def enqueue(self, name: str, *, dry_run: bool = False) -> tuple[str, bool]:
        """Queue operator job ``name``; returns ``(job_id, joined)`` where ``joined``
        means a run already queued or running was joined instead."""
        function = OPERATOR_JOBS.get(name)
        if function is None:
            known = ", ".join(sorted(OPERATOR_JOBS))
            raise ValidationError(f"unknown job {name!r}; known jobs: {known}")
        if dry_run:
            # A dry run reports; it neither joins a real run nor is joined by one.
            job_id = f"herald:{name}:dry-run:{uuid.uuid4().hex}"
            await self.arq.enqueue_job(
                function, _job_id=job_id, _queue_name=QUEUE_NAME, dry_run=True
            )
            return job_id, False
        key = active_job_key(name)
        job_id = f"herald:{name}:{uuid.uuid4().hex}"
        if not await self.arq.set(key, job_id, nx=True, ex=ACTIVE_TTL_S):
            current = await self.arq.get(key)
            if current is not None:
                current_id = current.decode()
                if await self._active(current_id, key):
                    return current_id, True
            await self.arq.set(key, job_id, ex=ACTIVE_TTL_S)
        try:
            await self.arq.enqueue_job(function, _job_id=job_id, _queue_name=QUEUE_NAME)
        except BaseException:
            await self.arq.delete(key)
            raise
        return job_id, False

    async def _active(self, job_id: str, key: str) -> bool:
        status = await Job(job_id, self.arq, _queue_name=QUEUE_NAME).status()
        if status in ACTIVE:
            return True
        if status is JobStatus.not_found:
            left_ms = await self.arq.pttl(key)
            return bool(left_ms > ACTIVE_TTL_S * 1000 - FRESH_CLAIM_MS)
        return False

    async def state(self, job_id: str) -> JobState:
        """Where the job is now, with its result once it finished."""
        if not job_id or len(job_id) > MAX_JOB_ID_CHARS:
            raise ValidationError("job id: 1-200 characters")
        job = Job(job_id, self.arq, _queue_name=QUEUE_NAME)
        status = await job.status()
        info = await job.info()
        if info is None:
            return JobState(job_id=job_id, status=status.value)
        if not isinstance(info, JobResult):
            return JobState(
                job_id=job_id,
                status=status.value,
                function=info.function,
                enqueued_at=_time(info.enqueue_time),
            )
        result, error = info.result, None
        if isinstance(result, BaseException):
            error = f"{result.__class__.__name__}: {str(result)[:200]}".rstrip(": ")
            result = None
        return JobState(
            job_id=job_id,
            status=JobStatus.complete.value,
            function=info.function,
            success=info.success,
            result=result,
            error=error,
            enqueued_at=_time(info.enqueue_time),
            started_at=_time(info.start_time),
            finished_at=_time(info.finish_time),
        )

    async def wait(self, job_id: str, max_wait_s: float | None) -> JobState:
        """Poll until the job finished (or vanished) or ``max_wait_s`` seconds passed;
        returns the last state seen (``done`` tells which)."""
        started = time.monotonic()
        deadline = None if max_wait_s is None else started + max_wait_s
        delay = 0.05
        while True:
            state = await self.state(job_id)
            if state.done:
                return state
            # A just-joined id may not be in the queue yet: "not found" only counts later.
            vanished = state.status == JobStatus.not_found.value
            if vanished and time.monotonic() - started > NOT_FOUND_GRACE_S:
                return state
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return state
                delay = min(delay, left)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
