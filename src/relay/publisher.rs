//! The Kafka side of the relay: one idempotent rdkafka producer per gateway
//! instance, with the settings that keep per-key order.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};

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

/// Producer properties that per-key order depends on (DESIGN §7); fixed.
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

/// Publishes relay rows as Kafka records.
pub struct Publisher {
    producer: FutureProducer,
}

impl Publisher {
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        Ok(Publisher {
            producer: config.producer_config().create()?,
        })
    }

    /// Hands the record of `row` to the producer without waiting for Kafka.
    /// Fails at once when the local queue is full or the record is invalid.
    pub fn send(&self, row: &RelayRow) -> Result<DeliveryFuture, KafkaError> {
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
            ("traceparent", row.traceparent.as_deref()),
            ("tracestate", row.tracestate.as_deref()),
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
        self.producer
            .send_result(record)
            .map_err(|(error, _record)| error)
    }

    /// Waits up to `timeout` for queued records to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
