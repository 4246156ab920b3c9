-- Users, channels, members and messages.
CREATE TABLE users (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    is_admin    boolean NOT NULL DEFAULT false,
    -- sha256 of the API token; the token itself is never stored.
    token_hash  bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE channels (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    topic       text NOT NULL DEFAULT '',
    is_private  boolean NOT NULL DEFAULT false,
    created_by  bigint NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE channel_members (
    channel_id            bigint NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    user_id               bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    last_read_message_id  bigint NOT NULL DEFAULT 0,
    joined_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel_id, user_id)
);
-- "Which channels is this user in?" (listing, visibility).
CREATE INDEX channel_members_user_idx ON channel_members (user_id, channel_id);

CREATE TABLE messages (
    id          bigserial PRIMARY KEY,
    channel_id  bigint NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    author_id   bigint NOT NULL REFERENCES users (id),
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Pages of a channel's messages, its newest message, replay after Last-Event-ID.
CREATE INDEX messages_channel_id_idx ON messages (channel_id, id);
