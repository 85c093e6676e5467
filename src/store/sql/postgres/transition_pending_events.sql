-- Moves the PENDING events of one transaction to a new state ($3), with a
-- reason ($4). Served by outbox_events_pending.
UPDATE outbox_events
SET state = $3,
    last_error = $4,
    change_seq = nextval('outbox_change_seq'),
    change_xid = pg_current_xact_id(),
    updated_at = now()
WHERE producer = $1
  AND transaction_id = $2
  AND state = 1
RETURNING event_id, producer, transaction_id, append_sequence, topic, state,
          kafka_partition, kafka_offset, attempts, last_error, updated_at, change_seq, shard
