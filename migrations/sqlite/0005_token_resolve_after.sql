-- When an open postgres_xid token is next asked about (microseconds; NULL:
-- at once). A token that cannot be resolved now is put off, so that such
-- tokens never fill the resolver's window ahead of tokens that can.
ALTER TABLE outbox_transactions ADD COLUMN resolve_after INTEGER;

CREATE INDEX outbox_transactions_open_xid ON outbox_transactions (coalesce(resolve_after, created_at))
    WHERE state = 1 AND mode = 3;
