"""Operator jobs (``herald jobs``, the cron route): enqueue, join, wait, report.

A real (not dry) run of an operator job is deduplicated: while one is queued or running,
asking again joins it (same job id) instead of stacking a second run behind it. The id
of the current run is kept under ``active_job_key(name)``; a finished or vanished run
no longer counts, so the next request starts a fresh one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arq.connections import ArqRedis
from arq.constants import result_key_prefix
from arq.jobs import DeserializationError, Job, JobResult, JobStatus, deserialize_result
from redis.exceptions import RedisError

from shared.constants import (
    JOB_DELIVER_DELAYED,
    JOB_SAMPLE_QUEUE,
    OPERATOR_JOBS,
    QUEUE_NAME,
    active_job_key,
    job_progress_key,
)
from shared.errors import ValidationError
from shared.models import iso

logger = logging.getLogger(__name__)

ACTIVE_TTL_S = 3600
# Between claiming the active key and the job landing in the queue there is a moment when
# the id is claimed but not queued yet; a claim this fresh counts as active.
FRESH_CLAIM_MS = 5000
ACTIVE = (JobStatus.queued, JobStatus.deferred, JobStatus.in_progress)
MAX_JOB_ID_CHARS = 200
NOT_FOUND_GRACE_S = 2.0
# Jobs the worker runs by itself every few hundred milliseconds: their results would bury
# the operator's in `herald jobs list`, so they are counted there, not shown, by default.
ROUTINE_FUNCTIONS = frozenset({JOB_DELIVER_DELAYED, JOB_SAMPLE_QUEUE})
# At most this many queued entries and result keys are read for one listing.
LIST_SCAN_MAX = 5000
PROGRESS_TTL_S = 3600
PROGRESS_EVERY_S = 0.25


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


@dataclass(frozen=True, slots=True)
class JobListing:
    """``herald jobs list``: what runs or waits (running first), then finished runs,
    newest first; ``hidden`` counts finished routine runs left out."""

    active: list[JobState]
    finished: list[JobState]
    hidden: int


def _time(value: datetime | None) -> str | None:
    return iso(value) if isinstance(value, datetime) else None


class JobProgress:
    """Written by a long job as it goes, read by ``herald jobs enqueue --wait``.

    Writes are throttled to one per ``PROGRESS_EVERY_S`` (a phase change always goes
    through), so reporting after every batch costs the job almost nothing."""

    def __init__(self, redis: ArqRedis, job_id: str) -> None:
        self.redis = redis
        self.key = job_progress_key(job_id)
        self._last_at = 0.0
        self._last_phase: object = None

    async def __call__(self, figures: dict[str, Any]) -> None:
        now = time.monotonic()
        phase = figures.get("phase")
        if phase == self._last_phase and now - self._last_at < PROGRESS_EVERY_S:
            return
        self._last_at, self._last_phase = now, phase
        try:
            await self.redis.set(self.key, json.dumps(figures), ex=PROGRESS_TTL_S)
        except (RedisError, OSError) as exc:
            # Progress is a courtesy to a watching operator; the job goes on without it.
            logger.debug("job progress not written: %s", exc)


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
        return _finished_state(job_id, info)

    async def progress(self, job_id: str) -> dict[str, Any] | None:
        """The figures a running job last reported, if it reports any."""
        raw = await self.arq.get(job_progress_key(job_id))
        if raw is None:
            return None
        try:
            figures = json.loads(raw)
        except ValueError:
            return None
        return figures if isinstance(figures, dict) else None

    async def listing(self, *, limit: int = 20, include_routine: bool = False) -> JobListing:
        """Running and queued jobs, and the ``limit`` newest finished ones."""
        entries = await self.arq.zrange(QUEUE_NAME, 0, LIST_SCAN_MAX - 1)
        running: list[JobState] = []
        waiting: list[JobState] = []
        for raw_id in entries:
            job_id = raw_id.decode()
            state = await self.state(job_id)
            if state.status == JobStatus.not_found.value:
                continue  # finished between the two reads
            (running if state.status == JobStatus.in_progress.value else waiting).append(state)
        finished: list[tuple[float, JobState]] = []
        hidden = 0
        keys = [k async for k in self.arq.scan_iter(match=result_key_prefix + "*", count=500)]
        for key in keys[:LIST_SCAN_MAX]:
            done = await self._finished(key.decode()[len(result_key_prefix) :])
            if done is None:
                continue
            if not include_routine and done.function in ROUTINE_FUNCTIONS:
                hidden += 1
                continue
            finished.append((_sort_key(done), done))
        finished.sort(key=lambda pair: pair[0], reverse=True)
        return JobListing(
            active=running + waiting,
            finished=[state for _, state in finished[:limit]],
            hidden=hidden,
        )

    async def _finished(self, job_id: str) -> JobState | None:
        raw = await self.arq.get(result_key_prefix + job_id)
        if raw is None:
            return None  # expired since the scan
        try:
            info = deserialize_result(raw)
        except DeserializationError:
            return JobState(job_id=job_id, status=JobStatus.complete.value, error="unreadable")
        return _finished_state(job_id, info)

    async def wait(
        self,
        job_id: str,
        max_wait_s: float | None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> JobState:
        """Poll until the job finished (or vanished) or ``max_wait_s`` seconds passed;
        returns the last state seen (``done`` tells which). ``on_progress`` hears each
        new progress report of the job."""
        started = time.monotonic()
        deadline = None if max_wait_s is None else started + max_wait_s
        delay = 0.05
        last: dict[str, Any] | None = None
        while True:
            state = await self.state(job_id)
            if state.done:
                return state
            if on_progress is not None:
                figures = await self.progress(job_id)
                if figures is not None and figures != last:
                    on_progress(figures)
                    last = figures
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


def _finished_state(job_id: str, info: JobResult) -> JobState:
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


def _sort_key(state: JobState) -> float:
    when = state.finished_at or state.enqueued_at
    return datetime.fromisoformat(when).timestamp() if when else 0.0
