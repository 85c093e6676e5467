-- One shard's not-final rows in (writer_xid, seq) order, behind the
-- visibility gate: only rows whose writing transaction is older than every
-- transaction still running, so that no row can later appear before the
-- cursor (Watermill's scheme). Served by outbox_events_relay.
SELECT seq, writer_xid::text::bigint AS writer_xid, event_id, producer, transaction_id,
       topic, kafka_key, payload, headers, aggregate_type, aggregate_id, event_type,
       state, attempts, next_attempt_at, occurred_at, traceparent, tracestate
FROM outbox_events
WHERE shard = $1
  AND state < 4
  AND writer_xid < pg_snapshot_xmin(pg_current_snapshot())
  AND (writer_xid, seq) > ($2::text::xid8, $3)
ORDER BY writer_xid, seq
LIMIT $4
