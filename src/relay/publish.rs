//! What a shard worker needs of a publisher, in terms of no particular
//! broker: hand over one relay row's record, and learn what became of it,
//! with a failure already sorted into a [`FailureKind`].
//!
//! [`super::Publisher`] is the Kafka implementation; everything that knows
//! librdkafka's errors stays there.

use std::future::Future;

use crate::domain::TraceContext;
use crate::store::RelayRow;

/// What a failed delivery means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The broker side is unreachable or timing out: open the breaker; the
    /// event's attempts do not grow.
    BrokerLevel,
    /// The record can never be accepted (too large, invalid or unknown
    /// topic, not authorised): dead-letter at once.
    Permanent,
    /// Worth another attempt after a backoff.
    Retriable,
    /// The producer dropped it on purpose (purge, shutdown, a producer lost
    /// to a fatal error): not a failure.
    Purged,
}

/// Where the broker put a delivered record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The partition it went to.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
}

/// A record that was not delivered, described without the broker's types.
#[derive(Debug)]
pub struct PublishFailure<R> {
    /// What the failure means for the event.
    pub kind: FailureKind,
    /// A short, stable name of the error (OpenTelemetry's `error.type`).
    pub error_type: String,
    /// The error as text, for logs and the event's last error.
    pub error: String,
    /// The record as the publisher built it, for a copy to the dead-letter
    /// topic; `None` when the publisher no longer has it.
    pub record: Option<R>,
}

/// Why [`Publish::send`] did not take a record.
#[derive(Debug)]
pub enum SendRefused<R> {
    /// The publisher's local queue is full. It is shared by every shard, so
    /// this is nobody's fault: the record was not sent and costs its event
    /// nothing. `error_type` names it for the publish span.
    QueueFull {
        /// A short, stable name of the error (OpenTelemetry's `error.type`).
        error_type: String,
    },
    /// The record failed at once (e.g. it is invalid).
    Failed(PublishFailure<R>),
}

/// What became of one record handed to a [`Publish`].
pub type Delivery<R> = Result<Placement, PublishFailure<R>>;

/// Sends relay rows as records, each on its own. Per-key order is the shard
/// worker's: it hands over at most one record per key at a time.
pub trait Publish: Send + Sync + 'static {
    /// The record as the publisher keeps it for a dead-letter copy.
    type Record: Send + 'static;
    /// Resolves once the broker has taken the record or it has failed.
    type Pending: Future<Output = Delivery<Self::Record>> + Send + 'static;

    /// Hands the record of `row` over without waiting for the broker. The
    /// record carries `trace` as its trace context (the publish span's, with
    /// tracing on), or else the one stored with the event.
    fn send(
        &self,
        row: &RelayRow,
        trace: Option<&TraceContext>,
    ) -> Result<Self::Pending, SendRefused<Self::Record>>;

    /// Copies a dead-lettered record to the dead-letter topic, if there is
    /// one, with `reason`. Best effort: the event is dead-lettered in the
    /// store either way.
    fn copy_to_dead_letter_topic(&self, record: &Self::Record, reason: &str);
}
