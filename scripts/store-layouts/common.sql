-- Shared by every layout: the event table as migrations/postgres creates it.
DROP SCHEMA IF EXISTS layout CASCADE;
CREATE SCHEMA layout;
SET search_path = layout;
CREATE SEQUENCE change_seq;
CREATE TABLE events (
    seq bigserial PRIMARY KEY,
    writer_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id uuid NOT NULL UNIQUE,
    shard integer NOT NULL,
    producer text NOT NULL,
    transaction_id text NOT NULL,
    append_sequence bigint NOT NULL,
    batch_index integer NOT NULL,
    topic text NOT NULL,
    kafka_key bytea,
    payload bytea NOT NULL,
    headers bytea NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    event_type text NOT NULL,
    occurred_at timestamptz NOT NULL,
    appended_at timestamptz NOT NULL DEFAULT now(),
    state smallint NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error text,
    kafka_partition integer,
    kafka_offset bigint,
    published_at timestamptz,
    traceparent text,
    tracestate text,
    change_seq bigint NOT NULL DEFAULT nextval('change_seq'),
    updated_at timestamptz NOT NULL DEFAULT now()
);
