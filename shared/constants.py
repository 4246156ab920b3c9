"""Names both processes must agree on: job names, Redis keys, pub/sub channels."""

from __future__ import annotations

# arq job function names (the worker registers functions under exactly these names).
JOB_CLEANUP_DELAYED = "cleanup_delayed_messages"
JOB_DELIVER_DELAYED = "deliver_delayed_message"
JOB_ORPHAN_SCAN = "orphan_scan"
JOB_RETRY_ATTACHMENT_DELETIONS = "retry_attachment_deletions"
JOB_DELETE_ATTACHMENT_FILE = "delete_attachment_file"

# Operator-facing job names (`herald jobs enqueue NAME`) → arq function names.
OPERATOR_JOBS: dict[str, str] = {
    "cleanup-delayed-messages": JOB_CLEANUP_DELAYED,
    "orphan-scan": JOB_ORPHAN_SCAN,
    "retry-attachment-deletions": JOB_RETRY_ATTACHMENT_DELETIONS,
}

# Redis keys. Keys live in the REDIS_URL database; pub/sub channel names are global to
# a Redis server, so they carry the database number to keep two deployments apart.
KEY_PREFIX = "herald:"
QUEUE_NAME = "arq:queue"
# arq writes this key every HEALTH_CHECK_INTERVAL_S with a TTL one second longer, so
# "the key exists" means "a worker was alive within the last interval".
WORKER_HEALTH_KEY = QUEUE_NAME + ":health-check"
HEALTH_CHECK_INTERVAL_S = 10


def events_channel(redis_db: int) -> str:
    """The pub/sub channel every server process subscribes to (one subscription each)."""
    return f"herald:{redis_db}:events"
