-- Marks a batch published, fenced by the shard's lease epoch: the rows move
-- from outbox_events to outbox_published (see migration 0007). FOR KEY SHARE
-- makes a concurrent takeover wait for this statement, or this statement
-- see it.
WITH fence AS (
    SELECT 1 FROM outbox_leases WHERE shard = $1 AND epoch = $2 FOR KEY SHARE
),
gone AS (
    DELETE FROM outbox_events AS e
    USING UNNEST($3::bigint[], $4::integer[], $5::bigint[]) AS u(seq, kafka_partition, kafka_offset)
    WHERE e.seq = u.seq
      -- "+ 0": each row is found by its primary key, never by scanning the
      -- relay index (state < 4), whatever plan is cached.
      AND e.state + 0 < 4
      AND EXISTS (SELECT 1 FROM fence)
    RETURNING e.event_id, e.seq, e.producer, e.transaction_id, e.append_sequence, e.topic,
              u.kafka_partition, u.kafka_offset, e.attempts
)
INSERT INTO outbox_published (event_id, seq, producer, transaction_id, append_sequence, topic,
                              kafka_partition, kafka_offset, attempts, published_at, change_seq)
SELECT event_id, seq, producer, transaction_id, append_sequence, topic,
       kafka_partition, kafka_offset, attempts, now(), nextval('outbox_change_seq')
FROM gone
RETURNING event_id, producer, transaction_id, append_sequence, topic, 4::smallint AS state,
          kafka_partition, kafka_offset, attempts, NULL::text AS last_error,
          published_at AS updated_at, change_seq
