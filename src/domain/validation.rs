//! Checks every append before anything is stored, naming the field at fault.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{AppendBatch, TokenMode};

/// A field of the request and what is wrong with it, e.g.
/// `events[3].topic`: "must be at most 249 characters".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field's path in the request, e.g. `events[3].topic`.
    pub field: String,
    /// What is wrong with it, for the caller to read.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`, described by `description`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Size limits of one append; configurable (`[limits]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Events in one `Append`.
    pub max_batch_events: usize,
    /// Bytes of one event's payload.
    pub max_payload_bytes: usize,
    /// Bytes of one event's key.
    pub max_key_bytes: usize,
    /// Bytes of one event's header keys and values together.
    pub max_headers_bytes: usize,
    /// Bytes of one encoded request (also the gRPC decoding limit).
    pub max_request_bytes: usize,
    /// Longest two_phase timeout a caller may ask for, in seconds.
    pub max_two_phase_timeout_secs: u64,
    /// Requests being served at once, all connections together (a stream
    /// counts only until its response starts); one more is refused at once
    /// with RESOURCE_EXHAUSTED. Bounds the memory of requests being read.
    pub max_concurrent_requests: usize,
    /// Open AppendStream and WatchStatus streams of one identity (with
    /// `[auth]` identities configured).
    pub max_streams_per_identity: usize,
    /// Requests a second of one identity, with bursts up to one second's
    /// worth; 0: no limit.
    pub requests_per_second_per_identity: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_events: 1_000,
            max_payload_bytes: 1024 * 1024,
            max_key_bytes: 16 * 1024,
            max_headers_bytes: 64 * 1024,
            max_request_bytes: 8 * 1024 * 1024,
            max_two_phase_timeout_secs: 24 * 3600,
            max_concurrent_requests: 256,
            max_streams_per_identity: 1_000,
            requests_per_second_per_identity: 0,
        }
    }
}

/// Longest producer name and transaction id.
const MAX_NAME_CHARS: usize = 255;
/// Kafka's limit on topic names.
const MAX_TOPIC_CHARS: usize = 249;
/// Header keys outboxd writes itself; a caller may not forge them.
pub const RESERVED_HEADER_PREFIX: &str = "outbox-";

/// Why `topic` is not a legal Kafka topic name, if it is not.
pub fn validate_topic(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("must not be empty")
    } else if topic.len() > MAX_TOPIC_CHARS {
        Some("must be at most 249 characters")
    } else if topic == "." || topic == ".." {
        Some("must not be \".\" or \"..\"")
    } else if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("may contain only ASCII letters, digits, '.', '_' and '-'")
    } else {
        None
    }
}

fn validate_name(field: &str, value: &str, violations: &mut Vec<FieldViolation>) {
    if value.is_empty() {
        violations.push(FieldViolation::new(field, "must not be empty"));
    } else if value.chars().count() > MAX_NAME_CHARS {
        violations.push(FieldViolation::new(
            field,
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    } else if value.chars().any(char::is_control) {
        violations.push(FieldViolation::new(
            field,
            "must not contain control characters",
        ));
    }
}

/// Every reason `batch` may not be stored; empty when it may.
pub fn validate_batch(batch: &AppendBatch, limits: &Limits) -> Vec<FieldViolation> {
    let mut violations = Vec::new();
    validate_name("token.producer", &batch.token.producer, &mut violations);
    validate_name(
        "token.transaction_id",
        &batch.token.transaction_id,
        &mut violations,
    );
    if let TokenMode::TwoPhase { timeout } = batch.token.mode {
        if timeout.is_zero() {
            violations.push(FieldViolation::new(
                "token.timeout",
                "two_phase tokens need a timeout above zero",
            ));
        } else if timeout.as_secs() > limits.max_two_phase_timeout_secs {
            violations.push(FieldViolation::new(
                "token.timeout",
                format!(
                    "must be at most {} seconds",
                    limits.max_two_phase_timeout_secs
                ),
            ));
        }
    }
    if batch.events.is_empty() {
        violations.push(FieldViolation::new(
            "events",
            "must hold at least one event",
        ));
    } else if batch.events.len() > limits.max_batch_events {
        violations.push(FieldViolation::new(
            "events",
            format!(
                "holds {} events; the limit is {}",
                batch.events.len(),
                limits.max_batch_events
            ),
        ));
    }
    let mut seen_ids = HashSet::new();
    for (index, event) in batch.events.iter().enumerate() {
        let field = |name: &str| format!("events[{index}].{name}");
        if let Some(reason) = validate_topic(&event.topic) {
            violations.push(FieldViolation::new(field("topic"), reason));
        }
        if event.payload.len() > limits.max_payload_bytes {
            violations.push(FieldViolation::new(
                field("payload"),
                format!(
                    "is {} bytes; the limit is {}",
                    event.payload.len(),
                    limits.max_payload_bytes
                ),
            ));
        }
        if let Some(key) = &event.key
            && key.len() > limits.max_key_bytes
        {
            violations.push(FieldViolation::new(
                field("key"),
                format!(
                    "is {} bytes; the limit is {}",
                    key.len(),
                    limits.max_key_bytes
                ),
            ));
        }
        let header_bytes: usize = event
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.len())
            .sum();
        if header_bytes > limits.max_headers_bytes {
            violations.push(FieldViolation::new(
                field("headers"),
                format!(
                    "are {header_bytes} bytes; the limit is {}",
                    limits.max_headers_bytes
                ),
            ));
        }
        for (header_index, header) in event.headers.iter().enumerate() {
            if header.key.is_empty() {
                violations.push(FieldViolation::new(
                    format!("events[{index}].headers[{header_index}].key"),
                    "must not be empty",
                ));
            } else if header.key.starts_with(RESERVED_HEADER_PREFIX) {
                violations.push(FieldViolation::new(
                    format!("events[{index}].headers[{header_index}].key"),
                    format!("the prefix {RESERVED_HEADER_PREFIX:?} is reserved for outboxd"),
                ));
            }
        }
        for (name, value) in [
            ("aggregate_type", &event.aggregate_type),
            ("aggregate_id", &event.aggregate_id),
            ("event_type", &event.event_type),
        ] {
            if value.len() > MAX_NAME_CHARS {
                violations.push(FieldViolation::new(
                    field(name),
                    format!("must be at most {MAX_NAME_CHARS} bytes"),
                ));
            } else if value.contains('\0') {
                // PostgreSQL's text cannot hold it: refused here, it would
                // fail the whole coalesced store transaction.
                violations.push(FieldViolation::new(
                    field(name),
                    "must not contain NUL characters",
                ));
            }
        }
        if let Some(id) = event.event_id
            && !seen_ids.insert(id)
        {
            violations.push(FieldViolation::new(
                field("event_id"),
                "appears twice in this request",
            ));
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventId, Header, NewEvent, TraceContext, TransactionToken};

    fn batch(events: Vec<NewEvent>) -> AppendBatch {
        AppendBatch {
            token: TransactionToken {
                producer: "billing".into(),
                transaction_id: "tx-1".into(),
                mode: TokenMode::Immediate,
            },
            sequence: 0,
            events,
            trace: TraceContext::default(),
        }
    }

    fn event() -> NewEvent {
        NewEvent {
            event_id: None,
            topic: "orders".into(),
            key: Some(b"k".to_vec()),
            payload: vec![1, 2, 3],
            headers: vec![],
            aggregate_type: String::new(),
            aggregate_id: String::new(),
            event_type: String::new(),
            occurred_at: None,
        }
    }

    fn fields(violations: Vec<FieldViolation>) -> Vec<String> {
        violations.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn accepts_a_plain_batch() {
        assert!(validate_batch(&batch(vec![event()]), &Limits::default()).is_empty());
    }

    #[test]
    fn names_each_bad_field() {
        let limits = Limits {
            max_payload_bytes: 2,
            max_headers_bytes: 4,
            ..Limits::default()
        };
        let mut bad_topic = event();
        bad_topic.topic = "orders/eu".into();
        let mut long_topic = event();
        long_topic.topic = "t".repeat(250);
        let mut big_headers = event();
        big_headers.headers = vec![Header {
            key: "trace".into(),
            value: vec![0; 8],
        }];
        let mut forged = event();
        forged.headers = vec![Header {
            key: "outbox-event-id".into(),
            value: vec![],
        }];
        forged.payload.clear();
        let mut good = event();
        good.payload.clear();
        let mut with_batch = batch(vec![bad_topic, long_topic, big_headers, forged, good]);
        with_batch.token.producer.clear();
        assert_eq!(
            fields(validate_batch(&with_batch, &limits)),
            vec![
                "token.producer",
                "events[0].topic",
                "events[0].payload",
                "events[1].topic",
                "events[1].payload",
                "events[2].payload",
                "events[2].headers",
                "events[3].headers",
                "events[3].headers[0].key",
            ]
        );
    }

    #[test]
    fn rejects_nul_characters_in_text_fields() {
        let mut with_nul = event();
        with_nul.aggregate_id = "a\0b".into();
        with_nul.event_type = "\0".into();
        assert_eq!(
            fields(validate_batch(
                &batch(vec![event(), with_nul]),
                &Limits::default()
            )),
            vec!["events[1].aggregate_id", "events[1].event_type"]
        );
    }

    #[test]
    fn rejects_empty_and_oversize_batches() {
        assert_eq!(
            fields(validate_batch(&batch(vec![]), &Limits::default())),
            vec!["events"]
        );
        let limits = Limits {
            max_batch_events: 2,
            ..Limits::default()
        };
        assert_eq!(
            fields(validate_batch(&batch(vec![event(); 3]), &limits)),
            vec!["events"]
        );
    }

    #[test]
    fn rejects_a_repeated_event_id() {
        let mut first = event();
        first.event_id = Some(EventId::generate());
        let second = first.clone();
        assert_eq!(
            fields(validate_batch(
                &batch(vec![first, second]),
                &Limits::default()
            )),
            vec!["events[1].event_id"]
        );
    }

    #[test]
    fn topic_rules_follow_kafka() {
        assert_eq!(validate_topic("a.b_c-D9"), None);
        assert!(validate_topic("").is_some());
        assert!(validate_topic("..").is_some());
        assert!(validate_topic("ü").is_some());
        assert_eq!(validate_topic(&"x".repeat(249)), None);
    }
}
