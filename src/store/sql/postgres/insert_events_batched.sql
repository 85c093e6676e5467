-- Every event of a coalesced transaction in one statement.
INSERT INTO outbox_events (
    event_id, shard, producer, transaction_id, append_sequence, batch_index,
    topic, kafka_key, payload, headers, aggregate_type, aggregate_id,
    event_type, occurred_at, state, traceparent, tracestate
)
SELECT * FROM UNNEST(
    $1::uuid[], $2::integer[], $3::text[], $4::text[], $5::bigint[], $6::integer[],
    $7::text[], $8::bytea[], $9::bytea[], $10::bytea[], $11::text[], $12::text[],
    $13::text[], $14::timestamptz[], $15::smallint[], $16::text[], $17::text[]
)
RETURNING event_id, change_seq, updated_at
