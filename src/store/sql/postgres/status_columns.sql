event_id, producer, transaction_id, append_sequence, topic, state,
kafka_partition, kafka_offset, attempts, last_error, updated_at, change_seq
