-- Shared by the packed layouts: 2,500 distinct random 256-byte payloads (a
-- packed segment of constant payloads would compress to nothing and flatter
-- the layout), and one coalesced append's events, each packed as a
-- length-prefixed record of the fields the row layouts store in columns.
DROP SCHEMA IF EXISTS layout_input CASCADE;
CREATE SCHEMA layout_input;
CREATE TABLE layout_input.payloads AS
SELECT i, decode(string_agg(md5(random()::text || i || j), '' ORDER BY j), 'hex') AS payload
FROM generate_series(1, 2500) AS i, generate_series(1, 16) AS j
GROUP BY i;
CREATE UNIQUE INDEX ON layout_input.payloads (i);
CREATE FUNCTION packed_events(round int) RETURNS TABLE (shard int, event_count int, events bytea)
LANGUAGE sql AS $$
SELECT shard, count(*)::int, string_agg(int4send(length(rec)) || rec, ''::bytea ORDER BY i)
FROM (
  SELECT i, (i % 1000) % 8 AS shard,
         uuid_send(gen_random_uuid()) || int8send(0) || int4send(i % 50)
         || convert_to('bench' || chr(1) || 'tx-' || round || '-' || i / 50 || chr(1)
                       || 'bench' || chr(1) || 'key-' || (i % 1000) || chr(1)
                       || 'order' || chr(1) || 'o-' || i || chr(1) || 'created' || chr(1), 'UTF8')
         || int8send((extract(epoch FROM now()) * 1000000)::bigint) || p.payload AS rec
  FROM generate_series(1, 2500) AS i JOIN layout_input.payloads p USING (i)
) e
GROUP BY shard;
$$;
