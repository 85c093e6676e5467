-- The change feed's gate (see CHANGE_FEED_GATE in postgres/mod.rs).
WITH snapshot AS (
    SELECT (pg_snapshot_xmax(pg_current_snapshot())::text)::bigint AS xmax
)
SELECT least(
    (SELECT xmax FROM snapshot),
    (SELECT min(s.xmax - ((s.xmax - (a.backend_xid::text)::bigint) & 4294967295))
     FROM pg_stat_activity AS a, snapshot AS s
     WHERE a.datname = current_database()
       AND a.application_name = 'outboxd'
       AND a.backend_xid IS NOT NULL)
)
