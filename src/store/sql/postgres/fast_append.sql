-- A coalesced batch of appends to new transactions in one autocommit
-- statement: the writer's slot (migration 0002) goes in the same commit as
-- its rows. Refused (outbox_fast_append_check raises, nothing is stored)
-- unless every transaction and append is new and no caller-chosen event id
-- is taken.
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
events AS (
    INSERT INTO outbox_events (
        event_id, shard, producer, transaction_id, append_sequence, batch_index,
        topic, kafka_key, payload, headers, aggregate_type, aggregate_id,
        event_type, occurred_at, state, traceparent, tracestate
    )
    SELECT * FROM UNNEST(
        $12::uuid[], $13::integer[], $14::text[], $15::text[], $16::bigint[], $17::integer[],
        $18::text[], $19::bytea[], $20::bytea[], $21::bytea[], $22::text[], $23::text[],
        $24::text[], $25::timestamptz[], $26::smallint[], $27::text[], $28::text[]
    )
    RETURNING event_id, change_seq, updated_at
)
SELECT e.event_id, e.change_seq, e.updated_at
FROM events AS e
-- An uncorrelated scalar subquery: checked once, before any row is returned.
WHERE (SELECT outbox_fast_append_check(
           (SELECT count(*) FROM transactions) = cardinality($2::text[])
           AND (SELECT count(*) FROM appends) = cardinality($2::text[])
           -- Both tables, under the statement's one snapshot: a concurrent
           -- delivery record moving an id from one to the other cannot hide
           -- it (the unique index alone would let the id in once the move
           -- commits, and this snapshot would not see it published).
           AND NOT EXISTS (SELECT 1 FROM outbox_events WHERE event_id = ANY ($29::uuid[]))
           AND NOT EXISTS (SELECT 1 FROM outbox_published WHERE event_id = ANY ($29::uuid[]))))
