-- Layout 3: rows stay and publish updates only unindexed columns, so the
-- update is HOT (no index insertions; dead versions pruned in the page).
-- No index may mention state or change_seq: the relay index is full and
-- relies on a persisted cursor; there is no indexed change feed.
\i common.sql
ALTER TABLE events SET (fillfactor = 85);
CREATE INDEX events_relay ON events (shard, writer_xid, seq);
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
