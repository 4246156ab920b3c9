"""The /health fields CONTRACT.md names (the acceptance checks read these)."""

CONTRACT_FIELDS: dict[str, set[str]] = {
    "sse": {
        "active",
        "peak",
        "opened_total",
        "rejected_per_ip_total",
        "rejected_global_total",
        "stale_detected_total",
        "stale_active",
        "slow_consumer_total",
        "new_per_s",
        "limits",
    },
    "queue": {
        "size",
        "max_size",
        "max_seen",
        "avg_size",
        "growth_per_min",
        "alert",
        "alert_threshold",
        "cleanup",
    },
    "db": {"queries_total", "slow_queries_total", "slow_threshold_ms", "p95_ms", "degraded"},
    "attachments": {"delete_failures_total", "pending_file_deletions", "last_orphan_scan"},
}
CLEANUP_FIELDS = {
    "runs",
    "failures",
    "success_rate",
    "last_run_at",
    "last_deleted",
    "deleted_total",
}
