"""``herald worker`` riding out outages: one arq Worker run after another until a signal.

arq's ``async_run()`` returns or raises as soon as Redis goes away, and its
``Worker.close()`` deletes the health key first: with Redis down that raises, its
``on_shutdown`` never runs and the pools leak. So the supervisor owns the lifecycle:

* each run gets a fresh Worker (arq's slot counters can leak on a Redis error between
  taking a job and starting it) and a fresh arq pool with bounded commands;
* a run that fails closes everything it opened (:meth:`Supervisor._end_run`), then the
  next one is tried after a backoff (0.5 s doubling to 10 s) for as long as it takes;
* one log line per state change (lost, back), not per attempt;
* SIGTERM/SIGINT (arq's handlers, which call ``on_stop``) end the loop: running jobs
  get ``job_completion_wait`` to finish, the health key is deleted if Redis answers,
  and every pool is closed; the process exits 0.

The systemd watchdog is fed from the start (a worker waiting for its backends is not
stalled); READY is sent by the first run that connected (``build_worker``'s startup).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from signal import Signals
from typing import Any

from arq import Worker

from shared.bus import arq_pool, close_redis
from shared.constants import WORKER_HEALTH_KEY
from shared.sdnotify import Notifier
from shared.settings import Settings
from worker.context import CTX_KEY, close_context

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
JOB_WAIT_ON_OUTAGE_S = 10.0

# What /health on the worker says while there is no connected run.
STARTING, RUNNING, RECONNECTING, STOPPING = "starting", "running", "reconnecting", "stopping"


class WorkerRef:
    """The Worker of the current run (replaced on every reconnection) and the state."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.state = STARTING


WorkerFactory = Callable[[], Worker]


class Supervisor:
    def __init__(
        self, settings: Settings, make_worker: WorkerFactory, ref: WorkerRef, notifier: Notifier
    ) -> None:
        self.settings = settings
        self.make_worker = make_worker
        self.ref = ref
        self.notifier = notifier
        self.stop = asyncio.Event()
        self._down_since: float | None = None
        self._failures = 0

    def on_stop(self, signum: Signals) -> None:
        self.stop.set()

    def connected(self) -> None:
        """Called by a run's startup once Redis and PostgreSQL answered."""
        self.ref.state = RUNNING
        if self._down_since is not None:
            logger.info(
                "worker reconnected after %.1f s (%d failed attempts)",
                time.monotonic() - self._down_since,
                self._failures,
            )
        self._down_since = None
        self._failures = 0

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            # One line per outage; the class only (driver messages carry hosts).
            logger.warning(
                "worker lost Redis or PostgreSQL (%s); retrying every %.1f-%.0f s until"
                " they answer",
                exc.__class__.__name__,
                BACKOFF_FIRST_S,
                BACKOFF_MAX_S,
            )
        self.ref.state = RECONNECTING
        self.notifier.send(f"STATUS=reconnecting ({exc.__class__.__name__})")

    async def run(self) -> None:
        delay = BACKOFF_FIRST_S
        me = asyncio.current_task()
        while not self.stop.is_set():
            worker = self.ref.worker
            worker.on_stop = self.on_stop
            try:
                # arq's Worker takes a ready pool (and then never builds its own, whose
                # commands would be unbounded); it is ours to close.
                worker._pool = await arq_pool(self.settings, conn_retries=0)
                if self.stop.is_set():
                    break
                await worker.async_run()
                break  # a burst run (tests) that emptied the queue
            except asyncio.CancelledError:
                if me is not None and me.cancelling():
                    raise  # our own task is being cancelled, not a signal's stop
                break  # arq's signal handler cancelled its main task: a normal stop
            except Exception as exc:
                if self.stop.is_set():
                    break
                self._failed(exc)
            finally:
                await self._end_run(worker, stopping=self.stop.is_set())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stop.wait()
            delay = min(delay * 2, BACKOFF_MAX_S)
            if not self.stop.is_set():
                self.ref.worker = self.make_worker()
        self.ref.state = STOPPING

    async def _end_run(self, worker: Worker, *, stopping: bool) -> None:
        """Close what the run opened, on every path; never raises (Redis may be down)."""
        tasks = list(worker.tasks.values())
        if tasks:
            wait_s = worker._job_completion_wait if stopping else JOB_WAIT_ON_OUTAGE_S
            _, pending = await asyncio.wait(tasks, timeout=wait_s or None)
            for task in pending:
                task.cancel()
            # Jobs end with CancelledError or a Redis error: collected, not raised.
            await asyncio.gather(*tasks, return_exceptions=True)
        worker.tasks.clear()
        wctx = worker.ctx.pop(CTX_KEY, None)
        if wctx is not None:
            with contextlib.suppress(Exception):
                await close_context(wctx)
        pool: Any = worker._pool
        worker._pool = None
        if pool is None:
            return
        if stopping:
            # What arq's close() would do first: `herald worker --check` fails at once.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.settings.backend_timeout_s):
                    await pool.delete(WORKER_HEALTH_KEY)
        with contextlib.suppress(Exception):
            await close_redis(pool)  # the Sentinel connections too, when there are any
