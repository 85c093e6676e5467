-- How a transaction was resolved, for status reasons: 'committed',
-- 'aborted', 'expired', 'rolled back' (postgres_xid), 'xid too old'.
ALTER TABLE outbox_transactions ADD COLUMN resolution text;

-- Pending postgres_xid tokens, resolved in bulk by the relay.
CREATE INDEX outbox_transactions_open_xid ON outbox_transactions (created_at)
    WHERE state = 1 AND mode = 3;
-- Open two_phase tokens by expiry, for the expiry sweep.
CREATE INDEX outbox_transactions_open_expiry ON outbox_transactions (expires_at)
    WHERE state = 1 AND mode = 2;
-- Events of a transaction, for Commit/Abort.
CREATE INDEX outbox_events_pending ON outbox_events (producer, transaction_id) WHERE state = 1;

-- The visibility gate, without stalling on other work of the cluster.
--
-- A writer registers here (autocommit) before its transaction takes an xid,
-- recording pg_snapshot_xmax() at that moment: its xid will be at least that
-- "floor". It removes its slot after commit or rollback. The relay reads only
-- rows whose writer_xid is below the floor of every live writer (and below
-- its own snapshot's xmax, which bounds writers not yet registered), so it can
-- never pass a row still being written, while transactions that are not
-- outboxd writers (a caller's long postgres_xid transaction on this cluster,
-- a batch job) hold nothing back. A slot whose backend is gone (a crashed
-- gateway) no longer counts; its writer's transaction died with it.
CREATE UNLOGGED TABLE outbox_writer_slots (
    id            bigserial   PRIMARY KEY,
    floor_xid     xid8        NOT NULL,
    backend_pid   integer     NOT NULL,
    backend_start timestamptz NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);
