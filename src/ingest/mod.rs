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
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

mod operations;
mod stream;
mod transactions;

pub use operations::Operations;
pub use stream::{MAX_PIPELINED_APPENDS, StreamedAck, StreamedAppend};
pub use transactions::{ResolveError, Transactions};

use crate::domain::{AppendBatch, AppendOutcome, TokenMode};
use crate::relay::{RelayWaker, XidSources};
use crate::status::StatusBus;
use crate::store::{AppendRejection, Store, StoreError};
use crate::telemetry::names;

/// Ingest settings (`[ingest]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Writer tasks, each committing its own transactions concurrently.
    /// One is the default: it commits whatever waited during its last
    /// commit, so its commits grow with the load, and the relay's work goes
    /// by the segments a commit writes (one per shard it touches), not by
    /// its events. A second writer halves each commit and doubles that work.
    pub writers: usize,
    /// Most events one store transaction takes.
    pub max_coalesced_events: usize,
    /// Most bytes one store transaction takes (well below PostgreSQL's
    /// 1 GB message limit); a single larger append still goes alone.
    pub max_coalesced_bytes: usize,
    /// Bytes of appends waiting for or in a store transaction, across all
    /// writers and streams. Over it, a unary Append is refused with
    /// RESOURCE_EXHAUSTED and an AppendStream waits (reading no further).
    pub max_queued_bytes: usize,
    /// Requests that may wait per writer before callers are pushed back.
    pub queue_depth: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            writers: 1,
            max_coalesced_events: 5_000,
            max_coalesced_bytes: 64 * 1024 * 1024,
            max_queued_bytes: 256 * 1024 * 1024,
            queue_depth: 4_096,
        }
    }
}

/// Why an append was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The store refused this append (the others of its commit went on).
    #[error(transparent)]
    Rejected(#[from] AppendRejection),
    /// The store could not commit: nothing of this append was stored.
    /// (Shared: one failed commit fails every append it carried.)
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Arc<StoreError>),
    /// The store failed for another reason; nothing was stored.
    #[error("store failure: {0}")]
    Store(#[source] Arc<StoreError>),
    /// A postgres_xid token that nothing could ever resolve: no cluster is
    /// configured for its producer, and the store is not PostgreSQL.
    #[error(
        "no PostgreSQL cluster is configured to resolve postgres_xid tokens of producer {producer:?} \
         (set tokens.postgres_xid_clusters, or use a PostgreSQL store)"
    )]
    Unresolvable {
        /// The batch's producer.
        producer: String,
    },
    /// The writers have stopped; nothing of this append was stored.
    #[error("outboxd is shutting down")]
    ShuttingDown,
    /// Too many bytes of appends are queued: nothing of this one was
    /// stored; retry after a short wait.
    #[error("too many bytes of appends are queued ({queued_limit} bytes)")]
    Overloaded {
        /// `ingest.max_queued_bytes`.
        queued_limit: usize,
    },
}

struct QueuedAppend {
    batch: AppendBatch,
    /// Its share of the queued-bytes budget, given back once it is acked.
    budget: OwnedSemaphorePermit,
    bytes: usize,
    reply: oneshot::Sender<Result<AppendOutcome, IngestError>>,
}

/// The queued-bytes budget, counted in KiB (a semaphore's permits are u32
/// per acquisition).
#[derive(Clone)]
struct ByteBudget {
    kib: Arc<Semaphore>,
    total_kib: u32,
    limit_bytes: usize,
}

impl ByteBudget {
    fn new(limit_bytes: usize) -> Self {
        let total_kib = u32::try_from(limit_bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        ByteBudget {
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            limit_bytes,
        }
    }

    /// An append larger than the whole budget takes all of it.
    fn share(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_kib)
    }
}

/// Handle to the writers. Dropping every handle lets the writers finish what
/// is queued and stop: that is how shutdown drains in-flight appends.
#[derive(Clone)]
pub struct Ingest {
    queues: Arc<Vec<mpsc::Sender<QueuedAppend>>>,
    next: Arc<AtomicUsize>,
    budget: ByteBudget,
    sources: Arc<XidSources>,
}

/// The writers' queue chosen for one stream of appends.
#[derive(Clone)]
pub struct WriterLane {
    queue: mpsc::Sender<QueuedAppend>,
    budget: ByteBudget,
    /// Which producers' postgres_xid tokens can be resolved.
    sources: Arc<XidSources>,
}

impl Ingest {
    /// Starts the writer tasks into `tasks`. Appends of postgres_xid tokens
    /// that none of `sources` can resolve are refused before they are queued.
    pub fn start(
        store: Arc<dyn Store>,
        bus: StatusBus,
        waker: RelayWaker,
        sources: XidSources,
        config: &IngestConfig,
        tasks: &mut JoinSet<()>,
    ) -> Ingest {
        let mut queues = Vec::with_capacity(config.writers.max(1));
        for writer in 0..config.writers.max(1) {
            let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
            queues.push(tx);
            let store = store.clone();
            let bus = bus.clone();
            let waker = waker.clone();
            let bounds = Coalescing {
                max_events: config.max_coalesced_events.max(1),
                max_bytes: config.max_coalesced_bytes.max(1),
            };
            tasks.spawn(run_writer(writer, rx, store, bus, waker, bounds));
        }
        Ingest {
            queues: Arc::new(queues),
            next: Arc::new(AtomicUsize::new(0)),
            budget: ByteBudget::new(config.max_queued_bytes),
            sources: Arc::new(sources),
        }
    }

    /// A writer lane, round robin; appends through one lane commit in order.
    pub fn lane(&self) -> WriterLane {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        WriterLane {
            queue: self.queues[index].clone(),
            budget: self.budget.clone(),
            sources: self.sources.clone(),
        }
    }

    /// Stores one append and waits for its commit; refused at once when
    /// the queued-bytes budget is spent.
    pub async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, IngestError> {
        self.lane().try_submit(batch).await?.await
    }
}

impl WriterLane {
    /// Queues `batch`; the returned future resolves once it is committed.
    /// Queuing waits while the writer is saturated or the queued-bytes
    /// budget is spent (backpressure).
    pub async fn submit(
        &self,
        batch: AppendBatch,
    ) -> Result<impl Future<Output = Result<AppendOutcome, IngestError>> + use<>, IngestError> {
        self.queue_up(batch, true).await
    }

    /// Like [`WriterLane::submit`], but refused at once with
    /// [`IngestError::Overloaded`] when the budget is spent.
    pub async fn try_submit(
        &self,
        batch: AppendBatch,
    ) -> Result<impl Future<Output = Result<AppendOutcome, IngestError>> + use<>, IngestError> {
        self.queue_up(batch, false).await
    }

    async fn queue_up(
        &self,
        batch: AppendBatch,
        wait_for_budget: bool,
    ) -> Result<impl Future<Output = Result<AppendOutcome, IngestError>> + use<>, IngestError> {
        if matches!(batch.token.mode, TokenMode::PostgresXid { .. })
            && !self.sources.can_resolve(&batch.token.producer)
        {
            return Err(IngestError::Unresolvable {
                producer: batch.token.producer,
            });
        }
        let bytes = batch.approximate_bytes();
        let share = self.budget.share(bytes);
        let kib = self.budget.kib.clone();
        let budget = if wait_for_budget {
            kib.acquire_many_owned(share)
                .await
                .map_err(|_| IngestError::ShuttingDown)?
        } else {
            kib.try_acquire_many_owned(share)
                .map_err(|_| IngestError::Overloaded {
                    queued_limit: self.budget.limit_bytes,
                })?
        };
        let (reply, done) = oneshot::channel();
        self.queue
            .send(QueuedAppend {
                batch,
                budget,
                bytes,
                reply,
            })
            .await
            .map_err(|_| IngestError::ShuttingDown)?;
        Ok(async move { done.await.unwrap_or(Err(IngestError::ShuttingDown)) })
    }
}

/// How much one store transaction may take.
#[derive(Clone, Copy)]
struct Coalescing {
    max_events: usize,
    max_bytes: usize,
}

async fn run_writer(
    writer: usize,
    mut queue: mpsc::Receiver<QueuedAppend>,
    store: Arc<dyn Store>,
    bus: StatusBus,
    waker: RelayWaker,
    bounds: Coalescing,
) {
    // An append that did not fit the last transaction opens the next.
    let mut carried: Option<QueuedAppend> = None;
    // Ends when every sender is dropped and the queue is empty.
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => break,
            },
        };
        let mut events = first.batch.events.len();
        let mut bytes = first.bytes;
        let mut batches = vec![first.batch];
        let mut replies = vec![first.reply];
        let mut budget = vec![first.budget];
        while events < bounds.max_events {
            match queue.try_recv() {
                Ok(next) if bytes + next.bytes > bounds.max_bytes => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    events += next.batch.events.len();
                    bytes += next.bytes;
                    batches.push(next.batch);
                    replies.push(next.reply);
                    budget.push(next.budget);
                }
                Err(_) => break,
            }
        }
        let span = crate::telemetry::commit_span(
            store.db_system(),
            batches.iter().map(|batch| &batch.trace),
            events,
        );
        let committed = store.append(&batches).instrument(span.clone()).await;
        // What follows is logged in the commit's span; nothing below awaits.
        let _entered = span.enter();
        match committed {
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
                let error = Arc::new(error);
                crate::telemetry::failed(&span, if unavailable { "unavailable" } else { "store" });
                metrics::counter!(names::APPEND_REQUESTS, "outcome" => "failed")
                    .increment(replies.len() as u64);
                for reply in replies {
                    let error = if unavailable {
                        IngestError::Unavailable(error.clone())
                    } else {
                        IngestError::Store(error.clone())
                    };
                    let _ = reply.send(Err(error));
                }
            }
        }
        drop(budget);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_keeps_the_store_error_as_its_source() {
        let error = IngestError::Store(Arc::new(StoreError::Corrupt("bad row".into())));
        let source = std::error::Error::source(&error).expect("a source");
        assert_eq!(source.to_string(), "corrupt store data: bad row");
        assert_eq!(
            error.to_string(),
            "store failure: corrupt store data: bad row"
        );
    }
}
