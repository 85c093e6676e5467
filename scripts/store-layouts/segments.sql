-- Layout 6: segments. One row per coalesced commit per shard holds its
-- events packed (about 312 here), so the row and its two index entries are
-- paid once per segment, and the packed events go to TOAST as one value.
-- Publishing is one row update per segment: the delivered count and each
-- event's partition and offset, in arrays. (Event ids name their segment and
-- position, so status by id is a primary-key read; not measured here.)
DROP SCHEMA IF EXISTS layout CASCADE;
CREATE SCHEMA layout;
SET search_path = layout;
CREATE SEQUENCE change_seq;
CREATE TABLE segments (
    id bigserial PRIMARY KEY,
    writer_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    shard integer NOT NULL,
    event_count integer NOT NULL,
    events bytea NOT NULL,
    appended_at timestamptz NOT NULL DEFAULT now(),
    delivered integer NOT NULL DEFAULT 0,
    partitions smallint[],
    offsets bigint[],
    published_at timestamptz,
    change_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    change_seq bigint NOT NULL DEFAULT nextval('change_seq')
);
-- Random payloads do not compress: do not try.
ALTER TABLE segments ALTER COLUMN events SET STORAGE EXTERNAL;
CREATE INDEX segments_relay ON segments (shard, writer_xid, id) WHERE delivered < event_count;
\i packed.sql
CREATE PROCEDURE work(rounds int) LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; appending interval := '0'; publishing interval := '0'; segment record;
BEGIN
  FOR r IN 1..rounds LOOP
    t0 := clock_timestamp();
    INSERT INTO segments (shard, event_count, events) SELECT * FROM packed_events(r);
    COMMIT;
    appending := appending + (clock_timestamp() - t0);
    t0 := clock_timestamp();
    FOR segment IN SELECT id, event_count FROM segments WHERE delivered < event_count ORDER BY id LOOP
      UPDATE segments
      SET delivered = segment.event_count,
          partitions = array_fill(0::smallint, ARRAY[segment.event_count]),
          offsets = ARRAY(SELECT generate_series(segment.id * 1000, segment.id * 1000 + segment.event_count - 1)),
          published_at = now(), change_xid = pg_current_xact_id(), change_seq = nextval('change_seq')
      WHERE id = segment.id;
      COMMIT;
    END LOOP;
    publishing := publishing + (clock_timestamp() - t0);
  END LOOP;
  RAISE NOTICE 'appending % publishing %', appending, publishing;
END $$;
