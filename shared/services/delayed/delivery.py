"""Delivering due delayed messages (the worker's side), exactly once.

A batch of due rows is locked with ``FOR UPDATE SKIP LOCKED``; in the same transaction
each row is either posted (``insert_messages``) and marked delivered, or marked failed
with its reason. A second worker skips the locked rows; a worker killed mid-batch rolls
the whole batch back and the rows stay pending for the next job or sweep; a cancel waits
for the lock and then finds the row no longer pending. Messages are published only
after the commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.bus import EventBus
from shared.db.pool import Database, Row, Tx
from shared.errors import NotFound
from shared.metrics import Metrics
from shared.models import User
from shared.services.channels import visible_channel
from shared.services.messages import Posted, insert_messages
from shared.settings import Settings

logger = logging.getLogger(__name__)

BATCH_SIZE = 200
PARALLEL = 4
# A job stops draining after this long (the next tick or sweep goes on), so one job never
# runs into arq's job timeout under a constant stream of due messages.
MAX_DRAIN_S = 60.0

DUE_SQL = """
SELECT id, channel_id, author_id, body, deliver_at FROM delayed_messages
WHERE status = 'pending' AND deliver_at <= %s
ORDER BY deliver_at, id
LIMIT %s
FOR UPDATE SKIP LOCKED
"""

# Failure reasons a user sees on a failed delayed message.
TOO_LATE = "too_late"
CHANNEL_DELETED = "channel_deleted"
NOT_ALLOWED = "not_allowed"


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: int = 0
    batches: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, other: DeliveryReport) -> None:
        self.delivered += other.delivered
        self.failed += other.failed
        self.batches += other.batches
        for reason, n in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "batches": self.batches,
            "reasons": dict(self.reasons),
        }


class DeliveryService:
    def __init__(
        self,
        *,
        db: Database,
        bus: EventBus,
        settings: Settings,
        metrics: Metrics,
        batch_size: int = BATCH_SIZE,
        parallel: int = PARALLEL,
    ) -> None:
        self.db = db
        self.bus = bus
        self.settings = settings
        self.metrics = metrics
        self.batch_size = batch_size
        self.parallel = parallel

    async def deliver_due(self) -> DeliveryReport:
        """Deliver (or fail) every message due now, in parallel batches; returns counts."""
        # Every loop runs to its end even if one fails, then the first error is raised:
        # no loop is left running behind a job that already reported.
        results = await asyncio.gather(
            *(self._drain() for _ in range(self.parallel)), return_exceptions=True
        )
        total = DeliveryReport()
        for result in results:
            if isinstance(result, BaseException):
                raise result
            total.add(result)
        if total.delivered or total.failed:
            logger.info(
                "delayed messages: %d delivered, %d failed %s in %d batches",
                total.delivered,
                total.failed,
                total.reasons or "",
                total.batches,
            )
        return total

    async def _drain(self) -> DeliveryReport:
        report = DeliveryReport()
        deadline = time.monotonic() + MAX_DRAIN_S
        while time.monotonic() < deadline:
            batch, messages, taken = await self._deliver_batch()
            # Publish only after the commit: subscribers never see a rolled-back message.
            for stored in messages:
                await self.bus.message_posted(stored.message, stored.prev_id)
            report.add(batch)
            # Fewer rows than asked: the rest (if any) are locked by someone delivering them.
            if taken < self.batch_size:
                break
        return report

    async def _deliver_batch(self) -> tuple[DeliveryReport, list[Posted], int]:
        report = DeliveryReport()
        messages: list[Posted] = []
        delivered: list[tuple[int, int]] = []
        failed: list[tuple[int, str]] = []
        async with self.db.transaction() as tx:
            rows = await tx.fetch(DUE_SQL, (datetime.now(UTC), self.batch_size))
            if not rows:
                return report, messages, 0
            report.batches = 1
            allowed: dict[tuple[int, int], str | None] = {}
            to_post: list[Row] = []
            for row in rows:
                reason = self._lateness(row)
                if reason is None:
                    key = (row["author_id"], row["channel_id"])
                    if key not in allowed:
                        allowed[key] = await self._permission(tx, row)
                    reason = allowed[key]
                if reason is not None:
                    failed.append((row["id"], reason))
                else:
                    to_post.append(row)
            # One INSERT for the batch (per-channel locks in channel order, see
            # insert_messages); within a channel, ids follow the due order.
            to_post.sort(key=lambda r: (r["channel_id"], r["deliver_at"], r["id"]))
            posted = await insert_messages(
                tx, [(r["channel_id"], r["author_id"], r["body"]) for r in to_post]
            )
            for row, stored in zip(to_post, posted, strict=True):
                delivered.append((row["id"], stored.id))
                messages.append(stored)
            if delivered:
                await tx.execute(
                    "UPDATE delayed_messages d SET status = 'delivered', message_id = u.mid,"
                    " finished_at = clock_timestamp()"
                    " FROM unnest(%s::bigint[], %s::bigint[]) AS u(did, mid) WHERE d.id = u.did",
                    ([d for d, _ in delivered], [m for _, m in delivered]),
                )
            if failed:
                await tx.execute(
                    "UPDATE delayed_messages d SET status = 'failed', reason = u.reason,"
                    " finished_at = clock_timestamp()"
                    " FROM unnest(%s::bigint[], %s::text[]) AS u(did, reason) WHERE d.id = u.did",
                    ([d for d, _ in failed], [r for _, r in failed]),
                )
        report.delivered = len(delivered)
        report.failed = len(failed)
        for _, reason in failed:
            report.reasons[reason] = report.reasons.get(reason, 0) + 1
        self._count(report)
        return report, messages, len(rows)

    def _lateness(self, row: Row) -> str | None:
        late_s = (datetime.now(UTC) - row["deliver_at"]).total_seconds()
        if late_s > self.settings.delivery_max_lateness_s:
            logger.warning(
                "delayed message %s is %.0f s late (limit %d s): marked failed, not sent",
                row["id"],
                late_s,
                self.settings.delivery_max_lateness_s,
            )
            return TOO_LATE
        return None

    async def _permission(self, tx: Tx, row: Row) -> str | None:
        """Re-check at delivery that the author may still post in the channel."""
        author = await tx.fetchrow(
            "SELECT id, name, is_admin FROM users WHERE id = %s", (row["author_id"],)
        )
        if author is None:  # pragma: no cover - the row is deleted with its author
            return NOT_ALLOWED
        user = User(author["id"], author["name"], author["is_admin"])
        try:
            await visible_channel(tx, user, row["channel_id"])
        except NotFound:
            exists = await tx.fetchval("SELECT 1 FROM channels WHERE id = %s", (row["channel_id"],))
            return NOT_ALLOWED if exists else CHANNEL_DELETED
        return None

    def _count(self, report: DeliveryReport) -> None:
        if report.delivered:
            self.metrics.delayed_delivered.labels("delivered").inc(report.delivered)
            self.metrics.messages_posted.labels("delayed").inc(report.delivered)
        for reason, n in report.reasons.items():
            self.metrics.delayed_delivered.labels(f"failed_{reason}").inc(n)
