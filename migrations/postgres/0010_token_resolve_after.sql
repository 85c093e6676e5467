-- When an open postgres_xid token is next asked about. A token that cannot
-- be resolved now (it names another cluster, or its cluster cannot be
-- reached) is put off, so that such tokens never fill the resolver's window
-- ahead of tokens that can be resolved.
ALTER TABLE outbox_transactions ADD COLUMN resolve_after timestamptz NOT NULL DEFAULT now();

DROP INDEX outbox_transactions_open_xid;
CREATE INDEX outbox_transactions_open_xid ON outbox_transactions (resolve_after)
    WHERE state = 1 AND mode = 3;
