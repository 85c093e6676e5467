//! Request builders shared by the tests: tokens, events, appends, and the
//! store's own batches built from them.
//!
//! The builders start from sensible defaults and take chained setters; but
//! for `AppendBuilder::batch` they check nothing, so a test may build a
//! request the gateway must refuse.

use std::time::Duration;

use outboxd::domain::{AppendBatch, Limits, TraceContext};
use outboxd::proto;

/// An immediate-mode token.
pub fn immediate_token(producer: &str, transaction_id: &str) -> Option<proto::TransactionToken> {
    Some(token(producer, transaction_id))
}

/// A two_phase token: publishable on `Commit`, discarded on `Abort` or once
/// `timeout` has passed.
pub fn two_phase_token(
    producer: &str,
    transaction_id: &str,
    timeout: Duration,
) -> Option<proto::TransactionToken> {
    let mut token = token(producer, transaction_id);
    make_two_phase(&mut token, timeout);
    Some(token)
}

/// A postgres_xid token: publishable once the caller's transaction `xid`
/// of the cluster whose system identifier is `system_id` has committed.
pub fn postgres_xid_token(
    producer: &str,
    transaction_id: &str,
    xid: u64,
    system_id: u64,
) -> Option<proto::TransactionToken> {
    let mut token = token(producer, transaction_id);
    make_postgres_xid(&mut token, xid, system_id);
    Some(token)
}

/// The immediate-mode token that the other modes start from.
fn token(producer: &str, transaction_id: &str) -> proto::TransactionToken {
    proto::TransactionToken {
        producer: producer.into(),
        transaction_id: transaction_id.into(),
        mode: proto::TokenMode::Immediate as i32,
        ..Default::default()
    }
}

/// Turns `token` into a two_phase token that expires after `timeout`.
fn make_two_phase(token: &mut proto::TransactionToken, timeout: Duration) {
    token.mode = proto::TokenMode::TwoPhase as i32;
    token.timeout = Some(prost_types::Duration {
        seconds: timeout.as_secs() as i64,
        nanos: timeout.subsec_nanos() as i32,
    });
}

/// Turns `token` into a postgres_xid token of transaction `xid` of the
/// cluster `system_id`.
fn make_postgres_xid(token: &mut proto::TransactionToken, xid: u64, system_id: u64) {
    token.mode = proto::TokenMode::PostgresXid as i32;
    token.postgres_xid = xid;
    token.postgres_system_id = system_id;
}

/// A plain event of `topic` with Kafka key `key`: `EventBuilder::keyed`
/// with `payload`.
pub fn keyed_event(topic: &str, key: &str, payload: impl AsRef<[u8]>) -> proto::Event {
    EventBuilder::keyed(topic, key)
        .payload(payload.as_ref())
        .build()
}

/// A first append (sequence 0) of `events` under `token`.
pub fn append_request(
    token: Option<proto::TransactionToken>,
    events: Vec<proto::Event>,
) -> proto::AppendRequest {
    AppendBuilder::with_token(token).events(events).build()
}

/// A `proto::Event` under construction: start with `new` or `keyed`, chain
/// setters, end with `build` (or pass the builder where an event goes).
#[derive(Debug, Clone)]
#[must_use]
pub struct EventBuilder(proto::Event);

impl EventBuilder {
    /// An event of `topic` and nothing else: no key, an empty payload, no
    /// headers, aggregate, type, id or time.
    pub fn new(topic: impl Into<String>) -> Self {
        EventBuilder(proto::Event {
            topic: topic.into(),
            ..Default::default()
        })
    }

    /// An event of `topic` with Kafka key `key`, about the `order`
    /// aggregate `key`, of type `created`, with an empty payload.
    pub fn keyed(topic: impl Into<String>, key: &str) -> Self {
        Self::new(topic)
            .key(key)
            .aggregate("order", key)
            .event_type("created")
    }

    /// Sets the Kafka key.
    pub fn key(self, key: impl AsRef<[u8]>) -> Self {
        self.maybe_key(Some(key))
    }

    /// Sets the Kafka key, or removes it with `None`.
    pub fn maybe_key(mut self, key: Option<impl AsRef<[u8]>>) -> Self {
        self.0.key = key.map(|k| k.as_ref().to_vec().into());
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.0.payload = payload.into().into();
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.0.headers.push(proto::Header {
            key: key.into(),
            value: value.into().into(),
        });
        self
    }

    /// Replaces the headers.
    pub fn headers(mut self, headers: Vec<proto::Header>) -> Self {
        self.0.headers = headers;
        self
    }

    /// Sets the aggregate type and id.
    pub fn aggregate(
        mut self,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
    ) -> Self {
        self.0.aggregate_type = aggregate_type.into();
        self.0.aggregate_id = aggregate_id.into();
        self
    }

    /// Sets the event type.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.0.event_type = event_type.into();
        self
    }

    /// Sets the caller-chosen event id, as text: an `EventId`, or anything
    /// else a caller might send.
    pub fn id(mut self, id: impl ToString) -> Self {
        self.0.event_id = id.to_string();
        self
    }

    /// Sets (or, with `None`, clears) when the event occurred.
    pub fn occurred_at(mut self, occurred_at: Option<prost_types::Timestamp>) -> Self {
        self.0.occurred_at = occurred_at;
        self
    }

    /// The event.
    pub fn build(self) -> proto::Event {
        self.0
    }
}

impl From<EventBuilder> for proto::Event {
    fn from(builder: EventBuilder) -> Self {
        builder.build()
    }
}

/// A `proto::AppendRequest` under construction: start with `new` or
/// `with_token`, chain setters, end with `build` (or `batch`, for a store).
#[derive(Debug, Clone)]
#[must_use]
pub struct AppendBuilder(proto::AppendRequest);

impl AppendBuilder {
    /// The first append (sequence 0, correlation 0, no events yet) of
    /// `producer`'s immediate-mode transaction `transaction_id`.
    pub fn new(producer: &str, transaction_id: &str) -> Self {
        Self::with_token(immediate_token(producer, transaction_id))
    }

    /// The first append (sequence 0, correlation 0, no events yet) under
    /// `token` as given: a caller's token, or none at all.
    pub fn with_token(token: Option<proto::TransactionToken>) -> Self {
        AppendBuilder(proto::AppendRequest {
            token,
            sequence: 0,
            events: Vec::new(),
            correlation: 0,
        })
    }

    /// Makes the transaction two_phase: publishable on `Commit`, discarded on
    /// `Abort` or once `timeout` has passed.
    pub fn two_phase(mut self, timeout: Duration) -> Self {
        make_two_phase(self.token_mut(), timeout);
        self
    }

    /// Makes the transaction postgres_xid: publishable once the caller's
    /// transaction `xid` of the cluster `system_id` has committed.
    pub fn postgres_xid(mut self, xid: u64, system_id: u64) -> Self {
        make_postgres_xid(self.token_mut(), xid, system_id);
        self
    }

    /// The request's token, an empty one put in first if it has none.
    fn token_mut(&mut self) -> &mut proto::TransactionToken {
        self.0.token.get_or_insert_with(Default::default)
    }

    /// Sets the number of this append within its transaction.
    pub fn sequence(mut self, sequence: u64) -> Self {
        self.0.sequence = sequence;
        self
    }

    /// Sets the number that pairs a stream's response with this request.
    pub fn correlation(mut self, correlation: u64) -> Self {
        self.0.correlation = correlation;
        self
    }

    /// Adds an event.
    pub fn event(mut self, event: impl Into<proto::Event>) -> Self {
        self.0.events.push(event.into());
        self
    }

    /// Adds events, in order.
    pub fn events<E: Into<proto::Event>>(mut self, events: impl IntoIterator<Item = E>) -> Self {
        self.0.events.extend(events.into_iter().map(Into::into));
        self
    }

    /// The request.
    pub fn build(self) -> proto::AppendRequest {
        self.0
    }

    /// The append as the gateway hands it to the store (converted and
    /// validated as the API does, with default limits and no trace
    /// context), for tests that append through a `Store` directly. Panics
    /// on a request the API would refuse.
    pub fn batch(self) -> AppendBatch {
        outboxd::api::convert::append_batch(self.0, TraceContext::default(), &Limits::default())
            .expect("a valid append")
    }
}

impl From<AppendBuilder> for proto::AppendRequest {
    fn from(builder: AppendBuilder) -> Self {
        builder.build()
    }
}

/// A steady load of appends by one producer, as the fault and shutdown
/// tests drive it: each append holds `events` events of `topic` whose keys
/// `{key_prefix}{n}` rotate over `keys` keys, so that every key is written
/// by many transactions.
#[derive(Debug, Clone, Copy)]
pub struct Load<'a> {
    /// Who appends.
    pub producer: &'a str,
    /// Where every event goes.
    pub topic: &'a str,
    /// Events in one append.
    pub events: usize,
    /// What every key starts with.
    pub key_prefix: &'a str,
    /// How many keys the events rotate over.
    pub keys: usize,
}

impl Load<'_> {
    /// Append number `transaction` of the load (transaction
    /// `tx-{transaction}`, immediate mode), with the keys of its events in
    /// order; its payloads name the transaction and the event.
    pub fn append(&self, transaction: usize) -> (AppendBuilder, Vec<String>) {
        let keys: Vec<String> = (0..self.events)
            .map(|i| format!("{}{}", self.key_prefix, (transaction + i) % self.keys))
            .collect();
        let request = AppendBuilder::new(self.producer, &format!("tx-{transaction}")).events(
            keys.iter().enumerate().map(|(i, key)| {
                EventBuilder::keyed(self.topic, key).payload(format!("{transaction}-{i}"))
            }),
        );
        (request, keys)
    }
}
