//! The Kafka side of the relay: one idempotent rdkafka producer per gateway
//! instance, with the settings that keep per-key order.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, ClientContext, Message};
use serde::{Deserialize, Serialize};

use super::breaker::SharedBreaker;
pub use super::publish::FailureKind;
use super::publish::{Delivery, Placement, Publish, PublishFailure, SendRefused};
use crate::domain::TraceContext;
use crate::store::RelayRow;

/// Kafka settings (`[kafka]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Extra librdkafka producer properties (e.g. `linger.ms`,
    /// `security.protocol`). The order-keeping ones cannot be overridden.
    pub producer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            producer: BTreeMap::new(),
        }
    }
}

/// Producer properties that per-key order depends on (docs/architecture.md,
/// "Per-key order"); fixed.
pub const ORDER_KEEPING_PROPERTIES: [(&str, &str); 5] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("partitioner", "murmur2_random"),
    // Never time a message out: with idempotence a timed-out message leaves a
    // gap that later messages skip, a reorder once it is retried.
    ("message.timeout.ms", "0"),
    ("max.in.flight.requests.per.connection", "5"),
];

impl KafkaConfig {
    /// Why this configuration may not be used, if it may not.
    pub fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("kafka.brokers must not be empty".into());
        }
        for (name, _) in ORDER_KEEPING_PROPERTIES {
            if self.producer.contains_key(name) {
                return Err(format!(
                    "kafka.producer.{name} is fixed by outboxd to keep per-key order"
                ));
            }
        }
        Ok(())
    }

    /// The full producer configuration.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("batch.num.messages", "10000")
            .set("client.id", "outboxd");
        for (name, value) in &self.producer {
            config.set(name, value);
        }
        for (name, value) in ORDER_KEEPING_PROPERTIES {
            config.set(name, value);
        }
        config
    }
}

/// Sorts a produce error into a [`FailureKind`].
pub fn classify(error: &KafkaError) -> FailureKind {
    use RDKafkaErrorCode as Code;
    let Some(code) = error.rdkafka_error_code() else {
        return FailureKind::Retriable;
    };
    match code {
        Code::AllBrokersDown
        | Code::BrokerTransportFailure
        | Code::MessageTimedOut
        | Code::RequestTimedOut
        | Code::NetworkException
        | Code::OperationTimedOut
        | Code::Resolve => FailureKind::BrokerLevel,
        Code::MessageSizeTooLarge
        | Code::MessageBatchTooLarge
        | Code::InvalidMessageSize
        | Code::InvalidMessage
        | Code::InvalidRecord
        | Code::InvalidTopic
        | Code::UnknownTopic
        | Code::UnknownTopicOrPartition
        | Code::TopicAuthorizationFailed
        | Code::ClusterAuthorizationFailed
        | Code::UnsupportedForMessageFormat => FailureKind::Permanent,
        // Purged, or the producer was lost to a fatal error and is being
        // replaced: either way not the record's fault.
        Code::PurgeQueue | Code::PurgeInflight | Code::Fatal => FailureKind::Purged,
        _ => FailureKind::Retriable,
    }
}

/// Sees librdkafka's client-level errors: "all brokers down" opens the
/// breaker; every error has the relay check whether the producer is lost to
/// a fatal error (the callback reports the underlying code, not "fatal").
pub struct RelayContext {
    breaker: Arc<SharedBreaker>,
    error_seen: Arc<Notify>,
}

impl ClientContext for RelayContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if classify(&error) == FailureKind::BrokerLevel {
            self.breaker.trip();
        }
        tracing::warn!(%error, reason, "kafka client error");
        self.error_seen.notify_one();
    }
}

type RelayProducer = FutureProducer<RelayContext>;

/// The current producer and its generation. A fatal error (the idempotent
/// producer can no longer vouch for order or once-ness) makes every later
/// produce fail; the producer is then replaced by a new one, with a new
/// producer id, in the next generation.
struct ProducerSlot(RwLock<(u64, Arc<RelayProducer>)>);

impl ProducerSlot {
    fn current(&self) -> (u64, Arc<RelayProducer>) {
        self.0.read().expect("producer lock").clone()
    }

    /// Whether the producer of `generation` was lost to a fatal error.
    fn lost_to_fatal_error(&self, generation: u64) -> bool {
        let (current, producer) = self.current();
        generation != current || producer.client().fatal_error().is_some()
    }
}

/// Publishes relay rows as Kafka records.
pub struct Publisher {
    /// The current producer, shared with the deliveries it has pending.
    producer: Arc<ProducerSlot>,
    config: ClientConfig,
    breaker: Arc<SharedBreaker>,
    /// Raised by the producer's error callback.
    error_seen: Arc<Notify>,
    /// Where dead letters are also copied, when configured.
    dead_letter_topic: Option<String>,
}

impl Publisher {
    /// A publisher with a producer made from `config`. Broker-level client
    /// errors trip `breaker`; dead letters are also copied to
    /// `dead_letter_topic` when it is set.
    pub fn new(
        config: &KafkaConfig,
        breaker: Arc<SharedBreaker>,
        dead_letter_topic: Option<String>,
    ) -> Result<Self, KafkaError> {
        let config = config.producer_config();
        let error_seen = Arc::new(Notify::new());
        let producer = Self::create(&config, &breaker, &error_seen)?;
        Ok(Publisher {
            producer: Arc::new(ProducerSlot(RwLock::new((0, Arc::new(producer))))),
            config,
            breaker,
            error_seen,
            dead_letter_topic,
        })
    }

    fn create(
        config: &ClientConfig,
        breaker: &Arc<SharedBreaker>,
        error_seen: &Arc<Notify>,
    ) -> Result<RelayProducer, KafkaError> {
        config.create_with_context(RelayContext {
            breaker: breaker.clone(),
            error_seen: error_seen.clone(),
        })
    }

    fn current(&self) -> (u64, Arc<RelayProducer>) {
        self.producer.current()
    }

    fn producer(&self) -> Arc<RelayProducer> {
        self.current().1
    }

    /// Resolves when the producer reported an error: time to check
    /// [`Publisher::replace_if_fatal`].
    pub async fn error_seen(&self) {
        self.error_seen.notified().await
    }

    /// Has the relay check the producer again.
    pub fn raise_error_seen(&self) {
        self.error_seen.notify_one();
    }

    /// Replaces the producer with a new one if it hit a fatal error. The old
    /// one is returned, for the caller to drop off the runtime: dropping
    /// purges what it still holds (those records fail as purged, cost their
    /// events nothing, and their shards send them again in order) and
    /// blocks while it flushes.
    pub fn replace_if_fatal(&self) -> Result<Option<Arc<RelayProducer>>, KafkaError> {
        let (generation, producer) = self.current();
        let Some((code, reason)) = producer.client().fatal_error() else {
            return Ok(None);
        };
        tracing::error!(
            ?code,
            reason,
            "fatal kafka producer error; replacing the producer"
        );
        let fresh = Arc::new(Self::create(&self.config, &self.breaker, &self.error_seen)?);
        let (_, old) = std::mem::replace(
            &mut *self.producer.0.write().expect("producer lock"),
            (generation + 1, fresh),
        );
        metrics::counter!(crate::telemetry::names::PRODUCER_REPLACED).increment(1);
        Ok(Some(old))
    }

    /// Whether the cluster answers a metadata request (blocking).
    pub fn probe(&self, timeout: Duration) -> bool {
        self.producer()
            .client()
            .fetch_metadata(None, timeout)
            .is_ok()
    }

    /// Waits up to `timeout` for queued records to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer().flush(timeout)
    }
}

impl Publish for Publisher {
    type Record = Box<OwnedMessage>;
    type Pending = KafkaDelivery;

    /// Copies a dead-lettered record to the dead-letter topic, with the
    /// reason in `outbox-dead-letter-reason`. Best effort: a copy that fails
    /// is logged; the event is dead-lettered in the store either way.
    fn copy_to_dead_letter_topic(&self, message: &Self::Record, reason: &str) {
        let Some(topic) = &self.dead_letter_topic else {
            return;
        };
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(KafkaHeader {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        headers = headers
            .insert(KafkaHeader {
                key: "outbox-dead-letter-reason",
                value: Some(reason),
            })
            .insert(KafkaHeader {
                key: "outbox-original-topic",
                value: Some(message.topic()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .payload(message.payload().unwrap_or_default())
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Err((error, _)) = self.producer().send_result(record) {
            tracing::warn!(%error, %topic, "could not copy a dead letter to the dead-letter topic");
        }
    }

    /// Hands the record of `row` to the producer without waiting for Kafka.
    /// Fails at once when the local queue is full or the record is invalid
    /// (then with the record, for the dead-letter topic). The record's
    /// `traceparent` and `tracestate` are `trace` (the publish span's, with
    /// tracing on) or else the ones stored with the event.
    fn send(
        &self,
        row: &RelayRow,
        trace: Option<&TraceContext>,
    ) -> Result<KafkaDelivery, SendRefused<Box<OwnedMessage>>> {
        let (generation, producer) = self.current();
        let event_id = row.event_id.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(row.headers.len() + 8);
        for header in &row.headers {
            headers = headers.insert(KafkaHeader {
                key: &header.key,
                value: Some(&header.value),
            });
        }
        let outbox_headers: [(&str, Option<&str>); 8] = [
            ("outbox-event-id", Some(&event_id)),
            ("outbox-event-type", Some(&row.event_type)),
            ("outbox-aggregate-type", Some(&row.aggregate_type)),
            ("outbox-aggregate-id", Some(&row.aggregate_id)),
            ("outbox-producer", Some(&row.producer)),
            ("outbox-transaction-id", Some(&row.transaction_id)),
            (
                "traceparent",
                trace.map_or(row.traceparent.as_deref(), |t| t.traceparent.as_deref()),
            ),
            (
                "tracestate",
                trace.map_or(row.tracestate.as_deref(), |t| t.tracestate.as_deref()),
            ),
        ];
        for (key, value) in outbox_headers {
            if let Some(value) = value {
                headers = headers.insert(KafkaHeader {
                    key,
                    value: Some(value),
                });
            }
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&row.topic)
            .payload(&row.payload[..])
            .headers(headers)
            .timestamp(row.occurred_at.timestamp_millis());
        if let Some(key) = &row.kafka_key {
            record = record.key(&key[..]);
        }
        match producer.send_result(record) {
            Ok(delivery) => Ok(KafkaDelivery {
                delivery,
                generation,
                producer: self.producer.clone(),
            }),
            Err((error @ KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendRefused::QueueFull {
                    error_type: kafka_error_type(&error),
                })
            }
            Err((error, record)) => {
                let message = Box::new(OwnedMessage::new(
                    Some(record.payload.map(<[u8]>::to_vec).unwrap_or_default()),
                    record.key.map(<[u8]>::to_vec),
                    record.topic.to_owned(),
                    rdkafka::Timestamp::NotAvailable,
                    -1,
                    -1,
                    record.headers,
                ));
                Err(SendRefused::Failed(failure(&error, Some(message))))
            }
        }
    }
}

/// A record handed to the producer, until Kafka acknowledges or refuses it.
pub struct KafkaDelivery {
    delivery: DeliveryFuture,
    /// The producer generation that sent it.
    generation: u64,
    producer: Arc<ProducerSlot>,
}

impl Future for KafkaDelivery {
    type Output = Delivery<Box<OwnedMessage>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (error, message) = match Pin::new(&mut self.delivery).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(Ok(delivery))) => {
                return Poll::Ready(Ok(Placement {
                    partition: delivery.partition,
                    offset: delivery.offset,
                }));
            }
            Poll::Ready(Ok(Err((error, message)))) => (error, Some(Box::new(message))),
            // The producer went away with the record: as if purged.
            Poll::Ready(Err(_canceled)) => (
                KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue),
                None,
            ),
        };
        // Whatever a producer lost to a fatal error reports, the record is
        // not at fault: it goes again on the new producer.
        let error = if self.producer.lost_to_fatal_error(self.generation) {
            KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)
        } else {
            error
        };
        Poll::Ready(Err(failure(&error, message)))
    }
}

/// A produce error, classified, with the record it failed.
fn failure(
    error: &KafkaError,
    record: Option<Box<OwnedMessage>>,
) -> PublishFailure<Box<OwnedMessage>> {
    PublishFailure {
        kind: classify(error),
        error_type: kafka_error_type(error),
        error: error.to_string(),
        record,
    }
}

/// OpenTelemetry's `error.type` of a failed delivery: librdkafka's error
/// code, in its own spelling.
fn kafka_error_type(error: &KafkaError) -> String {
    match error.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => "kafka".to_owned(),
    }
}
