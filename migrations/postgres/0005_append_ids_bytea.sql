-- Event ids of an append as 16 bytes each (like the SQLite store), so that
-- the appends of a whole coalesced transaction go in with one UNNEST.
ALTER TABLE outbox_appends
    ALTER COLUMN event_ids TYPE bytea
    USING decode(replace(array_to_string(event_ids, ''), '-', ''), 'hex');
