//! The relay's read, whose SQL is composed at compile time.

/// Some shards' unfinished segments in (writer_xid, number) order, each
/// shard's ($1) from its (writer_xid, number) on ($2, $3), at most $4 per
/// shard, behind the visibility gate (see migration 0002): only segments
/// whose writing transaction is older than every outboxd writer still
/// running, so that no segment can later appear before the last one read.
/// Served by outbox_segments_relay; one gate for all the shards.
///
/// Always one row per shard at least: held_back says whether unfinished
/// segments of the shard wait behind the gate (the relay then looks again
/// soon, as the writer that lifts the gate wakes only its own shards); page
/// rows have a number.
pub(super) const READ_SEGMENTS: &str = r"
WITH gate AS (
    SELECT LEAST(
        pg_snapshot_xmax(pg_current_snapshot()),
        (SELECT min(s.floor_xid)
         FROM outbox_writer_slots AS s
         JOIN pg_stat_activity AS a
           ON a.pid = s.backend_pid AND a.backend_start = s.backend_start)
    ) AS below
)
SELECT w.request, page.*, held.back IS NOT NULL AS held_back
FROM gate
CROSS JOIN unnest($1::integer[], $2::text[], $3::bigint[]) WITH ORDINALITY
    AS w(shard, from_xid, from_number, request)
-- Per shard, off the relay index (an EXISTS here would be planned as one
-- scan of the whole table for all the shards).
LEFT JOIN LATERAL (
    SELECT true AS back
    FROM outbox_segments AS h
    WHERE h.shard = w.shard AND NOT h.final AND h.writer_xid >= gate.below
    LIMIT 1
) AS held ON true
LEFT JOIN LATERAL (
    SELECT number, shard, (writer_xid::text)::bigint AS writer_xid, millis, appended_at,
           updated_at, states, placements
    FROM outbox_segments
    WHERE shard = w.shard
      AND NOT final
      AND writer_xid < gate.below
      AND (writer_xid, number) >= (w.from_xid::xid8, w.from_number)
    -- The table's columns, not the output's writer_xid (a bigint): the index
    -- order, so that the page is read off the index without a sort.
    ORDER BY outbox_segments.writer_xid, outbox_segments.number
    LIMIT $4
) AS page ON true
";
