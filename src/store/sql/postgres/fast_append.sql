-- A coalesced batch of appends to new transactions in one autocommit
-- statement: the writer's slot (migration 0002) goes in the same commit as
-- its segments. Refused (outbox_fast_append_check raises, nothing is
-- stored) unless every transaction and append is new; a caller-chosen id
-- that is taken fails the statement on its unique index.
WITH slot AS (
    DELETE FROM outbox_writer_slots WHERE id = $1
),
transactions AS (
    INSERT INTO outbox_transactions
        (producer, transaction_id, mode, state, caller_xid, caller_system_id, expires_at)
    SELECT u.producer, u.transaction_id, u.mode, u.state, u.caller_xid, u.caller_system_id,
           now() + make_interval(secs => u.expires_in)
    FROM UNNEST($2::text[], $3::text[], $4::smallint[], $5::smallint[], $6::bigint[], $7::bigint[],
                $8::double precision[])
        AS u(producer, transaction_id, mode, state, caller_xid, caller_system_id, expires_in)
    ON CONFLICT DO NOTHING
    RETURNING 1
),
appends AS (
    INSERT INTO outbox_appends (producer, transaction_id, sequence, content_hash, event_ids)
    SELECT * FROM UNNEST($2::text[], $3::text[], $9::bigint[], $10::bytea[], $11::bytea[])
    ON CONFLICT DO NOTHING
    RETURNING 1
),
segments AS (
    INSERT INTO outbox_segments (number, shard, millis, states)
    SELECT u.number, u.shard, u.millis, u.states
    FROM UNNEST($12::bigint[], $13::integer[], $14::bigint[], $16::bytea[])
        AS u(number, shard, millis, states)
),
bodies AS (
    INSERT INTO outbox_segment_bodies (number, body)
    SELECT * FROM UNNEST($12::bigint[], $15::bytea[])
),
callers AS (
    INSERT INTO outbox_caller_ids (event_id, segment, position)
    SELECT * FROM UNNEST($17::uuid[], $18::bigint[], $19::integer[])
),
changes AS (
    -- One change-feed row per producer: its new events of every segment.
    INSERT INTO outbox_changes (producer, segments)
    SELECT u.producer, array_agg(u.segment)
    FROM UNNEST($20::text[], $21::bigint[]) AS u(producer, segment)
    GROUP BY u.producer
    RETURNING producer, segments, change_seq
),
checked AS (
    -- Checked once, before any row is returned.
    SELECT outbox_fast_append_check(
               (SELECT count(*) FROM transactions) = cardinality($2::text[])
               AND (SELECT count(*) FROM appends) = cardinality($2::text[])) AS ok
)
SELECT c.producer, c.segments, c.change_seq
FROM checked CROSS JOIN changes AS c
WHERE checked.ok
