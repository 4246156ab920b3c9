-- API tokens a user may hold several of, each revocable and optionally expiring
-- (`herald tokens create|list|revoke`).
--
-- Every user's one token so far moves here (same sha256, so it keeps working, created
-- at the user's creation, never expiring), and users.token_hash goes: one home for a
-- token hash. Authentication reads api_tokens by token_hash (its unique index).
--
-- Not reversible by itself: the previous version reads users.token_hash, which is
-- dropped here. Servers of the previous version answer 500 to authenticated requests
-- once this is applied, so stop them, migrate, then start the new version. Rolling
-- back needs the SQL in docs/runbook.md ("Rolling back"), which gives each user
-- back its oldest token still valid; tokens created since and revocations are lost
-- to the old version.
CREATE TABLE api_tokens (
    id            bigserial PRIMARY KEY,
    user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- sha256 of the token; the token itself is never stored.
    token_hash    bytea NOT NULL UNIQUE,
    label         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Written at most once a minute per token (shared/services/users.py).
    last_used_at  timestamptz,
    expires_at    timestamptz,
    revoked_at    timestamptz
);
-- `herald tokens list NAME`: one user's tokens in id order.
CREATE INDEX api_tokens_user_idx ON api_tokens (user_id, id);
-- Each server's sweep of recent revocations, every second: revoked tokens only.
CREATE INDEX api_tokens_revoked_idx ON api_tokens (revoked_at) WHERE revoked_at IS NOT NULL;

INSERT INTO api_tokens (user_id, token_hash, label, created_at)
SELECT id, token_hash, 'first token', created_at FROM users ORDER BY id;

ALTER TABLE users DROP COLUMN token_hash;
