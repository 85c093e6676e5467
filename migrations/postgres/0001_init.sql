-- outboxd's PostgreSQL schema.
--
-- Two different transaction ids live here and are kept apart by name:
--   caller_xid  the caller's own PostgreSQL transaction (a postgres_xid token),
--               resolved with pg_xact_status on the caller's cluster;
--   writer_xid  outboxd's own transaction that wrote an event row, used by the
--               relay's visibility gate.

CREATE TABLE outbox_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per caller transaction (token).
CREATE TABLE outbox_transactions (
    producer         text        NOT NULL,
    transaction_id   text        NOT NULL,
    mode             smallint    NOT NULL, -- 1 immediate, 2 two_phase, 3 postgres_xid
    state            smallint    NOT NULL, -- 1 open, 2 committed, 3 aborted
    caller_xid       bigint,               -- postgres_xid: the caller's pg_current_xact_id()
    caller_system_id bigint,               -- postgres_xid: its cluster's system_identifier
    expires_at       timestamptz,          -- two_phase: discarded when still open then
    created_at       timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz,
    PRIMARY KEY (producer, transaction_id)
);

CREATE INDEX outbox_transactions_open ON outbox_transactions (mode, created_at) WHERE state = 1;

-- One row per stored Append, for idempotent retries.
CREATE TABLE outbox_appends (
    producer       text        NOT NULL,
    transaction_id text        NOT NULL,
    sequence       bigint      NOT NULL,
    content_hash   bytea       NOT NULL,
    event_ids      uuid[]      NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (producer, transaction_id, sequence)
);

-- Every state change of any event takes the next value: the change feed
-- cursor of WatchStatus.
CREATE SEQUENCE outbox_change_seq;

CREATE TABLE outbox_events (
    -- Global append sequence.
    seq             bigserial   PRIMARY KEY,
    -- outboxd's writing transaction (not the caller's): the visibility gate.
    writer_xid      xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id        uuid        NOT NULL UNIQUE,
    shard           integer     NOT NULL,
    producer        text        NOT NULL,
    transaction_id  text        NOT NULL,
    append_sequence bigint      NOT NULL,
    batch_index     integer     NOT NULL,
    topic           text        NOT NULL,
    -- The ordering key, which is the Kafka key; NULL: no key, no order promise.
    kafka_key       bytea,
    payload         bytea       NOT NULL,
    headers         bytea       NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    appended_at     timestamptz NOT NULL DEFAULT now(),
    state           smallint    NOT NULL, -- see domain::EventState
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    kafka_partition integer,
    kafka_offset    bigint,
    published_at    timestamptz,
    traceparent     text,
    tracestate      text,
    change_seq      bigint      NOT NULL DEFAULT nextval('outbox_change_seq'),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The relay's hot query: one shard's not-final rows in (writer_xid, seq) order.
CREATE INDEX outbox_events_relay ON outbox_events (shard, writer_xid, seq) WHERE state < 4;
CREATE INDEX outbox_events_transaction ON outbox_events (producer, transaction_id, append_sequence, batch_index);
CREATE INDEX outbox_events_changes ON outbox_events (producer, change_seq);

-- Shard leases: at most one relay per shard, fenced by epoch.
CREATE TABLE outbox_leases (
    shard      integer     PRIMARY KEY,
    owner      text,
    epoch      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
