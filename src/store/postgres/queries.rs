//! The relay's read, whose SQL is composed at compile time.

/// One shard's unfinished segments in (writer_xid, number) order, from
/// ($2, $3) on, behind the visibility gate (see migration 0002): only
/// segments whose writing transaction is older than every outboxd writer
/// still running, so that no segment can later appear before the last one
/// read. Served by outbox_segments_relay.
///
/// Always one row at least: held_back says whether unfinished segments of
/// the shard wait behind the gate (the relay then looks again soon, as the
/// writer that lifts the gate wakes only its own shards); page rows have a
/// number.
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
SELECT page.*,
       EXISTS (SELECT 1 FROM outbox_segments AS h
               WHERE h.shard = $1 AND NOT h.final AND h.writer_xid >= gate.below) AS held_back
FROM gate
LEFT JOIN LATERAL (
    SELECT number, shard, (writer_xid::text)::bigint AS writer_xid, millis, appended_at,
           updated_at, states, placements
    FROM outbox_segments
    WHERE shard = $1
      AND NOT final
      AND writer_xid < gate.below
      AND (writer_xid, number) >= ($2::text::xid8, $3)
    -- The table's columns, not the output's writer_xid (a bigint): the index
    -- order, so that the page is read off the index without a sort.
    ORDER BY outbox_segments.writer_xid, outbox_segments.number
    LIMIT $4
) AS page ON true
";
