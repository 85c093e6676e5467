-- Marks a batch published, fenced by the shard's lease epoch. FOR SHARE makes
-- a concurrent takeover wait for this statement, or this statement see it.
WITH fence AS (
    SELECT 1 FROM outbox_leases WHERE shard = $1 AND epoch = $2 FOR SHARE
)
UPDATE outbox_events AS e
SET state = 4,
    kafka_partition = u.kafka_partition,
    kafka_offset = u.kafka_offset,
    published_at = now(),
    last_error = NULL,
    next_attempt_at = NULL,
    change_seq = nextval('outbox_change_seq'),
    updated_at = now()
FROM UNNEST($3::bigint[], $4::integer[], $5::bigint[]) AS u(seq, kafka_partition, kafka_offset)
WHERE e.seq = u.seq
  AND e.state < 4
  AND EXISTS (SELECT 1 FROM fence)
RETURNING e.event_id, e.producer, e.transaction_id, e.append_sequence, e.topic, e.state,
          e.kafka_partition, e.kafka_offset, e.attempts, e.last_error, e.updated_at, e.change_seq
