"""Query monitoring: every statement timed, counted per statement, slow ones logged.

``Tx._run`` in :mod:`shared.db.pool` reports each statement here, so the server and the
worker both get it. Only the SQL template is looked at, never the parameters; literals
typed into the template (``pg_sleep(0.06)``) are normalised away too.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.metrics import Metrics

logger = logging.getLogger(__name__)

# Upper bounds (ms) of the per-statement latency histogram; the last bucket is open.
BUCKETS_MS: tuple[float, ...] = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# `degraded` looks at the statements of the last WINDOW_S seconds (at most WINDOW_MAX of
# them): it turns true when at least MIN_STATEMENTS ran and SLOW_SHARE of them were slow.
WINDOW_S = 60.0
WINDOW_MAX = 10_000
MIN_STATEMENTS = 20
SLOW_SHARE = 0.05
# A statement that is slow again within this many seconds is counted, not logged again;
# the next line it gets reports how many were folded into it.
SLOW_LOG_INTERVAL_S = 10.0
# Herald's SQL comes from constants, so there are a few dozen distinct statements; the
# cap only guards against a caller that builds SQL dynamically.
MAX_STATEMENTS = 500
OVERFLOW_TEXT = "(other statements)"
RAW_CACHE_MAX = 2000
TEXT_MAX = 500

_STRING = re.compile(r"'(?:[^']|'')*'")
_DOLLAR = re.compile(r"\$([A-Za-z_]*)\$.*?\$\1\$", re.DOTALL)
_NUMBER = re.compile(r"(?<![\w$%.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")
_LINE_COMMENT = re.compile(r"--[^\n]*")
_SPACE = re.compile(r"\s+")


def normalise(sql: str) -> str:
    """The statement's shape: comments dropped, literals as ``?``, whitespace collapsed.
    Placeholders (``%s``, ``%(name)s``) stay: they are where the parameters go."""
    text = _LINE_COMMENT.sub(" ", sql)
    text = _DOLLAR.sub("?", text)
    text = _STRING.sub("?", text)
    text = _NUMBER.sub("?", text)
    text = _SPACE.sub(" ", text).strip()
    return text[:TEXT_MAX]


def statement_id(text: str) -> str:
    """A short, stable label for a normalised statement: its verb and a hash."""
    verb = text.split(" ", 1)[0].lower() if text else "empty"
    if not verb.isalpha():
        verb = "other"
    digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"{verb}_{digest}"


@dataclass(slots=True)
class QueryScope:
    """Statements run inside one :func:`query_scope` (one HTTP request, say), including
    those of tasks it started: they inherit the context, so a shared cache load counts
    for the request that started it."""

    statements: int = 0
    ms: float = 0.0


_SCOPE: ContextVar[QueryScope | None] = ContextVar("herald_query_scope", default=None)


@contextmanager
def query_scope() -> Iterator[QueryScope]:
    """Count the statements run in this context (and tasks created in it) until exit."""
    scope = QueryScope()
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


@dataclass(slots=True)
class StatementStats:
    """Counters for one normalised statement."""

    id: str
    text: str
    calls: int = 0
    errors: int = 0
    slow: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_MS) + 1))
    # Slow-log rate limiting: when the last line was written and how many were folded.
    last_logged: float = float("-inf")
    folded: int = 0

    def observe(self, ms: float) -> None:
        self.calls += 1
        self.total_ms += ms
        self.max_ms = max(self.max_ms, ms)
        for i, bound in enumerate(BUCKETS_MS):
            if ms <= bound:
                self.buckets[i] += 1
                return
        self.buckets[-1] += 1

    def p95_ms(self) -> float | None:
        """The 95th percentile as the upper bound of its histogram bucket."""
        if not self.calls:
            return None
        rank = 0.95 * self.calls
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return BUCKETS_MS[i] if i < len(BUCKETS_MS) else self.max_ms
        return self.max_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "statement": self.text,
            "calls": self.calls,
            "errors": self.errors,
            "slow": self.slow,
            "mean_ms": round(self.total_ms / self.calls, 3) if self.calls else None,
            "max_ms": round(self.max_ms, 3),
            "p95_ms": self.p95_ms(),
        }


class QueryMonitor:
    """Times every statement; one per process, shared by every pool of that process."""

    def __init__(
        self,
        *,
        slow_ms: float,
        metrics: Metrics,
        window_s: float = WINDOW_S,
        min_statements: int = MIN_STATEMENTS,
        slow_share: float = SLOW_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slow_ms = slow_ms
        self.metrics = metrics
        self.window_s = window_s
        self.min_statements = min_statements
        self.slow_share = slow_share
        self.clock = clock
        self.queries_total = 0
        self.errors_total = 0
        self.slow_total = 0
        self.degraded = False
        # Per-request figures (server only): requests seen and the statements they ran;
        # background loops run outside any request and are not in these two.
        self.requests_total = 0
        self.request_statements_total = 0
        # Normalised text → its counters; raw SQL string → the same object (a shortcut).
        self.statements: dict[str, StatementStats] = {}
        self._by_raw: dict[str, StatementStats] = {}
        # (monotonic time, duration ms, slow?) of recent statements, oldest first.
        self._window: deque[tuple[float, float, bool]] = deque()
        self._window_slow = 0

    # -- recording ---------------------------------------------------------------------
    def record(self, sql: str, seconds: float, *, failed: bool = False) -> None:
        """Account one finished (or failed) statement that took ``seconds``."""
        ms = seconds * 1000.0
        scope = _SCOPE.get()
        if scope is not None:
            scope.statements += 1
            scope.ms += ms
        stats = self._stats(sql)
        stats.observe(ms)
        self.queries_total += 1
        if failed:
            stats.errors += 1
            self.errors_total += 1
        is_slow = ms > self.slow_ms
        now = self.clock()
        if is_slow:
            stats.slow += 1
            self.slow_total += 1
            self._log_slow(stats, ms, now)
        self.metrics.db_query_seconds.labels(stats.id).observe(seconds)
        if failed:
            self.metrics.db_query_errors.labels(stats.id).inc()
        if is_slow:
            self.metrics.db_slow_queries.labels(stats.id).inc()
        self._window.append((now, ms, is_slow))
        self._window_slow += is_slow
        self._prune(now)
        self._evaluate()

    def _stats(self, sql: str) -> StatementStats:
        stats = self._by_raw.get(sql)
        if stats is not None:
            return stats
        text = normalise(sql)
        stats = self.statements.get(text)
        if stats is None:
            if len(self.statements) >= MAX_STATEMENTS:
                text = OVERFLOW_TEXT
                stats = self.statements.get(text)
            if stats is None:
                stats = StatementStats(id=statement_id(text), text=text)
                self.statements[text] = stats
                # The id is all the metrics carry; this line says what it stands for.
                logger.debug("statement %s: %s", stats.id, text)
        # Raw strings are remembered only up to a bound: SQL built with literals in it
        # would otherwise grow this map without end (it is then normalised every time).
        if len(self._by_raw) < RAW_CACHE_MAX:
            self._by_raw[sql] = stats
        return stats

    def _log_slow(self, stats: StatementStats, ms: float, now: float) -> None:
        if now - stats.last_logged < SLOW_LOG_INTERVAL_S:
            stats.folded += 1
            return
        folded, stats.folded, stats.last_logged = stats.folded, 0, now
        logger.warning(
            "slow query %.1f ms (threshold %g ms) [%s]%s: %s",
            ms,
            self.slow_ms,
            stats.id,
            f" (+{folded} more slow since last report)" if folded else "",
            stats.text,
        )

    def _prune(self, now: float) -> None:
        window = self._window
        horizon = now - self.window_s
        while window and (window[0][0] < horizon or len(window) > WINDOW_MAX):
            _, _, was_slow = window.popleft()
            self._window_slow -= was_slow

    def _evaluate(self) -> None:
        n = len(self._window)
        share = self._window_slow / n if n else 0.0
        degraded = n >= self.min_statements and share >= self.slow_share
        if degraded == self.degraded:
            return
        self.degraded = degraded
        self.metrics.db_degraded.set(1 if degraded else 0)
        if degraded:
            logger.error(
                "ALERT database degraded: %d of the last %d statements (%.0f%%) took longer"
                " than %g ms (alert at %.0f%% over %gs)",
                self._window_slow,
                n,
                share * 100,
                self.slow_ms,
                self.slow_share * 100,
                self.window_s,
            )
        else:
            logger.warning(
                "database recovered: %d of the last %d statements slow", self._window_slow, n
            )

    def request_done(self, route: str, scope: QueryScope) -> None:
        """Account a finished request's statements (N+1 regressions show up here)."""
        self.requests_total += 1
        self.request_statements_total += scope.statements
        self.metrics.db_statements_per_request.labels(route).observe(scope.statements)

    # -- reading -----------------------------------------------------------------------
    def refresh(self) -> None:
        """Drop statements that left the window (an idle process recovers by itself)."""
        self._prune(self.clock())
        self._evaluate()

    def p95_ms(self) -> float | None:
        """The 95th percentile duration of the statements in the recent window."""
        self.refresh()
        if not self._window:
            return None
        durations = sorted(ms for _, ms, _ in self._window)
        # Nearest-rank percentile: the smallest value with 95 % of the others at or below.
        rank = max(0, math.ceil(0.95 * len(durations)) - 1)
        return round(durations[rank], 3)

    def window_stats(self) -> dict[str, Any]:
        self.refresh()
        n = len(self._window)
        return {
            "seconds": self.window_s,
            "statements": n,
            "slow": self._window_slow,
            "slow_share": round(self._window_slow / n, 4) if n else 0.0,
            "alert_share": self.slow_share,
        }

    def top(self, n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` statements that took the most time in total."""
        ranked = sorted(self.statements.values(), key=lambda s: s.total_ms, reverse=True)[:n]
        return [s.to_json() for s in ranked]

    def snapshot(self) -> dict[str, Any]:
        """The ``/health`` → ``db`` figures (the contract's five fields, then extras)."""
        p95 = self.p95_ms()
        return {
            "queries_total": self.queries_total,
            "slow_queries_total": self.slow_total,
            "slow_threshold_ms": self.slow_ms,
            "p95_ms": p95,
            "degraded": self.degraded,
            "errors_total": self.errors_total,
            "statements_per_request": (
                round(self.request_statements_total / self.requests_total, 3)
                if self.requests_total
                else None
            ),
            "window": self.window_stats(),
            "top_statements": self.top(),
        }
