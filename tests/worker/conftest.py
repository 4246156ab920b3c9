"""Worker fixtures: real burst-mode arq workers and the context a job receives."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from arq import Worker

from shared.settings import Settings
from worker.app import build_worker
from worker.context import CTX_KEY, close_context, open_context

BurstWorker = Callable[..., Worker]


@pytest.fixture
async def burst_worker(settings: Settings) -> AsyncIterator[BurstWorker]:
    """Build real arq workers on the test's Redis: ``await burst_worker().async_run()``
    runs every queued job (deferred ones included) and returns when the queue is empty.

    ``burst_worker(other_settings, **overrides)``: other settings, or other ``Worker``
    arguments (``functions=[...]``, ``cron_jobs=[]``...). Every worker is closed after
    the test; closing one earlier (to see what closing does) is fine."""
    workers: list[Worker] = []

    def make(worker_settings: Settings | None = None, **overrides: Any) -> Worker:
        options: dict[str, Any] = {"burst": True, "handle_signals": False, "poll_delay": 0.1}
        worker = build_worker(worker_settings or settings, **(options | overrides))
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.close()


@pytest.fixture
async def worker_ctx(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """The ``ctx`` arq hands a job (first try), with the worker's context opened on the
    test's settings; call a job function directly: ``await job(worker_ctx, ...)``."""
    wctx = await open_context(settings)
    try:
        yield {CTX_KEY: wctx, "job_try": 1}
    finally:
        await close_context(wctx)
