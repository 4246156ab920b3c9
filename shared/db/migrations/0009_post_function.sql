-- A post in one round trip: herald_post_message() checks the channel's visibility, takes
-- the channel's posting lock, inserts the message with its prev_id, moves the author's
-- read mark and returns the stored row, all inside PostgreSQL. Called as one statement
-- outside a transaction block, it commits on return: the posting lock is held only while
-- PostgreSQL works, never while a busy server process gets round to its next statement
-- (five round trips held it before, which serialised a busy channel's posts behind the
-- server's own fan-out work).
--
-- Same order of steps as the Python code before it: lock, then the INSERT reads prev_id
-- with a snapshot taken after the lock (a VOLATILE function takes one per statement
-- under READ COMMITTED), then the read mark in its own statement after the INSERT:
-- folded into the INSERT as a CTE it would lock the membership row before the foreign
-- key check (run at the statement's end) waits on a concurrent channel DELETE's row
-- lock, while that DELETE's cascade waits on the membership row, a deadlock
-- (test_posting_while_the_channel_is_deleted). No row comes back when the channel does
-- not exist or the author may not see it. Reversible: DROP FUNCTION herald_post_message.
CREATE FUNCTION herald_post_message(
    p_channel bigint, p_author bigint, p_admin boolean, p_body text,
    p_lock_class integer, p_lock_key integer
) RETURNS TABLE (
    id bigint, channel_id bigint, author_id bigint, author_name text, body text,
    created_at timestamptz, prev_id bigint
) LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    v_private boolean;
    v_member boolean;
    v_msg messages%ROWTYPE;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_class, p_lock_key);
    SELECT c.is_private, (m.user_id IS NOT NULL) INTO v_private, v_member
      FROM channels c LEFT JOIN channel_members m ON m.channel_id = c.id AND m.user_id = p_author
     WHERE c.id = p_channel;
    IF NOT FOUND OR (v_private AND NOT v_member AND NOT p_admin) THEN
        RETURN;
    END IF;
    INSERT INTO messages (channel_id, author_id, body, prev_id)
    VALUES (p_channel, p_author, p_body,
            (SELECT COALESCE(max(x.id), 0) FROM messages x WHERE x.channel_id = p_channel))
    RETURNING * INTO v_msg;
    UPDATE channel_members cm SET last_read_message_id = v_msg.id
     WHERE cm.channel_id = p_channel AND cm.user_id = p_author
       AND cm.last_read_message_id < v_msg.id;
    RETURN QUERY
        SELECT v_msg.id, v_msg.channel_id, v_msg.author_id, u.name, v_msg.body,
               v_msg.created_at, v_msg.prev_id
          FROM users u WHERE u.id = v_msg.author_id;
END
$$;
