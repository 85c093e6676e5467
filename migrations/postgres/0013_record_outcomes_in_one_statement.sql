-- Deliveries are recorded by one statement whose state and placement bytes
-- the relay computes (src/store/sql/postgres/record_outcomes.sql); the
-- function that did it per outcome is no longer used.
DROP FUNCTION IF EXISTS outbox_record_outcomes(
    integer[], bigint[], bigint[], integer[], text[], smallint[], integer[], bigint[], text[],
    timestamptz[]);
