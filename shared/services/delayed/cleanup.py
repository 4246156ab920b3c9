"""Delayed-message cleanup: finished rows past the retention, deleted in short batches.

Each batch is its own transaction (its row locks live only that long), takes rows with
SKIP LOCKED (never waits on a delivery or a cancel, and two runs never collide), and has
a statement timeout. Every run is recorded: started, finished, deleted, batches,
duration, the longest batch, success or the error; running totals feed /health.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2

from shared.db.pool import Database
from shared.errors import BackendUnavailable
from shared.models import iso

logger = logging.getLogger(__name__)

DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
# Run records are history for operators; the totals row keeps the all-time figures.
RUN_HISTORY_DAYS = 30

FINISHED_OLD = "status <> 'pending' AND finished_at < %s"
DELETE_BATCH_SQL = f"""
DELETE FROM delayed_messages WHERE id IN (
    SELECT id FROM delayed_messages WHERE {FINISHED_OLD}
    ORDER BY finished_at LIMIT %s FOR UPDATE SKIP LOCKED)
"""


def describe_error(exc: BaseException) -> str:
    """The error class, plus PostgreSQL's primary message (never connection details)."""
    name = exc.__class__.__name__
    if isinstance(exc, psycopg2.Error) and exc.diag.message_primary:
        return f"{name}: {exc.diag.message_primary}"[:500]
    return name


def query_canceled(exc: asyncio.CancelledError) -> BaseException | None:
    """aiopg raises ``CancelledError`` for PostgreSQL's QueryCanceled (a statement
    timeout): return that original error, or None for a real cancellation of our task."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return None
    original = exc.__context__
    return original if isinstance(original, psycopg2.extensions.QueryCanceledError) else None


class CleanupService:
    def __init__(
        self,
        *,
        db: Database,
        retention_s: int,
        batch_size: int,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    ) -> None:
        self.db = db
        self.retention_s = retention_s
        self.batch_size = batch_size
        self.statement_timeout_ms = statement_timeout_ms

    async def run(self, *, dry_run: bool = False, job_id: str | None = None) -> dict[str, Any]:
        """Delete finished rows older than the retention, batch by batch, and record the
        run. Never raises for a database error: the run is recorded as failed."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.retention_s)
        if dry_run:
            return await self._dry_run(cutoff)
        run_id = await self.db.fetchval(
            "INSERT INTO delayed_cleanup_runs (job_id) VALUES (%s) RETURNING id", (job_id,)
        )
        start = time.perf_counter()
        deleted = batches = 0
        max_batch_ms = 0.0
        error: str | None = None
        try:
            while True:
                batch_start = time.perf_counter()
                async with self.db.transaction() as tx:
                    await tx.execute(
                        "SELECT set_config('statement_timeout', %s, true)",
                        (str(self.statement_timeout_ms),),
                    )
                    n = await tx.execute(DELETE_BATCH_SQL, (cutoff, self.batch_size))
                max_batch_ms = max(max_batch_ms, (time.perf_counter() - batch_start) * 1000)
                if n == 0:
                    break
                batches += 1
                deleted += n
                if n < self.batch_size:
                    break
        except asyncio.CancelledError as exc:
            original = query_canceled(exc)
            if original is None:
                raise
            error = describe_error(original)
        except (psycopg2.Error, OSError, TimeoutError, BackendUnavailable) as exc:
            error = describe_error(exc)
        if error is not None:
            logger.error(
                "delayed-message cleanup run %s failed after %d batches: %s",
                run_id,
                batches,
                error,
            )
        duration_ms = round((time.perf_counter() - start) * 1000, 3)
        status = "failed" if error else "succeeded"
        await self._finish(run_id, status, deleted, batches, duration_ms, max_batch_ms, error)
        if error is None:
            # A run that deleted nothing is routine (every 5 minutes): DEBUG.
            logger.log(
                logging.INFO if deleted else logging.DEBUG,
                "delayed-message cleanup run %s: deleted %d in %d batches, %.0f ms",
                run_id,
                deleted,
                batches,
                duration_ms,
            )
        return {
            "run_id": run_id,
            "status": status,
            "dry_run": False,
            "deleted": deleted,
            "batches": batches,
            "duration_ms": duration_ms,
            "max_batch_ms": round(max_batch_ms, 3),
            "error": error,
            "cutoff": iso(cutoff),
        }

    async def _dry_run(self, cutoff: datetime) -> dict[str, Any]:
        start = time.perf_counter()
        would = int(
            await self.db.fetchval(
                f"SELECT count(*) FROM delayed_messages WHERE {FINISHED_OLD}", (cutoff,)
            )
        )
        return {
            "run_id": None,
            "status": "dry_run",
            "dry_run": True,
            "deleted": 0,
            "would_delete": would,
            "batches": math.ceil(would / self.batch_size),
            "duration_ms": round((time.perf_counter() - start) * 1000, 3),
            "max_batch_ms": 0.0,
            "error": None,
            "cutoff": iso(cutoff),
        }

    async def _finish(
        self,
        run_id: int,
        status: str,
        deleted: int,
        batches: int,
        duration_ms: float,
        max_batch_ms: float,
        error: str | None,
    ) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE delayed_cleanup_runs SET finished_at = now(), status = %s, deleted = %s,"
                " batches = %s, duration_ms = %s, max_batch_ms = %s, error = %s WHERE id = %s",
                (status, deleted, batches, duration_ms, max_batch_ms, error, run_id),
            )
            await tx.execute(
                "INSERT INTO delayed_cleanup_totals AS t (id, runs, failures, deleted_total)"
                " VALUES (true, 1, %s, %s) ON CONFLICT (id) DO UPDATE SET runs = t.runs + 1,"
                " failures = t.failures + EXCLUDED.failures,"
                " deleted_total = t.deleted_total + EXCLUDED.deleted_total",
                (1 if status == "failed" else 0, deleted),
            )
            await tx.execute(
                "DELETE FROM delayed_cleanup_runs WHERE started_at < now() - %s * interval '1 day'",
                (RUN_HISTORY_DAYS,),
            )


async def cleanup_summary(db: Database) -> dict[str, Any]:
    """The contract's ``queue.cleanup`` figures (plus ``last_status``) in two cheap reads."""
    async with db.connection() as tx:
        totals = await tx.fetchrow(
            "SELECT runs, failures, deleted_total FROM delayed_cleanup_totals WHERE id"
        )
        last = await tx.fetchrow(
            "SELECT finished_at, deleted, status FROM delayed_cleanup_runs"
            " WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1"
        )
    runs = int(totals["runs"]) if totals else 0
    failures = int(totals["failures"]) if totals else 0
    return {
        "runs": runs,
        "failures": failures,
        "success_rate": round((runs - failures) / runs, 4) if runs else None,
        "last_run_at": iso(last["finished_at"]) if last else None,
        "last_deleted": int(last["deleted"]) if last else 0,
        "deleted_total": int(totals["deleted_total"]) if totals else 0,
        "last_status": last["status"] if last else None,
    }
