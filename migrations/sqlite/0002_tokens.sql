ALTER TABLE outbox_transactions ADD COLUMN resolution TEXT;

CREATE INDEX outbox_transactions_open ON outbox_transactions (mode, expires_at) WHERE state = 1;
CREATE INDEX outbox_events_pending ON outbox_events (producer, transaction_id) WHERE state = 1;
