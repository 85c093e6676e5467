-- Layout 4: update in place on a table partitioned by append sequence
-- (100,000 events per partition), so that retention can drop whole
-- partitions instead of deleting rows. PostgreSQL cannot enforce a unique
-- event id across partitions, so the event-id index is not unique here.
DROP SCHEMA IF EXISTS layout CASCADE;
CREATE SCHEMA layout;
SET search_path = layout;
CREATE SEQUENCE change_seq;
CREATE SEQUENCE events_seq;
CREATE TABLE events (
    seq bigint NOT NULL DEFAULT nextval('events_seq'),
    writer_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id uuid NOT NULL,
    shard integer NOT NULL,
    producer text NOT NULL,
    transaction_id text NOT NULL,
    append_sequence bigint NOT NULL,
    batch_index integer NOT NULL,
    topic text NOT NULL,
    kafka_key bytea,
    payload bytea NOT NULL,
    headers bytea NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    event_type text NOT NULL,
    occurred_at timestamptz NOT NULL,
    appended_at timestamptz NOT NULL DEFAULT now(),
    state smallint NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error text,
    kafka_partition integer,
    kafka_offset bigint,
    published_at timestamptz,
    traceparent text,
    tracestate text,
    change_seq bigint NOT NULL DEFAULT nextval('change_seq'),
    updated_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (seq);
DO $$ BEGIN
  FOR p IN 0..20 LOOP
    EXECUTE format('CREATE TABLE events_%s PARTITION OF events FOR VALUES FROM (%s) TO (%s)',
                   p, p * 100000 + 1, (p + 1) * 100000 + 1);
  END LOOP;
END $$;
CREATE INDEX events_pkey ON events (seq);
CREATE INDEX events_event_id ON events (event_id);
CREATE INDEX events_relay ON events (shard, writer_xid, seq) WHERE state < 4;
CREATE INDEX events_changes ON events (producer, change_seq);
CREATE INDEX events_pending ON events (producer, transaction_id) WHERE state = 1;
CREATE INDEX events_dead ON events (seq) WHERE state = 5;
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
      UPDATE events SET state = 4, kafka_partition = 0, kafka_offset = seq, published_at = now(),
             change_seq = nextval('change_seq'), updated_at = now()
      WHERE seq = ANY (ARRAY(SELECT generate_series(lo + s * 500, lo + s * 500 + 499))) AND state < 4;
      COMMIT;
    END LOOP;
    publishing := publishing + (clock_timestamp() - t0);
    lo := lo + 2500;
  END LOOP;
  RAISE NOTICE 'appending % publishing %', appending, publishing;
END $$;
