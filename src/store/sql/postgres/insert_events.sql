INSERT INTO outbox_events (
    event_id, shard, producer, transaction_id, append_sequence, batch_index,
    topic, kafka_key, payload, headers, aggregate_type, aggregate_id,
    event_type, occurred_at, state, traceparent, tracestate
)
SELECT u.event_id, u.shard, $1, $2, $3, u.batch_index,
       u.topic, u.kafka_key, u.payload, u.headers, u.aggregate_type, u.aggregate_id,
       u.event_type, u.occurred_at, $4, $5, $6
FROM UNNEST(
    $7::uuid[], $8::integer[], $9::integer[], $10::text[], $11::bytea[], $12::bytea[],
    $13::bytea[], $14::text[], $15::text[], $16::text[], $17::timestamptz[]
) AS u(event_id, shard, batch_index, topic, kafka_key, payload,
       headers, aggregate_type, aggregate_id, event_type, occurred_at)
RETURNING event_id, change_seq, updated_at
