-- outboxd's embedded (SQLite) schema. Same model as the PostgreSQL one; times
-- are unix microseconds. SQLite serialises writers, so rows become visible in
-- `seq` order and no writer transaction id is needed.

CREATE TABLE outbox_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE outbox_transactions (
    producer         TEXT    NOT NULL,
    transaction_id   TEXT    NOT NULL,
    mode             INTEGER NOT NULL,
    state            INTEGER NOT NULL,
    caller_xid       INTEGER,
    caller_system_id INTEGER,
    expires_at       INTEGER,
    created_at       INTEGER NOT NULL,
    resolved_at      INTEGER,
    PRIMARY KEY (producer, transaction_id)
) STRICT;

CREATE TABLE outbox_appends (
    producer       TEXT    NOT NULL,
    transaction_id TEXT    NOT NULL,
    sequence       INTEGER NOT NULL,
    content_hash   BLOB    NOT NULL,
    -- 16 bytes per event id, in request order.
    event_ids      BLOB    NOT NULL,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (producer, transaction_id, sequence)
) STRICT;

CREATE TABLE outbox_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;

INSERT INTO outbox_counters (name, value) VALUES ('change_seq', 0);

CREATE TABLE outbox_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        BLOB    NOT NULL UNIQUE,
    shard           INTEGER NOT NULL,
    producer        TEXT    NOT NULL,
    transaction_id  TEXT    NOT NULL,
    append_sequence INTEGER NOT NULL,
    batch_index     INTEGER NOT NULL,
    topic           TEXT    NOT NULL,
    kafka_key       BLOB,
    payload         BLOB    NOT NULL,
    headers         BLOB    NOT NULL,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    occurred_at     INTEGER NOT NULL,
    appended_at     INTEGER NOT NULL,
    state           INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error      TEXT,
    kafka_partition INTEGER,
    kafka_offset    INTEGER,
    published_at    INTEGER,
    traceparent     TEXT,
    tracestate      TEXT,
    change_seq      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

CREATE INDEX outbox_events_relay ON outbox_events (shard, seq) WHERE state < 4;
CREATE INDEX outbox_events_transaction ON outbox_events (producer, transaction_id, append_sequence, batch_index);
CREATE INDEX outbox_events_changes ON outbox_events (producer, change_seq);

CREATE TABLE outbox_leases (
    shard      INTEGER PRIMARY KEY,
    owner      TEXT,
    epoch      INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL DEFAULT 0
) STRICT;
