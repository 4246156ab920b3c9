"""Delayed messages: scheduling under the queue caps, listing and cancelling.

The server only accepts, lists and cancels; the worker delivers (delayed_delivery.py) and
cleans up (delayed_cleanup.py). Lifecycle: pending → delivered | cancelled | failed.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from shared.constants import JOB_DELIVER_DELAYED, QUEUE_NAME, delivery_job_id
from shared.db.pool import Database, Row
from shared.enforcement import Enforcement
from shared.errors import Conflict, NotFound
from shared.metrics import Metrics
from shared.models import User, iso
from shared.services.channels import visible_channel
from shared.services.delayed.admission import Admission
from shared.services.delayed.queue_stats import QueueStats
from shared.settings import Settings

logger = logging.getLogger(__name__)

STATUSES = ("pending", "delivered", "cancelled", "failed")
# How far ahead a message may be scheduled (the handler checks it while parsing).
MAX_AHEAD_S = 30 * 24 * 3600
# Delivery jobs are per tick (ceil of deliver_at to 100 ms): messages due together share
# one job, and a message is at most one tick early in its job's eyes (never late).
TICK_MS = 100
RECENT_TICKS = 4096

DELAYED_COLUMNS = (
    "id, channel_id, author_id, body, deliver_at, status, reason, message_id,"
    " created_at, finished_at"
)


def delayed_json(row: Row) -> dict[str, Any]:
    """A delayed-message row as the API shows it."""
    return {
        "id": row["id"],
        "channel_id": row["channel_id"],
        "author_id": row["author_id"],
        "body": row["body"],
        "deliver_at": iso(row["deliver_at"]),
        "status": row["status"],
        "reason": row["reason"],
        "message_id": row["message_id"],
        "created_at": iso(row["created_at"]),
        "finished_at": iso(row["finished_at"]),
    }


def delivery_tick(deliver_at: datetime) -> tuple[str, datetime]:
    """The delivery job id and run time for a message due at ``deliver_at``."""
    tick_ms = math.ceil(deliver_at.timestamp() * 1000 / TICK_MS) * TICK_MS
    return delivery_job_id(tick_ms), datetime.fromtimestamp(tick_ms / 1000, UTC)


class DelayedMessageService:
    def __init__(
        self,
        *,
        db: Database,
        arq: ArqRedis,
        settings: Settings,
        metrics: Metrics,
        stats: QueueStats,
        enforcement: Enforcement | None = None,
    ) -> None:
        self.db = db
        self.arq = arq
        self.settings = settings
        self.metrics = metrics
        self.stats = stats
        self.admission = Admission(
            db=db,
            settings=settings,
            metrics=metrics,
            stats=stats,
            enforcement=enforcement or Enforcement(settings.observe_only, metrics),
        )
        # Tick jobs this process queued lately: a burst due at one moment costs one
        # enqueue, not one per message (a lost job is still caught by the sweep).
        self.recent_ticks: OrderedDict[str, None] = OrderedDict()

    async def schedule(
        self, user: User, channel_id: int, body: str, deliver_at: datetime
    ) -> dict[str, Any]:
        """Accept a message for later delivery: 429 over the user's cap, 503 over the
        global one (both checked before adding, race-free); then queue its tick job."""
        async with self.db.connection() as tx:
            await visible_channel(tx, user, channel_id)
        row = await self.admission.admit(user.id, channel_id, body, deliver_at)
        self.metrics.delayed_scheduled.inc()
        await self._enqueue_tick(row["id"], deliver_at)
        return delayed_json(row)

    async def close(self) -> None:
        await self.admission.close()

    async def _enqueue_tick(self, delayed_id: int, deliver_at: datetime) -> None:
        job_id, run_at = delivery_tick(deliver_at)
        if job_id in self.recent_ticks:
            return
        try:
            await self.arq.enqueue_job(
                JOB_DELIVER_DELAYED, _job_id=job_id, _defer_until=run_at, _queue_name=QUEUE_NAME
            )
        except (RedisError, OSError) as exc:
            # The row is committed: the worker's periodic sweep delivers it anyway.
            logger.warning(
                "delivery job for delayed message %s not queued (%s); the sweep will deliver it",
                delayed_id,
                exc.__class__.__name__,
            )
            return
        self.recent_ticks[job_id] = None
        if len(self.recent_ticks) > RECENT_TICKS:
            self.recent_ticks.popitem(last=False)

    async def list_own(
        self, user: User, *, status: str | None, limit: int, before: int | None
    ) -> list[dict[str, Any]]:
        """The caller's delayed messages, newest first (``before``: ids below it)."""
        conds = ["author_id = %s"]
        params: list[Any] = [user.id]
        if status is not None:
            conds.append("status = %s")
            params.append(status)
        if before is not None:
            conds.append("id < %s")
            params.append(before)
        rows = await self.db.fetch(
            f"SELECT {DELAYED_COLUMNS} FROM delayed_messages WHERE {' AND '.join(conds)}"
            " ORDER BY id DESC LIMIT %s",
            (*params, limit),
        )
        return [delayed_json(r) for r in rows]

    async def cancel(self, user: User, delayed_id: int) -> None:
        """Cancel a pending message of the caller's: 404 if not theirs, 409 if it is no
        longer pending. Waits on a delivery holding the row, so only one outcome wins."""
        async with self.db.transaction() as tx:
            done = await tx.fetchval(
                "UPDATE delayed_messages SET status = 'cancelled', finished_at = now()"
                " WHERE id = %s AND author_id = %s AND status = 'pending' RETURNING id",
                (delayed_id, user.id),
            )
            if done is not None:
                return
            status = await tx.fetchval(
                "SELECT status FROM delayed_messages WHERE id = %s AND author_id = %s",
                (delayed_id, user.id),
            )
        if status is None:
            raise NotFound("delayed message not found", code="delayed_message_not_found")
        raise Conflict(f"the delayed message is {status}, not pending", code="not_pending")
