//! The PostgreSQL store's segments (migration 0012): the rows that hold a
//! coalesced commit's events of one shard, what each event's state is, and
//! the statuses built from them.
//!
//! A segment row keeps one state byte per event and, once any is
//! published, twelve bytes of partition and offset per event. A state
//! change rewrites those bytes under the row's lock (`FOR UPDATE`, in
//! number order so that writers never deadlock), so every change is read,
//! decided here and written back in one store transaction. Bodies never
//! change: the store keeps the ones it wrote or read in a [`SegmentCache`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::domain::{EventId, EventState, EventStatus};
use crate::store::StoreError;
use crate::store::segment::{EventLocation, PackedEvent, Segment, SegmentTransaction};

/// The state byte of an event retention removed while other events of its
/// segment were not final (no [`EventState`] has it).
pub(super) const GONE: u8 = 0;

/// Bodies kept in memory, in bytes of their stored form.
const CACHE_BYTES: usize = 8 << 20;

/// Heads kept in memory, in bytes (estimated).
const HEAD_BYTES: usize = 8 << 20;

/// Decoded segment bodies by number, the oldest dropped first once they
/// exceed [`CACHE_BYTES`]; and the heads of more segments, which is all the
/// recording of deliveries needs: while the relay has many events in
/// flight, their bodies no longer fit, their heads do.
pub(super) struct SegmentCache {
    bodies: Mutex<Fifo<Segment>>,
    heads: Mutex<Fifo<SegmentHead>>,
}

impl Default for SegmentCache {
    fn default() -> Self {
        SegmentCache {
            bodies: Mutex::new(Fifo::new(CACHE_BYTES)),
            heads: Mutex::new(Fifo::new(HEAD_BYTES)),
        }
    }
}

/// Values by segment number, the oldest dropped first beyond `budget`.
struct Fifo<T> {
    values: HashMap<i64, Arc<T>>,
    order: VecDeque<(i64, usize)>,
    bytes: usize,
    budget: usize,
}

impl<T> Fifo<T> {
    fn new(budget: usize) -> Self {
        Fifo {
            values: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn put(&mut self, number: i64, value: Arc<T>, bytes: usize) {
        if self.values.insert(number, value).is_some() {
            return;
        }
        self.order.push_back((number, bytes));
        self.bytes += bytes;
        while self.bytes > self.budget {
            let Some((oldest, size)) = self.order.pop_front() else {
                break;
            };
            self.values.remove(&oldest);
            self.bytes -= size;
        }
    }
}

impl SegmentCache {
    /// The body of segment `number`, when kept.
    pub(super) fn get(&self, number: i64) -> Option<Arc<Segment>> {
        let bodies = self.bodies.lock().expect("segment cache lock");
        bodies.values.get(&number).cloned()
    }

    /// The head of segment `number`, when kept.
    pub(super) fn head(&self, number: i64) -> Option<Arc<SegmentHead>> {
        let heads = self.heads.lock().expect("segment cache lock");
        heads.values.get(&number).cloned()
    }

    /// Keeps `segment`, whose stored body is `bytes` long, and its head.
    pub(super) fn put(&self, segment: Arc<Segment>, bytes: usize) {
        let number = segment.number as i64;
        let head = SegmentHead::of(&segment);
        let head_bytes = head.bytes();
        self.heads
            .lock()
            .expect("segment cache lock")
            .put(number, Arc::new(head), head_bytes);
        self.bodies
            .lock()
            .expect("segment cache lock")
            .put(number, segment, bytes);
    }
}

/// What a status needs of a segment's events, without their payloads.
pub(super) struct SegmentHead {
    number: u64,
    millis: u64,
    transactions: Vec<SegmentTransaction>,
    topics: Vec<String>,
    events: Vec<HeadEvent>,
}

/// One event of a [`SegmentHead`].
struct HeadEvent {
    transaction: u32,
    topic: u32,
    caller_id: Option<Uuid>,
}

/// One event read from a [`SegmentHead`].
pub(super) struct HeadView<'a> {
    pub event_id: EventId,
    pub transaction: &'a SegmentTransaction,
    pub topic: &'a str,
}

impl SegmentHead {
    fn of(segment: &Segment) -> SegmentHead {
        let mut topics: Vec<String> = Vec::new();
        let events = segment
            .body
            .events
            .iter()
            .map(|event| {
                let topic = match topics.iter().position(|known| *known == event.topic) {
                    Some(index) => index,
                    None => {
                        topics.push(event.topic.clone());
                        topics.len() - 1
                    }
                };
                HeadEvent {
                    transaction: event.transaction,
                    topic: topic as u32,
                    caller_id: event
                        .caller_id
                        .as_deref()
                        .and_then(|id| Uuid::from_slice(id).ok()),
                }
            })
            .collect();
        SegmentHead {
            number: segment.number,
            millis: segment.millis,
            transactions: segment.body.transactions.clone(),
            topics,
            events,
        }
    }

    /// Its size in memory, roughly.
    fn bytes(&self) -> usize {
        let strings: usize = self.topics.iter().map(String::len).sum::<usize>()
            + (self.transactions.iter())
                .map(|t| t.producer.len() + t.transaction_id.len() + 64)
                .sum::<usize>();
        strings + self.events.len() * std::mem::size_of::<HeadEvent>() + 64
    }

    /// The event at `position`, when the segment holds one there.
    pub(super) fn event(&self, position: u16) -> Option<HeadView<'_>> {
        let event = self.events.get(usize::from(position))?;
        Some(HeadView {
            event_id: match event.caller_id {
                Some(id) => EventId(id),
                None => EventLocation {
                    segment: self.number,
                    position,
                }
                .id(self.millis),
            },
            transaction: self.transactions.get(event.transaction as usize)?,
            topic: self.topics.get(event.topic as usize)?,
        })
    }
}

/// Heads of the segments `numbers`, from the cache or (their bodies) from
/// the store.
pub(super) async fn heads(
    connection: &mut PgConnection,
    cache: &SegmentCache,
    numbers: &[i64],
) -> Result<HashMap<i64, Arc<SegmentHead>>, StoreError> {
    let mut found = HashMap::with_capacity(numbers.len());
    let mut missing = Vec::new();
    for &number in numbers {
        if found.contains_key(&number) {
            continue;
        }
        match cache.head(number) {
            Some(head) => {
                found.insert(number, head);
            }
            None => missing.push(number),
        }
    }
    for (number, body) in bodies(connection, cache, &missing).await? {
        found.insert(number, Arc::new(SegmentHead::of(&body)));
    }
    Ok(found)
}

/// A segment row without its body.
#[derive(Debug, Clone)]
pub(super) struct SegmentRow {
    pub number: i64,
    pub shard: i32,
    pub writer_xid: i64,
    pub millis: i64,
    pub appended_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub states: Vec<u8>,
    pub placements: Option<Vec<u8>>,
}

/// The columns [`SegmentRow::from_row`] reads.
pub(super) const ROW_COLUMNS: &str = "number, shard, (writer_xid::text)::bigint AS writer_xid, \
     millis, appended_at, updated_at, states, placements";

impl SegmentRow {
    pub(super) fn from_row(row: &PgRow) -> Result<SegmentRow, sqlx::Error> {
        Ok(SegmentRow {
            number: row.try_get("number")?,
            shard: row.try_get("shard")?,
            writer_xid: row.try_get("writer_xid")?,
            millis: row.try_get("millis")?,
            appended_at: row.try_get("appended_at")?,
            updated_at: row.try_get("updated_at")?,
            states: row.try_get("states")?,
            placements: row.try_get("placements")?,
        })
    }

    /// Events in the segment.
    pub(super) fn len(&self) -> usize {
        self.states.len()
    }

    /// The state of the event at `position`; `None` once retention removed
    /// it (its segment waits for its other events).
    pub(super) fn state(&self, position: u16) -> Result<Option<EventState>, StoreError> {
        let code = self.states[position as usize];
        if code == GONE {
            return Ok(None);
        }
        EventState::from_stored(i16::from(code))
            .map(Some)
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "segment {}: unknown state {code} at {position}",
                    self.number
                ))
            })
    }

    /// Whether retention removed the event at `position`.
    pub(super) fn gone(&self, position: u16) -> bool {
        self.states[position as usize] == GONE
    }

    /// Removes the published and discarded events (retention): their
    /// statuses go now, their bytes with the segment. Returns how many.
    pub(super) fn remove_finished(&mut self) -> usize {
        let mut removed = 0;
        for code in &mut self.states {
            if *code == EventState::Published as u8 || *code == EventState::Discarded as u8 {
                *code = GONE;
                removed += 1;
            }
        }
        removed
    }

    /// Where the published event at `position` went (twelve bytes per
    /// event: partition and offset, big-endian).
    pub(super) fn placement(&self, position: u16) -> Option<(i32, i64)> {
        let bytes = self.placements.as_ref()?;
        let at = position as usize * 12;
        let slot = bytes.get(at..at + 12)?;
        Some((
            i32::from_be_bytes(slot[..4].try_into().expect("4 bytes")),
            i64::from_be_bytes(slot[4..].try_into().expect("8 bytes")),
        ))
    }

    /// Sets where the event at `position` was published.
    pub(super) fn set_placement(&mut self, position: u16, partition: i32, offset: i64) {
        let len = self.len();
        let bytes = self.placements.get_or_insert_with(|| vec![0; len * 12]);
        let at = usize::from(position) * 12;
        bytes[at..at + 4].copy_from_slice(&partition.to_be_bytes());
        bytes[at + 4..at + 12].copy_from_slice(&offset.to_be_bytes());
    }

    /// Sets the state of the event at `position`.
    pub(super) fn set_state(&mut self, position: u16, state: EventState) {
        self.states[position as usize] = state as i16 as u8;
    }

    /// Whether every event is published or discarded: the segment leaves
    /// the relay's index. A dead letter keeps it there.
    pub(super) fn is_final(&self) -> bool {
        self.states.iter().all(|&code| {
            code == EventState::Published as u8
                || code == EventState::Discarded as u8
                || code == GONE
        })
    }
}

/// Rows of the segments `numbers`, in number order; `lock` takes their
/// row locks for a state change.
pub(super) async fn rows(
    connection: &mut PgConnection,
    numbers: &[i64],
    lock: bool,
) -> Result<Vec<SegmentRow>, StoreError> {
    if numbers.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM outbox_segments WHERE number = ANY($1) ORDER BY number{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(numbers)
        .fetch_all(&mut *connection)
        .await?;
    rows.iter()
        .map(|row| SegmentRow::from_row(row).map_err(StoreError::from))
        .collect()
}

/// Bodies of the segments `numbers`, from the cache or the store.
pub(super) async fn bodies(
    connection: &mut PgConnection,
    cache: &SegmentCache,
    numbers: &[i64],
) -> Result<HashMap<i64, Arc<Segment>>, StoreError> {
    let mut found = HashMap::with_capacity(numbers.len());
    let mut missing = Vec::new();
    for &number in numbers {
        match cache.get(number) {
            Some(segment) => {
                found.insert(number, segment);
            }
            None => missing.push(number),
        }
    }
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        let rows = sqlx::query(
            "SELECT s.number, s.millis, b.body \
                 FROM outbox_segments AS s JOIN outbox_segment_bodies AS b USING (number) \
                 WHERE s.number = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(&mut *connection)
        .await?;
        for row in rows {
            let number: i64 = row.try_get("number")?;
            let millis: i64 = row.try_get("millis")?;
            let body: Vec<u8> = row.try_get("body")?;
            let segment = Segment::decode(number as u64, millis as u64, &body)
                .map_err(|e| StoreError::Corrupt(format!("segment {number}: {e}")))?;
            let segment = Arc::new(segment);
            cache.put(segment.clone(), body.len());
            found.insert(number, segment);
        }
    }
    Ok(found)
}

/// Where events are packed, by id: caller-chosen ids from their table,
/// others from the location they name. An id that names no event is left
/// out ([`Located::event`] checks the segment's time and position).
pub(super) async fn locate(
    connection: &mut PgConnection,
    ids: &[EventId],
) -> Result<Vec<(EventId, Located)>, StoreError> {
    let uuids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    let mut chosen: HashMap<Uuid, (i64, i32)> = HashMap::new();
    if !uuids.is_empty() {
        for row in sqlx::query(
            "SELECT event_id, segment, position FROM outbox_caller_ids WHERE event_id = ANY($1)",
        )
        .bind(&uuids)
        .fetch_all(&mut *connection)
        .await?
        {
            chosen.insert(
                row.try_get("event_id")?,
                (row.try_get("segment")?, row.try_get("position")?),
            );
        }
    }
    Ok(ids
        .iter()
        .filter_map(|id| {
            let located = match chosen.get(&id.0) {
                Some(&(segment, position)) => Located {
                    segment,
                    position: position as u16,
                    millis: None,
                },
                None => {
                    let (location, millis) = EventLocation::of(*id)?;
                    Located {
                        segment: i64::try_from(location.segment).ok()?,
                        position: location.position,
                        millis: Some(millis as i64),
                    }
                }
            };
            Some((*id, located))
        })
        .collect())
}

/// Where an id says its event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Located {
    pub segment: i64,
    pub position: u16,
    /// The segment time a generated id carries; `None` for a caller's id.
    pub millis: Option<i64>,
}

impl Located {
    /// The event `id` names in `segment` (of `row`), if it is there.
    pub(super) fn event<'s>(
        &self,
        id: EventId,
        row: &SegmentRow,
        segment: &'s Segment,
    ) -> Option<PackedEvent<'s>> {
        if self.millis.is_some_and(|millis| millis != row.millis) {
            return None;
        }
        segment
            .events()
            .nth(self.position as usize)
            .filter(|event| event.event_id == id)
    }
}

/// What a status needs besides its segment: the events' faults and the
/// reasons of their transactions.
#[derive(Debug, Default)]
pub(super) struct Facts {
    faults: HashMap<(i64, u16), Fault>,
    reasons: HashMap<(String, String), String>,
}

/// A failed delivery's record.
#[derive(Debug, Clone)]
pub(super) struct Fault {
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl Facts {
    /// The faults of `numbers`' events, and the reasons of the
    /// transactions of their PENDING or DISCARDED events.
    pub(super) async fn load(
        connection: &mut PgConnection,
        rows: &[&SegmentRow],
        bodies: &HashMap<i64, Arc<Segment>>,
    ) -> Result<Facts, StoreError> {
        let mut facts = Facts::load_faults(connection, rows).await?;
        let mut wanted: HashSet<(&str, &str)> = HashSet::new();
        for row in rows {
            let held = |code: &u8| {
                *code == EventState::Pending as u8 || *code == EventState::Discarded as u8
            };
            if !row.states.iter().any(held) {
                continue;
            }
            let Some(segment) = bodies.get(&row.number) else {
                continue;
            };
            for event in segment.events() {
                if held(&row.states[event.position as usize]) {
                    wanted.insert((
                        event.transaction.producer.as_str(),
                        event.transaction.transaction_id.as_str(),
                    ));
                }
            }
        }
        if !wanted.is_empty() {
            let (producers, ids): (Vec<&str>, Vec<&str>) = wanted.into_iter().unzip();
            for row in sqlx::query(
                "SELECT t.producer, t.transaction_id, t.reason FROM outbox_transactions AS t \
                 JOIN UNNEST($1::text[], $2::text[]) AS u(producer, transaction_id) \
                   ON t.producer = u.producer AND t.transaction_id = u.transaction_id \
                 WHERE t.reason IS NOT NULL",
            )
            .bind(&producers)
            .bind(&ids)
            .fetch_all(&mut *connection)
            .await?
            {
                facts.reasons.insert(
                    (row.try_get("producer")?, row.try_get("transaction_id")?),
                    row.try_get("reason")?,
                );
            }
        }
        Ok(facts)
    }

    /// The faults of the events of `rows`.
    pub(super) async fn load_faults(
        connection: &mut PgConnection,
        rows: &[&SegmentRow],
    ) -> Result<Facts, StoreError> {
        let mut facts = Facts::default();
        let numbers: Vec<i64> = rows.iter().map(|row| row.number).collect();
        if !numbers.is_empty() {
            for row in sqlx::query(
                "SELECT segment, position, attempts, last_error, next_attempt_at, updated_at \
                 FROM outbox_event_faults WHERE segment = ANY($1)",
            )
            .bind(&numbers)
            .fetch_all(&mut *connection)
            .await?
            {
                facts.faults.insert(
                    (
                        row.try_get("segment")?,
                        row.try_get::<i32, _>("position")? as u16,
                    ),
                    Fault {
                        attempts: row.try_get("attempts")?,
                        last_error: row.try_get("last_error")?,
                        next_attempt_at: row.try_get("next_attempt_at")?,
                        updated_at: row.try_get("updated_at")?,
                    },
                );
            }
        }
        Ok(facts)
    }

    /// The fault of the event at `position` of `segment`.
    pub(super) fn fault(&self, segment: i64, position: u16) -> Option<&Fault> {
        self.faults.get(&(segment, position))
    }

    /// The status of `event` of the segment of `row`, at feed position
    /// `cursor`.
    pub(super) fn status(
        &self,
        row: &SegmentRow,
        event: &PackedEvent<'_>,
        cursor: u64,
    ) -> Result<EventStatus, StoreError> {
        let state = row.state(event.position)?.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "segment {}: the status of a removed event at {}",
                row.number, event.position
            ))
        })?;
        let fault = self.fault(row.number, event.position);
        let (partition, offset) = match state {
            EventState::Published => match row.placement(event.position) {
                Some((partition, offset)) => (Some(partition), Some(offset)),
                None => (None, None),
            },
            _ => (None, None),
        };
        let transaction = event.transaction;
        let reason = match state {
            EventState::Retrying | EventState::DeadLettered => {
                fault.and_then(|f| f.last_error.clone()).unwrap_or_default()
            }
            EventState::Pending | EventState::Discarded => self
                .reasons
                .get(&(
                    transaction.producer.clone(),
                    transaction.transaction_id.clone(),
                ))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        };
        let updated_at = match (state, fault) {
            (EventState::Retrying | EventState::DeadLettered, Some(fault)) => fault.updated_at,
            _ => row.updated_at,
        };
        Ok(EventStatus {
            event_id: event.event_id,
            producer: transaction.producer.clone(),
            transaction_id: transaction.transaction_id.clone(),
            sequence: transaction.append_sequence,
            topic: event.event.topic.clone(),
            state,
            partition,
            offset,
            attempts: fault.map_or(0, |f| f.attempts.max(0) as u32),
            reason,
            updated_at,
            cursor,
        })
    }
}

/// A state change of some events of one segment, to be written.
#[derive(Debug, Default)]
pub(super) struct Changed {
    /// The positions changed, by producer.
    pub positions: HashMap<String, Vec<u16>>,
}

/// Writes the changed `rows` back (states, placements, whether final) and
/// one change-feed row per producer and segment; returns each change's
/// `change_seq` by (producer, segment).
pub(super) async fn write_changes(
    connection: &mut PgConnection,
    rows: &[(&SegmentRow, &Changed)],
) -> Result<HashMap<(String, i64), i64>, StoreError> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let numbers: Vec<i64> = rows.iter().map(|(row, _)| row.number).collect();
    let states: Vec<&[u8]> = rows.iter().map(|(row, _)| &row.states[..]).collect();
    let placements: Vec<Option<&[u8]>> = rows
        .iter()
        .map(|(row, _)| row.placements.as_deref())
        .collect();
    let finals: Vec<bool> = rows.iter().map(|(row, _)| row.is_final()).collect();
    sqlx::query(
        // Each row by its key, its bytes by its place in the arrays (see
        // record_outcomes.sql).
        "UPDATE outbox_segments AS s \
         SET states = ($2::bytea[])[array_position($1::bigint[], s.number)], \
             placements = ($3::bytea[])[array_position($1::bigint[], s.number)], \
             final = ($4::boolean[])[array_position($1::bigint[], s.number)], \
             updated_at = now() \
         WHERE s.number = ANY ($1::bigint[])",
    )
    .bind(&numbers)
    .bind(&states)
    .bind(&placements)
    .bind(&finals)
    .execute(&mut *connection)
    .await?;
    let (mut producers, mut segments, mut positions) = (vec![], vec![], vec![]);
    for (row, changed) in rows {
        for (producer, changed_positions) in &changed.positions {
            for &position in changed_positions {
                producers.push(producer.as_str());
                segments.push(row.number);
                positions.push(i32::from(position));
            }
        }
    }
    insert_changes(connection, &producers, &segments, Some(&positions)).await
}

/// Inserts one change-feed row per producer: the `segments` whose events
/// changed, with the event's position in each (`None`: all the producer's
/// events of each segment). Returns each change's `change_seq` by
/// (producer, segment).
pub(super) async fn insert_changes(
    connection: &mut PgConnection,
    producers: &[&str],
    segments: &[i64],
    positions: Option<&[i32]>,
) -> Result<HashMap<(String, i64), i64>, StoreError> {
    if producers.is_empty() {
        return Ok(HashMap::new());
    }
    let query = match positions {
        Some(positions) => sqlx::query(
            "WITH changes AS ( \
                 INSERT INTO outbox_changes (producer, segments, positions) \
                 SELECT u.producer, array_agg(u.segment), array_agg(u.position) \
                 FROM UNNEST($1::text[], $2::bigint[], $3::integer[]) AS u(producer, segment, position) \
                 GROUP BY u.producer \
                 RETURNING producer, segments, change_seq) \
             SELECT producer, segments, change_seq FROM changes",
        )
        .bind(producers)
        .bind(segments)
        .bind(positions),
        None => sqlx::query(
            "WITH changes AS ( \
                 INSERT INTO outbox_changes (producer, segments) \
                 SELECT u.producer, array_agg(u.segment) \
                 FROM UNNEST($1::text[], $2::bigint[]) AS u(producer, segment) \
                 GROUP BY u.producer \
                 RETURNING producer, segments, change_seq) \
             SELECT producer, segments, change_seq FROM changes",
        )
        .bind(producers)
        .bind(segments),
    };
    let rows = query.fetch_all(&mut *connection).await?;
    Ok(change_seqs(&rows)?)
}

/// Change cursors of the rows an insert into outbox_changes returned
/// (producer, segments, change_seq), by (producer, segment).
pub(super) fn change_seqs(
    rows: &[sqlx::postgres::PgRow],
) -> Result<HashMap<(String, i64), i64>, sqlx::Error> {
    let mut changes = HashMap::with_capacity(rows.len());
    for row in rows {
        let producer: String = row.try_get("producer")?;
        let segments: Vec<i64> = row.try_get("segments")?;
        let change_seq: i64 = row.try_get("change_seq")?;
        for segment in segments {
            changes.insert((producer.clone(), segment), change_seq);
        }
    }
    Ok(changes)
}

/// A change-feed row read back: one producer's changes of one statement,
/// as (segment, positions) pairs (`None`: all the producer's events of the
/// segment).
pub(super) fn change_entries(
    segments: &[i64],
    positions: Option<&[i32]>,
) -> BTreeMap<i64, Option<Vec<i32>>> {
    let mut entries: BTreeMap<i64, Option<Vec<i32>>> = BTreeMap::new();
    match positions {
        None => {
            for &segment in segments {
                entries.insert(segment, None);
            }
        }
        Some(positions) => {
            for (&segment, &position) in segments.iter().zip(positions) {
                entries
                    .entry(segment)
                    .or_insert_with(|| Some(Vec::new()))
                    .get_or_insert_with(Vec::new)
                    .push(position);
            }
        }
    }
    entries
}

/// The relay's position of an event: segment number and position, so that
/// a segment's events follow each other in number order.
pub(super) fn seq_of(segment: i64, position: u16) -> i64 {
    (segment << 16) | i64::from(position)
}

/// The segment and position of a relay position.
pub(super) fn location_of(seq: i64) -> (i64, u16) {
    (seq >> 16, (seq & 0xffff) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(states: &[EventState]) -> SegmentRow {
        SegmentRow {
            number: 7,
            shard: 0,
            writer_xid: 1,
            millis: 0,
            appended_at: Utc::now(),
            updated_at: Utc::now(),
            states: states.iter().map(|s| *s as i16 as u8).collect(),
            placements: None,
        }
    }

    #[test]
    fn a_segment_is_final_once_every_event_is_published_or_discarded() {
        let mut segment = row(&[EventState::Ready, EventState::Pending, EventState::Ready]);
        assert!(!segment.is_final());
        segment.set_state(0, EventState::Published);
        segment.set_state(1, EventState::Discarded);
        assert!(!segment.is_final());
        segment.set_state(2, EventState::DeadLettered);
        assert!(!segment.is_final(), "a dead letter waits for redrive");
        segment.set_state(2, EventState::Published);
        assert!(segment.is_final());
    }

    #[test]
    fn relay_positions_order_by_segment_then_position() {
        let seqs = [
            seq_of(1, 65_535),
            seq_of(2, 0),
            seq_of(2, 1),
            seq_of(1 << 40, 3),
        ];
        assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]));
        for seq in seqs {
            let (segment, position) = location_of(seq);
            assert_eq!(seq_of(segment, position), seq);
        }
    }

    #[test]
    fn a_change_row_names_each_event_of_each_segment_it_changed() {
        let named = change_entries(&[7, 7, 9], Some(&[0, 3, 1]));
        assert_eq!(
            named.into_iter().collect::<Vec<_>>(),
            [(7, Some(vec![0, 3])), (9, Some(vec![1]))]
        );
        let all = change_entries(&[9, 7], None);
        assert_eq!(all.into_iter().collect::<Vec<_>>(), [(7, None), (9, None)]);
    }

    #[test]
    fn a_head_names_each_event_as_its_body_does() {
        use crate::store::segment::{SegmentBody, SegmentEvent};
        let transaction = |producer: &str| SegmentTransaction {
            producer: producer.into(),
            transaction_id: format!("{producer}-t"),
            append_sequence: 3,
            batch: 0,
        };
        let event = |transaction: u32, topic: &str, caller_id: Option<Vec<u8>>| SegmentEvent {
            transaction,
            topic: topic.into(),
            caller_id,
            payload: vec![7; 300],
            ..Default::default()
        };
        let segment = Segment {
            number: 4_096,
            millis: 1_765_000_000_000,
            body: SegmentBody {
                transactions: vec![transaction("a"), transaction("b")],
                events: vec![
                    event(0, "orders", None),
                    event(1, "payments", Some(Uuid::now_v7().as_bytes().to_vec())),
                    event(0, "orders", None),
                ],
                strings: vec![],
            },
        };
        let head = SegmentHead::of(&segment);
        for position in 0..3u16 {
            let (from_body, from_head) = (
                segment.event(position).unwrap(),
                head.event(position).unwrap(),
            );
            assert_eq!(from_head.event_id, from_body.event_id, "{position}");
            assert_eq!(from_head.transaction, from_body.transaction, "{position}");
            assert_eq!(from_head.topic, from_body.event.topic, "{position}");
        }
        assert!(head.event(3).is_none());
        assert!(head.bytes() < 900, "a head leaves the payloads out");
    }
}
