//! One recorder of deliveries per store: the shards' workers hand it their
//! batches, and it records what has gathered in one statement for all
//! their shards, instead of a statement per shard and batch.
//!
//! Each batch keeps its own outcome: its rows are written only while its
//! lease holds (`StoreError::LeaseLost` otherwise), and a statement that
//! fails for several batches is tried again for each alone, so that one
//! batch's bad row fails only that batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};

use super::segments::{ROW_COLUMNS, SegmentCache, SegmentHead, SegmentRow, heads, location_of};
use crate::domain::{EventId, EventState, EventStatus};
use crate::store::{Delivered, Lease, StoreError};

/// What the recorder writes with: the pool and the store's segment cache.
type Store = (PgPool, Arc<SegmentCache>);

/// Recorder tasks, each with its own shards (shard modulo this), so that
/// two statements never write the same segment at once: one would wait
/// for the other, find the segment changed and record again.
const RECORDERS: usize = 2;

/// Most deliveries one statement records.
const MAX_ROWS: usize = 20_000;

/// How long a recorder task gathers batches after the first one before it
/// writes them: the batches of many shards then share a statement, and a
/// producer's changes in it share one change-feed row (a row per producer
/// and statement), which is most of what the feed costs per event.
const GATHER: std::time::Duration = std::time::Duration::from_millis(3);

/// One shard's batch and where its outcome goes.
struct Batch {
    lease: Lease,
    delivered: Vec<Delivered>,
    reply: oneshot::Sender<Result<Vec<EventStatus>, StoreError>>,
}

/// Hands batches to the recorder tasks; they stop when every handle is
/// gone.
pub(super) struct Recorder {
    queues: Vec<mpsc::Sender<Batch>>,
    /// For a batch the tasks can no longer take (the runtime is stopping).
    store: Store,
}

impl Recorder {
    /// Starts the recorder tasks on `pool`.
    pub(super) fn start(pool: PgPool, cache: Arc<SegmentCache>) -> Recorder {
        let store = (pool, cache);
        let queues = (0..RECORDERS)
            .map(|_| {
                let (queue, batches) = mpsc::channel(1_024);
                tokio::spawn(record(store.clone(), batches));
                queue
            })
            .collect();
        Recorder { queues, store }
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
        let queue = &self.queues[lease.shard as usize % self.queues.len()];
        match queue.send(batch).await {
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
async fn record(store: Store, mut batches: mpsc::Receiver<Batch>) {
    loop {
        let gathered = {
            let Some(first) = batches.recv().await else {
                return;
            };
            let mut rows = first.delivered.len();
            let mut gathered = vec![first];
            let until = tokio::time::Instant::now() + GATHER;
            while rows < MAX_ROWS {
                match tokio::time::timeout_at(until, batches.recv()).await {
                    Ok(Some(next)) => {
                        rows += next.delivered.len();
                        gathered.push(next);
                    }
                    _ => break,
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

/// Records the outcomes of several shards' batches (one per lease): the
/// new state and placement bytes are computed here from a read without
/// locks and written by one statement (`record_outcomes.sql`) only where
/// nothing changed meanwhile; a segment that did change is read and
/// decided again. Returns the statuses of what changed, per batch, or
/// `LeaseLost` for a batch whose lease is gone. `Err` when a statement
/// failed: what earlier statements wrote stays written (each outcome is
/// recorded once: a repeat finds its event final and leaves it).
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
    let heads = heads(&mut connection, cache, &numbers).await?;
    let mut waiting: BTreeMap<i64, Vec<(usize, &Outcome)>> = BTreeMap::new();
    for (index, batch) in outcomes.iter().enumerate() {
        for outcome in batch {
            waiting
                .entry(location_of(outcome.seq).0)
                .or_default()
                .push((index, outcome));
        }
    }
    let mut statuses: Vec<Vec<EventStatus>> = leases.iter().map(|_| Vec::new()).collect();
    let mut lost = vec![false; leases.len()];
    for _ in 0..MAX_TRIES {
        if waiting.is_empty() {
            break;
        }
        let numbers: Vec<i64> = waiting.keys().copied().collect();
        let read = read_for_recording(&mut connection, &numbers).await?;
        let mut plan = Plan::default();
        for (row, attempts) in read {
            let (Some(batch), Some(head)) = (waiting.get(&row.number), heads.get(&row.number))
            else {
                continue;
            };
            plan.decide(row, &attempts, head, batch);
        }
        // Segments that are gone, or whose events are all final already,
        // have nothing left to write.
        waiting.retain(|number, _| plan.segments.contains_key(number));
        if waiting.is_empty() {
            break;
        }
        let shards: Vec<i32> = leases.iter().map(|lease| lease.shard as i32).collect();
        let epochs: Vec<i64> = leases.iter().map(|lease| lease.epoch).collect();
        let columns = plan.columns();
        let written: Vec<Written> = sqlx::query_as(RECORD_OUTCOMES)
            .bind(&shards)
            .bind(&epochs)
            .bind(&columns.numbers)
            .bind(&columns.read_states)
            .bind(&columns.states)
            .bind(&columns.placements)
            .bind(&columns.finals)
            .bind(&columns.segments)
            .bind(&columns.positions)
            .bind(&columns.producers)
            .bind(&columns.errors)
            .bind(&columns.retry_at)
            .bind(&columns.failed)
            .fetch_all(&mut *connection)
            .await?;
        let mut change_seqs: HashMap<(i64, &str), i64> = HashMap::new();
        let mut attempts: HashMap<(i64, u16), i32> = HashMap::new();
        let mut at = None;
        for row in &written {
            at = Some(row.at);
            if let (Some(producer), Some(segments), Some(change_seq)) =
                (&row.producer, &row.segments, row.change_seq)
            {
                for &segment in segments {
                    waiting.remove(&segment);
                    change_seqs.insert((segment, producer.as_str()), change_seq);
                }
            }
            if let (Some(segment), Some(position), Some(count)) =
                (row.segment, row.position, row.attempts)
            {
                attempts.insert((segment, position as u16), count);
            }
        }
        for (&(number, position), change) in &plan.changes {
            let (Some(&change_seq), Some(at)) = (change_seqs.get(&(number, change.producer)), at)
            else {
                continue;
            };
            let outcome = change.outcome;
            statuses[change.batch].push(EventStatus {
                event_id: change.event_id,
                producer: change.producer.to_owned(),
                transaction_id: change.transaction_id.to_owned(),
                sequence: change.sequence,
                topic: change.topic.to_owned(),
                state: outcome.state,
                partition: outcome.placement.map(|(partition, _)| partition),
                offset: outcome.placement.map(|(_, offset)| offset),
                attempts: attempts
                    .get(&(number, position))
                    .copied()
                    .unwrap_or(change.attempts)
                    .max(0) as u32,
                reason: outcome.error.clone().unwrap_or_default(),
                updated_at: at,
                cursor: change_seq as u64,
            });
        }
        if waiting.is_empty() {
            break;
        }
        // Not written: the lease is gone, or the segment changed since it
        // was read (then it is decided again).
        let current = current_epochs(&mut connection, leases).await?;
        for &(index, _) in waiting.values().flatten() {
            let lease = leases[index];
            lost[index] = current.get(&lease.shard) != Some(&lease.epoch);
        }
        for batch in waiting.values_mut() {
            batch.retain(|(index, _)| !lost[*index]);
        }
        waiting.retain(|_, batch| !batch.is_empty());
    }
    if !waiting.is_empty() {
        return Err(StoreError::Unavailable(sqlx::Error::Protocol(format!(
            "segments {:?} kept changing while their outcomes were recorded",
            waiting.keys().collect::<Vec<_>>()
        ))));
    }
    Ok(leases
        .iter()
        .zip(statuses)
        .zip(lost)
        .map(|((lease, statuses), lost)| {
            if lost {
                Err(StoreError::LeaseLost {
                    shard: lease.shard,
                    epoch: lease.epoch,
                })
            } else {
                Ok(statuses)
            }
        })
        .collect())
}

/// A row `record_outcomes.sql` returns: a change-feed row written
/// (producer, segments and change_seq) or a fault written (segment,
/// position and attempts).
#[derive(sqlx::FromRow)]
struct Written {
    producer: Option<String>,
    segments: Option<Vec<i64>>,
    change_seq: Option<i64>,
    segment: Option<i64>,
    position: Option<i32>,
    attempts: Option<i32>,
    at: DateTime<Utc>,
}

/// Times the segments of one recording are read and decided before it
/// gives up (each time, another writer changed one of them meanwhile).
const MAX_TRIES: usize = 50;

/// Records outcomes; see `record_outcomes.sql`.
const RECORD_OUTCOMES: &str = include_str!("../sql/postgres/record_outcomes.sql");

/// The rows of segments `numbers`, without locks, each with the attempts
/// its events have made so far (by position, for those that failed once).
async fn read_for_recording(
    connection: &mut sqlx::PgConnection,
    numbers: &[i64],
) -> Result<Vec<(SegmentRow, HashMap<u16, i32>)>, StoreError> {
    let sql = format!(
        "SELECT {ROW_COLUMNS}, f.positions, f.attempts \
         FROM outbox_segments \
         LEFT JOIN LATERAL ( \
             SELECT array_agg(e.position) AS positions, array_agg(e.attempts) AS attempts \
             FROM outbox_event_faults AS e WHERE e.segment = outbox_segments.number \
         ) AS f ON true \
         WHERE number = ANY($1)"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(numbers)
        .fetch_all(&mut *connection)
        .await?;
    let mut read = Vec::with_capacity(rows.len());
    for row in rows {
        let segment = SegmentRow::from_row(&row)?;
        let positions: Option<Vec<i32>> = row.try_get("positions")?;
        let attempts: Option<Vec<i32>> = row.try_get("attempts")?;
        let attempts = positions
            .unwrap_or_default()
            .into_iter()
            .zip(attempts.unwrap_or_default())
            .map(|(position, attempts)| (position as u16, attempts))
            .collect();
        read.push((segment, attempts));
    }
    Ok(read)
}

/// One event's change, decided.
struct Change<'a> {
    batch: usize,
    outcome: &'a Outcome,
    event_id: EventId,
    producer: &'a str,
    transaction_id: &'a str,
    sequence: u64,
    topic: &'a str,
    /// Its attempts before this outcome.
    attempts: i32,
}

/// The segments of one recording statement: each as read and as it is to
/// be written, with the changes of its events.
#[derive(Default)]
struct Plan<'a> {
    segments: BTreeMap<i64, (Vec<u8>, SegmentRow)>,
    changes: BTreeMap<(i64, u16), Change<'a>>,
}

impl<'a> Plan<'a> {
    /// Applies `batch`'s outcomes to `row`: only events not final yet (nor
    /// removed) change. The segment joins the plan if any did.
    fn decide(
        &mut self,
        mut row: SegmentRow,
        attempts: &HashMap<u16, i32>,
        head: &'a SegmentHead,
        batch: &[(usize, &'a Outcome)],
    ) {
        let read_states = row.states.clone();
        let mut changed = false;
        for &(index, outcome) in batch {
            let position = location_of(outcome.seq).1;
            if usize::from(position) >= row.len() {
                continue;
            }
            if !matches!(
                row.state(position),
                Ok(Some(
                    EventState::Pending | EventState::Ready | EventState::Retrying
                ))
            ) {
                continue;
            }
            let Some(event) = head.event(position) else {
                continue;
            };
            row.set_state(position, outcome.state);
            if let Some((partition, offset)) = outcome.placement {
                row.set_placement(position, partition, offset);
            }
            changed = true;
            self.changes.insert(
                (row.number, position),
                Change {
                    batch: index,
                    outcome,
                    event_id: event.event_id,
                    producer: &event.transaction.producer,
                    transaction_id: &event.transaction.transaction_id,
                    sequence: event.transaction.append_sequence,
                    topic: event.topic,
                    attempts: attempts.get(&position).copied().unwrap_or(0),
                },
            );
        }
        if changed {
            self.segments.insert(row.number, (read_states, row));
        }
    }

    /// The plan as the arrays `record_outcomes.sql` takes.
    fn columns(&self) -> PlanColumns<'_> {
        let mut columns = PlanColumns::default();
        for (number, (read_states, row)) in &self.segments {
            columns.numbers.push(*number);
            columns.read_states.push(read_states);
            columns.states.push(&row.states);
            columns.placements.push(row.placements.as_deref());
            columns.finals.push(row.is_final());
        }
        for ((number, position), change) in &self.changes {
            columns.segments.push(*number);
            columns.positions.push(i32::from(*position));
            columns.producers.push(change.producer);
            columns.errors.push(change.outcome.error.as_deref());
            columns.retry_at.push(change.outcome.retry_at);
            columns
                .failed
                .push(change.outcome.state != EventState::Published);
        }
        columns
    }
}

/// A plan as arrays, one per statement parameter.
#[derive(Default)]
struct PlanColumns<'a> {
    numbers: Vec<i64>,
    read_states: Vec<&'a [u8]>,
    states: Vec<&'a [u8]>,
    placements: Vec<Option<&'a [u8]>>,
    finals: Vec<bool>,
    segments: Vec<i64>,
    positions: Vec<i32>,
    producers: Vec<&'a str>,
    errors: Vec<Option<&'a str>>,
    retry_at: Vec<Option<DateTime<Utc>>>,
    failed: Vec<bool>,
}

/// The current epoch of each of the `leases`' shards.
async fn current_epochs(
    connection: &mut sqlx::PgConnection,
    leases: &[&Lease],
) -> Result<HashMap<u32, i64>, StoreError> {
    let shards: Vec<i32> = leases.iter().map(|lease| lease.shard as i32).collect();
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT shard, epoch FROM outbox_leases WHERE shard = ANY($1)")
            .bind(&shards)
            .fetch_all(&mut *connection)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(shard, epoch)| (shard as u32, epoch))
        .collect())
}
