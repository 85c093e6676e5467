-- Layout 4: update in place on a table partitioned by append sequence
-- (100,000 events per partition), so that retention can drop whole
-- partitions instead of deleting rows. PostgreSQL cannot enforce a unique
-- event id across partitions, so the event-id index is not unique here.
\i common.sql
-- The same columns, without the unique keys a partitioned table cannot have.
ALTER TABLE events RENAME TO events_template;
CREATE TABLE events (LIKE events_template INCLUDING DEFAULTS) PARTITION BY RANGE (seq);
DO $$ BEGIN
  FOR p IN 0..20 LOOP
    EXECUTE format('CREATE TABLE events_%s PARTITION OF events FOR VALUES FROM (%s) TO (%s)',
                   p, p * 100000 + 1, (p + 1) * 100000 + 1);
  END LOOP;
END $$;
CREATE INDEX events_seq ON events (seq);
CREATE INDEX events_event_id ON events (event_id);
CREATE INDEX events_relay ON events (shard, writer_xid, seq) WHERE state < 4;
CREATE INDEX events_changes ON events (producer, change_seq);
CREATE INDEX events_pending ON events (producer, transaction_id) WHERE state = 1;
CREATE INDEX events_dead ON events (seq) WHERE state = 5;
\i append.sql
\i publish-by-update.sql
