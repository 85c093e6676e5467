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

/// Records the outcomes of deliveries (published, retrying, dead-lettered)
/// of several shards in one statement, each shard's fenced by its lease
/// epoch (`FOR KEY SHARE`: a takeover waits for the statement, or the
/// statement sees it and leaves that shard's outcomes alone). One
/// statement, so that no lock is held between round trips: a writer that
/// stalls (a paused process) can never hold up another instance's
/// takeover.
///
/// Per outcome: segment, position, producer, new state, and the partition
/// and offset (published) or the error and next attempt (failed). Only
/// events not final yet change. Returns each changed event with its
/// change-feed position, its attempts and the time of the change.
/// (Re)created at every migration.
pub(super) const RECORD_OUTCOMES_FUNCTION: &str = concat!(
    r"
CREATE OR REPLACE FUNCTION outbox_record_outcomes(
    p_shards integer[], p_epochs bigint[],
    p_segments bigint[], p_positions integer[], p_producers text[], p_states smallint[],
    p_partitions integer[], p_offsets bigint[], p_errors text[], p_retry_at timestamptz[])
RETURNS TABLE (recorded_segment bigint, recorded_position integer, recorded_change bigint,
               recorded_attempts integer, recorded_at timestamptz)
LANGUAGE plpgsql AS $function$
DECLARE
    held integer[];
    o record;
    at_segment bigint;
    s bytea;
    p bytea;
    code integer;
    changed_positions integer[] := '{}';
    changed_producers text[] := '{}';
BEGIN
    SELECT coalesce(array_agg(l.shard), '{}') INTO held
    FROM (SELECT l.shard FROM outbox_leases AS l
          JOIN unnest(p_shards, p_epochs) AS w(shard, epoch)
            ON l.shard = w.shard AND l.epoch = w.epoch
          ORDER BY l.shard
          FOR KEY SHARE OF l) AS l;
    -- One pass over the outcomes in segment order; each segment is locked
    -- when its first outcome comes (in number order: writers never
    -- deadlock) and written back after its last. A sentinel ends the pass.
    FOR o IN
        SELECT u.segment, u.position, u.producer, u.state, u.partition, u.kafka_offset,
               u.error, u.retry_at
        FROM unnest(p_segments, p_positions, p_producers, p_states, p_partitions, p_offsets,
                    p_errors, p_retry_at)
            AS u(segment, position, producer, state, partition, kafka_offset, error, retry_at)
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
        ORDER BY 1 NULLS LAST, 2
    LOOP
        IF o.segment IS DISTINCT FROM at_segment THEN
            IF at_segment IS NOT NULL AND cardinality(changed_positions) > 0 THEN
                -- Final once every event is published, discarded or
                -- removed (a dead letter keeps its segment in the relay's
                -- index).
                UPDATE outbox_segments
                SET states = s, placements = p, updated_at = now(),
                    final = position('\x",
    stored!(event pending hex),
    r"'::bytea IN s) = 0
                        AND position('\x",
    stored!(event ready hex),
    r"'::bytea IN s) = 0
                        AND position('\x",
    stored!(event retrying hex),
    r"'::bytea IN s) = 0
                        AND position('\x",
    stored!(event dead_lettered hex),
    r"'::bytea IN s) = 0
                WHERE number = at_segment;
                RETURN QUERY
                WITH changes AS (
                    INSERT INTO outbox_changes (producer, segment, positions)
                    SELECT c.producer, at_segment, array_agg(c.position ORDER BY c.position)
                    FROM unnest(changed_producers, changed_positions) AS c(producer, position)
                    GROUP BY c.producer
                    RETURNING outbox_changes.producer, outbox_changes.change_seq
                )
                SELECT at_segment, c.position, ch.change_seq, coalesce(f.attempts, 0), now()
                FROM unnest(changed_producers, changed_positions) AS c(producer, position)
                JOIN changes AS ch ON ch.producer = c.producer
                LEFT JOIN outbox_event_faults AS f
                  ON f.segment = at_segment AND f.position = c.position;
            END IF;
            EXIT WHEN o.segment IS NULL;
            at_segment := o.segment;
            changed_positions := '{}';
            changed_producers := '{}';
            SELECT g.states, g.placements INTO s, p FROM outbox_segments AS g
            WHERE g.number = at_segment AND g.shard = ANY (held)
            FOR UPDATE OF g;
            IF NOT FOUND THEN
                s := NULL;
            END IF;
        END IF;
        IF s IS NULL OR o.position >= length(s) THEN
            CONTINUE;
        END IF;
        code := get_byte(s, o.position);
        -- Only an event that is not final yet (nor removed) changes.
        IF code NOT IN (",
    stored!(event pending),
    ", ",
    stored!(event ready),
    ", ",
    stored!(event retrying),
    r") THEN
            CONTINUE;
        END IF;
        s := set_byte(s, o.position, o.state);
        IF o.state = ",
    stored!(event published),
    r" THEN
            IF p IS NULL THEN
                p := decode(repeat('00', length(s) * 12), 'hex');
            END IF;
            p := overlay(p PLACING int4send(o.partition) || int8send(o.kafka_offset)
                         FROM o.position * 12 + 1 FOR 12);
        ELSE
            INSERT INTO outbox_event_faults AS f
                (segment, position, attempts, last_error, next_attempt_at, dead)
            VALUES (at_segment, o.position, 1, o.error, o.retry_at, o.retry_at IS NULL)
            ON CONFLICT (segment, position) DO UPDATE
            SET attempts = f.attempts + 1, last_error = EXCLUDED.last_error,
                next_attempt_at = EXCLUDED.next_attempt_at, dead = EXCLUDED.dead,
                updated_at = now();
        END IF;
        changed_positions := changed_positions || o.position;
        changed_producers := changed_producers || o.producer;
    END LOOP;
END
$function$
"
);
