CREATE TABLE outbox_instances (
    owner        TEXT    PRIMARY KEY,
    heartbeat_at INTEGER NOT NULL
) STRICT;
