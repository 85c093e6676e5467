-- One shard's not-final rows in (writer_xid, seq) order (with or without
-- its dead letters: the state condition comes between this file and
-- read_relay_rows_tail.sql, see READ_RELAY_ROWS), behind the
-- visibility gate (see migration 0002): only rows whose writing transaction
-- is older than every outboxd writer still running, so that no row can later
-- appear before the cursor. Served by outbox_events_relay.
--
-- Always one row at least: held_back says whether committed rows of the
-- shard wait behind the gate (the relay then looks again soon, as the
-- writer that lifts the gate wakes only its own shards); page rows have a
-- seq.
WITH gate AS (
    SELECT LEAST(
        pg_snapshot_xmax(pg_current_snapshot()),
        (SELECT min(s.floor_xid)
         FROM outbox_writer_slots AS s
         JOIN pg_stat_activity AS a
           ON a.pid = s.backend_pid AND a.backend_start = s.backend_start)
    ) AS below
)
SELECT page.*,
       EXISTS (SELECT 1 FROM outbox_events AS h
               WHERE h.shard = $1 AND h.state < 4 AND h.writer_xid >= gate.below) AS held_back
FROM gate
LEFT JOIN LATERAL (
    SELECT seq, writer_xid::text::bigint AS writer_xid, event_id, producer, transaction_id,
           topic, kafka_key, payload, headers, aggregate_type, aggregate_id, event_type,
           state, attempts, next_attempt_at, occurred_at, appended_at, traceparent, tracestate
    FROM outbox_events
    WHERE shard = $1
