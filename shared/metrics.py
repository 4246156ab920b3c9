"""Prometheus metrics. Each process (and each test app) owns its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """The collectors Herald exports; built once per process and passed down."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "herald_http_requests", "HTTP requests answered", ["method", "status"], registry=r
        )
        self.messages_posted = Counter(
            "herald_messages_posted", "Messages stored and published", registry=r
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
            "herald_sse_closed", "SSE streams closed by the server", ["reason"], registry=r
        )
        self.sse_stale_active = Gauge(
            "herald_sse_stale_active", "Stale streams found and not yet gone", registry=r
        )
        self.sse_new_per_s = Gauge(
            "herald_sse_new_per_second", "New SSE streams per second (sliding window)", registry=r
        )
        self.sse_events_sent = Counter(
            "herald_sse_events_sent", "Events written to SSE streams", ["event"], registry=r
        )
        self.fanout_seconds = Histogram(
            "herald_sse_fanout_seconds",
            "Time to hand one bus event to every local stream",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
