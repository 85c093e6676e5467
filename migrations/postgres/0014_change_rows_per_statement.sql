-- The change feed kept a row per producer and segment of every statement
-- that changed events: about two rows per event when segments are small (a
-- low rate spreads each append over its shards), each with two index
-- entries. A row now holds one producer's changes of one statement, however
-- many segments they touch: segments[i] names the segment of the i-th
-- change and, when positions is not NULL, positions[i] its event (NULL: all
-- the producer's events of each segment listed).
ALTER TABLE outbox_changes ADD COLUMN segments bigint[];
UPDATE outbox_changes
SET segments = CASE WHEN positions IS NULL THEN ARRAY[segment]
                    ELSE array_fill(segment, ARRAY[cardinality(positions)]) END;
ALTER TABLE outbox_changes ALTER COLUMN segments SET NOT NULL;
-- Drops outbox_changes_segment with it.
ALTER TABLE outbox_changes DROP COLUMN segment;
-- Statuses by id and retention find a segment's changes here. Entries go
-- in at once (no pending list that an append would have to merge).
CREATE INDEX outbox_changes_segments ON outbox_changes USING gin (segments)
    WITH (fastupdate = off);
