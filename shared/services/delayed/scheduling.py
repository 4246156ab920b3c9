"""Delayed messages: scheduling under the queue caps, listing and cancelling.

The server only accepts, lists and cancels; the worker delivers (delayed_delivery.py) and
cleans up (delayed_cleanup.py). Lifecycle: pending → delivered | cancelled | failed.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from shared.constants import JOB_DELIVER_DELAYED, QUEUE_NAME, delivery_job_id
from shared.db.pool import Database, Row
from shared.errors import Conflict, NotFound, ValidationError
from shared.metrics import Metrics
from shared.models import User, iso
from shared.services.channels import visible_channel
from shared.services.delayed.admission import Admission
from shared.services.delayed.queue_stats import QueueStats
from shared.settings import Settings

logger = logging.getLogger(__name__)

STATUSES = ("pending", "delivered", "cancelled", "failed")
MAX_AHEAD_S = 30 * 24 * 3600
# Delivery jobs are per tick (ceil of deliver_at to 100 ms): messages due together share
# one job, and a message is at most one tick early in its job's eyes (never late).
TICK_MS = 100
RECENT_TICKS = 4096

# [0-9], not \d: \d also matches other scripts' digits, which int() would then accept.
RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
MAX_TIMESTAMP_CHARS = 40

DELAYED_COLUMNS = (
    "id, channel_id, author_id, body, deliver_at, status, reason, message_id,"
    " created_at, finished_at"
)


def parse_rfc3339(value: str) -> datetime:
    """A strict RFC 3339 date-time with an offset (``Z`` or ``±hh:mm``), as aware UTC."""
    m = RFC3339_RE.fullmatch(value) if len(value) <= MAX_TIMESTAMP_CHARS else None
    if m is None:
        raise ValidationError("deliver_at: must be an RFC 3339 date-time with an offset")
    year, month, day, hour, minute, second, frac, offset = m.groups()
    micro = int((frac or "0").ljust(6, "0")[:6])
    if offset in ("Z", "z"):
        tz: timezone = UTC
    else:
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise ValidationError("deliver_at: invalid UTC offset")
        sign = -1 if offset[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        # RFC 3339 allows a leap second (:60); PostgreSQL does not store one: round down.
        sec = min(int(second), 59)
        parsed = datetime(
            int(year), int(month), int(day), int(hour), int(minute), sec, micro, tzinfo=tz
        ).astimezone(UTC)
    except (ValueError, OverflowError):
        # OverflowError: valid as written, but out of datetime's range once in UTC.
        raise ValidationError("deliver_at: not a valid date-time") from None
    return parsed


def resolve_deliver_at(data: Mapping[str, Any], now: datetime) -> datetime:
    """``deliver_at`` (RFC 3339) or ``delay_seconds`` (a number), exactly one; in the
    future and at most 30 days ahead of ``now``."""
    has_at = data.get("deliver_at") is not None
    has_delay = data.get("delay_seconds") is not None
    if has_at == has_delay:
        raise ValidationError("give exactly one of deliver_at and delay_seconds")
    if has_at:
        raw = data["deliver_at"]
        if not isinstance(raw, str):
            raise ValidationError("deliver_at: must be an RFC 3339 string")
        when = parse_rfc3339(raw)
        if when <= now:
            raise ValidationError("deliver_at: must be in the future")
    else:
        delay = data["delay_seconds"]
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise ValidationError("delay_seconds: must be a number")
        # Range first: math.isfinite raises OverflowError on an int too large for a float.
        if delay > MAX_AHEAD_S:
            raise ValidationError(f"delay_seconds: at most {MAX_AHEAD_S} (30 days)")
        if delay <= 0 or not math.isfinite(delay):
            raise ValidationError("delay_seconds: must be greater than 0")
        when = now + timedelta(seconds=delay)
    if when > now + timedelta(seconds=MAX_AHEAD_S):
        raise ValidationError("deliver_at: at most 30 days ahead")
    return when


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
    ) -> None:
        self.db = db
        self.arq = arq
        self.settings = settings
        self.metrics = metrics
        self.stats = stats
        self.admission = Admission(db=db, settings=settings, metrics=metrics, stats=stats)
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
