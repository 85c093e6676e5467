CREATE INDEX outbox_events_dead_letters ON outbox_events (seq) WHERE state = 5;
