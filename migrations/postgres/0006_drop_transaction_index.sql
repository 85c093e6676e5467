-- Events of a transaction are found through outbox_appends (ids per append)
-- and, while pending, through outbox_events_pending; this index only cost
-- two text-key insertions per event written or updated.
DROP INDEX outbox_events_transaction;
