-- Takes or renews up to $3 leases for owner $1: its own first, then free or
-- expired ones. A change of owner bumps the epoch, fencing the old owner.
WITH candidates AS (
    SELECT shard
    FROM outbox_leases
    WHERE owner = $1 OR owner IS NULL OR expires_at < now()
    ORDER BY (owner IS NOT DISTINCT FROM $1) DESC, shard
    LIMIT $3
    -- Not FOR UPDATE: renewals must not wait for relay writes (migration 0009).
    FOR NO KEY UPDATE
)
UPDATE outbox_leases AS l
SET epoch = CASE WHEN l.owner IS NOT DISTINCT FROM $1 THEN l.epoch ELSE l.epoch + 1 END,
    owner = $1,
    expires_at = now() + make_interval(secs => $2::double precision)
FROM candidates AS c
WHERE l.shard = c.shard
RETURNING l.shard, l.owner, l.epoch, l.expires_at
