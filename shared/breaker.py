"""A small circuit breaker for an optional backend (the Redis cache and bus).

While Redis does not answer, every request would otherwise wait the whole
HERALD_BACKEND_TIMEOUT_S for it again. The breaker opens at the first failure or
timeout; while open, callers skip Redis at once (the cache reads PostgreSQL, a publish
is left to the feeds' reconciliation). After ``open_s`` one caller is let through as a
probe (half-open): its success closes the breaker, its failure opens it again for
another ``open_s``. Every other caller keeps skipping while the probe is out.

One breaker per process and backend, built by the process's wiring and passed to the
services that share that backend: never module state, so two apps in one process (as in
the tests) never see each other's outage.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
DEFAULT_OPEN_S = 3.0


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        open_s: float = DEFAULT_OPEN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.open_s = open_s
        self.clock = clock
        self.state = CLOSED
        self._opened_at = 0.0
        self.opened_total = 0  # times it went from closed to open (one per outage)

    def allow(self) -> bool:
        """May a caller use the backend now? Closed: yes. Open: no, until ``open_s`` has
        passed, then yes for exactly one probe; no for the others while it is out."""
        if self.state == CLOSED:
            return True
        # A probe that never reported (its caller was cancelled) counts as failed once
        # another ``open_s`` has passed, so the breaker cannot stay half-open for good.
        if self.clock() - self._opened_at >= self.open_s:
            self.state = HALF_OPEN
            self._opened_at = self.clock()
            return True
        return False

    def success(self) -> bool:
        """The backend answered; True if this closed the breaker (the outage is over)."""
        was_open = self.state != CLOSED
        self.state = CLOSED
        return was_open

    def failure(self) -> bool:
        """The backend failed or timed out; True if this opened a closed breaker."""
        was_closed = self.state == CLOSED
        self.state = OPEN
        self._opened_at = self.clock()
        if was_closed:
            self.opened_total += 1
        return was_closed

    @property
    def is_open(self) -> bool:
        return self.state != CLOSED
