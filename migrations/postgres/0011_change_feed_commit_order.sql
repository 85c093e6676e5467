-- A producer's change feed in commit order.
--
-- change_seq comes from nextval() when a statement runs, so a change can
-- commit after one with a higher number, and a watch resumed after that
-- higher number would never see it. Each change now also records the
-- transaction that made it (change_xid). The feed is read in
-- (change_xid, change_seq) order, and only below the oldest transaction of
-- an outboxd connection to this database still running (or, with none, the
-- next xid to be assigned): nothing can appear there any more, so a
-- position handed out is final. change_seq still orders the changes of one
-- event.
ALTER TABLE outbox_events ADD COLUMN change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE outbox_published ADD COLUMN change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();

DROP INDEX outbox_events_changes;
CREATE INDEX outbox_events_changes ON outbox_events (producer, change_xid, change_seq);
DROP INDEX outbox_published_changes;
CREATE INDEX outbox_published_changes ON outbox_published (producer, change_xid, change_seq);

CREATE OR REPLACE VIEW outbox_event_statuses AS
SELECT seq, event_id, producer, transaction_id, append_sequence, topic, state,
       kafka_partition, kafka_offset, attempts, last_error, updated_at, change_seq, change_xid
FROM outbox_events
UNION ALL
SELECT seq, event_id, producer, transaction_id, append_sequence, topic, 4::smallint,
       kafka_partition, kafka_offset, attempts, NULL::text, published_at, change_seq, change_xid
FROM outbox_published;
