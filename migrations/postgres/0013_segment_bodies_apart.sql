-- Deliveries are recorded by one statement whose state and placement bytes
-- the relay computes (src/store/sql/postgres/record_outcomes.sql); the
-- function that did it per outcome is no longer used.
DROP FUNCTION IF EXISTS outbox_record_outcomes(
    integer[], bigint[], bigint[], integer[], text[], smallint[], integer[], bigint[], text[],
    timestamptz[]);

-- A segment's body never changes, its states do, often more than once: a
-- body below PostgreSQL's out-of-line threshold (2 kB, a few events) was
-- copied by every new version of its row. Bodies get a table of their own,
-- so that a state change writes a row of states and placements only.
CREATE TABLE outbox_segment_bodies (
    number bigint PRIMARY KEY,
    body   bytea  NOT NULL
);
-- Packed events rarely compress (payloads are the caller's): do not try.
ALTER TABLE outbox_segment_bodies ALTER COLUMN body SET STORAGE EXTERNAL;
INSERT INTO outbox_segment_bodies (number, body) SELECT number, body FROM outbox_segments;
ALTER TABLE outbox_segments DROP COLUMN body;
