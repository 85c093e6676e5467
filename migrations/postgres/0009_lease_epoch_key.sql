-- Relay writes fence on (shard, epoch) with FOR KEY SHARE. With the epoch in
-- a unique key, only a change of epoch (a takeover) is a key update that
-- waits for those writes; an owner renewing its lease (same epoch, a no-key
-- update) no longer holds up every relay write of its shards.
CREATE UNIQUE INDEX outbox_leases_epoch ON outbox_leases (shard, epoch);
