-- Segments: the events of one coalesced commit for one shard in one row.
--
-- The store's work per event becomes its bytes: one row and one relay index
-- entry per segment instead of a row and four index entries per event, and
-- publishing is one row update per segment instead of a delete and an
-- insert per event (docs/benchmarks.md, "Store layouts for the store's
-- redesign"). The body is the protobuf of src/store/segment.rs; an event id
-- that outboxd generates names its segment and position there, so a status
-- lookup needs no index per event. outboxd packs the rows of the old layout
-- into segments when it starts (store/postgres/legacy.rs), then drops the
-- old tables.

-- Segment numbers, taken in blocks: a writer knows its segments' numbers
-- (and so its events' ids) before it writes them. Each nextval reserves
-- the numbers [value, value + 1024).
CREATE SEQUENCE outbox_segment_numbers INCREMENT BY 1024;

CREATE TABLE outbox_segments (
    number      bigint      PRIMARY KEY,
    shard       integer     NOT NULL,
    -- outboxd's writing transaction: the relay's visibility gate (0002).
    writer_xid  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    -- The time in the ids of its events (unix milliseconds).
    millis      bigint      NOT NULL,
    appended_at timestamptz NOT NULL DEFAULT now(),
    body        bytea       NOT NULL,
    -- One byte per event, in position order: its state (domain::EventState).
    states      bytea       NOT NULL,
    -- Twelve bytes per event once any is published: the Kafka partition
    -- (4 bytes) and offset (8), big-endian; meaningful for published events.
    placements  bytea,
    -- Every event published or discarded: out of the relay's index.
    -- (A dead letter keeps its segment in, for redrive and held keys.)
    final       boolean     NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- Packed events rarely compress (payloads are the caller's): do not try.
ALTER TABLE outbox_segments ALTER COLUMN body SET STORAGE EXTERNAL;
-- The relay's hot query: one shard's unfinished segments in
-- (writer_xid, number) order.
CREATE INDEX outbox_segments_relay ON outbox_segments (shard, writer_xid, number) WHERE NOT final;

-- Events that left the happy path: a failed delivery (attempts, the last
-- error, the next attempt) or a dead letter.
CREATE TABLE outbox_event_faults (
    segment         bigint      NOT NULL,
    position        integer     NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz,
    dead            boolean     NOT NULL DEFAULT false,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (segment, position)
);
CREATE INDEX outbox_event_faults_dead ON outbox_event_faults (segment, position) WHERE dead;

-- Ids the callers chose, which do not name a location.
CREATE TABLE outbox_caller_ids (
    event_id uuid    PRIMARY KEY,
    segment  bigint  NOT NULL,
    position integer NOT NULL
);
CREATE INDEX outbox_caller_ids_segment ON outbox_caller_ids (segment);

-- The change feed of WatchStatus: one row per producer and segment a
-- transaction changed, naming the positions (NULL: all of the producer's
-- events of the segment). Read in (change_xid, change_seq) order below the
-- gate of 0011.
CREATE TABLE outbox_changes (
    producer   text    NOT NULL,
    segment    bigint  NOT NULL,
    positions  integer[],
    change_xid xid8    NOT NULL DEFAULT pg_current_xact_id(),
    change_seq bigint  NOT NULL DEFAULT nextval('outbox_change_seq')
);
CREATE INDEX outbox_changes_feed ON outbox_changes (producer, change_xid, change_seq);
CREATE INDEX outbox_changes_segment ON outbox_changes (segment);

-- Why a transaction's events are held or were discarded (an unresolvable
-- token, an abort, an expiry), shown in their status.
ALTER TABLE outbox_transactions ADD COLUMN reason text;
