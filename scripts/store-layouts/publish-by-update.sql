-- The work of the layouts that keep published rows: append, then mark each
-- batch published in place, 500 rows per committed statement.
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
