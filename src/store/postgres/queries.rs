//! The relay's queries and the pending-event transition, whose SQL names
//! event states: composed at compile time with [`stored!`], so that the
//! numbers are written in one place (`store::codes`).

/// One shard's not-final rows in (writer_xid, seq) order, behind the
/// visibility gate (see migration 0002): only rows whose writing
/// transaction is older than every outboxd writer still running, so that
/// no row can later appear before the cursor. Served by
/// outbox_events_relay.
///
/// Always one row at least: held_back says whether committed rows of the
/// shard wait behind the gate (the relay then looks again soon, as the
/// writer that lifts the gate wakes only its own shards); page rows have a
/// seq. `$state_condition` says which rows: not final, or also the dead
/// letters.
macro_rules! read_relay_rows {
    ($state_condition:expr) => {
        concat!(
            r"
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
               WHERE h.shard = $1 AND h.state < ",
            stored!(event first_final),
            r" AND h.writer_xid >= gate.below) AS held_back
FROM gate
LEFT JOIN LATERAL (
    SELECT seq, writer_xid::text::bigint AS writer_xid, event_id, producer, transaction_id,
           topic, kafka_key, payload, headers, aggregate_type, aggregate_id, event_type,
           state, attempts, next_attempt_at, occurred_at, appended_at, traceparent, tracestate
    FROM outbox_events
    WHERE shard = $1
      AND writer_xid < gate.below
      AND (writer_xid, seq) > ($2::text::xid8, $3)
      AND ",
            $state_condition,
            r"
    -- The table's columns, not the output's writer_xid (a bigint): the index
    -- order, so that the page is read off the index without a sort.
    ORDER BY outbox_events.writer_xid, outbox_events.seq
    LIMIT $4
) AS page ON true
"
        )
    };
}

/// Not-final rows of a shard.
pub(super) const READ_RELAY_ROWS: &str =
    read_relay_rows!(concat!("state < ", stored!(event first_final)));

/// Not-final rows of a shard and its dead letters (their own partial index
/// serves them).
pub(super) const READ_RELAY_ROWS_WITH_DEAD_LETTERS: &str = read_relay_rows!(concat!(
    "(state < ",
    stored!(event first_final),
    " OR state = ",
    stored!(event dead_lettered),
    ")"
));

/// Marks deliveries of several shards published in one statement, each
/// fenced by its shard's lease epoch: the rows move from outbox_events to
/// outbox_published (see migration 0007). $1/$2 are the shards and the
/// epochs their writers hold; $3..$6 the deliveries (seq, partition,
/// offset, shard). FOR KEY SHARE makes a concurrent takeover wait for this
/// statement, or this statement see it (and skip that shard's rows). "+ 0":
/// each row is found by its primary key, never by scanning the relay
/// index, whatever plan is cached.
pub(super) const RECORD_DELIVERED: &str = concat!(
    r"
WITH fence AS (
    SELECT l.shard
    FROM outbox_leases AS l
    JOIN UNNEST($1::integer[], $2::bigint[]) AS w(shard, epoch)
      ON l.shard = w.shard AND l.epoch = w.epoch
    FOR KEY SHARE OF l
),
gone AS (
    DELETE FROM outbox_events AS e
    USING UNNEST($3::bigint[], $4::integer[], $5::bigint[], $6::integer[])
          AS u(seq, kafka_partition, kafka_offset, shard)
    WHERE e.seq = u.seq
      AND e.shard = u.shard
      AND e.state + 0 < ",
    stored!(event first_final),
    r"
      AND u.shard IN (SELECT shard FROM fence)
    RETURNING e.event_id, e.seq, e.producer, e.transaction_id, e.append_sequence, e.topic,
              u.kafka_partition, u.kafka_offset, e.attempts
)
INSERT INTO outbox_published (event_id, seq, producer, transaction_id, append_sequence, topic,
                              kafka_partition, kafka_offset, attempts, published_at, change_seq)
SELECT event_id, seq, producer, transaction_id, append_sequence, topic,
       kafka_partition, kafka_offset, attempts, now(), nextval('outbox_change_seq')
FROM gone
RETURNING seq, event_id, producer, transaction_id, append_sequence, topic, ",
    stored!(event published),
    r"::smallint AS state,
          kafka_partition, kafka_offset, attempts, NULL::text AS last_error,
          published_at AS updated_at, change_seq
"
);

/// Records failed deliveries: a retry time keeps the event RETRYING, none
/// dead-letters it. Fenced by the shard's lease epoch like
/// [`RECORD_DELIVERED`].
pub(super) const RECORD_FAILED: &str = concat!(
    r"
WITH fence AS (
    SELECT 1 FROM outbox_leases WHERE shard = $1 AND epoch = $2 FOR KEY SHARE
)
UPDATE outbox_events AS e
SET state = CASE WHEN u.retry_at IS NULL THEN ",
    stored!(event dead_lettered),
    " ELSE ",
    stored!(event retrying),
    r" END,
    attempts = e.attempts + 1,
    last_error = u.error,
    next_attempt_at = u.retry_at,
    change_seq = nextval('outbox_change_seq'),
    change_xid = pg_current_xact_id(),
    updated_at = now()
FROM UNNEST($3::bigint[], $4::text[], $5::timestamptz[]) AS u(seq, error, retry_at)
WHERE e.seq = u.seq
  AND e.state + 0 < ",
    stored!(event first_final),
    r"
  AND EXISTS (SELECT 1 FROM fence)
RETURNING e.event_id, e.producer, e.transaction_id, e.append_sequence, e.topic, e.state,
          e.kafka_partition, e.kafka_offset, e.attempts, e.last_error, e.updated_at, e.change_seq
"
);

/// Moves the PENDING events of one transaction to a new state ($3), with a
/// reason ($4). Served by outbox_events_pending.
pub(super) const TRANSITION_PENDING_EVENTS: &str = concat!(
    r"
UPDATE outbox_events
SET state = $3,
    last_error = $4,
    change_seq = nextval('outbox_change_seq'),
    change_xid = pg_current_xact_id(),
    updated_at = now()
WHERE producer = $1
  AND transaction_id = $2
  AND state = ",
    stored!(event pending),
    r"
RETURNING event_id, producer, transaction_id, append_sequence, topic, state,
          kafka_partition, kafka_offset, attempts, last_error, updated_at, change_seq, shard
"
);
