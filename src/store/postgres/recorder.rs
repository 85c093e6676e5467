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

use std::collections::BTreeMap;

use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::events::{Loaded, mark};
use super::segments::{SegmentCache, location_of};
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

/// Records several shards' batches in one store transaction; an outcome
/// per batch, in order. `Err` when the transaction failed: nothing was
/// written.
async fn record_together(
    store: &Store,
    leases: &[&Lease],
    deliveries: &[&[Delivered]],
) -> Result<Vec<Result<Vec<EventStatus>, StoreError>>, StoreError> {
    let (pool, cache) = store;
    let mut tx = pool.begin().await?;
    // FOR KEY SHARE makes a concurrent takeover wait for this transaction,
    // or this transaction see it (and leave that shard's batch alone).
    let shards: Vec<i32> = leases.iter().map(|lease| lease.shard as i32).collect();
    let epochs: Vec<i64> = leases.iter().map(|lease| lease.epoch).collect();
    let held: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT l.shard, l.epoch FROM outbox_leases AS l \
         JOIN UNNEST($1::integer[], $2::bigint[]) AS w(shard, epoch) \
           ON l.shard = w.shard AND l.epoch = w.epoch \
         ORDER BY l.shard \
         FOR KEY SHARE OF l",
    )
    .bind(&shards)
    .bind(&epochs)
    .fetch_all(&mut *tx)
    .await?;
    let holds = |lease: &Lease| held.contains(&(lease.shard as i32, lease.epoch));
    let numbers: Vec<i64> = leases
        .iter()
        .zip(deliveries)
        .filter(|(lease, _)| holds(lease))
        .flat_map(|(_, delivered)| delivered.iter().map(|d| location_of(d.seq).0))
        .collect();
    let mut loaded = Loaded::load(&mut tx, cache, &numbers, true).await?;
    let mut changed = BTreeMap::new();
    let mut batch_of: HashMap<crate::domain::EventId, usize> = HashMap::new();
    for (index, (lease, delivered)) in leases.iter().zip(deliveries).enumerate() {
        if !holds(lease) {
            continue;
        }
        for delivery in delivered.iter() {
            let (number, position) = location_of(delivery.seq);
            let Some(row) = loaded.rows.get_mut(&number) else {
                continue;
            };
            if row.shard != lease.shard as i32
                || position as usize >= row.len()
                || row.state(position)?.is_none_or(|s| s.is_final())
            {
                continue;
            }
            row.set_state(position, EventState::Published);
            row.set_placement(position, delivery.partition, delivery.offset);
            if let Some((row, event)) = loaded.event(number, position) {
                batch_of.insert(event.event_id, index);
                mark(&mut changed, row, &event);
            }
        }
    }
    let resolved = loaded.write(&mut tx, &changed).await?;
    tx.commit().await?;
    let mut outcomes: Vec<Result<Vec<EventStatus>, StoreError>> = leases
        .iter()
        .map(|lease| {
            if holds(lease) {
                Ok(Vec::new())
            } else {
                Err(StoreError::LeaseLost {
                    shard: lease.shard,
                    epoch: lease.epoch,
                })
            }
        })
        .collect();
    for status in resolved.changed {
        if let Some(&batch) = batch_of.get(&status.event_id)
            && let Some(Ok(statuses)) = outcomes.get_mut(batch)
        {
            statuses.push(status);
        }
    }
    Ok(outcomes)
}
