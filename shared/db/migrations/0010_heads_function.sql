-- The feeds' reconcile in one round trip: herald_channel_heads() takes the channels'
-- posting locks in shared mode (in channel order, as posters take them), reads the id
-- sequence, then each channel's newest message id, and returns the watermark with the
-- heads in the order of p_channels. Every server process calls it once a second
-- (server/sse/feeds.py); it was a five-round-trip transaction before (BEGIN, locks,
-- sequence, heads, COMMIT), the most frequent thing an idle server did to PostgreSQL.
--
-- The steps keep their order and their snapshots: a VOLATILE function takes a new
-- snapshot per statement under READ COMMITTED, so the heads are read after the locks
-- were granted, and see every post that held a lock before them. Called as one
-- statement outside a transaction block, it commits on return and releases the locks.
-- Reversible: DROP FUNCTION herald_channel_heads.
CREATE FUNCTION herald_channel_heads(p_channels bigint[], p_lock_class integer)
RETURNS TABLE (watermark bigint, heads bigint[])
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_last bigint;
    v_called boolean;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(p_lock_class, (s.c % 2147483647)::int)
       FROM (SELECT c FROM unnest(p_channels) AS c ORDER BY c) AS s;
    SELECT q.last_value, q.is_called INTO v_last, v_called FROM messages_id_seq q;
    RETURN QUERY
        SELECT v_last - CASE WHEN v_called THEN 0 ELSE 1 END,
               COALESCE(array_agg(COALESCE((SELECT max(m.id) FROM messages m
                                           WHERE m.channel_id = t.c), 0) ORDER BY t.n),
                        '{}'::bigint[])
          FROM unnest(p_channels) WITH ORDINALITY AS t(c, n);
END
$$;
