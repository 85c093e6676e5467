-- Records failed deliveries: a retry time keeps the event RETRYING, none
-- dead-letters it. Fenced like record_delivered.
WITH fence AS (
    SELECT 1 FROM outbox_leases WHERE shard = $1 AND epoch = $2 FOR KEY SHARE
)
UPDATE outbox_events AS e
SET state = CASE WHEN u.retry_at IS NULL THEN 5 ELSE 3 END,
    attempts = e.attempts + 1,
    last_error = u.error,
    next_attempt_at = u.retry_at,
    change_seq = nextval('outbox_change_seq'),
    change_xid = pg_current_xact_id(),
    updated_at = now()
FROM UNNEST($3::bigint[], $4::text[], $5::timestamptz[]) AS u(seq, error, retry_at)
WHERE e.seq = u.seq
  -- "+ 0": each row is found by its primary key, never by scanning the
  -- relay index (state < 4), whatever plan is cached.
  AND e.state + 0 < 4
  AND EXISTS (SELECT 1 FROM fence)
RETURNING e.event_id, e.producer, e.transaction_id, e.append_sequence, e.topic, e.state,
          e.kafka_partition, e.kafka_offset, e.attempts, e.last_error, e.updated_at, e.change_seq
