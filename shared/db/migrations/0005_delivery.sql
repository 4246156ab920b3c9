-- Lossless live delivery (docs/architecture.md, "Delivery you can trust").
--
-- prev_id: the id of the channel's previous message (0 for its first), assigned under
-- the channel's posting lock with the insert. A server process that receives message N
-- whose prev_id is not the last one it wrote for the channel knows, at once, that an
-- event was lost or overtaken, and fills the gap from this table before writing on.
-- NULL (rows written by older code during a rolling upgrade) means "unknown": the
-- process checks PostgreSQL, as for a gap. Reversible: DROP COLUMN prev_id.
ALTER TABLE messages ADD COLUMN prev_id bigint;

UPDATE messages m SET prev_id = s.prev
  FROM (SELECT id, COALESCE(lag(id) OVER (PARTITION BY channel_id ORDER BY id), 0) AS prev
          FROM messages) s
 WHERE m.id = s.id;

-- Keys every process of one deployment shares. 'cursor': signs the resume cursors of
-- multi-channel streams, so a cursor Herald did not write is refused (422). Made here,
-- once per database, from PostgreSQL's own random source (gen_random_uuid, core since 13).
CREATE TABLE server_keys (
    name        text PRIMARY KEY,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO server_keys (name, secret)
VALUES ('cursor', replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''))
ON CONFLICT DO NOTHING;
