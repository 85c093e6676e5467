-- The change feed's gate (see CHANGE_FEED_GATE in postgres/mod.rs).
--
-- pg_stat_activity shows 32-bit xids. A running transaction's xid lies
-- within 2^31 of the snapshot's xmax, on either side: xmax is one past the
-- latest *completed* xid, so a transaction that took its xid after that
-- one is running at or above it. Each is widened to the xid8 nearest xmax
-- with the same low 32 bits.
WITH snapshot AS (
    SELECT (pg_snapshot_xmax(pg_current_snapshot())::text)::bigint AS xmax
)
SELECT least(
    (SELECT xmax FROM snapshot),
    (SELECT min(s.xmax
                + ((((a.backend_xid::text)::bigint - s.xmax) + 2147483648) & 4294967295)
                - 2147483648)
     FROM pg_stat_activity AS a, snapshot AS s
     WHERE a.datname = current_database()
       AND a.application_name = 'outboxd'
       AND a.backend_xid IS NOT NULL)
)
