-- Publishing moves an event out of outbox_events into outbox_published.
--
-- outbox_events then holds only events that are not final yet, dead
-- letters (kept for redrive) and discarded events, so the relay's table and
-- its indexes stay small. A published event keeps what its status needs
-- (partition, offset, time, change cursor) in a narrow row; the payload is
-- not kept. Measured with scripts/store-layouts (docs/benchmarks.md), this
-- costs PostgreSQL less than updating rows in place, whose new row versions
-- add an entry to every index of the wide table.
CREATE TABLE outbox_published (
    event_id        uuid        PRIMARY KEY,
    seq             bigint      NOT NULL,
    producer        text        NOT NULL,
    transaction_id  text        NOT NULL,
    append_sequence bigint      NOT NULL,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    attempts        integer     NOT NULL,
    published_at    timestamptz NOT NULL,
    change_seq      bigint      NOT NULL
);
-- A producer's changes in cursor order, for WatchStatus resumes.
CREATE INDEX outbox_published_changes ON outbox_published (producer, change_seq);
-- Retention: rows are inserted in publish order, which a BRIN index
-- summarises for almost nothing per insertion.
CREATE INDEX outbox_published_age ON outbox_published USING brin (published_at);

WITH moved AS (
    DELETE FROM outbox_events WHERE state = 4
    RETURNING event_id, seq, producer, transaction_id, append_sequence, topic,
              kafka_partition, kafka_offset, attempts, updated_at, change_seq
)
INSERT INTO outbox_published
SELECT event_id, seq, producer, transaction_id, append_sequence, topic,
       coalesce(kafka_partition, -1), coalesce(kafka_offset, -1), attempts, updated_at, change_seq
FROM moved;

-- Every event's status, wherever it lives.
CREATE VIEW outbox_event_statuses AS
SELECT seq, event_id, producer, transaction_id, append_sequence, topic, state,
       kafka_partition, kafka_offset, attempts, last_error, updated_at, change_seq
FROM outbox_events
UNION ALL
SELECT seq, event_id, producer, transaction_id, append_sequence, topic, 4::smallint,
       kafka_partition, kafka_offset, attempts, NULL::text, published_at, change_seq
FROM outbox_published;
