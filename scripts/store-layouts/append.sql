-- One coalesced append of 2,500 events into table `events`.
CREATE PROCEDURE append_batch(round int) LANGUAGE sql AS $$
INSERT INTO events (event_id, shard, producer, transaction_id, append_sequence, batch_index,
    topic, kafka_key, payload, headers, aggregate_type, aggregate_id, event_type,
    occurred_at, state)
SELECT gen_random_uuid(), (i % 1000) % 8, 'bench', 'tx-' || round || '-' || i / 50, 0, i % 50,
       'bench', convert_to('key-' || (i % 1000), 'UTF8'), decode(repeat('ab', 256), 'hex'),
       '\x'::bytea, 'order', 'o-' || i, 'created', now(), 2
FROM generate_series(1, 2500) AS i;
$$;
