"""Admission to the bounded delayed-message queue: exact caps at a high request rate.

The caps must hold under any concurrency, so the count and the insert form one critical
section: a transaction-scoped advisory lock, held through COMMIT, serialises admissions
across every server process. Held that long, one request per transaction would cap the
rate at one commit at a time. So each process coalesces: requests that arrive while a
batch is being admitted wait for the next batch, and one transaction admits a whole
batch — one lock, one count per cap, one multi-row INSERT, one commit — deciding the
requests in arrival order against exact running counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from shared.constants import AdvisoryLock
from shared.db.pool import Database, Row, Tx
from shared.enforcement import QUEUE_CAPS, Enforcement
from shared.errors import RetryLater
from shared.metrics import Metrics
from shared.services.delayed.queue_stats import QueueStats
from shared.settings import Settings

logger = logging.getLogger(__name__)

MAX_BATCH = 200
MAX_RETRY_AFTER_S = 300

RETURNING = (
    "id, channel_id, author_id, body, deliver_at, status, reason, message_id,"
    " created_at, finished_at"
)


@dataclass
class Request:
    author_id: int
    channel_id: int
    body: str
    deliver_at: datetime
    future: asyncio.Future[Row] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def retry_after(earliest: datetime | None, now: datetime) -> int:
    """Seconds until the earliest pending message falls due (a slot frees then)."""
    if earliest is None:
        return 1
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil((earliest - now).total_seconds())))


class Admission:
    """Admits delayed messages in batches; ``admit`` answers the row or raises 429/503."""

    def __init__(
        self,
        *,
        db: Database,
        settings: Settings,
        metrics: Metrics,
        stats: QueueStats,
        enforcement: Enforcement,
    ) -> None:
        self.db = db
        self.enforcement = enforcement
        self.settings = settings
        self.metrics = metrics
        self.stats = stats
        self.waiting: list[Request] = []
        self.task: asyncio.Task[None] | None = None

    async def admit(self, author_id: int, channel_id: int, body: str, deliver_at: datetime) -> Row:
        """Insert the message if both caps allow it (checked before adding)."""
        request = Request(author_id, channel_id, body, deliver_at)
        self.waiting.append(request)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="delayed-admission")
        return await request.future

    async def close(self) -> None:
        """Let the batch in flight finish (nothing new is queued once serving stopped)."""
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        while self.waiting:
            batch = [r for r in self.waiting[:MAX_BATCH] if not r.future.done()]
            del self.waiting[:MAX_BATCH]
            if not batch:
                continue
            try:
                await self._admit_batch(batch)
            except BaseException as exc:
                # Every caller gets an answer, whatever happened to the batch.
                failed = batch + (self.waiting if isinstance(exc, asyncio.CancelledError) else [])
                for request in failed:
                    if not request.future.done():
                        request.future.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError("admission stopped")
                        )
                if not isinstance(exc, Exception):
                    self.waiting.clear()
                    raise

    async def _admit_batch(self, batch: list[Request]) -> None:
        now = datetime.now(UTC)
        async with self.db.transaction() as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (AdvisoryLock.DELAYED_ADMISSION,))
            authors = sorted({r.author_id for r in batch})
            rows = await tx.fetch(
                "SELECT author_id, count(*) AS n FROM delayed_messages"
                " WHERE status = 'pending' AND author_id = ANY(%s) GROUP BY author_id",
                (authors,),
            )
            mine = {r["author_id"]: int(r["n"]) for r in rows}
            total = int(
                await tx.fetchval("SELECT count(*) FROM delayed_messages WHERE status = 'pending'")
            )
            accepted: list[Request] = []
            rejected: list[tuple[Request, str]] = []
            per_user, queue_max = self.settings.queue_max_per_user, self.settings.queue_max
            enforces = self.enforcement.enforces
            for request in batch:
                why = None
                if mine.get(request.author_id, 0) >= per_user:
                    why, cap = "too_many_pending", f"the per-user cap ({per_user})"
                elif total >= queue_max:
                    why, cap = "queue_full", f"the queue cap ({queue_max})"
                if why is not None and enforces(QUEUE_CAPS, f"a delayed message over {cap}"):
                    rejected.append((request, why))
                else:
                    accepted.append(request)
                    mine[request.author_id] = mine.get(request.author_id, 0) + 1
                    total += 1
            inserted = await self._insert(tx, accepted) if accepted else []
            errors = await self._rejections(tx, rejected, now) if rejected else []
        # ids come from one sequence in statement order: sorted ids match request order.
        for request, row in zip(accepted, sorted(inserted, key=lambda r: r["id"]), strict=True):
            request.future.set_result(row)
        for (request, _), error in zip(rejected, errors, strict=True):
            request.future.set_exception(error)
        if accepted:
            await self.stats.note_size(total)

    async def _insert(self, tx: Tx, accepted: list[Request]) -> list[Row]:
        return await tx.fetch(
            "INSERT INTO delayed_messages (channel_id, author_id, body, deliver_at)"
            " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::timestamptz[])"
            f" RETURNING {RETURNING}",
            (
                [r.channel_id for r in accepted],
                [r.author_id for r in accepted],
                [r.body for r in accepted],
                [r.deliver_at for r in accepted],
            ),
        )

    async def _rejections(
        self, tx: Tx, rejected: list[tuple[Request, str]], now: datetime
    ) -> list[RetryLater]:
        """One error per refused request, with Retry-After: when its cap frees a slot."""
        over_user = sorted({r.author_id for r, why in rejected if why == "too_many_pending"})
        earliest_mine: dict[int, datetime] = {}
        if over_user:
            rows = await tx.fetch(
                "SELECT author_id, min(deliver_at) AS at FROM delayed_messages"
                " WHERE status = 'pending' AND author_id = ANY(%s) GROUP BY author_id",
                (over_user,),
            )
            earliest_mine = {r["author_id"]: r["at"] for r in rows}
        earliest_any = None
        if any(why == "queue_full" for _, why in rejected):
            earliest_any = await tx.fetchval(
                "SELECT deliver_at FROM delayed_messages WHERE status = 'pending'"
                " ORDER BY deliver_at LIMIT 1"
            )
        errors = []
        for request, why in rejected:
            self.metrics.delayed_rejected.labels(why).inc()
            if why == "too_many_pending":
                errors.append(
                    RetryLater(
                        "you have the most pending delayed messages allowed"
                        f" ({self.settings.queue_max_per_user})",
                        code=why,
                        status=429,
                        retry_after=retry_after(earliest_mine.get(request.author_id), now),
                    )
                )
            else:
                errors.append(
                    RetryLater(
                        "the delayed-message queue is full; try again later",
                        code=why,
                        status=503,
                        retry_after=retry_after(earliest_any, now),
                    )
                )
        return errors
