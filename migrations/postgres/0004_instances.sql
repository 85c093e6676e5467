-- Live gateway instances, for a fair share of shards each.
CREATE TABLE outbox_instances (
    owner        text        PRIMARY KEY,
    heartbeat_at timestamptz NOT NULL
);
