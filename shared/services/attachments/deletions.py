"""Removing an attachment's file after its row left the users' view, and retrying that.

One attempt = lock the row (``deleting`` or ``delete_failed``), re-validate the path,
unlink, record the outcome and its audit entry in the same transaction. The server makes
the first attempt right after its commit; the worker retries on the backoff schedule; the
sweep (``retry_attachment_deletions``, also run by the orphan scan) retries what is left.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import dataclass
from typing import Any

from shared.db.pool import Database, Row, Tx
from shared.metrics import Metrics
from shared.services import audit
from shared.services.attachments.storage import PathRejected, Storage

logger = logging.getLogger(__name__)

# Delays before the worker's 1st, 2nd and 3rd retry. Read at call time (tests shrink it).
DELETE_RETRY_BACKOFF_S: tuple[float, ...] = (1.0, 2.0, 4.0)
# A row still ``deleting`` this long after its last change lost its retry job (a worker
# crash, Redis down at enqueue time); the sweep takes it over.
STALE_DELETING_S = 300
SWEEP_BATCH = 500

# Outcomes of one attempt.
REMOVED = "removed"
MISSING = "missing"
RETRY = "retry"
GAVE_UP = "gave_up"
REJECTED = "rejected"
SKIPPED = "skipped"

# Who makes an attempt.
SOURCE_REQUEST = "request"
SOURCE_WORKER = "worker"
SOURCE_SWEEP = "sweep"


def describe_os_error(exc: OSError) -> str:
    """An error text for the record: class, errno name and message, never a full path."""
    code = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{exc.__class__.__name__}" + (f" [{code}]" if code else "") + f": {text}"


def path_rejected_entry(
    metrics: Metrics,
    attachment_id: int,
    exc: PathRejected,
    details: dict[str, Any],
    *,
    actor_id: int | None = None,
    client_ip: str | None = None,
) -> audit.Entry:
    """Count a refused stored path and describe it for the audit trail (downloads,
    deletes and file-removal attempts alike)."""
    metrics.attachment_path_rejected.inc()
    return audit.Entry(
        audit.ATTACHMENT_PATH_REJECTED,
        "attachment",
        attachment_id,
        audit.DENIED,
        actor_id=actor_id,
        details={**details, "reason": str(exc)},
        client_ip=client_ip,
    )


@dataclass(slots=True)
class SweepSummary:
    candidates: int = 0
    removed: int = 0
    missing: int = 0
    failed: int = 0
    rejected: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "removed": self.removed,
            "missing": self.missing,
            "failed": self.failed,
            "rejected": self.rejected,
        }


class FileDeletions:
    def __init__(self, *, db: Database, storage: Storage, metrics: Metrics) -> None:
        self.db = db
        self.storage = storage
        self.metrics = metrics

    async def attempt(
        self,
        attachment_id: int,
        *,
        attempt: int,
        final: bool,
        source: str,
        retry_in_s: float | None = None,
    ) -> str:
        """Try to remove the file of a ``deleting``/``delete_failed`` row once; returns an
        outcome. With ``final``, a failure marks the row ``delete_failed``."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                "SELECT id, storage_key, state, delete_attempts FROM attachments"
                " WHERE id = %s AND state IN ('deleting', 'delete_failed') FOR UPDATE",
                (attachment_id,),
            )
            if row is None:
                return SKIPPED
            details: dict[str, Any] = {"attempt": attempt, "source": source}
            try:
                removed = await asyncio.to_thread(self.storage.unlink, row["storage_key"])
            except PathRejected as exc:
                await self.mark_failed(tx, row, f"path rejected: {exc}")
                await audit.append(
                    tx, path_rejected_entry(self.metrics, attachment_id, exc, details)
                )
                return REJECTED
            except OSError as exc:
                error = describe_os_error(exc)
                entries = [
                    audit.Entry(
                        audit.ATTACHMENT_FILE_DELETE_RETRY,
                        "attachment",
                        attachment_id,
                        audit.FAILED,
                        details={**details, "error": error}
                        | ({} if final else {"retry_in_s": retry_in_s}),
                    )
                ]
                if final:
                    await self.mark_failed(tx, row, error)
                    entries.append(
                        audit.Entry(
                            audit.ATTACHMENT_FILE_DELETE_FAILED,
                            "attachment",
                            attachment_id,
                            audit.FAILED,
                            details={"attempts": row["delete_attempts"] + 1, "error": error},
                        )
                    )
                    self.metrics.attachment_delete_failures.inc()
                else:
                    await tx.execute(
                        "UPDATE attachments SET delete_attempts = delete_attempts + 1,"
                        " delete_error = %s WHERE id = %s",
                        (error, attachment_id),
                    )
                await audit.append(tx, *entries)
                logger.warning(
                    "attachment %s: file removal failed (attempt %s, %s): %s",
                    attachment_id,
                    attempt,
                    source,
                    error,
                )
                return GAVE_UP if final else RETRY
            await tx.execute(
                "UPDATE attachments SET state = 'deleted', delete_error = NULL,"
                " delete_attempts = delete_attempts + 1, state_changed_at = now()"
                " WHERE id = %s",
                (attachment_id,),
            )
            # The request's own first attempt succeeding is already told by its
            # `attachment.delete` entry; everything else (retries, a file that vanished
            # between the check and the unlink) gets an entry of its own.
            if attempt > 0 or source != SOURCE_REQUEST or not removed:
                await audit.append(
                    tx,
                    audit.Entry(
                        audit.ATTACHMENT_FILE_DELETE_RETRY,
                        "attachment",
                        attachment_id,
                        audit.OK if removed else audit.MISSING,
                        details=details,
                    ),
                )
        logger.info(
            "attachment %s: file removed on attempt %s (%s)", attachment_id, attempt, source
        )
        return REMOVED if removed else MISSING

    async def mark_failed(self, tx: Tx, row: Row, error: str) -> None:
        """Keep the row, out of users' view, with the error for operators."""
        await tx.execute(
            "UPDATE attachments SET state = 'delete_failed', delete_error = %s,"
            " delete_attempts = delete_attempts + 1, state_changed_at = now() WHERE id = %s",
            (error[:2000], row["id"]),
        )

    async def pending(self, *, after_id: int, limit: int) -> list[Row]:
        """Rows the sweep should retry: every ``delete_failed`` and stale ``deleting``."""
        return await self.db.fetch(
            "SELECT id, state, delete_error FROM attachments"
            " WHERE id > %s AND (state = 'delete_failed'"
            "   OR (state = 'deleting' AND state_changed_at < now() - make_interval(secs => %s)))"
            " ORDER BY id LIMIT %s",
            (after_id, STALE_DELETING_S, limit),
        )

    async def sweep(self, *, dry_run: bool = False) -> SweepSummary:
        """Retry every pending file removal once; with ``dry_run`` only count them."""
        summary = SweepSummary()
        after = 0
        while True:
            rows = await self.pending(after_id=after, limit=SWEEP_BATCH)
            if not rows:
                return summary
            for row in rows:
                after = row["id"]
                summary.candidates += 1
                if dry_run:
                    continue
                outcome = await self.attempt(row["id"], attempt=0, final=True, source=SOURCE_SWEEP)
                if outcome == REMOVED:
                    summary.removed += 1
                elif outcome == MISSING:
                    summary.missing += 1
                elif outcome == REJECTED:
                    summary.rejected += 1
                elif outcome == GAVE_UP:
                    summary.failed += 1
