"""Names both processes must agree on: job names, Redis keys, pub/sub channels."""

from __future__ import annotations

# The REST API's path prefix: routes, the auth and CORS middlewares, the dev runner's banner.
API_PREFIX = "/api/v1"


class AdvisoryLock:
    """Every PostgreSQL advisory lock id Herald takes, in one table so no two collide.

    The values are arbitrary (ASCII tags); they only have to be the same in every
    process. One-key locks (``pg_advisory_xact_lock(bigint)``) guard one thing each. A
    two-key lock (``pg_advisory_xact_lock(int, int)``) is a namespace and a 32-bit key
    within it (a channel id modulo 2**31-1, a ``hashtext`` of a storage key); PostgreSQL
    keeps the one-key and two-key forms apart, so a namespace cannot meet a one-key id.
    """

    # One-key locks.
    MIGRATE = 0x48455241  # "HERA": `herald migrate`, so concurrent runs apply each once
    AUDIT_APPEND = 0x41554454  # "AUDT": audit appends, so the hash chain has no forks
    DELAYED_ADMISSION = 0x48444C59  # "HDLY": delayed-queue admission, so the caps are exact
    ORPHAN_SCAN = 0x4F525048  # "ORPH": session-level, one orphan scan at a time
    # Two-key namespaces.
    CHANNEL_POST = 0x4D53  # "MS": posting into a channel, so its ids commit in order
    UPLOAD_KEY = 0x4154  # "AT": an upload's storage key from INSERT to COMMIT


def channel_post_lock(channel_id: int) -> tuple[int, int]:
    """The two keys of a channel's posting lock (``pg_advisory_xact_lock(int, int)``)."""
    return AdvisoryLock.CHANNEL_POST, channel_id % 2_147_483_647


# arq job function names (the worker registers functions under exactly these names).
JOB_CLEANUP_DELAYED = "cleanup_delayed_messages"
JOB_DELIVER_DELAYED = "deliver_delayed_message"
JOB_ORPHAN_SCAN = "orphan_scan"
JOB_RETRY_ATTACHMENT_DELETIONS = "retry_attachment_deletions"
JOB_DELETE_ATTACHMENT_FILE = "delete_attachment_file"
JOB_SAMPLE_QUEUE = "sample_delayed_queue"

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

# Delayed-message queue figures, written by the worker (and max_seen by servers too), read
# by every server. Samples: a sorted set scored by unix time, members "<time>:<size>".
QUEUE_SAMPLES_KEY = KEY_PREFIX + "queue:samples"
# One member whose score only ever rises (ZADD GT): the largest queue size seen.
QUEUE_MAX_SEEN_KEY = KEY_PREFIX + "queue:max_seen"
# "1" while the queue is at/over HERALD_QUEUE_ALERT: the alert is logged once per crossing.
QUEUE_ALERT_KEY = KEY_PREFIX + "queue:alert"


def delivery_job_id(tick_ms: int) -> str:
    """One delivery job per 100 ms tick, however many messages fall due in it."""
    return f"herald:deliver:{tick_ms}"


def active_job_key(operator_job: str) -> str:
    """The id of the operator job run that is queued or running (so callers join it)."""
    return f"{KEY_PREFIX}jobs:active:{operator_job}"


def job_progress_key(job_id: str) -> str:
    """How far a long operator job is (a JSON object the job rewrites as it goes)."""
    return f"{KEY_PREFIX}jobs:progress:{job_id}"


def sse_ip_key(ip: str) -> str:
    """The SSE leases of one client address, across every server process: a sorted set
    of stream ids scored by when each lease runs out (server/sse/leases.py)."""
    return f"{KEY_PREFIX}sse:ip:{ip}"


def events_channel(redis_db: int) -> str:
    """The pub/sub channel every server process subscribes to (one subscription each)."""
    return f"herald:{redis_db}:events"


# Metadata cache (shared/cache.py). One hash per channel (field "d": its JSON, fields
# "m:<user id>": members of a private channel), a generation counter bumped on every
# change, a short loader lock; and the token-hash → user entries of the auth cache.
CACHE_PREFIX = KEY_PREFIX + "cache:"


def channel_cache_key(channel_id: int) -> str:
    return f"{CACHE_PREFIX}channel:{channel_id}"


def channel_gen_key(channel_id: int) -> str:
    return f"{CACHE_PREFIX}channel:{channel_id}:gen"


def channel_lock_key(channel_id: int) -> str:
    return f"{CACHE_PREFIX}channel:{channel_id}:lock"


def user_token_cache_key(token_hash_hex: str) -> str:
    return f"{CACHE_PREFIX}token:{token_hash_hex}"
