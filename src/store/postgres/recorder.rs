//! One recorder of deliveries per store: the shards' workers hand it their
//! batches, and it records what has gathered in one statement for all
//! their shards, instead of a statement per shard and batch.
//!
//! Each batch keeps its own outcome: its rows are written only while its
//! lease holds (`StoreError::LeaseLost` otherwise), and a statement that
//! fails for several batches is tried again for each alone, so that one
//! batch's bad row fails only that batch.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::segments::{SegmentCache, bodies, location_of};
use crate::domain::{EventState, EventStatus};
use crate::store::{Delivered, Lease, StoreError};

/// What the recorder writes with: the pool and the store's segment cache.
type Store = (PgPool, Arc<SegmentCache>);

/// Statements in flight at once: one gathers while another is written.
const RECORDERS: usize = 2;

/// Most deliveries one statement records.
const MAX_ROWS: usize = 20_000;

/// One shard's batch and where its outcome goes.
struct Batch {
    lease: Lease,
    delivered: Vec<Delivered>,
    reply: oneshot::Sender<Result<Vec<EventStatus>, StoreError>>,
}

/// Hands batches to the recorder tasks; they stop when every handle is
/// gone.
pub(super) struct Recorder {
    queue: mpsc::Sender<Batch>,
    /// For a batch the tasks can no longer take (the runtime is stopping).
    store: Store,
}

impl Recorder {
    /// Starts the recorder tasks on `pool`.
    pub(super) fn start(pool: PgPool, cache: Arc<SegmentCache>) -> Recorder {
        let (queue, batches) = mpsc::channel(1_024);
        let batches = Arc::new(Mutex::new(batches));
        let store = (pool, cache);
        for _ in 0..RECORDERS {
            tokio::spawn(record(store.clone(), batches.clone()));
        }
        Recorder { queue, store }
    }

    /// Marks `delivered` published, fenced by `lease`, in a transaction
    /// shared with the batches of other shards that are waiting too.
    pub(super) async fn record(
        &self,
        lease: &Lease,
        delivered: &[Delivered],
    ) -> Result<Vec<EventStatus>, StoreError> {
        let (reply, outcome) = oneshot::channel();
        let batch = Batch {
            lease: lease.clone(),
            delivered: delivered.to_vec(),
            reply,
        };
        match self.queue.send(batch).await {
            Ok(()) => match outcome.await {
                Ok(result) => result,
                // The task is gone (the runtime is stopping): write it here.
                Err(_) => record_alone(&self.store, lease, delivered).await,
            },
            Err(_) => record_alone(&self.store, lease, delivered).await,
        }
    }
}

/// One recorder task: takes what has gathered, records it, answers each
/// batch.
async fn record(store: Store, batches: Arc<Mutex<mpsc::Receiver<Batch>>>) {
    loop {
        let gathered = {
            let mut batches = batches.lock().await;
            let Some(first) = batches.recv().await else {
                return;
            };
            let mut rows = first.delivered.len();
            let mut gathered = vec![first];
            while rows < MAX_ROWS {
                match batches.try_recv() {
                    Ok(next) => {
                        rows += next.delivered.len();
                        gathered.push(next);
                    }
                    Err(_) => break,
                }
            }
            gathered
        };
        if gathered.len() > 1 {
            let leases: Vec<&Lease> = gathered.iter().map(|batch| &batch.lease).collect();
            let deliveries: Vec<&[Delivered]> =
                gathered.iter().map(|batch| &batch.delivered[..]).collect();
            if let Ok(outcomes) = record_together(&store, &leases, &deliveries).await {
                for (batch, outcome) in gathered.into_iter().zip(outcomes) {
                    let _ = batch.reply.send(outcome);
                }
                continue;
            }
        }
        for batch in gathered {
            let outcome = record_alone(&store, &batch.lease, &batch.delivered).await;
            let _ = batch.reply.send(outcome);
        }
    }
}

/// Records one batch in a statement of its own.
async fn record_alone(
    store: &Store,
    lease: &Lease,
    delivered: &[Delivered],
) -> Result<Vec<EventStatus>, StoreError> {
    let mut outcomes = record_together(store, &[lease], &[delivered]).await?;
    outcomes.pop().expect("one outcome per batch")
}

/// Records several shards' batches in one statement; an outcome per batch,
/// in order. `Err` when the statement failed: nothing was written.
async fn record_together(
    store: &Store,
    leases: &[&Lease],
    deliveries: &[&[Delivered]],
) -> Result<Vec<Result<Vec<EventStatus>, StoreError>>, StoreError> {
    let outcomes: Vec<Vec<Outcome>> = deliveries
        .iter()
        .map(|delivered| {
            delivered
                .iter()
                .map(|delivery| Outcome {
                    seq: delivery.seq,
                    state: EventState::Published,
                    placement: Some((delivery.partition, delivery.offset)),
                    error: None,
                    retry_at: None,
                })
                .collect()
        })
        .collect();
    record_outcomes(&store.0, &store.1, leases, &outcomes).await
}

/// What became of one delivery.
pub(super) struct Outcome {
    /// The event's relay position.
    pub seq: i64,
    /// PUBLISHED, RETRYING or DEAD_LETTERED.
    pub state: EventState,
    /// Where it was published.
    pub placement: Option<(i32, i64)>,
    /// Why it failed.
    pub error: Option<String>,
    /// When a failed one is tried again.
    pub retry_at: Option<DateTime<Utc>>,
}

/// Records the outcomes of several shards' batches (one per lease) in one
/// statement (`outbox_record_outcomes`, `queries.rs`); the statuses of
/// what changed, per batch, or `LeaseLost` for a batch whose lease is
/// gone. `Err` when the statement failed: nothing was written.
pub(super) async fn record_outcomes(
    pool: &PgPool,
    cache: &SegmentCache,
    leases: &[&Lease],
    outcomes: &[Vec<Outcome>],
) -> Result<Vec<Result<Vec<EventStatus>, StoreError>>, StoreError> {
    let mut connection = pool.acquire().await?;
    let numbers: Vec<i64> = outcomes
        .iter()
        .flatten()
        .map(|outcome| location_of(outcome.seq).0)
        .collect();
    let bodies = bodies(&mut connection, cache, &numbers).await?;
    let shards: Vec<i32> = leases.iter().map(|lease| lease.shard as i32).collect();
    let epochs: Vec<i64> = leases.iter().map(|lease| lease.epoch).collect();
    let mut columns = OutcomeColumns::default();
    let mut batch_of: HashMap<(i64, u16), (usize, &Outcome)> = HashMap::new();
    for (index, batch) in outcomes.iter().enumerate() {
        for outcome in batch {
            let (number, position) = location_of(outcome.seq);
            let Some(event) = bodies
                .get(&number)
                .and_then(|segment| segment.events().nth(position as usize))
            else {
                continue;
            };
            batch_of.insert((number, position), (index, outcome));
            columns.push(number, position, &event.transaction.producer, outcome);
        }
    }
    let rows: Vec<(i64, i32, i64, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT * FROM outbox_record_outcomes($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&shards)
    .bind(&epochs)
    .bind(&columns.segments)
    .bind(&columns.positions)
    .bind(&columns.producers)
    .bind(&columns.states)
    .bind(&columns.partitions)
    .bind(&columns.offsets)
    .bind(&columns.errors)
    .bind(&columns.retry_at)
    .fetch_all(&mut *connection)
    .await?;
    let mut statuses: Vec<Vec<EventStatus>> = leases.iter().map(|_| Vec::new()).collect();
    for (number, position, change, attempts, at) in rows {
        let position = position as u16;
        let Some(&(index, outcome)) = batch_of.get(&(number, position)) else {
            continue;
        };
        let Some(event) = bodies
            .get(&number)
            .and_then(|segment| segment.events().nth(position as usize))
        else {
            continue;
        };
        statuses[index].push(EventStatus {
            event_id: event.event_id,
            producer: event.transaction.producer.clone(),
            transaction_id: event.transaction.transaction_id.clone(),
            sequence: event.transaction.append_sequence,
            topic: event.event.topic.clone(),
            state: outcome.state,
            partition: outcome.placement.map(|(partition, _)| partition),
            offset: outcome.placement.map(|(_, offset)| offset),
            attempts: attempts.max(0) as u32,
            reason: outcome.error.clone().unwrap_or_default(),
            updated_at: at,
            cursor: change as u64,
        });
    }
    let mut results = Vec::with_capacity(leases.len());
    for (lease, statuses) in leases.iter().zip(statuses) {
        // None written while the lease is no longer current: it was lost
        // (the outcomes may also all have been recorded already, by an
        // earlier attempt).
        if statuses.is_empty() && !lease_is_current(&mut connection, lease).await? {
            results.push(Err(StoreError::LeaseLost {
                shard: lease.shard,
                epoch: lease.epoch,
            }));
        } else {
            results.push(Ok(statuses));
        }
    }
    Ok(results)
}

/// Outcomes as the arrays `outbox_record_outcomes` takes.
#[derive(Default)]
struct OutcomeColumns<'a> {
    segments: Vec<i64>,
    positions: Vec<i32>,
    producers: Vec<&'a str>,
    states: Vec<i16>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    errors: Vec<Option<&'a str>>,
    retry_at: Vec<Option<DateTime<Utc>>>,
}

impl<'a> OutcomeColumns<'a> {
    fn push(&mut self, segment: i64, position: u16, producer: &'a str, outcome: &'a Outcome) {
        self.segments.push(segment);
        self.positions.push(i32::from(position));
        self.producers.push(producer);
        self.states.push(outcome.state as i16);
        let (partition, offset) = outcome.placement.unwrap_or((0, 0));
        self.partitions.push(partition);
        self.offsets.push(offset);
        self.errors.push(outcome.error.as_deref());
        self.retry_at.push(outcome.retry_at);
    }
}

/// Whether `lease`'s epoch is still its shard's.
async fn lease_is_current(
    connection: &mut sqlx::PgConnection,
    lease: &Lease,
) -> Result<bool, StoreError> {
    let epoch: Option<i64> = sqlx::query_scalar("SELECT epoch FROM outbox_leases WHERE shard = $1")
        .bind(lease.shard as i32)
        .fetch_optional(&mut *connection)
        .await?;
    Ok(epoch == Some(lease.epoch))
}
