-- Delayed messages (scheduled by users, delivered and cleaned up by the worker) and the
-- record of every cleanup run.
CREATE TABLE delayed_messages (
    id           bigserial PRIMARY KEY,
    -- No foreign key on purpose: when the channel is deleted the row stays, and the
    -- worker marks it failed ("channel_deleted") so its author sees what happened.
    channel_id   bigint NOT NULL,
    author_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    body         text NOT NULL,
    deliver_at   timestamptz NOT NULL,
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'delivered', 'cancelled', 'failed')),
    -- Why it failed (a short code); only failed rows have one.
    reason       text,
    -- The message it became. No foreign key: messages go with their channel.
    message_id   bigint,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- When it left "pending"; retention (HERALD_QUEUE_RETENTION_S) counts from here.
    finished_at  timestamptz,
    CHECK ((status = 'pending') = (finished_at IS NULL)),
    CHECK ((status = 'failed') = (reason IS NOT NULL)),
    CHECK ((status = 'delivered') = (message_id IS NOT NULL))
);

-- Delivery: due pending rows, oldest first (per-tick jobs and the sweep, FOR UPDATE SKIP
-- LOCKED); the global pending count for the queue cap is an index-only scan of it.
CREATE INDEX delayed_messages_due_idx
    ON delayed_messages (deliver_at, id) WHERE status = 'pending';
-- A user's pending count (per-user cap) and their own list, by status, newest first.
CREATE INDEX delayed_messages_author_idx
    ON delayed_messages (author_id, status, id);
-- Cleanup: finished rows older than the retention, oldest first.
CREATE INDEX delayed_messages_finished_idx
    ON delayed_messages (finished_at) WHERE status <> 'pending';

CREATE TABLE delayed_cleanup_runs (
    id            bigserial PRIMARY KEY,
    job_id        text,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    status        text NOT NULL DEFAULT 'running'
                  CHECK (status IN ('running', 'succeeded', 'failed')),
    deleted       bigint NOT NULL DEFAULT 0,
    batches       integer NOT NULL DEFAULT 0,
    duration_ms   double precision,
    -- The longest batch transaction: the longest any row lock was held.
    max_batch_ms  double precision,
    error         text
);
-- "The last finished run" for /health.
CREATE INDEX delayed_cleanup_runs_finished_idx
    ON delayed_cleanup_runs (id) WHERE finished_at IS NOT NULL;

-- Running totals, one row, updated when a run finishes: /health reads them in O(1) while
-- old run records are pruned.
CREATE TABLE delayed_cleanup_totals (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    runs           bigint NOT NULL DEFAULT 0,
    failures       bigint NOT NULL DEFAULT 0,
    deleted_total  bigint NOT NULL DEFAULT 0
);
