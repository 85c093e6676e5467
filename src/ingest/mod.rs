//! The coalescing writer: concurrent appends are gathered and committed in
//! one store transaction, then each caller is acked.
//!
//! Each writer task owns a queue. A writer takes what is queued (bounded by
//! event count), commits it, acks every request, announces the new events on
//! the status bus and wakes the relay. Requests of one `AppendStream` all go
//! to one writer, so they commit in stream order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

mod transactions;

pub use transactions::{ResolveError, Transactions};

use crate::domain::{AppendBatch, AppendOutcome, TokenMode};
use crate::relay::RelayWaker;
use crate::status::StatusBus;
use crate::store::{AppendRejection, Store, StoreError};
use crate::telemetry::names;

/// Ingest settings (`[ingest]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Writer tasks, each committing its own transactions concurrently.
    pub writers: usize,
    /// Most events one store transaction takes.
    pub max_coalesced_events: usize,
    /// Requests that may wait per writer before callers are pushed back.
    pub queue_depth: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            writers: 2,
            max_coalesced_events: 5_000,
            queue_depth: 4_096,
        }
    }
}

/// Why an append was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Rejected(#[from] AppendRejection),
    /// The store could not commit: nothing of this append was stored.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store failed for another reason; nothing was stored.
    #[error("store failure: {0}")]
    Store(String),
    #[error("outboxd is shutting down")]
    ShuttingDown,
}

struct QueuedAppend {
    batch: AppendBatch,
    reply: oneshot::Sender<Result<AppendOutcome, IngestError>>,
}

/// Handle to the writers. Dropping every handle lets the writers finish what
/// is queued and stop: that is how shutdown drains in-flight appends.
#[derive(Clone)]
pub struct Ingest {
    queues: Arc<Vec<mpsc::Sender<QueuedAppend>>>,
    next: Arc<AtomicUsize>,
}

/// The writers' queue chosen for one stream of appends.
#[derive(Clone)]
pub struct WriterLane {
    queue: mpsc::Sender<QueuedAppend>,
}

impl Ingest {
    /// Starts the writer tasks into `tasks`.
    pub fn start(
        store: Arc<dyn Store>,
        bus: StatusBus,
        waker: RelayWaker,
        config: &IngestConfig,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> Ingest {
        let mut queues = Vec::with_capacity(config.writers.max(1));
        for writer in 0..config.writers.max(1) {
            let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
            queues.push(tx);
            let store = store.clone();
            let bus = bus.clone();
            let waker = waker.clone();
            let max_events = config.max_coalesced_events.max(1);
            tasks.spawn(async move {
                run_writer(writer, rx, store, bus, waker, max_events).await;
                Ok(())
            });
        }
        Ingest {
            queues: Arc::new(queues),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A writer lane, round robin; appends through one lane commit in order.
    pub fn lane(&self) -> WriterLane {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        WriterLane {
            queue: self.queues[index].clone(),
        }
    }

    /// Stores one append and waits for its commit.
    pub async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, IngestError> {
        self.lane().submit(batch).await?.await
    }
}

impl WriterLane {
    /// Queues `batch`; the returned future resolves once it is committed.
    /// Queuing waits when the writer is saturated (backpressure).
    pub async fn submit(
        &self,
        batch: AppendBatch,
    ) -> Result<impl Future<Output = Result<AppendOutcome, IngestError>> + use<>, IngestError> {
        let (reply, done) = oneshot::channel();
        self.queue
            .send(QueuedAppend { batch, reply })
            .await
            .map_err(|_| IngestError::ShuttingDown)?;
        Ok(async move { done.await.unwrap_or(Err(IngestError::ShuttingDown)) })
    }
}

async fn run_writer(
    writer: usize,
    mut queue: mpsc::Receiver<QueuedAppend>,
    store: Arc<dyn Store>,
    bus: StatusBus,
    waker: RelayWaker,
    max_events: usize,
) {
    // Ends when every sender is dropped and the queue is empty.
    while let Some(first) = queue.recv().await {
        let mut events = first.batch.events.len();
        let mut batches = vec![first.batch];
        let mut replies = vec![first.reply];
        while events < max_events {
            match queue.try_recv() {
                Ok(next) => {
                    events += next.batch.events.len();
                    batches.push(next.batch);
                    replies.push(next.reply);
                }
                Err(_) => break,
            }
        }
        match store.append(&batches).await {
            Ok(results) => {
                let mut shards = Vec::new();
                let pending_xid = batches.iter().zip(&results).any(|(batch, result)| {
                    matches!(batch.token.mode, TokenMode::PostgresXid { .. })
                        && result.as_ref().is_ok_and(|outcome| !outcome.duplicate)
                });
                if pending_xid {
                    waker.wake_resolver();
                }
                for (reply, result) in replies.into_iter().zip(results) {
                    let outcome_name = match &result {
                        Ok(outcome) if outcome.duplicate => "duplicate",
                        Ok(_) => "stored",
                        Err(_) => "rejected",
                    };
                    metrics::counter!(names::APPEND_REQUESTS, "outcome" => outcome_name)
                        .increment(1);
                    match result {
                        Ok(mut outcome) => {
                            metrics::counter!(names::EVENTS_APPENDED)
                                .increment(outcome.statuses.len() as u64);
                            shards.extend_from_slice(&outcome.shards);
                            bus.publish(std::mem::take(&mut outcome.statuses));
                            let _ = reply.send(Ok(outcome));
                        }
                        Err(rejection) => {
                            let _ = reply.send(Err(IngestError::Rejected(rejection)));
                        }
                    }
                }
                waker.wake_shards(shards);
            }
            Err(error) => {
                tracing::warn!(writer, requests = replies.len(), %error, "append commit failed");
                let unavailable = matches!(error, StoreError::Unavailable(_));
                metrics::counter!(names::APPEND_REQUESTS, "outcome" => "failed")
                    .increment(replies.len() as u64);
                for reply in replies {
                    let error = if unavailable {
                        IngestError::Unavailable(error.to_string())
                    } else {
                        IngestError::Store(error.to_string())
                    };
                    let _ = reply.send(Err(error));
                }
            }
        }
    }
}
