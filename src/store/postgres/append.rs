//! The append paths. [`append_new`]: appends of new transactions in one
//! statement, the writer's slot released in the same commit. [`append`]:
//! any appends in a few statements, whatever their number, as [`plan`]
//! decides from what the store holds. Both pack the new events into
//! segments with [`pack`]: one per shard the commit writes to.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, Postgres};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::segments::{self, SegmentCache, change_seqs, insert_changes};
use crate::domain::{AppendBatch, AppendOutcome, EventId, EventStatus, shard_of};
use crate::store::AppendRejection;
use crate::store::codes::{
    NewTransaction, event_id_taken, initial_event_state, mode_code, pack_ids, unpack_ids,
};
use crate::store::segment::{AppendPlace, MAX_SEGMENT_EVENTS, Segment, SegmentBuilder};
use crate::store::tokens::ExistingTransaction;
use crate::store::{StoreError, segment::EventLocation};

const UPSERT_TRANSACTIONS: &str = include_str!("../sql/postgres/upsert_transactions.sql");
const INSERT_APPENDS: &str = include_str!("../sql/postgres/insert_appends.sql");
const FAST_APPEND: &str = include_str!("../sql/postgres/fast_append.sql");

/// Raised by `outbox_fast_append_check` (migration 0008).
const NOT_A_FAST_APPEND: &str = "OBX01";

/// Segment numbers taken from the sequence at once (its increment,
/// migration 0012).
const NUMBER_BLOCK: i64 = 1024;

type Key<'a> = (&'a str, &'a str, i64);

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// A stored append: its content hash and packed event ids, by key.
type StoredAppends = HashMap<(String, String, i64), (Vec<u8>, Vec<u8>)>;

/// Results of a coalesced batch, in request order.
pub(super) type Results = Vec<Result<AppendOutcome, AppendRejection>>;

fn key(batch: &AppendBatch) -> Key<'_> {
    (
        batch.token.producer.as_str(),
        batch.token.transaction_id.as_str(),
        batch.sequence as i64,
    )
}

/// Segment numbers, reserved from the sequence a block at a time, so that
/// a writer knows its events' ids before it writes them.
#[derive(Default)]
pub(super) struct SegmentNumbers {
    /// The next number and the end of the block it is in.
    block: Mutex<(i64, i64)>,
}

impl SegmentNumbers {
    /// `count` unused segment numbers, ascending.
    pub(super) async fn take(
        &self,
        connection: &mut PgConnection,
        count: usize,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let mut numbers = Vec::with_capacity(count);
        loop {
            {
                let mut block = self.block.lock().expect("segment numbers lock");
                while numbers.len() < count && block.0 < block.1 {
                    numbers.push(block.0);
                    block.0 += 1;
                }
            }
            if numbers.len() == count {
                return Ok(numbers);
            }
            let start: i64 = sqlx::query_scalar("SELECT nextval('outbox_segment_numbers')")
                .fetch_one(&mut *connection)
                .await?;
            let mut block = self.block.lock().expect("segment numbers lock");
            // The rest of the block in hand (if another writer took one
            // meanwhile) is given up: numbers need not be dense.
            *block = (start, start + NUMBER_BLOCK);
        }
    }
}

/// The new events of a commit, packed into segments.
#[derive(Debug, Default)]
pub(super) struct Packed {
    /// The segments, in number order.
    pub segments: Vec<NewSegment>,
    /// Ids and shards of each packed append's events, in request order.
    pub appends: Vec<(Vec<EventId>, Vec<u32>)>,
    /// Caller-chosen ids: id, segment, position.
    pub caller_ids: (Vec<Uuid>, Vec<i64>, Vec<i32>),
    /// The change-feed rows: each producer of each segment.
    pub changes: (Vec<String>, Vec<i64>),
}

/// A segment to insert.
#[derive(Debug)]
pub(super) struct NewSegment {
    pub shard: i32,
    pub body: Vec<u8>,
    pub states: Vec<u8>,
    pub segment: Arc<Segment>,
}

/// The shard of each event of each append: its ordering key's, or any
/// shard for an event without one (no order promise).
pub(super) fn shards_of(batches: &[&AppendBatch], shard_count: u32) -> Vec<Vec<u32>> {
    batches
        .iter()
        .map(|batch| {
            batch
                .events
                .iter()
                .map(|event| match event.ordering_key() {
                    Some(key) => shard_of(Some(key), EventId(Uuid::nil()), shard_count),
                    None => shard_of(None, EventId(Uuid::new_v4()), shard_count),
                })
                .collect()
        })
        .collect()
}

/// The segments `shards` fill: one per shard, more when a shard has more
/// events than a segment holds.
pub(super) fn segments_needed(shards: &[Vec<u32>]) -> usize {
    let mut per_shard: BTreeMap<u32, usize> = BTreeMap::new();
    for shard in shards.iter().flatten() {
        *per_shard.entry(*shard).or_default() += 1;
    }
    per_shard
        .values()
        .map(|events| events.div_ceil(MAX_SEGMENT_EVENTS))
        .sum()
}

/// Packs the events of `batches` (their shards as [`shards_of`] gave them)
/// into segments numbered from `numbers` (at least [`segments_needed`]),
/// stamped `millis`: a shard's events in request order, one segment per
/// shard in shard order. No I/O.
pub(super) fn pack(
    batches: &[&AppendBatch],
    shards: &[Vec<u32>],
    numbers: &[i64],
    millis: i64,
) -> Packed {
    let mut by_shard: BTreeMap<u32, Vec<(usize, usize)>> = BTreeMap::new();
    for (append, event_shards) in shards.iter().enumerate() {
        for (event, shard) in event_shards.iter().enumerate() {
            by_shard.entry(*shard).or_default().push((append, event));
        }
    }
    let mut packed = Packed::default();
    let mut ids: Vec<Vec<EventId>> = batches
        .iter()
        .map(|batch| vec![EventId(Uuid::nil()); batch.events.len()])
        .collect();
    let mut numbers = numbers.iter().copied();
    for (shard, events) in by_shard {
        for chunk in events.chunks(MAX_SEGMENT_EVENTS) {
            let number = numbers.next().expect("enough segment numbers");
            let mut builder = SegmentBuilder::default();
            let mut states = Vec::with_capacity(chunk.len());
            let mut producers: Vec<&str> = Vec::new();
            for &(append, event) in chunk {
                let batch = batches[append];
                let new = &batch.events[event];
                let producer = batch.token.producer.as_str();
                let position = builder.push(
                    AppendPlace {
                        producer,
                        transaction_id: &batch.token.transaction_id,
                        sequence: batch.sequence,
                        batch: append as u32,
                        index: event as u32,
                        traceparent: batch.trace.traceparent.as_deref(),
                        tracestate: batch.trace.tracestate.as_deref(),
                    },
                    new,
                );
                states.push(initial_event_state(batch) as i16 as u8);
                ids[append][event] = match new.event_id {
                    Some(id) => {
                        packed.caller_ids.0.push(id.0);
                        packed.caller_ids.1.push(number);
                        packed.caller_ids.2.push(i32::from(position));
                        id
                    }
                    None => EventLocation {
                        segment: number as u64,
                        position,
                    }
                    .id(millis as u64),
                };
                if !producers.contains(&producer) {
                    producers.push(producer);
                }
            }
            for producer in producers {
                packed.changes.0.push(producer.to_owned());
                packed.changes.1.push(number);
            }
            let (body, segment) = builder.finish(number as u64, millis as u64);
            packed.segments.push(NewSegment {
                shard: shard as i32,
                body,
                states,
                segment: Arc::new(segment),
            });
        }
    }
    packed.appends = ids.into_iter().zip(shards.iter().cloned()).collect();
    packed
}

impl Packed {
    /// Binds the segments and caller ids as the next eight parameters
    /// (the change rows, `changes`, are bound by the statement that writes
    /// them with these).
    fn bind<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        let numbers: Vec<i64> = self
            .segments
            .iter()
            .map(|s| s.segment.number as i64)
            .collect();
        let shards: Vec<i32> = self.segments.iter().map(|s| s.shard).collect();
        let millis: Vec<i64> = self
            .segments
            .iter()
            .map(|s| s.segment.millis as i64)
            .collect();
        let bodies: Vec<&[u8]> = self.segments.iter().map(|s| &s.body[..]).collect();
        let states: Vec<&[u8]> = self.segments.iter().map(|s| &s.states[..]).collect();
        query
            .bind(numbers)
            .bind(shards)
            .bind(millis)
            .bind(bodies)
            .bind(states)
            .bind(&self.caller_ids.0)
            .bind(&self.caller_ids.1)
            .bind(&self.caller_ids.2)
    }

    /// Keeps the written segments' bodies.
    pub(super) fn cache(&self, cache: &SegmentCache) {
        for segment in &self.segments {
            cache.put(segment.segment.clone(), segment.body.len());
        }
    }
}

/// What becomes of one append of the batch.
#[derive(Debug)]
enum Plan {
    Decided(Result<AppendOutcome, AppendRejection>),
    /// A retry of an append earlier in this same batch.
    SameAs(usize),
    /// New: stored, its events packed.
    New,
}

/// Stores `batches` in the open transaction; `Ok(None)` when a concurrent
/// writer got in the way and the caller must roll back and try again.
pub(super) async fn append(
    tx: &mut PgConnection,
    numbers: &SegmentNumbers,
    batches: &[AppendBatch],
    shard_count: u32,
) -> Result<Option<(Results, Packed)>, StoreError> {
    // Appends already stored: retries (same content) or conflicts.
    let (mut key_producers, mut key_ids, mut key_sequences) = (vec![], vec![], vec![]);
    for batch in batches {
        let (p, t, s) = key(batch);
        key_producers.push(p);
        key_ids.push(t);
        key_sequences.push(s);
    }
    let mut stored: StoredAppends = HashMap::new();
    if !key_producers.is_empty() {
        for row in sqlx::query(
            // LATERAL: one primary-key probe per key, whatever the table's
            // statistics said when the statement's plan was cached.
            "SELECT a.producer, a.transaction_id, a.sequence, a.content_hash, a.event_ids \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(producer, transaction_id, sequence) \
             CROSS JOIN LATERAL ( \
                 SELECT * FROM outbox_appends AS a \
                 WHERE a.producer = k.producer AND a.transaction_id = k.transaction_id \
                   AND a.sequence = k.sequence) AS a",
        )
        .bind(&key_producers)
        .bind(&key_ids)
        .bind(&key_sequences)
        .fetch_all(&mut *tx)
        .await?
        {
            stored.insert(
                (
                    row.try_get("producer")?,
                    row.try_get("transaction_id")?,
                    row.try_get("sequence")?,
                ),
                (row.try_get("content_hash")?, row.try_get("event_ids")?),
            );
        }
    }

    // Caller-chosen ids that are taken already (a retry finds its own ids
    // stored: it is judged by its content instead).
    let taken = taken_event_ids(tx, batches).await?;

    // The transactions, created when new (first token in the batch wins).
    let mut seen = HashMap::new();
    let mut new_transactions = TransactionColumns::default();
    for batch in batches {
        let token = &batch.token;
        if uses_taken_id(batch, &taken, &stored)
            || seen
                .insert((token.producer.as_str(), token.transaction_id.as_str()), ())
                .is_some()
        {
            continue;
        }
        new_transactions.push(batch);
    }
    let mut transactions: HashMap<(String, String), ExistingTransaction> = HashMap::new();
    if !new_transactions.producers.is_empty() {
        for row in new_transactions
            .bind(sqlx::query(UPSERT_TRANSACTIONS))
            .fetch_all(&mut *tx)
            .await?
        {
            transactions.insert(
                (row.try_get("producer")?, row.try_get("transaction_id")?),
                ExistingTransaction::from_row(&row)?,
            );
        }
    }

    let hashes: Vec<[u8; 32]> = batches.iter().map(AppendBatch::content_hash).collect();
    let mut plans: Vec<Option<Plan>> = plan(batches, &hashes, &taken, &transactions, &stored)
        .into_iter()
        .map(Some)
        .collect();

    // The new appends, their events packed.
    let new: Vec<usize> = plans
        .iter()
        .enumerate()
        .filter_map(|(i, p)| matches!(p, Some(Plan::New)).then_some(i))
        .collect();
    let new_batches: Vec<&AppendBatch> = new.iter().map(|&i| &batches[i]).collect();
    let shards = shards_of(&new_batches, shard_count);
    let segment_numbers = numbers.take(tx, segments_needed(&shards)).await?;
    let now = Utc::now();
    let packed = pack(
        &new_batches,
        &shards,
        &segment_numbers,
        now.timestamp_millis(),
    );
    let mut changes = HashMap::new();
    if !new.is_empty() {
        let mut a = (vec![], vec![], vec![], vec![], vec![]);
        for (&i, (event_ids, _)) in new.iter().zip(&packed.appends) {
            let batch = &batches[i];
            a.0.push(batch.token.producer.as_str());
            a.1.push(batch.token.transaction_id.as_str());
            a.2.push(batch.sequence as i64);
            a.3.push(hashes[i].to_vec());
            a.4.push(pack_ids(event_ids));
        }
        let inserted = sqlx::query(INSERT_APPENDS)
            .bind(&a.0)
            .bind(&a.1)
            .bind(&a.2)
            .bind(&a.3)
            .bind(&a.4)
            .fetch_all(&mut *tx)
            .await?;
        if inserted.len() != new.len() {
            // Another writer stored one of these appends meanwhile.
            return Ok(None);
        }
        let written = packed
            .bind(sqlx::query(
                "WITH segments AS ( \
                     INSERT INTO outbox_segments (number, shard, millis, states) \
                     SELECT u.number, u.shard, u.millis, u.states \
                     FROM UNNEST($1::bigint[], $2::integer[], $3::bigint[], $5::bytea[]) \
                         AS u(number, shard, millis, states)), \
                 bodies AS ( \
                     INSERT INTO outbox_segment_bodies (number, body) \
                     SELECT * FROM UNNEST($1::bigint[], $4::bytea[])) \
                 INSERT INTO outbox_caller_ids (event_id, segment, position) \
                 SELECT * FROM UNNEST($6::uuid[], $7::bigint[], $8::integer[])",
            ))
            .execute(&mut *tx)
            .await;
        match written {
            Ok(_) => {}
            // A caller-chosen id another writer took meanwhile.
            Err(error) if crate::store::error::is_unique_violation(&error) => return Ok(None),
            Err(error) => return Err(error.into()),
        }
        let producers: Vec<&str> = packed.changes.0.iter().map(String::as_str).collect();
        changes = insert_changes(tx, &producers, &packed.changes.1, None).await?;
    }

    // Outcomes, in request order.
    let mut outcomes = packed.appends.iter().zip(&new_batches);
    let mut results: Results = Vec::with_capacity(batches.len());
    for (index, batch) in batches.iter().enumerate() {
        let result = match plans[index].take().expect("every append was planned") {
            Plan::Decided(result) => result,
            Plan::SameAs(first) => match &results[first] {
                Ok(outcome) => Ok(AppendOutcome {
                    event_ids: outcome.event_ids.clone(),
                    duplicate: true,
                    statuses: vec![],
                    shards: vec![],
                }),
                Err(rejection) => Err(rejection.clone()),
            },
            Plan::New => {
                let ((ids, shards), _) = outcomes.next().expect("one packing per new append");
                Ok(new_outcome(batch, ids, shards, &changes, now))
            }
        };
        results.push(result);
    }
    Ok(Some((results, packed)))
}

/// New transactions' columns, as arrays for one statement.
#[derive(Default)]
struct TransactionColumns<'a> {
    producers: Vec<&'a str>,
    ids: Vec<&'a str>,
    modes: Vec<i16>,
    states: Vec<i16>,
    xids: Vec<Option<i64>>,
    systems: Vec<Option<i64>>,
    expiries: Vec<Option<f64>>,
}

impl<'a> TransactionColumns<'a> {
    /// The transaction of `batch`, as it starts when it is new.
    fn push(&mut self, batch: &'a AppendBatch) {
        let token = &batch.token;
        let new = NewTransaction::of(&token.mode);
        self.producers.push(token.producer.as_str());
        self.ids.push(token.transaction_id.as_str());
        self.modes.push(mode_code(&token.mode));
        self.states.push(new.state);
        self.xids.push(new.caller_xid);
        self.systems.push(new.caller_system_id);
        self.expiries.push(new.expires_in.map(|d| d.as_secs_f64()));
    }

    /// Binds the seven arrays, in this order, as the next parameters.
    fn bind<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        query
            .bind(&self.producers)
            .bind(&self.ids)
            .bind(&self.modes)
            .bind(&self.states)
            .bind(&self.xids)
            .bind(&self.systems)
            .bind(&self.expiries)
    }
}

/// Caller-chosen ids of `batch` among `taken`, unless `batch` is a retry of
/// a `stored` append (which finds its own ids taken).
fn uses_taken_id(batch: &AppendBatch, taken: &[Uuid], stored: &StoredAppends) -> bool {
    let (p, t, s) = key(batch);
    !taken.is_empty()
        && !stored.contains_key(&(p.to_owned(), t.to_owned(), s))
        && batch
            .events
            .iter()
            .any(|e| e.event_id.is_some_and(|id| taken.contains(&id.0)))
}

/// The caller-chosen event ids of `batches` that are stored already: as a
/// caller's id, or as the id outboxd gave an event it packed.
pub(super) async fn taken_event_ids(
    connection: &mut PgConnection,
    batches: &[AppendBatch],
) -> Result<Vec<Uuid>, StoreError> {
    let ids: Vec<EventId> = batches
        .iter()
        .flat_map(|b| b.events.iter().filter_map(|e| e.event_id))
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let located = segments::locate(connection, &ids).await?;
    let numbers: Vec<i64> = located.iter().map(|(_, l)| l.segment).collect();
    let rows = segments::rows(connection, &numbers, false).await?;
    let rows: HashMap<i64, &segments::SegmentRow> = rows.iter().map(|r| (r.number, r)).collect();
    Ok(located
        .into_iter()
        .filter(
            |(_, located)| match (located.millis, rows.get(&located.segment)) {
                // A caller's id in its table.
                (None, _) => true,
                // An id naming one of outboxd's events.
                (Some(millis), Some(row)) => {
                    row.millis == millis && (located.position as usize) < row.len()
                }
                (Some(_), None) => false,
            },
        )
        .map(|(id, _)| id.0)
        .collect())
}

/// What becomes of each append of a coalesced batch, from what the store
/// holds: the caller-chosen ids already `taken`, the `transactions` the
/// appends name (as stored, or as just created) and the appends `stored`
/// already under the same keys. `hashes` are the appends' content hashes.
/// No I/O: the rules of idempotent appends in one place.
fn plan(
    batches: &[AppendBatch],
    hashes: &[[u8; 32]],
    taken: &[Uuid],
    transactions: &HashMap<(String, String), ExistingTransaction>,
    stored: &StoredAppends,
) -> Vec<Plan> {
    let mut plans = Vec::with_capacity(batches.len());
    let mut new_in_batch: HashMap<Key<'_>, usize> = HashMap::new();
    for (index, batch) in batches.iter().enumerate() {
        let token = &batch.token;
        if uses_taken_id(batch, taken, stored) {
            plans.push(Plan::Decided(Err(event_id_taken(batch, taken))));
            continue;
        }
        let conflict = || {
            Plan::Decided(Err(AppendRejection::ConflictingRetry {
                transaction_id: token.transaction_id.clone(),
                sequence: batch.sequence,
            }))
        };
        let existing = transactions
            .get(&(token.producer.clone(), token.transaction_id.clone()))
            .expect("every transaction was upserted");
        let plan = if let Some(rejection) = existing.token_conflict(batch) {
            Plan::Decided(Err(rejection))
        } else if let Some((hash, ids)) = stored.get(&(
            token.producer.clone(),
            token.transaction_id.clone(),
            batch.sequence as i64,
        )) {
            if hash[..] == hashes[index][..] {
                Plan::Decided(Ok(AppendOutcome {
                    event_ids: unpack_ids(ids),
                    duplicate: true,
                    statuses: vec![],
                    shards: vec![],
                }))
            } else {
                conflict()
            }
        } else if let Some(&first) = new_in_batch.get(&key(batch)) {
            if hashes[first] == hashes[index] {
                Plan::SameAs(first)
            } else {
                conflict()
            }
        } else if let Some(rejection) = existing.resolved(batch) {
            Plan::Decided(Err(rejection))
        } else {
            new_in_batch.insert(key(batch), index);
            Plan::New
        };
        plans.push(plan);
    }
    plans
}

/// Stores `batches` in one autocommit statement, which also removes the
/// writer's `slot`; `Ok(None)` (and nothing stored, slot kept) unless every
/// transaction and append is new and every caller-chosen event id is free.
pub(super) async fn append_new(
    connection: &mut PgConnection,
    numbers: &SegmentNumbers,
    slot: i64,
    batches: &[AppendBatch],
    shard_count: u32,
) -> Result<Option<(Results, Packed)>, StoreError> {
    // One append per transaction, or the statement could not tell a retry
    // or a token conflict within the batch. A later append (sequence > 0)
    // finds its transaction stored: the statement would refuse it, with an
    // error in the server's log each time, so it goes the careful way.
    let mut transactions = std::collections::HashSet::new();
    if !batches.iter().all(|b| {
        b.sequence == 0
            && transactions.insert((b.token.producer.as_str(), b.token.transaction_id.as_str()))
    }) {
        return Ok(None);
    }
    // An id that names one of outboxd's events is in no table's unique
    // index: look for it first.
    if batches
        .iter()
        .any(|b| b.events.iter().any(|e| e.event_id.is_some()))
        && !taken_event_ids(connection, batches).await?.is_empty()
    {
        return Ok(None);
    }
    let all: Vec<&AppendBatch> = batches.iter().collect();
    let shards = shards_of(&all, shard_count);
    let segment_numbers = numbers.take(connection, segments_needed(&shards)).await?;
    let now = Utc::now();
    let packed = pack(&all, &shards, &segment_numbers, now.timestamp_millis());
    let mut new_transactions = TransactionColumns::default();
    let (mut sequences, mut hashes, mut packed_ids) = (vec![], vec![], vec![]);
    for (batch, (ids, _)) in batches.iter().zip(&packed.appends) {
        new_transactions.push(batch);
        sequences.push(batch.sequence as i64);
        hashes.push(batch.content_hash().to_vec());
        packed_ids.push(pack_ids(ids));
    }
    let query = new_transactions
        .bind(sqlx::query(FAST_APPEND).bind(slot))
        .bind(&sequences)
        .bind(&hashes)
        .bind(&packed_ids);
    let result = packed
        .bind(query)
        .bind(&packed.changes.0)
        .bind(&packed.changes.1)
        .fetch_all(&mut *connection)
        .await;
    let returned = match result {
        Ok(returned) => returned,
        Err(sqlx::Error::Database(error))
            if error.code().as_deref() == Some(NOT_A_FAST_APPEND)
                || error.kind() == sqlx::error::ErrorKind::UniqueViolation =>
        {
            return Ok(None);
        }
        Err(error) => return Err(error.into()),
    };
    let changes = change_seqs(&returned)?;
    let results = batches
        .iter()
        .zip(&packed.appends)
        .map(|(batch, (ids, shards))| Ok(new_outcome(batch, ids, shards, &changes, now)))
        .collect();
    Ok(Some((results, packed)))
}

/// The outcome of a newly stored append.
fn new_outcome(
    batch: &AppendBatch,
    event_ids: &[EventId],
    shards: &[u32],
    changes: &HashMap<(String, i64), i64>,
    now: DateTime<Utc>,
) -> AppendOutcome {
    let state = initial_event_state(batch);
    // The change rows of the append's producer (one per segment it wrote
    // to); its statuses carry the latest.
    let cursor = changes
        .iter()
        .filter(|((producer, _), _)| *producer == batch.token.producer)
        .map(|(_, seq)| *seq)
        .max()
        .unwrap_or(0);
    let statuses = batch
        .events
        .iter()
        .zip(event_ids)
        .map(|(event, id)| EventStatus::appended(batch, event, *id, state, cursor as u64, now))
        .collect();
    AppendOutcome {
        event_ids: event_ids.to_vec(),
        duplicate: false,
        statuses,
        shards: shards.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{TokenMode, test_append, test_event};
    use crate::store::codes::{TRANSACTION_ABORTED, TRANSACTION_COMMITTED, TRANSACTION_OPEN};

    fn append(transaction: &str, sequence: u64, mode: TokenMode, payload: &[u8]) -> AppendBatch {
        test_append(
            transaction,
            sequence,
            mode,
            vec![test_event(Some(b"k"), payload)],
        )
    }

    fn two_phase() -> TokenMode {
        TokenMode::TwoPhase {
            timeout: std::time::Duration::from_secs(60),
        }
    }

    fn stored_transaction(
        transaction: &str,
        mode: i16,
        state: i16,
    ) -> ((String, String), ExistingTransaction) {
        (
            ("shop".into(), transaction.into()),
            ExistingTransaction {
                mode,
                state,
                resolution: (state == TRANSACTION_ABORTED).then(|| "aborted".into()),
                caller_xid: None,
                caller_system_id: None,
                expired: false,
            },
        )
    }

    fn plans(
        batches: &[AppendBatch],
        taken: &[Uuid],
        transactions: &[((String, String), ExistingTransaction)],
        stored: &[(&AppendBatch, Vec<EventId>)],
    ) -> Vec<Plan> {
        let hashes: Vec<[u8; 32]> = batches.iter().map(AppendBatch::content_hash).collect();
        let transactions: HashMap<_, _> = transactions.iter().cloned().collect();
        let stored: StoredAppends = stored
            .iter()
            .map(|(batch, ids)| {
                let (p, t, s) = key(batch);
                (
                    (p.into(), t.into(), s),
                    (batch.content_hash().to_vec(), pack_ids(ids)),
                )
            })
            .collect();
        plan(batches, &hashes, taken, &transactions, &stored)
    }

    #[test]
    fn new_appends_get_ids_and_a_retry_in_the_same_batch_gets_the_first_ones() {
        let first = append("tx-1", 0, TokenMode::Immediate, b"a");
        let other = append("tx-2", 0, TokenMode::Immediate, b"b");
        let retried = first.clone();
        let mut changed = first.clone();
        changed.events[0].payload = b"changed".to_vec();
        let result = plans(
            &[first, other, retried, changed],
            &[],
            &[
                stored_transaction("tx-1", 1, TRANSACTION_COMMITTED),
                stored_transaction("tx-2", 1, TRANSACTION_COMMITTED),
            ],
            &[],
        );
        assert!(matches!(&result[0], Plan::New));
        assert!(matches!(&result[1], Plan::New));
        assert!(matches!(result[2], Plan::SameAs(0)));
        assert!(matches!(
            result[3],
            Plan::Decided(Err(AppendRejection::ConflictingRetry { sequence: 0, .. }))
        ));
    }

    #[test]
    fn a_stored_append_is_a_duplicate_with_its_stored_ids_or_a_conflict() {
        let earlier = append("tx-1", 0, two_phase(), b"a");
        let ids = vec![EventId::generate()];
        let mut changed = earlier.clone();
        changed.events[0].payload = b"changed".to_vec();
        let result = plans(
            &[earlier.clone(), changed],
            &[],
            &[stored_transaction("tx-1", 2, TRANSACTION_OPEN)],
            &[(&earlier, ids.clone())],
        );
        assert!(
            matches!(&result[0], Plan::Decided(Ok(outcome)) if outcome.duplicate && outcome.event_ids == ids)
        );
        assert!(matches!(
            result[1],
            Plan::Decided(Err(AppendRejection::ConflictingRetry { .. }))
        ));
    }

    #[test]
    fn a_resolved_transaction_or_another_mode_refuses_new_appends_but_not_retries() {
        let stored = append("tx-1", 0, two_phase(), b"a");
        let later = append("tx-1", 1, two_phase(), b"b");
        let immediate = append("tx-1", 2, TokenMode::Immediate, b"c");
        let result = plans(
            &[stored.clone(), later, immediate],
            &[],
            &[stored_transaction("tx-1", 2, TRANSACTION_ABORTED)],
            &[(&stored, vec![EventId::generate()])],
        );
        assert!(matches!(&result[0], Plan::Decided(Ok(outcome)) if outcome.duplicate));
        assert!(matches!(
            result[1],
            Plan::Decided(Err(AppendRejection::TransactionResolved { .. }))
        ));
        assert!(matches!(
            result[2],
            Plan::Decided(Err(AppendRejection::ModeMismatch { .. }))
        ));
    }

    #[test]
    fn a_taken_caller_id_refuses_its_append_alone() {
        let mut mine = append("tx-1", 0, TokenMode::Immediate, b"a");
        let id = EventId::generate();
        mine.events[0].event_id = Some(id);
        let other = append("tx-2", 0, TokenMode::Immediate, b"b");
        // No transaction was upserted for the refused append.
        let result = plans(
            &[mine, other],
            &[id.0],
            &[stored_transaction("tx-2", 1, TRANSACTION_COMMITTED)],
            &[],
        );
        assert!(matches!(
            &result[0],
            Plan::Decided(Err(AppendRejection::EventIdTaken(violation))) if violation.field == "events[0].event_id"
        ));
        assert!(matches!(result[1], Plan::New));
    }

    #[test]
    fn a_retry_finds_its_own_ids_taken_and_is_a_duplicate() {
        let mut mine = append("tx-1", 0, TokenMode::Immediate, b"a");
        let id = EventId::generate();
        mine.events[0].event_id = Some(id);
        let result = plans(
            std::slice::from_ref(&mine),
            &[id.0],
            &[stored_transaction("tx-1", 1, TRANSACTION_COMMITTED)],
            &[(&mine, vec![id])],
        );
        assert!(matches!(
            &result[0],
            Plan::Decided(Ok(outcome)) if outcome.duplicate && outcome.event_ids == vec![id]
        ));
    }

    fn keyed(key: &str, payload: &str) -> crate::domain::NewEvent {
        test_event(Some(key.as_bytes()), payload.as_bytes())
    }

    #[test]
    fn a_commit_packs_one_segment_per_shard_with_its_events_in_request_order() {
        let first = test_append(
            "tx-1",
            0,
            TokenMode::Immediate,
            vec![keyed("a", "a1"), keyed("b", "b1"), keyed("a", "a2")],
        );
        let mut chosen = keyed("b", "b2");
        let caller_id = EventId::generate();
        chosen.event_id = Some(caller_id);
        let second = test_append("tx-2", 0, two_phase(), vec![chosen, keyed("a", "a3")]);
        let batches = [&first, &second];
        let shards = vec![vec![0, 1, 0], vec![1, 0]];
        assert_eq!(segments_needed(&shards), 2);
        let packed = pack(&batches, &shards, &[40, 41], 1_796_000_000_000);

        assert_eq!(packed.segments.len(), 2);
        let payloads = |index: usize| -> Vec<Vec<u8>> {
            packed.segments[index]
                .segment
                .events()
                .map(|event| event.event.payload.clone())
                .collect()
        };
        assert_eq!(packed.segments[0].shard, 0);
        assert_eq!(
            payloads(0),
            [b"a1".to_vec(), b"a2".to_vec(), b"a3".to_vec()]
        );
        assert_eq!(packed.segments[1].shard, 1);
        assert_eq!(payloads(1), [b"b1".to_vec(), b"b2".to_vec()]);
        // Each event starts as its transaction's mode says.
        assert_eq!(packed.segments[0].states, [2, 2, 1]);
        assert_eq!(packed.segments[1].states, [2, 1]);

        // Generated ids name their segment and position; a caller's id is
        // kept, with its location.
        let (ids, event_shards) = &packed.appends[0];
        assert_eq!(event_shards, &vec![0, 1, 0]);
        let location = |id: EventId| EventLocation::of(id).map(|(l, _)| (l.segment, l.position));
        assert_eq!(location(ids[0]), Some((40, 0)));
        assert_eq!(location(ids[1]), Some((41, 0)));
        assert_eq!(location(ids[2]), Some((40, 1)));
        let (ids, _) = &packed.appends[1];
        assert_eq!(ids[0], caller_id);
        assert_eq!(location(ids[1]), Some((40, 2)));
        assert_eq!(packed.caller_ids, (vec![caller_id.0], vec![41], vec![1]));
        // Every id is what the stored segment gives back.
        for ((ids, _), batch) in packed.appends.iter().zip(batches) {
            for (id, event) in ids.iter().zip(&batch.events) {
                let found = packed
                    .segments
                    .iter()
                    .find_map(|s| s.segment.find(*id))
                    .expect("packed");
                assert_eq!(found.event.payload, event.payload);
            }
        }
        // One change row per producer and segment.
        assert_eq!(
            packed.changes,
            (vec!["shop".to_owned(), "shop".to_owned()], vec![40, 41])
        );
    }

    #[test]
    fn a_shard_with_more_events_than_a_segment_holds_fills_several() {
        let events: Vec<_> = (0..MAX_SEGMENT_EVENTS + 1)
            .map(|_| test_event(Some(b"k"), b""))
            .collect();
        let batch = test_append("big", 0, TokenMode::Immediate, events);
        let shards = vec![vec![3; MAX_SEGMENT_EVENTS + 1]];
        assert_eq!(segments_needed(&shards), 2);
        let packed = pack(&[&batch], &shards, &[7, 8], 0);
        let sizes: Vec<usize> = packed.segments.iter().map(|s| s.states.len()).collect();
        assert_eq!(sizes, [MAX_SEGMENT_EVENTS, 1]);
        let last = EventLocation::of(packed.appends[0].0[MAX_SEGMENT_EVENTS]).map(|(l, _)| l);
        assert_eq!(
            last,
            Some(EventLocation {
                segment: 8,
                position: 0
            })
        );
    }
}
