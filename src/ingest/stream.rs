//! One `AppendStream`: its appends are read in order, submitted through one
//! writer lane (so they commit in stream order), many at a time, and
//! acknowledged in the order they came.

use std::pin::Pin;

use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{Ingest, IngestError, WriterLane};
use crate::domain::{AppendBatch, AppendOutcome};

/// Appends one stream may have in flight before it stops reading.
pub const MAX_PIPELINED_APPENDS: usize = 1_024;

/// One request of a stream: the caller's correlation number and either the
/// batch to store or why it was refused before reaching the store.
pub type StreamedAppend<E> = (u64, Result<AppendBatch, E>);

/// The acknowledgement of one request: its correlation number and outcome.
pub type StreamedAck<E> = (u64, Result<AppendOutcome, E>);

type PendingAck<E> = Pin<Box<dyn Future<Output = StreamedAck<E>> + Send>>;

/// The pipeline's state between two acknowledgements.
struct Pipeline<S, E> {
    requests: S,
    lane: WriterLane,
    acks: FuturesOrdered<PendingAck<E>>,
    reading: bool,
    shutdown: CancellationToken,
}

impl Ingest {
    /// The acknowledgements of one stream of appends, in request order:
    /// its appends go through one lane, so they commit in stream order, and
    /// up to [`MAX_PIPELINED_APPENDS`] are in flight at once; past that, no
    /// further request is read until the oldest is acknowledged. Reading
    /// stops when `requests` ends or at `shutdown`; the stream ends once
    /// every request read is acknowledged. Queuing waits for the
    /// queued-bytes budget instead of refusing (the stream's backpressure).
    /// Dropping the stream stops the reading, while the appends already
    /// queued still commit.
    pub fn append_stream<S, E>(
        &self,
        requests: S,
        shutdown: CancellationToken,
    ) -> impl Stream<Item = StreamedAck<E>> + Send + 'static
    where
        S: Stream<Item = StreamedAppend<E>> + Send + Unpin + 'static,
        E: From<IngestError> + Send + 'static,
    {
        let pipeline = Pipeline {
            requests,
            lane: self.lane(),
            acks: FuturesOrdered::new(),
            reading: true,
            shutdown,
        };
        futures::stream::unfold(pipeline, |mut pipeline| async move {
            let ack = pipeline.next_ack().await?;
            Some((ack, pipeline))
        })
    }
}

impl<S, E> Pipeline<S, E>
where
    S: Stream<Item = StreamedAppend<E>> + Send + Unpin + 'static,
    E: From<IngestError> + Send + 'static,
{
    /// Reads and submits requests until the oldest in flight is
    /// acknowledged; `None` once nothing is left to read or acknowledge.
    async fn next_ack(&mut self) -> Option<StreamedAck<E>> {
        loop {
            if !self.reading && self.acks.is_empty() {
                return None;
            }
            tokio::select! {
                _ = self.shutdown.cancelled(), if self.reading => self.reading = false,
                request = self.requests.next(),
                    if self.reading && self.acks.len() < MAX_PIPELINED_APPENDS =>
                {
                    match request {
                        Some((correlation, batch)) => {
                            let pending = submit(&self.lane, correlation, batch).await;
                            self.acks.push_back(pending);
                        }
                        None => self.reading = false,
                    }
                }
                Some(ack) = self.acks.next(), if !self.acks.is_empty() => return Some(ack),
            }
        }
    }
}

/// Queues an admitted batch on `lane`; its acknowledgement resolves once it
/// is committed.
async fn submit<E>(
    lane: &WriterLane,
    correlation: u64,
    batch: Result<AppendBatch, E>,
) -> PendingAck<E>
where
    E: From<IngestError> + Send + 'static,
{
    let submitted = match batch {
        Ok(batch) => lane.submit(batch).await.map_err(E::from),
        Err(error) => Err(error),
    };
    match submitted {
        Ok(ack) => Box::pin(async move { (correlation, ack.await.map_err(E::from)) }),
        Err(error) => Box::pin(async move { (correlation, Err(error)) }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::StreamExt;
    use tokio::task::JoinSet;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::domain::{TokenMode, test_append, test_event};
    use crate::ingest::{Ingest, IngestConfig};
    use crate::relay::{RelayWaker, XidSources};
    use crate::status::StatusBus;
    use crate::store::Store;

    /// Why a request of the test stream was refused before the store.
    #[derive(Debug, PartialEq)]
    enum Refused {
        Malformed,
        Ingest(String),
    }

    impl From<IngestError> for Refused {
        fn from(error: IngestError) -> Self {
            Refused::Ingest(error.to_string())
        }
    }

    fn append(transaction: &str, mode: TokenMode) -> AppendBatch {
        test_append(
            transaction,
            0,
            mode,
            vec![test_event(Some(b"k"), transaction.as_bytes())],
        )
    }

    async fn ingest(directory: &std::path::Path) -> (Ingest, Arc<dyn Store>, JoinSet<()>) {
        let url = format!("sqlite://{}", directory.join("store.db").display());
        let store = crate::store::connect(&url, 2, 4).await.expect("a store");
        store.migrate().await.expect("migrated");
        let mut writers = JoinSet::new();
        let ingest = Ingest::start(
            store.clone(),
            StatusBus::new(64),
            RelayWaker::new(4),
            XidSources::default(),
            &IngestConfig::default(),
            &mut writers,
        );
        (ingest, store, writers)
    }

    #[tokio::test]
    async fn a_stream_is_acknowledged_in_request_order_refusals_in_their_place() {
        let directory = tempfile::tempdir().expect("a directory");
        let (ingest, store, _writers) = ingest(directory.path()).await;
        let xid = TokenMode::PostgresXid {
            caller_xid: 7,
            system_id: 1,
        };
        let requests: Vec<StreamedAppend<Refused>> = vec![
            (1, Ok(append("t-1", TokenMode::Immediate))),
            (2, Err(Refused::Malformed)),
            // Nothing could resolve this token: refused before the store.
            (3, Ok(append("t-3", xid))),
            (4, Ok(append("t-4", TokenMode::Immediate))),
        ];
        let acks: Vec<StreamedAck<Refused>> = ingest
            .append_stream(futures::stream::iter(requests), CancellationToken::new())
            .collect()
            .await;
        let correlations: Vec<u64> = acks.iter().map(|(c, _)| *c).collect();
        assert_eq!(correlations, [1, 2, 3, 4]);
        assert!(acks[0].1.is_ok(), "{:?}", acks[0]);
        assert_eq!(acks[1].1.as_ref().err(), Some(&Refused::Malformed));
        match &acks[2].1 {
            Err(Refused::Ingest(message)) => {
                assert!(message.contains("postgres_xid_clusters"), "{message}")
            }
            other => panic!("an unresolvable token was not refused: {other:?}"),
        }
        assert!(acks[3].1.is_ok(), "{:?}", acks[3]);
        let stored = store
            .status_by_transactions(&[
                crate::domain::TransactionRef {
                    producer: "shop".into(),
                    transaction_id: "t-1".into(),
                },
                crate::domain::TransactionRef {
                    producer: "shop".into(),
                    transaction_id: "t-3".into(),
                },
                crate::domain::TransactionRef {
                    producer: "shop".into(),
                    transaction_id: "t-4".into(),
                },
            ])
            .await
            .expect("statuses");
        let transactions: Vec<&str> = stored
            .iter()
            .map(|status| status.transaction_id.as_str())
            .collect();
        assert_eq!(transactions, ["t-1", "t-4"]);
    }

    #[tokio::test]
    async fn a_stream_stops_reading_at_shutdown_and_answers_what_it_read() {
        let directory = tempfile::tempdir().expect("a directory");
        let (ingest, _store, _writers) = ingest(directory.path()).await;
        let shutdown = CancellationToken::new();
        let (sender, receiver) = tokio::sync::mpsc::channel::<StreamedAppend<Refused>>(4);
        let mut acks = Box::pin(ingest.append_stream(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
            shutdown.clone(),
        ));
        sender
            .send((1, Ok(append("t-1", TokenMode::Immediate))))
            .await
            .unwrap();
        let (correlation, outcome) = acks.next().await.expect("an ack");
        assert_eq!(correlation, 1);
        assert!(outcome.is_ok(), "{outcome:?}");
        shutdown.cancel();
        // The caller's stream is still open, but nothing more is read.
        assert!(acks.next().await.is_none());
        drop(sender);
    }
}
