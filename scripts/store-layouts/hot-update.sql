-- Layout 3: rows stay and publish updates only unindexed columns, so the
-- update is HOT (no index insertions; dead versions pruned in the page).
-- No index may mention state or change_seq: the relay index is full and
-- relies on a persisted cursor; there is no indexed change feed.
\i common.sql
ALTER TABLE events SET (fillfactor = 85);
CREATE INDEX events_relay ON events (shard, writer_xid, seq);
\i append.sql
\i publish-by-update.sql
