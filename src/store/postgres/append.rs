//! The fast append paths. [`append_new`]: appends of new transactions in
//! one statement, the writer's slot released in the same commit.
//! [`append`]: any appends in five statements, whatever their number, as
//! [`plan`] decides from what the store holds.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, Postgres};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::taken_event_ids;
use crate::domain::{AppendBatch, AppendOutcome, EventId, EventStatus, encode_headers, shard_of};
use crate::store::AppendRejection;
use crate::store::codes::{
    NewTransaction, event_id_taken, initial_event_state, mode_code, pack_ids, unpack_ids,
};
use crate::store::tokens::ExistingTransaction;

const UPSERT_TRANSACTIONS: &str = include_str!("../sql/postgres/upsert_transactions.sql");
const INSERT_APPENDS: &str = include_str!("../sql/postgres/insert_appends.sql");
const INSERT_EVENTS: &str = include_str!("../sql/postgres/insert_events_batched.sql");
const FAST_APPEND: &str = include_str!("../sql/postgres/fast_append.sql");

/// Raised by `outbox_fast_append_check` (migration 0008).
const NOT_A_FAST_APPEND: &str = "OBX01";

type Key<'a> = (&'a str, &'a str, i64);

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// A stored append: its content hash and packed event ids, by key.
type StoredAppends = HashMap<(String, String, i64), (Vec<u8>, Vec<u8>)>;

fn key(batch: &AppendBatch) -> Key<'_> {
    (
        batch.token.producer.as_str(),
        batch.token.transaction_id.as_str(),
        batch.sequence as i64,
    )
}

/// What becomes of one append of the batch.
#[derive(Debug)]
enum Plan {
    Decided(Result<AppendOutcome, AppendRejection>),
    /// A retry of an append earlier in this same batch.
    SameAs(usize),
    /// New: stored with these ids.
    New(Vec<EventId>),
}

/// Stores `batches`; `Ok(None)` when a concurrent writer got in the way and
/// the caller must roll back and take the slow path.
pub(super) async fn append(
    tx: &mut PgConnection,
    batches: &[AppendBatch],
    shard_count: u32,
) -> Result<Option<Vec<Result<AppendOutcome, AppendRejection>>>, sqlx::Error> {
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

    // The new appends and all their events.
    let new: Vec<(usize, &Vec<EventId>)> = plans
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Some(Plan::New(ids)) => Some((i, ids)),
            _ => None,
        })
        .collect();
    let mut changes: HashMap<Uuid, (i64, DateTime<Utc>)> = HashMap::new();
    if !new.is_empty() {
        let mut a = (vec![], vec![], vec![], vec![], vec![]);
        for (i, event_ids) in &new {
            let batch = &batches[*i];
            a.0.push(batch.token.producer.as_str());
            a.1.push(batch.token.transaction_id.as_str());
            a.2.push(batch.sequence as i64);
            a.3.push(hashes[*i].to_vec());
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

        let now = Utc::now();
        let mut rows = EventRows::default();
        for (i, event_ids) in &new {
            rows.push_batch(&batches[*i], event_ids, shard_count, now);
        }
        changes = rows.insert(tx).await?;
    }

    // Outcomes, in request order.
    let mut results: Vec<Result<AppendOutcome, AppendRejection>> =
        Vec::with_capacity(batches.len());
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
            Plan::New(event_ids) => Ok(new_outcome(batch, event_ids, &changes, shard_count)),
        };
        results.push(result);
    }
    Ok(Some(results))
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
            Plan::New(
                batch
                    .events
                    .iter()
                    .map(|e| e.event_id.unwrap_or_else(EventId::generate))
                    .collect(),
            )
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
    slot: i64,
    batches: &[AppendBatch],
    shard_count: u32,
) -> Result<Option<Vec<Result<AppendOutcome, AppendRejection>>>, sqlx::Error> {
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
    let mut new_transactions = TransactionColumns::default();
    let (mut sequences, mut hashes, mut packed) = (vec![], vec![], vec![]);
    let mut event_ids = Vec::with_capacity(batches.len());
    let mut caller_ids = Vec::new();
    for batch in batches {
        new_transactions.push(batch);
        sequences.push(batch.sequence as i64);
        hashes.push(batch.content_hash().to_vec());
        let these: Vec<EventId> = batch
            .events
            .iter()
            .map(|e| e.event_id.unwrap_or_else(EventId::generate))
            .collect();
        packed.push(pack_ids(&these));
        caller_ids.extend(
            batch
                .events
                .iter()
                .filter_map(|e| e.event_id.map(|id| id.0)),
        );
        event_ids.push(these);
    }
    let now = Utc::now();
    let mut rows = EventRows::default();
    for (batch, these) in batches.iter().zip(&event_ids) {
        rows.push_batch(batch, these, shard_count, now);
    }
    let query = new_transactions
        .bind(sqlx::query(FAST_APPEND).bind(slot))
        .bind(&sequences)
        .bind(&hashes)
        .bind(&packed);
    let result = rows
        .bind(query)
        .bind(&caller_ids)
        .fetch_all(connection)
        .await;
    let returned = match result {
        Ok(returned) => returned,
        Err(sqlx::Error::Database(error))
            if error.code().as_deref() == Some(NOT_A_FAST_APPEND)
                || error.kind() == sqlx::error::ErrorKind::UniqueViolation =>
        {
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    let mut changes = HashMap::with_capacity(returned.len());
    for row in returned {
        changes.insert(
            row.try_get::<Uuid, _>("event_id")?,
            (row.try_get("change_seq")?, row.try_get("updated_at")?),
        );
    }
    Ok(Some(
        batches
            .iter()
            .zip(event_ids)
            .map(|(batch, these)| Ok(new_outcome(batch, these, &changes, shard_count)))
            .collect(),
    ))
}

/// The outcome of a newly stored append.
fn new_outcome(
    batch: &AppendBatch,
    event_ids: Vec<EventId>,
    changes: &HashMap<Uuid, (i64, DateTime<Utc>)>,
    shard_count: u32,
) -> AppendOutcome {
    let state = initial_event_state(batch);
    let statuses = batch
        .events
        .iter()
        .zip(&event_ids)
        .map(|(event, id)| {
            let (cursor, updated_at) = changes.get(&id.0).copied().unwrap_or((0, Utc::now()));
            EventStatus::appended(batch, event, *id, state, cursor as u64, updated_at)
        })
        .collect();
    let shards = batch
        .events
        .iter()
        .zip(&event_ids)
        .map(|(event, id)| shard_of(event.ordering_key(), *id, shard_count))
        .collect();
    AppendOutcome {
        event_ids,
        duplicate: false,
        statuses,
        shards,
    }
}

/// Event rows to insert with one `UNNEST` statement, column by column.
#[derive(Default)]
pub(super) struct EventRows<'a> {
    ids: Vec<Uuid>,
    shards: Vec<i32>,
    producers: Vec<&'a str>,
    transactions: Vec<&'a str>,
    sequences: Vec<i64>,
    indexes: Vec<i32>,
    topics: Vec<&'a str>,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<&'a [u8]>,
    headers: Vec<Vec<u8>>,
    aggregate_types: Vec<&'a str>,
    aggregate_ids: Vec<&'a str>,
    event_types: Vec<&'a str>,
    occurred: Vec<DateTime<Utc>>,
    states: Vec<i16>,
    traceparents: Vec<Option<&'a str>>,
    tracestates: Vec<Option<&'a str>>,
}

impl<'a> EventRows<'a> {
    /// Adds the events of `batch`, with these ids.
    pub(super) fn push_batch(
        &mut self,
        batch: &'a AppendBatch,
        event_ids: &[EventId],
        shard_count: u32,
        now: DateTime<Utc>,
    ) {
        let state = initial_event_state(batch) as i16;
        for (index, (event, id)) in batch.events.iter().zip(event_ids).enumerate() {
            let ordering_key = event.ordering_key();
            self.ids.push(id.0);
            self.shards
                .push(shard_of(ordering_key, *id, shard_count) as i32);
            self.producers.push(&batch.token.producer);
            self.transactions.push(&batch.token.transaction_id);
            self.sequences.push(batch.sequence as i64);
            self.indexes.push(index as i32);
            self.topics.push(&event.topic);
            self.keys.push(ordering_key);
            self.payloads.push(&event.payload);
            self.headers.push(encode_headers(&event.headers));
            self.aggregate_types.push(&event.aggregate_type);
            self.aggregate_ids.push(&event.aggregate_id);
            self.event_types.push(&event.event_type);
            self.occurred.push(event.occurred_at.unwrap_or(now));
            self.states.push(state);
            self.traceparents.push(batch.trace.traceparent.as_deref());
            self.tracestates.push(batch.trace.tracestate.as_deref());
        }
    }

    /// Inserts them; returns each event's change cursor and time.
    pub(super) async fn insert(
        self,
        tx: &mut PgConnection,
    ) -> Result<HashMap<Uuid, (i64, DateTime<Utc>)>, sqlx::Error> {
        let mut changes = HashMap::with_capacity(self.ids.len());
        for row in self.bind(sqlx::query(INSERT_EVENTS)).fetch_all(tx).await? {
            changes.insert(
                row.try_get("event_id")?,
                (row.try_get("change_seq")?, row.try_get("updated_at")?),
            );
        }
        Ok(changes)
    }

    /// Binds the columns as the next 17 parameters of `query`.
    fn bind(self, query: PgQuery<'a>) -> PgQuery<'a> {
        query
            .bind(self.ids)
            .bind(self.shards)
            .bind(self.producers)
            .bind(self.transactions)
            .bind(self.sequences)
            .bind(self.indexes)
            .bind(self.topics)
            .bind(self.keys)
            .bind(self.payloads)
            .bind(self.headers)
            .bind(self.aggregate_types)
            .bind(self.aggregate_ids)
            .bind(self.event_types)
            .bind(self.occurred)
            .bind(self.states)
            .bind(self.traceparents)
            .bind(self.tracestates)
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
        assert!(matches!(&result[0], Plan::New(ids) if ids.len() == 1));
        assert!(matches!(&result[1], Plan::New(_)));
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
        assert!(matches!(result[1], Plan::New(_)));
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
}
