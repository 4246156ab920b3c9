"""Prometheus metrics. Each process (and each test app) owns its own registry.

Counters, histograms and gauges of state only: rates and averages are Prometheus's
work (``rate()``, ``avg_over_time()``), so none is exported pre-computed; ``/health``
computes its own from the same counters and samples. No label carries free text (SQL,
paths, addresses): a statement is named by its fingerprint id, whose text is logged.
"""

from __future__ import annotations

import importlib.metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


def herald_version() -> str:
    """The installed package's version (its metadata), or "unknown" when not installed."""
    try:
        return importlib.metadata.version("herald")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class SharedFigures(Collector):
    """Figures another process owns (read from PostgreSQL/Redis by a refresher), exported
    as last read, so every server process reports the same numbers. Names ending in
    ``_total`` are exported as counters, the rest as gauges."""

    def __init__(self, help_texts: dict[str, str]) -> None:
        self.help_texts = help_texts
        self.values: dict[str, float] = {}

    def set(self, name: str, value: float) -> None:
        self.values[name] = float(value)

    def collect(self) -> list[Metric]:
        out: list[Metric] = []
        for name, help_text in self.help_texts.items():
            if name not in self.values:
                continue
            value = self.values[name]
            if name.endswith("_total"):
                out.append(CounterMetricFamily(name[: -len("_total")], help_text, value))
            else:
                out.append(GaugeMetricFamily(name, help_text, value))
        return out


class Tally:
    """A Prometheus counter and the figure /health shows, moved by one call, so the two
    never disagree. For a labelled counter, ``inc(label)`` and ``tally[label]``."""

    __slots__ = ("_children", "counter", "values")

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.values: dict[str, int] = {}
        self._children: dict[str, Counter] = {}

    def inc(self, label: str = "", n: int = 1) -> None:
        if n <= 0:
            return
        self.values[label] = self.values.get(label, 0) + n
        child = self._children.get(label)
        if child is None:
            child = self._children[label] = self.counter.labels(label) if label else self.counter
        child.inc(n)

    def __getitem__(self, label: str) -> int:
        return self.values.get(label, 0)

    @property
    def total(self) -> int:
        return sum(self.values.values())

    def by_label(self) -> dict[str, int]:
        return dict(sorted(self.values.items()))


QUEUE_FIGURES = {
    "herald_delayed_queue_size": "Pending delayed messages, all users",
    "herald_delayed_queue_max_size": "HERALD_QUEUE_MAX",
    "herald_delayed_queue_max_seen": "Largest number of pending delayed messages seen",
    "herald_delayed_queue_alert": "1 while the queue size is at or over HERALD_QUEUE_ALERT",
    "herald_delayed_cleanup_runs_total": "Delayed-message cleanup runs finished",
    "herald_delayed_cleanup_failures_total": "Delayed-message cleanup runs that failed",
    "herald_delayed_cleanup_deleted_total": "Delayed messages deleted by cleanup",
    "herald_delayed_cleanup_last_deleted": "Rows deleted by the last cleanup run",
    "herald_delayed_cleanup_last_run_timestamp_seconds": "When the last cleanup run finished",
}


class Metrics:
    """The collectors Herald exports; built once per process and passed down."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # What every process exports: its build, and the client library's standard
        # process_* (CPU, memory, descriptors) and python_* (GC, version) families.
        self.build_info = Gauge(
            "herald_build_info", "Herald's version (value 1)", ["version"], registry=r
        )
        self.build_info.labels(herald_version()).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # HTTP (server/middlewares.py): `route` is the route template ("(unmatched)" when
        # none matched), `status` the class ("2xx".."5xx"), so neither grows with traffic.
        self.http_requests = Counter(
            "herald_http_requests",
            "HTTP requests answered, by method, route template and status class",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "herald_http_request_duration_seconds",
            "Time to answer an HTTP request (a stream: until it is open), by route template",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.auth_failures = Counter(
            "herald_auth_failures", "Requests with a bad bearer token", registry=r
        )
        self.auth_throttled = Counter(
            "herald_auth_throttled",
            "Requests refused 429 too_many_auth_failures (HERALD_AUTH_FAIL_LIMIT)",
            registry=r,
        )
        self.messages_posted = Counter(
            "herald_messages_posted",
            "Messages stored, by how (rest: POST; delayed: a delayed message delivered)",
            ["source"],
            registry=r,
        )
        self.events_received = Counter(
            "herald_bus_events_received", "Events read from the Redis bus", ["type"], registry=r
        )
        self.sse_active = Gauge("herald_sse_active", "Open SSE streams", registry=r)
        self.sse_peak = Gauge("herald_sse_peak", "Most SSE streams open at once", registry=r)
        self.sse_opened = Counter("herald_sse_opened", "SSE streams opened", registry=r)
        self.sse_rejected = Counter(
            "herald_sse_rejected", "SSE streams refused by a limit", ["kind"], registry=r
        )
        self.sse_closed = Counter(
            "herald_sse_closed",
            "SSE streams ended, by reason (gone: the client left)",
            ["reason"],
            registry=r,
        )
        # The limits themselves, so alerts can say "near the limit" without knowing them.
        self.sse_limit = Gauge(
            "herald_sse_limit",
            "Configured stream limits (global: HERALD_SSE_MAX_CONNECTIONS, per_ip)",
            ["kind"],
            registry=r,
        )
        self.sse_busiest_ip = Gauge(
            "herald_sse_busiest_ip_streams",
            "Streams open on this process from the address holding the most",
            registry=r,
        )
        self.sse_stale_active = Gauge(
            "herald_sse_stale_active", "Stale streams found and not yet gone", registry=r
        )
        self.sse_events_sent = Counter(
            "herald_sse_events_sent", "Events written to SSE streams", ["event"], registry=r
        )
        self.sse_replayed = Counter(
            "herald_sse_replayed_messages", "Messages replayed after Last-Event-ID", registry=r
        )
        self.sse_resets = Counter(
            "herald_sse_resets", "Reconnects that missed too much and got a reset", registry=r
        )
        self.sse_slow_consumers = Counter(
            "herald_sse_slow_consumers", "Streams closed as slow consumers", registry=r
        )
        self.sse_stale_detected = Counter(
            "herald_sse_stale_detected", "Streams found stale", registry=r
        )
        self.sse_ip_leases_unavailable = Counter(
            "herald_sse_ip_leases_unavailable",
            "Stream requests let through on this process's own per-IP count (Redis away)",
            registry=r,
        )
        self.sse_subscriptions = Counter(
            "herald_sse_subscriptions",
            "Channels added to (subscribed) or dropped from (unsubscribed) open streams",
            ["event"],
            registry=r,
        )
        # Live delivery's per-channel feeds (server/sse/feeds.py).
        self.sse_feed_events = Counter(
            "herald_sse_feed_events",
            "Bus message events by what the feed made of them (in_order, gap, duplicate)",
            ["kind"],
            registry=r,
        )
        self.sse_feed_filled = Counter(
            "herald_sse_feed_filled_messages",
            "Messages a feed read from PostgreSQL because the bus did not bring them in order",
            registry=r,
        )
        self.sse_feed_resets = Counter(
            "herald_sse_feed_resets", "Channels that missed too much and were reset", registry=r
        )
        self.sse_feed_errors = Counter(
            "herald_sse_feed_errors", "Failed reconcile or fill passes", registry=r
        )
        self.fanout_seconds = Histogram(
            "herald_sse_fanout_seconds",
            "Time to hand one bus event to every local stream",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        # Query monitoring (shared/db/monitor.py). `statement` is a short id (verb + hash
        # of the normalised SQL); the monitor logs each id's SQL text once, at first sight.
        self.db_query_seconds = Histogram(
            "herald_db_query_seconds",
            "Duration of each database statement",
            ["statement"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.db_slow_queries = Counter(
            "herald_db_slow_queries",
            "Statements slower than HERALD_SLOW_QUERY_MS",
            ["statement"],
            registry=r,
        )
        self.db_query_errors = Counter(
            "herald_db_query_errors", "Statements that raised", ["statement"], registry=r
        )
        self.db_statements_per_request = Histogram(
            "herald_db_statements_per_request",
            "Database statements one HTTP request ran, by route",
            ["route"],
            buckets=(0, 1, 2, 3, 5, 8, 13, 21, 50, 100, 1000),
            registry=r,
        )
        self.db_degraded = Gauge(
            "herald_db_degraded",
            "1 while the recent share of slow statements is too high",
            registry=r,
        )
        # Redis metadata cache (shared/cache.py); `kind` is channel or user.
        self.cache_hits = Counter("herald_cache_hits", "Cache hits", ["kind"], registry=r)
        self.cache_misses = Counter("herald_cache_misses", "Cache misses", ["kind"], registry=r)
        self.cache_invalidations = Counter(
            "herald_cache_invalidations", "Cache entries invalidated", ["kind"], registry=r
        )
        self.cache_errors = Counter(
            "herald_cache_errors", "Redis errors the cache fell back from", ["op"], registry=r
        )
        self.cache_lock_waits = Counter(
            "herald_cache_lock_waits", "Misses that waited for another loader", registry=r
        )
        # Attachments (shared/services/attachments.py, file_deletions.py, orphans.py).
        self.attachment_uploads = Counter(
            "herald_attachment_uploads", "Attachments stored", registry=r
        )
        self.attachment_upload_bytes = Counter(
            "herald_attachment_upload_bytes", "Bytes of attachments stored", registry=r
        )
        self.attachment_deletes = Counter(
            "herald_attachment_deletes", "Attachment delete requests", ["result"], registry=r
        )
        self.attachment_delete_failures = Counter(
            "herald_attachment_delete_failures",
            "Attachment files left after the last retry (marked delete_failed)",
            registry=r,
        )
        self.attachment_path_rejected = Counter(
            "herald_attachment_path_rejected",
            "Stored paths refused (outside the upload root, symlink, not a file)",
            registry=r,
        )
        self.orphan_files = Counter(
            "herald_orphan_files", "Orphan files found by the scan", ["result"], registry=r
        )
        self.observe_only = Counter(
            "herald_observe_only",
            "Refusals a protective rule would have made, let through (HERALD_OBSERVE_ONLY)",
            ["rule"],
            registry=r,
        )

        # Delayed messages: this process's own counts, plus the queue figures every
        # process shares (refreshed from PostgreSQL/Redis by shared/services/queue_stats.py).
        self.delayed_scheduled = Counter(
            "herald_delayed_scheduled", "Delayed messages accepted by this process", registry=r
        )
        self.delayed_rejected = Counter(
            "herald_delayed_rejected",
            "Delayed messages refused by a queue cap",
            ["reason"],
            registry=r,
        )
        self.delayed_delivered = Counter(
            "herald_delayed_delivered",
            "Delayed messages this worker finished, by outcome",
            ["outcome"],
            registry=r,
        )
        self.queue_figures = SharedFigures(QUEUE_FIGURES)
        r.register(self.queue_figures)

    @classmethod
    def null(cls) -> Metrics:
        """Metrics nothing exports, for tests and callers with nowhere to report. Real
        collectors on a registry of their own rather than no-op stand-ins: every call a
        service makes is accepted, and no second class has to mirror the attributes."""
        return cls(CollectorRegistry())

    def render(self) -> bytes:
        return generate_latest(self.registry)
