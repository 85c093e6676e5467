//! Events, transaction tokens, states and validation: the vocabulary of
//! outboxd, with no I/O.

pub mod murmur2;
mod validation;

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use validation::{FieldViolation, Limits, validate_batch, validate_topic};

/// The id of one event: a UUID, v7 when outboxd generated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub Uuid);

impl EventId {
    /// A new time-ordered id.
    pub fn generate() -> Self {
        EventId(Uuid::now_v7())
    }

    /// Parses the canonical hyphenated form (any UUID version).
    pub fn parse(text: &str) -> Option<Self> {
        Uuid::try_parse(text).ok().map(EventId)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Where an event is in its life. The numbers are stored; never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum EventState {
    /// Awaiting the caller's commit (two_phase, postgres_xid).
    Pending = 1,
    /// Publishable.
    Ready = 2,
    /// A delivery failed; the next attempt is due at `next_attempt_at`.
    Retrying = 3,
    /// Final: Kafka acknowledged it.
    Published = 4,
    /// Final: given up.
    DeadLettered = 5,
    /// Final: its transaction aborted.
    Discarded = 6,
}

impl EventState {
    /// The first state number that is final; the relay's partial index holds
    /// the rows below it.
    pub const FIRST_FINAL: i16 = 4;

    /// Whether no further state change can follow (published, dead-lettered or
    /// discarded).
    pub fn is_final(self) -> bool {
        (self as i16) >= Self::FIRST_FINAL
    }

    /// The state stored as `value`; `None` for a number no state has.
    pub fn from_stored(value: i16) -> Option<Self> {
        Some(match value {
            1 => Self::Pending,
            2 => Self::Ready,
            3 => Self::Retrying,
            4 => Self::Published,
            5 => Self::DeadLettered,
            6 => Self::Discarded,
            _ => return None,
        })
    }
}

/// How the events of a transaction become publishable (docs/architecture.md,
/// "Publishing only what the caller committed").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenMode {
    /// Publishable at append.
    Immediate,
    /// Publishable on `Commit`; discarded on `Abort` or after `timeout`.
    TwoPhase {
        /// How long the transaction may stay open, counted from its first
        /// append.
        timeout: Duration,
    },
    /// Publishable when the caller's PostgreSQL transaction `caller_xid` is
    /// seen committed on the cluster whose system identifier is `system_id`.
    PostgresXid {
        /// The caller's 64-bit transaction id (`pg_current_xact_id()`).
        caller_xid: u64,
        /// The cluster's system identifier (`pg_control_system()`).
        system_id: u64,
    },
}

impl TokenMode {
    /// The mode's name as the API spells it: `immediate`, `two_phase` or
    /// `postgres_xid`.
    pub fn name(&self) -> &'static str {
        match self {
            TokenMode::Immediate => "immediate",
            TokenMode::TwoPhase { .. } => "two_phase",
            TokenMode::PostgresXid { .. } => "postgres_xid",
        }
    }
}

/// The caller's transaction: its id within a producer namespace, and its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionToken {
    /// The producer namespace the transaction id belongs to.
    pub producer: String,
    /// The caller's id for the transaction, unique within `producer`.
    pub transaction_id: String,
    /// How the transaction's events become publishable.
    pub mode: TokenMode,
}

/// A (producer, transaction id) pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionRef {
    /// The producer namespace the transaction id belongs to.
    pub producer: String,
    /// The caller's id for the transaction, unique within `producer`.
    pub transaction_id: String,
}

/// A Kafka record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value, raw bytes.
    pub value: Vec<u8>,
}

/// W3C trace context of the append, carried to the Kafka record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent` header, when the append carried one.
    pub traceparent: Option<String>,
    /// The `tracestate` header, when the append carried one.
    pub tracestate: Option<String>,
}

/// One event as the caller handed it over, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The caller's id, when it chose one.
    pub event_id: Option<EventId>,
    /// The Kafka topic the event is published to.
    pub topic: String,
    /// The Kafka key as given; `None` when the caller gave none.
    pub key: Option<Vec<u8>>,
    /// The Kafka record value.
    pub payload: Vec<u8>,
    /// The caller's headers of the Kafka record, in order; none starts with
    /// `outbox-`, which outboxd keeps for its own.
    pub headers: Vec<Header>,
    /// The kind of entity the event is about (Debezium's `aggregatetype`).
    pub aggregate_type: String,
    /// The id of the entity the event is about; the ordering key when no key
    /// was given.
    pub aggregate_id: String,
    /// What happened, in the caller's words.
    pub event_type: String,
    /// When it happened, as the caller reports; `None` when not given.
    pub occurred_at: Option<DateTime<Utc>>,
}

impl NewEvent {
    /// The ordering key, which is also the Kafka key: the caller's key, else
    /// the aggregate id (Debezium's convention), else none (no order promise).
    pub fn ordering_key(&self) -> Option<&[u8]> {
        match &self.key {
            Some(key) => Some(key),
            None if !self.aggregate_id.is_empty() => Some(self.aggregate_id.as_bytes()),
            None => None,
        }
    }
}

/// One `Append` request: a batch of events of one transaction token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendBatch {
    /// The transaction the events belong to.
    pub token: TransactionToken,
    /// Numbers the appends of one transaction.
    pub sequence: u64,
    /// The events, stored together or not at all.
    pub events: Vec<NewEvent>,
    /// Trace context of the request; not part of the content hash.
    pub trace: TraceContext,
}

impl AppendBatch {
    /// About how many bytes this append takes in memory and in the store
    /// transaction: what the caller sent, plus a fixed share per event for
    /// ids, states and row overhead. Bounds coalescing and queued memory.
    pub fn approximate_bytes(&self) -> usize {
        const PER_EVENT: usize = 256;
        let token = self.token.producer.len() + self.token.transaction_id.len();
        let events: usize = self
            .events
            .iter()
            .map(|e| {
                PER_EVENT
                    + e.topic.len()
                    + e.key.as_ref().map_or(0, Vec::len)
                    + e.payload.len()
                    + e.headers
                        .iter()
                        .map(|h| h.key.len() + h.value.len() + 8)
                        .sum::<usize>()
                    + e.aggregate_type.len()
                    + e.aggregate_id.len()
                    + e.event_type.len()
            })
            .sum();
        token + events
    }

    /// A digest of everything the caller sent that defines this append, so a
    /// retry can be told apart from a different body under the same key.
    /// Generated ids and times are not part of it: a retry gets them anew.
    pub fn content_hash(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(self.token.mode.name().as_bytes());
        match &self.token.mode {
            TokenMode::Immediate => {}
            TokenMode::TwoPhase { timeout } => field(&timeout.as_millis().to_le_bytes()),
            TokenMode::PostgresXid {
                caller_xid,
                system_id,
            } => {
                field(&caller_xid.to_le_bytes());
                field(&system_id.to_le_bytes());
            }
        }
        field(&(self.events.len() as u64).to_le_bytes());
        for event in &self.events {
            field(
                event
                    .event_id
                    .map(|id| id.0.as_bytes().to_vec())
                    .unwrap_or_default()
                    .as_slice(),
            );
            field(event.topic.as_bytes());
            match &event.key {
                Some(key) => {
                    field(b"k");
                    field(key);
                }
                None => field(b"-"),
            }
            field(&event.payload);
            field(&(event.headers.len() as u64).to_le_bytes());
            for header in &event.headers {
                field(header.key.as_bytes());
                field(&header.value);
            }
            field(event.aggregate_type.as_bytes());
            field(event.aggregate_id.as_bytes());
            field(event.event_type.as_bytes());
            field(
                &event
                    .occurred_at
                    .map(|t| t.timestamp_micros())
                    .unwrap_or(i64::MIN)
                    .to_le_bytes(),
            );
        }
        hasher.finalize().into()
    }
}

/// The shard of an ordering key: Kafka's murmur2 modulo the shard count.
/// Events without a key are spread by their id; they have no order promise.
pub fn shard_of(ordering_key: Option<&[u8]>, event_id: EventId, shard_count: u32) -> u32 {
    match ordering_key {
        Some(key) => murmur2::kafka_partition(key, shard_count),
        None => murmur2::kafka_partition(event_id.0.as_bytes(), shard_count),
    }
}

/// Encodes headers for storage: a count, then length-prefixed keys and values.
pub fn encode_headers(headers: &[Header]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        4 + headers
            .iter()
            .map(|h| 8 + h.key.len() + h.value.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for header in headers {
        out.extend_from_slice(&(header.key.len() as u32).to_le_bytes());
        out.extend_from_slice(header.key.as_bytes());
        out.extend_from_slice(&(header.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&header.value);
    }
    out
}

/// Decodes what [`encode_headers`] wrote; `None` if the bytes are corrupt.
pub fn decode_headers(bytes: &[u8]) -> Option<Vec<Header>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Some(head)
    }
    fn take_u32(bytes: &mut &[u8]) -> Option<usize> {
        let raw = take(bytes, 4)?;
        Some(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize)
    }
    let mut rest = bytes;
    let count = take_u32(&mut rest)?;
    let mut headers = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let key_len = take_u32(&mut rest)?;
        let key = String::from_utf8(take(&mut rest, key_len)?.to_vec()).ok()?;
        let value_len = take_u32(&mut rest)?;
        let value = take(&mut rest, value_len)?.to_vec();
        headers.push(Header { key, value });
    }
    rest.is_empty().then_some(headers)
}

/// The state of one stored event, as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventStatus {
    /// The event's id.
    pub event_id: EventId,
    /// The producer that appended the event.
    pub producer: String,
    /// The transaction the event was appended under.
    pub transaction_id: String,
    /// The sequence of the append that stored the event.
    pub sequence: u64,
    /// The Kafka topic the event is published to.
    pub topic: String,
    /// Where the event is in its life.
    pub state: EventState,
    /// The Kafka partition it was published to; `None` until published.
    pub partition: Option<i32>,
    /// The Kafka offset it was published at; `None` until published.
    pub offset: Option<i64>,
    /// Delivery attempts charged so far.
    pub attempts: u32,
    /// Last error or dead-letter reason; empty when none.
    pub reason: String,
    /// When the state last changed.
    pub updated_at: DateTime<Utc>,
    /// Position of this change in the store's change feed; increases with
    /// every state change of any event.
    pub cursor: u64,
}

impl EventStatus {
    /// The status of an event of `batch` just stored in `state`.
    pub fn appended(
        batch: &AppendBatch,
        event: &NewEvent,
        event_id: EventId,
        state: EventState,
        cursor: u64,
        updated_at: DateTime<Utc>,
    ) -> Self {
        EventStatus {
            event_id,
            producer: batch.token.producer.clone(),
            transaction_id: batch.token.transaction_id.clone(),
            sequence: batch.sequence,
            topic: event.topic.clone(),
            state,
            partition: None,
            offset: None,
            attempts: 0,
            reason: String::new(),
            updated_at,
            cursor,
        }
    }
}

/// The outcome of one stored append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The ids of the append's events, in request order (the stored ones for a
    /// duplicate).
    pub event_ids: Vec<EventId>,
    /// Nothing new was stored: this append was already there, same content.
    pub duplicate: bool,
    /// The states of the new events (empty for a duplicate), for the status bus.
    pub statuses: Vec<EventStatus>,
    /// The shards the new events went to, so that their relays are woken.
    pub shards: Vec<u32>,
}

/// An event of the `orders` topic for unit tests: the `order` aggregate
/// `o-1`, type `created`, no headers, id or time of its own.
#[cfg(test)]
pub(crate) fn test_event(key: Option<&[u8]>, payload: &[u8]) -> NewEvent {
    NewEvent {
        event_id: None,
        topic: "orders".into(),
        key: key.map(<[u8]>::to_vec),
        payload: payload.to_vec(),
        headers: vec![],
        aggregate_type: "order".into(),
        aggregate_id: "o-1".into(),
        event_type: "created".into(),
        occurred_at: None,
    }
}

/// An append of `shop`'s transaction `transaction_id`, for unit tests.
#[cfg(test)]
pub(crate) fn test_append(
    transaction_id: &str,
    sequence: u64,
    mode: TokenMode,
    events: Vec<NewEvent>,
) -> AppendBatch {
    AppendBatch {
        token: TransactionToken {
            producer: "shop".into(),
            transaction_id: transaction_id.into(),
            mode,
        },
        sequence,
        events,
        trace: TraceContext::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: Option<&[u8]>, aggregate_id: &str) -> NewEvent {
        NewEvent {
            aggregate_id: aggregate_id.into(),
            ..test_event(key, b"{}")
        }
    }

    #[test]
    fn aggregate_id_is_the_ordering_key_when_no_key_is_given() {
        assert_eq!(event(None, "o-1").ordering_key(), Some(&b"o-1"[..]));
        assert_eq!(event(Some(b"k"), "o-1").ordering_key(), Some(&b"k"[..]));
        assert_eq!(event(Some(b""), "o-1").ordering_key(), Some(&b""[..]));
        assert_eq!(event(None, "").ordering_key(), None);
    }

    /// Shards are stored with each row: a change here strands events.
    #[test]
    fn shard_of_a_key_is_stable() {
        let id = EventId(Uuid::nil());
        let shards: Vec<u32> = ["21", "foobar", "abc", "order-42", ""]
            .iter()
            .map(|key| shard_of(Some(key.as_bytes()), id, 16))
            .collect();
        assert_eq!(shards, vec![12, 14, 11, 0, 9]);
    }

    #[test]
    fn headers_round_trip() {
        let headers = vec![
            Header {
                key: "a".into(),
                value: vec![0, 1, 2],
            },
            Header {
                key: "ü".into(),
                value: vec![],
            },
        ];
        assert_eq!(decode_headers(&encode_headers(&headers)), Some(headers));
        assert_eq!(decode_headers(&[1, 0, 0]), None);
    }

    #[test]
    fn content_hash_ignores_nothing_the_caller_sent() {
        let batch = AppendBatch {
            token: TransactionToken {
                producer: "p".into(),
                transaction_id: "t".into(),
                mode: TokenMode::Immediate,
            },
            sequence: 0,
            events: vec![event(Some(b"k"), "a")],
            trace: TraceContext::default(),
        };
        let mut changed = batch.clone();
        changed.events[0].payload = b"{ }".to_vec();
        assert_ne!(batch.content_hash(), changed.content_hash());
        let mut no_key = batch.clone();
        no_key.events[0].key = None;
        assert_ne!(batch.content_hash(), no_key.content_hash());
        let mut traced = batch.clone();
        traced.trace.traceparent = Some("00-x".into());
        assert_eq!(batch.content_hash(), traced.content_hash());
    }
}
