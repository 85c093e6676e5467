-- Appends $rounds coalesced transactions of 2,500 events (256-byte payloads,
-- 1,000 keys, 8 shards) and publishes each one's events in statements of 500,
-- committing every statement, the way the relay records outcomes. Reports the
-- time, the size of the tables and indexes afterwards, and the WAL written.
SET search_path = layout;
SELECT pg_current_wal_lsn() AS wal_before \gset
\timing on
CALL work(:rounds);
\timing off
SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) AS total_size
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'layout' AND c.relkind IN ('r', 'p');
-- The WAL written (where the logical-messages layout keeps its events).
SELECT pg_size_pretty(pg_current_wal_lsn() - :'wal_before') AS wal_written;
