-- Layout 5: the store as migrations/postgres leaves it (delete on publish,
-- with the change feed's commit-order indexes of migration 0011).
\i common.sql
ALTER TABLE events ADD COLUMN change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_relay ON events (shard, writer_xid, seq) WHERE state < 4;
CREATE INDEX events_changes ON events (producer, change_xid, change_seq);
CREATE INDEX events_pending ON events (producer, transaction_id) WHERE state = 1;
CREATE INDEX events_dead ON events (seq) WHERE state = 5;
CREATE TABLE published (
    event_id uuid PRIMARY KEY,
    producer text NOT NULL,
    transaction_id text NOT NULL,
    append_sequence bigint NOT NULL,
    topic text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    attempts integer NOT NULL,
    published_at timestamptz NOT NULL,
    change_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    change_seq bigint NOT NULL
);
CREATE INDEX published_changes ON published (producer, change_xid, change_seq);
CREATE INDEX published_age ON published USING brin (published_at);
\i append.sql
CREATE PROCEDURE work(rounds int) LANGUAGE plpgsql AS $$
DECLARE lo bigint; t0 timestamptz; appending interval := '0'; publishing interval := '0';
BEGIN
  SELECT coalesce(max(seq), 0) + 1 INTO lo FROM events;
  FOR r IN 1..rounds LOOP
    t0 := clock_timestamp();
    CALL append_batch(r);
    COMMIT;
    appending := appending + (clock_timestamp() - t0);
    t0 := clock_timestamp();
    FOR s IN 0..4 LOOP
      WITH gone AS (
        DELETE FROM events
        WHERE seq = ANY (ARRAY(SELECT generate_series(lo + s * 500, lo + s * 500 + 499)))
        RETURNING event_id, producer, transaction_id, append_sequence, topic, seq, attempts
      )
      INSERT INTO published (event_id, producer, transaction_id, append_sequence, topic,
                             kafka_partition, kafka_offset, attempts, published_at, change_seq)
      SELECT event_id, producer, transaction_id, append_sequence, topic, 0, seq, attempts + 1,
             now(), nextval('change_seq')
      FROM gone;
      COMMIT;
    END LOOP;
    publishing := publishing + (clock_timestamp() - t0);
    lo := lo + 2500;
  END LOOP;
  RAISE NOTICE 'appending % publishing %', appending, publishing;
END $$;
