-- Layout 1 (the store before migration 0007): rows stay, publish updates them; partial indexes find
-- unpublished, pending and dead-lettered rows; change_seq is indexed.
\i common.sql
CREATE INDEX events_relay ON events (shard, writer_xid, seq) WHERE state < 4;
CREATE INDEX events_changes ON events (producer, change_seq);
CREATE INDEX events_pending ON events (producer, transaction_id) WHERE state = 1;
CREATE INDEX events_dead ON events (seq) WHERE state = 5;
\i append.sql
\i publish-by-update.sql
