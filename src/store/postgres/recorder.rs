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

use sqlx::PgPool;
use sqlx::Row;
use sqlx::postgres::PgRow;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::queries::RECORD_DELIVERED;
use super::status_from_row;
use crate::domain::EventStatus;
use crate::store::{Delivered, Lease, StoreError};

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
    pool: PgPool,
}

impl Recorder {
    /// Starts the recorder tasks on `pool`.
    pub(super) fn start(pool: PgPool) -> Recorder {
        let (queue, batches) = mpsc::channel(1_024);
        let batches = Arc::new(Mutex::new(batches));
        for _ in 0..RECORDERS {
            tokio::spawn(record(pool.clone(), batches.clone()));
        }
        Recorder { queue, pool }
    }

    /// Marks `delivered` published, fenced by `lease`, in a statement
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
                Err(_) => record_alone(&self.pool, lease, delivered).await,
            },
            Err(_) => record_alone(&self.pool, lease, delivered).await,
        }
    }
}

/// One recorder task: takes what has gathered, records it, answers each
/// batch.
async fn record(pool: PgPool, batches: Arc<Mutex<mpsc::Receiver<Batch>>>) {
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
            if let Ok(outcomes) = record_together(&pool, &leases, &deliveries).await {
                for (batch, outcome) in gathered.into_iter().zip(outcomes) {
                    let _ = batch.reply.send(outcome);
                }
                continue;
            }
        }
        for batch in gathered {
            let outcome = record_alone(&pool, &batch.lease, &batch.delivered).await;
            let _ = batch.reply.send(outcome);
        }
    }
}

/// Records one batch in a statement of its own.
async fn record_alone(
    pool: &PgPool,
    lease: &Lease,
    delivered: &[Delivered],
) -> Result<Vec<EventStatus>, StoreError> {
    let mut outcomes = record_together(pool, &[lease], &[delivered]).await?;
    outcomes.pop().expect("one outcome per batch")
}

/// Records several shards' batches in one statement; an outcome per batch,
/// in order. `Err` when the statement failed: nothing was written.
async fn record_together(
    pool: &PgPool,
    leases: &[&Lease],
    deliveries: &[&[Delivered]],
) -> Result<Vec<Result<Vec<EventStatus>, StoreError>>, StoreError> {
    let shards: Vec<i32> = leases.iter().map(|lease| lease.shard as i32).collect();
    let epochs: Vec<i64> = leases.iter().map(|lease| lease.epoch).collect();
    let mut batch_of = HashMap::new();
    let (mut seqs, mut partitions, mut offsets, mut row_shards) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (index, (lease, delivered)) in leases.iter().zip(deliveries).enumerate() {
        for delivery in delivered.iter() {
            batch_of.insert(delivery.seq, index);
            seqs.push(delivery.seq);
            partitions.push(delivery.partition);
            offsets.push(delivery.offset);
            row_shards.push(lease.shard as i32);
        }
    }
    let rows: Vec<PgRow> = sqlx::query(RECORD_DELIVERED)
        .bind(&shards)
        .bind(&epochs)
        .bind(&seqs)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&row_shards)
        .fetch_all(pool)
        .await?;
    let mut written: Vec<Vec<PgRow>> = leases.iter().map(|_| Vec::new()).collect();
    for row in rows {
        let seq: i64 = row.try_get("seq")?;
        if let Some(&index) = batch_of.get(&seq) {
            written[index].push(row);
        }
    }
    let mut outcomes = Vec::with_capacity(leases.len());
    for (lease, rows) in leases.iter().zip(written) {
        outcomes.push(fenced_statuses(pool, lease, &rows).await);
    }
    Ok(outcomes)
}

/// The statuses of a batch's written rows; none written while its lease is
/// no longer current means the lease was lost (the rows may also all have
/// been recorded already, by an earlier attempt).
pub(super) async fn fenced_statuses(
    pool: &PgPool,
    lease: &Lease,
    rows: &[PgRow],
) -> Result<Vec<EventStatus>, StoreError> {
    if rows.is_empty() && !lease_is_current(pool, lease).await? {
        return Err(StoreError::LeaseLost {
            shard: lease.shard,
            epoch: lease.epoch,
        });
    }
    rows.iter().map(status_from_row).collect()
}

/// Whether `lease`'s epoch is still its shard's.
async fn lease_is_current(pool: &PgPool, lease: &Lease) -> Result<bool, StoreError> {
    let row = sqlx::query("SELECT epoch FROM outbox_leases WHERE shard = $1")
        .bind(lease.shard as i32)
        .fetch_optional(pool)
        .await?;
    Ok(match row {
        Some(row) => row.try_get::<i64, _>("epoch")? == lease.epoch,
        None => false,
    })
}
