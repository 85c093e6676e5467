INSERT INTO outbox_appends (producer, transaction_id, sequence, content_hash, event_ids)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bytea[], $5::bytea[])
ON CONFLICT DO NOTHING
RETURNING producer, transaction_id, sequence
