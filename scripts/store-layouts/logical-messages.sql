-- Layout 7: no event table. Each coalesced commit writes its events, packed
-- per shard, into the WAL with pg_logical_emit_message(true, …); the relay
-- reads them from a logical replication slot (pgoutput, in commit order)
-- and, once Kafka acked them, records a per-segment delivery row for status
-- reads and advances the slot. Needs wal_level = logical.
DROP SCHEMA IF EXISTS layout CASCADE;
CREATE SCHEMA layout;
SET search_path = layout;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'outboxd_layout';
DROP PUBLICATION IF EXISTS outboxd_layout;
CREATE PUBLICATION outboxd_layout;
SELECT pg_create_logical_replication_slot('outboxd_layout', 'pgoutput');
CREATE SEQUENCE change_seq;
CREATE TABLE delivered (
    id bigserial PRIMARY KEY,
    lsn pg_lsn NOT NULL,
    shard integer NOT NULL,
    event_count integer NOT NULL,
    partitions smallint[] NOT NULL,
    offsets bigint[] NOT NULL,
    published_at timestamptz NOT NULL,
    change_seq bigint NOT NULL DEFAULT nextval('change_seq')
);
\i packed.sql
CREATE PROCEDURE work(rounds int) LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; appending interval := '0'; publishing interval := '0'; upto pg_lsn;
BEGIN
  FOR r IN 1..rounds LOOP
    t0 := clock_timestamp();
    PERFORM pg_logical_emit_message(true, 'outboxd', int4send(shard) || events)
    FROM packed_events(r);
    COMMIT;
    appending := appending + (clock_timestamp() - t0);
    t0 := clock_timestamp();
    -- Read what is there (as the relay would, to send it), then record
    -- each message's delivery and let the slot go past it.
    CREATE TEMP TABLE read ON COMMIT DROP AS
    SELECT lsn, data FROM pg_logical_slot_peek_binary_changes('outboxd_layout', NULL, NULL,
        'proto_version', '1', 'publication_names', 'outboxd_layout', 'messages', 'true')
    WHERE get_byte(data, 0) = ascii('M');
    INSERT INTO delivered (lsn, shard, event_count, partitions, offsets, published_at)
    SELECT lsn, 0, 312, array_fill(0::smallint, ARRAY[312]),
           ARRAY(SELECT generate_series(1, 312)::bigint), now()
    FROM read;
    SELECT max(lsn) INTO upto FROM read;
    PERFORM pg_replication_slot_advance('outboxd_layout', upto);
    COMMIT;
    publishing := publishing + (clock_timestamp() - t0);
  END LOOP;
  RAISE NOTICE 'appending % publishing %', appending, publishing;
END $$;
