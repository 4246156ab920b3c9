-- Attachments (files under HERALD_UPLOAD_DIR) and the hash-chained audit trail.

-- An attachment row outlives its file: deletion moves it through
--   active -> deleting -> deleted            (file removed, or already missing)
--   active -> deleting -> delete_failed      (file could not be removed; operators act)
-- so a file is never left on disk without a row that says so.
CREATE TABLE attachments (
    id              bigserial PRIMARY KEY,
    -- A deleted channel takes its attachment rows with it; the files left behind are
    -- found, audited and removed by the orphan scan.
    channel_id      bigint NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    uploader_id     bigint NOT NULL REFERENCES users (id),
    -- Server-chosen relative path below the upload root ("ab/ab…"); never the client's name.
    storage_key     text NOT NULL UNIQUE,
    filename        text NOT NULL,
    content_type    text NOT NULL,
    size            bigint NOT NULL CHECK (size >= 0),
    sha256          text NOT NULL,
    state           text NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'deleting', 'deleted', 'delete_failed')),
    delete_error    text,
    delete_attempts integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    state_changed_at timestamptz NOT NULL DEFAULT now()
);
-- "This user's attachments in a given state" (owner listings, per-user accounting).
CREATE INDEX attachments_uploader_state_idx ON attachments (uploader_id, state);
-- The worker's and /health's view: only the few rows waiting for or failing file removal.
CREATE INDEX attachments_pending_idx ON attachments (state, state_changed_at)
    WHERE state IN ('deleting', 'delete_failed');

-- Append-only audit trail. Ids are gapless (each append takes previous id + 1 under an
-- advisory lock), so a removed row shows as a gap as well as a broken chain.
CREATE TABLE audit_log (
    id           bigint PRIMARY KEY,
    at           timestamptz NOT NULL,
    actor_id     bigint,
    action       text NOT NULL,
    target_type  text NOT NULL,
    target_id    text NOT NULL,
    result       text NOT NULL,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb,
    client_ip    text,
    prev_hash    text NOT NULL,
    hash         text NOT NULL
);
-- Filters of GET /admin/audit, newest first: by time, by target, by action.
CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_target_idx ON audit_log (target_type, target_id, id);
CREATE INDEX audit_log_action_idx ON audit_log (action, id);

-- Rows can be added, never changed or removed, whatever role the app runs as. TRUNCATE
-- is a separate privilege (tests use it); production revokes it with grants (docs).
CREATE FUNCTION audit_log_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_reject_change();
