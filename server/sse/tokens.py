"""Revoked and expired tokens: their streams end, their cache entries go.

A stream remembers its token's id and expiry (``Stream.token_id``,
``Stream.token_expires_at``). It is closed with ``close`` reason ``revoked`` when:

* the token expires: checked in memory every ``EXPIRY_CHECK_S``;
* the token is revoked: the bus's ``TokenRevoked`` closes its streams at once, on every
  process. The bus may lose that event (PostgreSQL is the truth, see shared/bus.py), so
  every ``DB_CHECK_S`` this process also sweeps the recent revocations from PostgreSQL
  (one indexed statement, which re-deletes their token cache entries too: see
  shared/cache.py) and, while it has streams, asks which of their tokens are still
  valid (one statement per ``CHECK_BATCH`` distinct tokens), which also catches a
  revocation older than the sweep's window (a process cut off from PostgreSQL for a
  while) and tokens deleted with their user.

So a revoked token's requests and streams end within 2 s on every process, with or
without the bus. The work is per process, never per stream: the manager indexes its
streams by token (``by_token``) and keeps the expiring ones in a heap (``expiring``), so
a pass costs one step per distinct token or per expiry due, not one per open stream.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time

from server.sse.manager import StreamManager
from shared.bus import BusEvent, TokenRevoked
from shared.services.users import UserService
from shared.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

EXPIRY_CHECK_S = 0.25
DB_CHECK_S = 1.0
CHECK_BATCH = 1000


class TokenWatch:
    """Closes this process's streams whose token was revoked or has expired, and sweeps
    revoked tokens out of the cache."""

    def __init__(self, *, manager: StreamManager, users: UserService, timeout_s: float) -> None:
        self.manager = manager
        self.users = users
        self.timeout_s = timeout_s
        self.failing = False
        self._task: asyncio.Task[None] | None = None

    def on_event(self, event: BusEvent) -> None:
        """Bus listener: a revoked token's streams close now."""
        if isinstance(event, TokenRevoked):
            self.close_token(event.token_id)

    def close_token(self, token_id: int) -> int:
        """Close every open stream of ``token_id``; how many were."""
        held = self.manager.by_token.get(token_id, ())
        closing = [s for s in held if s.close_reason is None]
        for s in closing:
            self.manager.close(s, "revoked")
        if closing:
            logger.info("SSE: %d stream(s) of token %d closed: revoked", len(closing), token_id)
        return len(closing)

    def expire(self, now: float) -> int:
        """Close the streams whose token expired by ``now`` (unix seconds)."""
        heap, streams = self.manager.expiring, self.manager.streams
        closing = []
        while heap and heap[0][0] <= now:
            _, stream_id, s = heapq.heappop(heap)
            if streams.get(stream_id) is s and s.close_reason is None:
                closing.append(s)
        for s in closing:
            self.manager.close(s, "revoked")
        if closing:
            logger.info("SSE: %d stream(s) closed: their token expired", len(closing))
        return len(closing)

    async def check(self) -> int:
        """Ask PostgreSQL which open streams' tokens are still valid; close the others
        (revoked, expired by the database's clock, or deleted with their user)."""
        held = sorted(self.manager.by_token)
        closed = 0
        for i in range(0, len(held), CHECK_BATCH):
            batch = held[i : i + CHECK_BATCH]
            valid = await self.users.valid_token_ids(batch)
            for token_id in batch:
                if token_id not in valid:
                    closed += self.close_token(token_id)
        return closed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="herald-sse-tokens")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def sweep(self) -> None:
        """One pass against PostgreSQL: recent revocations, then the streams' tokens."""
        for token_id in await self.users.sweep_revocations():
            self.close_token(token_id)
        if self.manager.streams:
            await self.check()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            await asyncio.sleep(EXPIRY_CHECK_S)
            try:
                self.expire(time.time())
            except Exception:
                logger.exception("SSE token expiry check failed")
            if loop.time() < next_sweep:
                continue
            next_sweep = loop.time() + DB_CHECK_S
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # The stop's cancel became a timeout inside the sweep: still a stop.
                    raise asyncio.CancelledError from exc
                # The bus still closes revoked tokens' streams meanwhile; one line per
                # outage, not one per second.
                if not self.failing:
                    logger.warning("token sweep failed (%s); retrying", type(exc).__name__)
                    self.failing = True
            else:
                if self.failing:
                    logger.info("token sweep works again")
                    self.failing = False
