-- Records the outcomes of deliveries of several shards in one statement.
-- The new state and placement bytes of each segment were computed by the
-- relay from a read without locks; a segment is written only if its states
-- are still those it read ($4, a compare-and-swap) and its shard's lease is
-- still the relay's ($1, $2: FOR KEY SHARE, so a takeover waits for this
-- statement or this statement leaves the shard alone). One statement, so
-- that no lock is held between round trips.
--
-- Per segment ($3..$7): number, the states read, the new states and
-- placements, whether it is final. Per changed event ($8..$13): segment,
-- position, producer, and for a failed delivery its error and next attempt
-- (none: dead-lettered). Returns the change-feed rows written (a producer,
-- its segments and its position in the feed) and the attempts of each
-- failed event; a segment no change-feed row names was not written.
WITH held AS (
    SELECT l.shard
    FROM outbox_leases AS l
    JOIN unnest($1::integer[], $2::bigint[]) AS w(shard, epoch)
      ON l.shard = w.shard AND l.epoch = w.epoch
    ORDER BY l.shard
    FOR KEY SHARE OF l
),
written AS (
    -- Each row by its key, its new bytes by its place in the arrays: a join
    -- to the unnested arrays (of unknown length to the planner) was planned
    -- as a nested loop that unnests them again for every row.
    UPDATE outbox_segments AS g
    SET states = ($5::bytea[])[array_position($3::bigint[], g.number)],
        placements = ($6::bytea[])[array_position($3::bigint[], g.number)],
        final = ($7::boolean[])[array_position($3::bigint[], g.number)],
        updated_at = now()
    WHERE g.number = ANY ($3::bigint[])
      AND g.states = ($4::bytea[])[array_position($3::bigint[], g.number)]
      AND g.shard IN (SELECT shard FROM held)
    RETURNING g.number
),
outcomes AS (
    SELECT o.*
    FROM unnest($8::bigint[], $9::integer[], $10::text[], $11::text[], $12::timestamptz[],
                $13::boolean[])
        AS o(segment, position, producer, error, retry_at, failed)
    WHERE o.segment IN (SELECT number FROM written)
),
faults AS (
    INSERT INTO outbox_event_faults AS f
        (segment, position, attempts, last_error, next_attempt_at, dead)
    SELECT o.segment, o.position, 1, o.error, o.retry_at, o.retry_at IS NULL
    FROM outcomes AS o
    WHERE o.failed
    ON CONFLICT (segment, position) DO UPDATE
    SET attempts = f.attempts + 1, last_error = EXCLUDED.last_error,
        next_attempt_at = EXCLUDED.next_attempt_at, dead = EXCLUDED.dead,
        updated_at = now()
    RETURNING f.segment, f.position, f.attempts
),
changes AS (
    -- One change-feed row per producer, naming each event it changed (in
    -- no particular order: an ordered aggregate sorts each group apart).
    INSERT INTO outbox_changes (producer, segments, positions)
    SELECT o.producer, array_agg(o.segment), array_agg(o.position)
    FROM outcomes AS o
    GROUP BY o.producer
    RETURNING producer, segments, change_seq
)
-- Two kinds of rows, not joined (a join of CTEs is planned blind): each
-- change-feed row written, and each fault written.
-- (Arrays as they are: a lateral unnest here cost a millisecond a row.)
SELECT c.producer, c.segments, c.change_seq, NULL::bigint AS segment,
       NULL::integer AS position, NULL::integer AS attempts, now() AS at
FROM changes AS c
UNION ALL
SELECT NULL, NULL, NULL, f.segment, f.position, f.attempts, now()
FROM faults AS f
