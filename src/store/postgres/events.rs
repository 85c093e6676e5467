//! What the PostgreSQL store does with its events once they are stored in
//! segments: the relay's reads, state changes (failed deliveries,
//! resolved transactions, redrives), dead letters, the backlog, retention
//! and statuses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::recorder::{Outcome, record_outcomes};
use super::segments::{
    self, Changed, Facts, SegmentCache, SegmentRow, change_entries, location_of, seq_of,
    write_changes,
};
use super::{PostgresStore, transaction_columns};
use crate::domain::{EventId, EventState, EventStatus, TransactionRef};
use crate::store::codes::unpack_ids;
use crate::store::segment::{PackedEvent, Segment, headers};
use crate::store::{
    DeadLetterFilter, DeliveryFailed, Lease, RelayCursor, RelayPage, RelayRow, Resolved,
    ShardBacklog, StoreError,
};

/// Segments one relay read takes at a time.
pub(super) const SEGMENTS_PER_READ: i64 = 16;

/// Segment rows and bodies loaded for a state change or a status.
pub(super) struct Loaded {
    pub rows: BTreeMap<i64, SegmentRow>,
    pub bodies: HashMap<i64, Arc<Segment>>,
}

impl Loaded {
    /// Rows (locked when `lock`) and bodies of the segments `numbers`.
    pub(super) async fn load(
        connection: &mut PgConnection,
        cache: &SegmentCache,
        numbers: &[i64],
        lock: bool,
    ) -> Result<Loaded, StoreError> {
        let mut numbers = numbers.to_vec();
        numbers.sort_unstable();
        numbers.dedup();
        let rows = segments::rows(connection, &numbers, lock).await?;
        let present: Vec<i64> = rows.iter().map(|row| row.number).collect();
        let bodies = segments::bodies(connection, cache, &present).await?;
        Ok(Loaded {
            rows: rows.into_iter().map(|row| (row.number, row)).collect(),
            bodies,
        })
    }

    /// The event at `position` of segment `number`, with its row.
    pub(super) fn event(
        &self,
        number: i64,
        position: u16,
    ) -> Option<(&SegmentRow, PackedEvent<'_>)> {
        let row = self.rows.get(&number)?;
        let event = self.bodies.get(&number)?.event(position)?;
        Some((row, event))
    }

    /// The facts the statuses of the rows `numbers` need.
    pub(super) async fn facts(
        &self,
        connection: &mut PgConnection,
        numbers: &[i64],
    ) -> Result<Facts, StoreError> {
        let rows: Vec<&SegmentRow> = numbers.iter().filter_map(|n| self.rows.get(n)).collect();
        Facts::load(connection, &rows, &self.bodies).await
    }

    /// Writes the changed rows back with their change-feed rows, and
    /// returns the statuses of the changed events (and their shards).
    pub(super) async fn write(
        &self,
        connection: &mut PgConnection,
        changed: &BTreeMap<i64, Changed>,
    ) -> Result<Resolved, StoreError> {
        let rows: Vec<(&SegmentRow, &Changed)> = changed
            .iter()
            .filter_map(|(number, changed)| Some((self.rows.get(number)?, changed)))
            .collect();
        let cursors = write_changes(connection, &rows).await?;
        let numbers: Vec<i64> = changed.keys().copied().collect();
        let facts = self.facts(connection, &numbers).await?;
        let mut resolved = Resolved::default();
        for (row, change) in rows {
            let mut positions: Vec<(&String, u16)> = change
                .positions
                .iter()
                .flat_map(|(producer, positions)| positions.iter().map(move |p| (producer, *p)))
                .collect();
            positions.sort_by_key(|(_, position)| *position);
            for (producer, position) in positions {
                let Some((_, event)) = self.event(row.number, position) else {
                    continue;
                };
                let cursor = cursors
                    .get(&(producer.clone(), row.number))
                    .copied()
                    .unwrap_or(0);
                resolved
                    .changed
                    .push(facts.status(row, &event, cursor as u64)?);
            }
            resolved.shards.push(row.shard as u32);
        }
        resolved.shards.sort_unstable();
        resolved.shards.dedup();
        Ok(resolved)
    }
}

/// Marks a change of the event at `position` of `row`, by its producer.
pub(super) fn mark(
    changed: &mut BTreeMap<i64, Changed>,
    row: &SegmentRow,
    event: &PackedEvent<'_>,
) {
    changed
        .entry(row.number)
        .or_default()
        .positions
        .entry(event.transaction.producer.clone())
        .or_default()
        .push(event.position);
}

/// The relay row of `event` of `row`.
fn relay_row(
    row: &SegmentRow,
    event: &PackedEvent<'_>,
    state: EventState,
    facts: &Facts,
) -> RelayRow {
    let packed = event.event;
    let fault = facts.fault(row.number, event.position);
    let kafka_key = match &packed.key {
        Some(key) => Some(key.clone()),
        None if !packed.aggregate_id.is_empty() => Some(packed.aggregate_id.as_bytes().to_vec()),
        None => None,
    };
    RelayRow {
        seq: seq_of(row.number, event.position),
        writer_xid: row.writer_xid,
        event_id: event.event_id,
        producer: event.transaction.producer.clone(),
        transaction_id: event.transaction.transaction_id.clone(),
        topic: packed.topic.clone(),
        kafka_key,
        payload: packed.payload.clone(),
        headers: headers(packed),
        aggregate_type: packed.aggregate_type.clone(),
        aggregate_id: packed.aggregate_id.clone(),
        event_type: packed.event_type.clone(),
        state,
        attempts: fault.map_or(0, |f| f.attempts.max(0) as u32),
        next_attempt_at: fault.and_then(|f| f.next_attempt_at),
        occurred_at: packed
            .occurred_at_micros
            .and_then(DateTime::from_timestamp_micros)
            .unwrap_or(row.appended_at),
        appended_at: row.appended_at,
        traceparent: packed.traceparent.clone(),
        tracestate: packed.tracestate.clone(),
    }
}

impl PostgresStore {
    /// See [`crate::store::Store::read_relay_page`].
    pub(super) async fn read_segments(
        &self,
        shard: u32,
        after: RelayCursor,
        limit: u32,
        with_dead_letters: bool,
    ) -> Result<RelayPage, StoreError> {
        let (after_segment, _) = location_of(after.seq);
        let mut from = (after.writer_xid, after_segment);
        let mut page = RelayPage::default();
        let mut first = true;
        loop {
            let fetched = self.reader.read(shard, from).await?;
            if first {
                page.held_back = fetched.held_back;
                first = false;
            }
            let rows = fetched.rows;
            // The events a page takes. Only their bodies are loaded: a read
            // ahead of large segments would push the rest out of the cache.
            let wanted = |row: &SegmentRow, position: usize, code: u8| {
                let seq = seq_of(row.number, position as u16);
                (row.writer_xid, seq) > (after.writer_xid, after.seq)
                    && code != segments::GONE
                    && (!EventState::from_stored(i16::from(code)).is_some_and(EventState::is_final)
                        || (with_dead_letters && code == EventState::DeadLettered as u8))
            };
            let mut needed = 0usize;
            let mut numbers: Vec<i64> = Vec::new();
            for row in &rows {
                if needed >= (limit as usize).saturating_sub(page.rows.len()) {
                    break;
                }
                let events = (row.states.iter().enumerate())
                    .filter(|&(position, &code)| wanted(row, position, code))
                    .count();
                if events > 0 {
                    numbers.push(row.number);
                    needed += events;
                }
            }
            let mut connection = self.pool.acquire().await?;
            let bodies = segments::bodies(&mut connection, &self.cache, &numbers).await?;
            let faulty: Vec<&SegmentRow> = rows
                .iter()
                .filter(|row| numbers.contains(&row.number))
                .filter(|row| {
                    row.states.iter().any(|&code| {
                        code == EventState::Retrying as u8 || code == EventState::DeadLettered as u8
                    })
                })
                .collect();
            let facts = Facts::load_faults(&mut connection, &faulty).await?;
            for row in &rows {
                let Some(segment) = bodies.get(&row.number) else {
                    continue;
                };
                for event in segment.events() {
                    let code = row.states[usize::from(event.position)];
                    if !wanted(row, usize::from(event.position), code) {
                        continue;
                    }
                    let Some(state) = row.state(event.position)? else {
                        continue;
                    };
                    page.rows.push(relay_row(row, &event, state, &facts));
                    if page.rows.len() >= limit as usize {
                        return Ok(page);
                    }
                }
            }
            match rows.last() {
                Some(last) if rows.len() as i64 == SEGMENTS_PER_READ => {
                    from = (last.writer_xid, last.number + 1);
                }
                _ => return Ok(page),
            }
        }
    }

    /// See [`crate::store::Store::record_failed`].
    pub(super) async fn record_failures(
        &self,
        lease: &Lease,
        failed: &[DeliveryFailed],
    ) -> Result<Vec<EventStatus>, StoreError> {
        let outcomes: Vec<Outcome> = failed
            .iter()
            .map(|failure| Outcome {
                seq: failure.seq,
                state: match failure.retry_at {
                    Some(_) => EventState::Retrying,
                    None => EventState::DeadLettered,
                },
                placement: None,
                error: Some(failure.error.clone()),
                retry_at: failure.retry_at,
            })
            .collect();
        record_outcomes(&self.pool, &self.cache, &[lease], &[outcomes])
            .await?
            .pop()
            .expect("one outcome per batch")
    }

    /// Moves the PENDING events of `transactions` to `state` (`None`: only
    /// tells the change feed that their reason changed). A dead letter gets
    /// `reason` as its error. One pass for all of them, however many.
    pub(super) async fn transition_pending(
        &self,
        connection: &mut PgConnection,
        transactions: &[TransactionRef],
        state: Option<EventState>,
        reason: Option<&str>,
    ) -> Result<Resolved, StoreError> {
        if transactions.is_empty() {
            return Ok(Resolved::default());
        }
        let (producers, transaction_ids) = transaction_columns(transactions);
        let appended: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT a.event_ids FROM outbox_appends AS a \
             JOIN UNNEST($1::text[], $2::text[]) AS t(producer, transaction_id) \
               ON a.producer = t.producer AND a.transaction_id = t.transaction_id",
        )
        .bind(&producers)
        .bind(&transaction_ids)
        .fetch_all(&mut *connection)
        .await?;
        let ids: Vec<EventId> = appended.iter().flat_map(|ids| unpack_ids(ids)).collect();
        let located = segments::locate(connection, &ids).await?;
        let numbers: Vec<i64> = located.iter().map(|(_, l)| l.segment).collect();
        let mut loaded = Loaded::load(connection, &self.cache, &numbers, true).await?;
        let mut changed = BTreeMap::new();
        let mut dead = (vec![], vec![]);
        for (id, located) in &located {
            let Some(row) = loaded.rows.get(&located.segment) else {
                continue;
            };
            let Some(body) = loaded.bodies.get(&located.segment) else {
                continue;
            };
            if located.event(*id, row, body).is_none()
                || row.state(located.position)? != Some(EventState::Pending)
            {
                continue;
            }
            if let Some(state) = state {
                loaded
                    .rows
                    .get_mut(&located.segment)
                    .expect("present")
                    .set_state(located.position, state);
                if state == EventState::DeadLettered {
                    dead.0.push(located.segment);
                    dead.1.push(i32::from(located.position));
                }
            }
            if let Some((row, event)) = loaded.event(located.segment, located.position) {
                mark(&mut changed, row, &event);
            }
        }
        if !dead.0.is_empty() {
            sqlx::query(
                "INSERT INTO outbox_event_faults AS f (segment, position, last_error, dead) \
                 SELECT u.segment, u.position, $3, true \
                 FROM UNNEST($1::bigint[], $2::integer[]) AS u(segment, position) \
                 ON CONFLICT (segment, position) DO UPDATE \
                 SET last_error = EXCLUDED.last_error, dead = true, updated_at = now()",
            )
            .bind(&dead.0)
            .bind(&dead.1)
            .bind(reason)
            .execute(&mut *connection)
            .await?;
        }
        loaded.write(connection, &changed).await
    }

    /// Dead letters matching `filter` after relay position `after_seq`, in
    /// that order, up to `limit`: (seq, status).
    pub(super) async fn dead_letters(
        &self,
        connection: &mut PgConnection,
        filter: &DeadLetterFilter,
        after_seq: i64,
        limit: u32,
    ) -> Result<(Vec<(i64, EventStatus)>, Loaded), StoreError> {
        let wanted: HashSet<EventId> = filter.event_ids.iter().copied().collect();
        let mut found = Vec::new();
        let mut after = location_of(after_seq);
        loop {
            let faults: Vec<(i64, i32)> = sqlx::query_as(
                "SELECT segment, position FROM outbox_event_faults \
                 WHERE dead AND (segment, position) > ($1, $2) \
                   AND ($3::timestamptz IS NULL OR updated_at >= $3) \
                 ORDER BY segment, position LIMIT 1000",
            )
            .bind(after.0)
            .bind(i32::from(after.1))
            .bind(if wanted.is_empty() {
                filter.since
            } else {
                None
            })
            .fetch_all(&mut *connection)
            .await?;
            let numbers: Vec<i64> = faults.iter().map(|(segment, _)| *segment).collect();
            let loaded = Loaded::load(connection, &self.cache, &numbers, false).await?;
            let facts = loaded.facts(connection, &numbers).await?;
            for &(segment, position) in &faults {
                let Some((row, event)) = loaded.event(segment, position as u16) else {
                    continue;
                };
                if row.state(event.position)? != Some(EventState::DeadLettered) {
                    continue;
                }
                let matches = if wanted.is_empty() {
                    filter
                        .producer
                        .as_ref()
                        .is_none_or(|p| *p == event.transaction.producer)
                        && filter
                            .topic
                            .as_ref()
                            .is_none_or(|t| *t == event.event.topic)
                } else {
                    wanted.contains(&event.event_id)
                };
                if matches {
                    found.push((
                        seq_of(segment, event.position),
                        facts.status(row, &event, 0)?,
                    ));
                    if found.len() >= limit as usize {
                        return Ok((found, loaded));
                    }
                }
            }
            match faults.last() {
                Some(&(segment, position)) if faults.len() == 1000 => {
                    after = (segment, position as u16)
                }
                _ => return Ok((found, loaded)),
            }
        }
    }

    /// See [`crate::store::Store::redrive`].
    pub(super) async fn redrive_dead_letters(
        &self,
        filter: &DeadLetterFilter,
    ) -> Result<Resolved, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (found, _) = self.dead_letters(&mut tx, filter, 0, u32::MAX).await?;
        let numbers: Vec<i64> = found.iter().map(|(seq, _)| location_of(*seq).0).collect();
        let mut loaded = Loaded::load(&mut tx, &self.cache, &numbers, true).await?;
        let mut changed = BTreeMap::new();
        let (mut fault_segments, mut fault_positions) = (vec![], vec![]);
        for (seq, _) in &found {
            let (number, position) = location_of(*seq);
            let Some(row) = loaded.rows.get_mut(&number) else {
                continue;
            };
            if row.state(position)? != Some(EventState::DeadLettered) {
                continue;
            }
            row.set_state(position, EventState::Ready);
            fault_segments.push(number);
            fault_positions.push(i32::from(position));
            if let Some((row, event)) = loaded.event(number, position) {
                mark(&mut changed, row, &event);
            }
        }
        sqlx::query(
            "UPDATE outbox_event_faults AS f \
             SET attempts = 0, last_error = NULL, next_attempt_at = NULL, dead = false, \
                 updated_at = now() \
             FROM UNNEST($1::bigint[], $2::integer[]) AS u(segment, position) \
             WHERE f.segment = u.segment AND f.position = u.position",
        )
        .bind(&fault_segments)
        .bind(&fault_positions)
        .execute(&mut *tx)
        .await?;
        let resolved = loaded.write(&mut tx, &changed).await?;
        tx.commit().await?;
        Ok(resolved)
    }

    /// See [`crate::store::Store::backlog`].
    pub(super) async fn shard_backlog(&self) -> Result<Vec<ShardBacklog>, StoreError> {
        let rows: Vec<(i32, Vec<u8>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT shard, states, appended_at FROM outbox_segments WHERE NOT final",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut shards: BTreeMap<u32, ShardBacklog> = BTreeMap::new();
        for (shard, states, appended_at) in rows {
            let depth = states
                .iter()
                .filter(|&&code| code != segments::GONE && code < EventState::FIRST_FINAL as u8)
                .count() as u64;
            if depth == 0 {
                continue;
            }
            let entry = shards.entry(shard as u32).or_insert(ShardBacklog {
                shard: shard as u32,
                depth: 0,
                oldest: None,
            });
            entry.depth += depth;
            entry.oldest = Some(entry.oldest.map_or(appended_at, |o| o.min(appended_at)));
        }
        Ok(shards.into_values().collect())
    }

    /// See [`crate::store::Store::purge_finished`].
    pub(super) async fn purge(
        &self,
        older_than: std::time::Duration,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // Whole segments, in short transactions: no long locks, no long
        // snapshots holding back vacuum.
        let mut tx = self.pool.begin().await?;
        let gone: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "DELETE FROM outbox_segments WHERE number IN ( \
                 SELECT number FROM outbox_segments \
                 WHERE final AND updated_at < now() - make_interval(secs => $1::double precision) \
                 ORDER BY number LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING number, states",
        )
        .bind(older_than.as_secs_f64())
        .bind(i64::from(limit.div_ceil(64).max(1)))
        .fetch_all(&mut *tx)
        .await?;
        let numbers: Vec<i64> = gone.iter().map(|(number, _)| *number).collect();
        let mut events: u64 = gone
            .iter()
            .map(|(_, states)| {
                states
                    .iter()
                    .filter(|&&code| code != segments::GONE)
                    .count() as u64
            })
            .sum();
        if !numbers.is_empty() {
            for (table, column) in [
                ("outbox_segment_bodies", "number"),
                ("outbox_event_faults", "segment"),
                ("outbox_caller_ids", "segment"),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE {column} = ANY($1)"
                )))
                .bind(&numbers)
                .execute(&mut *tx)
                .await?;
            }
            // A change-feed row goes with the last of its segments.
            sqlx::query(
                "DELETE FROM outbox_changes AS c WHERE c.segments && $1 \
                 AND NOT EXISTS (SELECT 1 FROM outbox_segments AS s \
                                 WHERE s.number = ANY (c.segments))",
            )
            .bind(&numbers)
            .execute(&mut *tx)
            .await?;
        }
        // Finished events of segments that wait for others: their statuses
        // go now (their bytes with the segment). The segment's last change
        // is older than the retention, so theirs is too.
        let waiting = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM outbox_segments \
             WHERE NOT final AND updated_at < now() - make_interval(secs => $1::double precision) \
             ORDER BY number LIMIT $2 FOR UPDATE SKIP LOCKED",
            segments::ROW_COLUMNS
        )))
        .bind(older_than.as_secs_f64())
        .bind(i64::from(limit.div_ceil(64).max(1)))
        .fetch_all(&mut *tx)
        .await?;
        let (mut marked, mut states, mut finals) = (vec![], vec![], vec![]);
        for row in &waiting {
            let mut row = SegmentRow::from_row(row)?;
            let removed = row.remove_finished();
            if removed > 0 {
                events += removed as u64;
                marked.push(row.number);
                finals.push(row.is_final());
                states.push(row.states);
            }
        }
        // updated_at stays: a segment left final here goes at the next round.
        sqlx::query(
            "UPDATE outbox_segments AS s \
             SET states = ($2::bytea[])[array_position($1::bigint[], s.number)], \
                 final = ($3::boolean[])[array_position($1::bigint[], s.number)] \
             WHERE s.number = ANY ($1::bigint[])",
        )
        .bind(&marked)
        .bind(&states)
        .bind(&finals)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        // An append's record goes only once none of its events waits or is
        // dead-lettered (a redrive may bring it back): until then a retry
        // must still find it, or it would store the events again.
        let mut connection = self.pool.acquire().await?;
        let old: Vec<(String, String, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT producer, transaction_id, sequence, event_ids FROM outbox_appends \
             WHERE created_at < now() - make_interval(secs => $1::double precision) LIMIT $2",
        )
        .bind(older_than.as_secs_f64())
        .bind(i64::from(limit))
        .fetch_all(&mut *connection)
        .await?;
        let ids: Vec<EventId> = old
            .iter()
            .flat_map(|(_, _, _, ids)| unpack_ids(ids))
            .collect();
        let located = segments::locate(&mut connection, &ids).await?;
        let numbers: Vec<i64> = located.iter().map(|(_, l)| l.segment).collect();
        let loaded = Loaded::load(&mut connection, &self.cache, &numbers, false).await?;
        let waiting: HashSet<EventId> = located
            .iter()
            .filter(|(id, located)| {
                let Some(row) = loaded.rows.get(&located.segment) else {
                    return false;
                };
                let Some(body) = loaded.bodies.get(&located.segment) else {
                    return false;
                };
                located.event(*id, row, body).is_some()
                    && row
                        .state(located.position)
                        .is_ok_and(|state| state.is_some_and(|s| s != EventState::Discarded))
                    && !row.is_final()
            })
            .map(|(id, _)| *id)
            .collect();
        let (mut producers, mut transactions, mut sequences) = (vec![], vec![], vec![]);
        for (producer, transaction_id, sequence, ids) in &old {
            if unpack_ids(ids).iter().any(|id| waiting.contains(id)) {
                continue;
            }
            producers.push(producer.as_str());
            transactions.push(transaction_id.as_str());
            sequences.push(*sequence);
        }
        sqlx::query(
            "DELETE FROM outbox_appends AS a \
             USING UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(producer, transaction_id, sequence) \
             WHERE a.producer = u.producer AND a.transaction_id = u.transaction_id \
               AND a.sequence = u.sequence",
        )
        .bind(&producers)
        .bind(&transactions)
        .bind(&sequences)
        .execute(&mut *connection)
        .await?;
        sqlx::query(concat!(
            "DELETE FROM outbox_transactions WHERE ctid IN ( \
                 SELECT t.ctid FROM outbox_transactions t WHERE t.state <> ",
            stored!(transaction open),
            " \
                   AND coalesce(t.resolved_at, t.created_at) < now() - make_interval(secs => $1::double precision) \
                   AND NOT EXISTS (SELECT 1 FROM outbox_appends a \
                       WHERE a.producer = t.producer AND a.transaction_id = t.transaction_id) \
                 LIMIT $2)"
        ))
        .bind(older_than.as_secs_f64())
        .bind(i64::from(limit))
        .execute(&mut *connection)
        .await?;
        Ok(events)
    }

    /// See [`crate::store::Store::status_by_ids`].
    pub(super) async fn statuses(&self, ids: &[EventId]) -> Result<Vec<EventStatus>, StoreError> {
        // One snapshot for the states and the change cursors: a status must
        // never carry the cursor of a change newer than its state (a watch
        // would then take the change's own status for old news).
        let mut connection = read_snapshot(&self.pool).await?;
        let located = segments::locate(&mut connection, ids).await?;
        let numbers: Vec<i64> = located.iter().map(|(_, l)| l.segment).collect();
        let loaded = Loaded::load(&mut connection, &self.cache, &numbers, false).await?;
        let facts = loaded.facts(&mut connection, &numbers).await?;
        let cursors = latest_changes(&mut connection, &loaded).await?;
        let mut statuses = Vec::with_capacity(located.len());
        let mut seen = HashSet::new();
        for (id, located) in &located {
            let Some(row) = loaded.rows.get(&located.segment) else {
                continue;
            };
            let Some(body) = loaded.bodies.get(&located.segment) else {
                continue;
            };
            let Some(event) = located.event(*id, row, body) else {
                continue;
            };
            if row.gone(event.position) || !seen.insert(*id) {
                continue;
            }
            let cursor = cursors
                .get(&(row.number, event.position))
                .copied()
                .unwrap_or(0);
            statuses.push((
                seq_of(row.number, event.position),
                facts.status(row, &event, cursor as u64)?,
            ));
        }
        statuses.sort_by_key(|(seq, _)| *seq);
        connection.commit().await?;
        Ok(statuses.into_iter().map(|(_, status)| status).collect())
    }
}

/// A change-feed row: one producer's changes of one statement.
#[derive(sqlx::FromRow)]
struct ChangeRow {
    producer: String,
    segments: Vec<i64>,
    positions: Option<Vec<i32>>,
    change_seq: i64,
}

/// The latest change-feed position of each event of the loaded segments.
async fn latest_changes(
    connection: &mut PgConnection,
    loaded: &Loaded,
) -> Result<HashMap<(i64, u16), i64>, StoreError> {
    let numbers: Vec<i64> = loaded.rows.keys().copied().collect();
    let mut latest = HashMap::new();
    if numbers.is_empty() {
        return Ok(latest);
    }
    let rows: Vec<ChangeRow> = sqlx::query_as(
        "SELECT producer, segments, positions, change_seq FROM outbox_changes \
         WHERE segments && $1",
    )
    .bind(&numbers)
    .fetch_all(&mut *connection)
    .await?;
    for row in rows {
        for (segment, positions) in change_entries(&row.segments, row.positions.as_deref()) {
            let Some(body) = loaded.bodies.get(&segment) else {
                continue;
            };
            for event in body.events() {
                let applies = event.transaction.producer == row.producer
                    && positions
                        .as_ref()
                        .is_none_or(|p| p.contains(&i32::from(event.position)));
                if applies {
                    let entry = latest
                        .entry((segment, event.position))
                        .or_insert(row.change_seq);
                    *entry = (*entry).max(row.change_seq);
                }
            }
        }
    }
    Ok(latest)
}

/// A read-only transaction whose statements all see one snapshot.
pub(super) async fn read_snapshot(
    pool: &sqlx::PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}
