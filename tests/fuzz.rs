//! Fuzzing the request path, at scale.
//!
//! 1. Inputs (random bytes, near-valid requests with a few fields broken,
//!    and those encoded and then mutated byte by byte) are decoded as every
//!    request type of `proto/` and put through the conversions and checks
//!    the handlers run. Nothing may panic; an append is accepted exactly when
//!    an independent model of the rules says so, refused with
//!    INVALID_ARGUMENT naming exactly the fields the model names, and an
//!    accepted one converts to a domain batch that holds what was sent.
//! 2. Requests through a real gateway (gRPC, concurrent callers, unary
//!    appends, AppendStream with bad messages among good ones, raw bytes,
//!    retries, taken event ids, commits and aborts, status and admin reads)
//!    against SQLite and PostgreSQL: after each call every event of the
//!    request is stored if and only if the call succeeded, and at the end
//!    the store holds exactly the transactions, appends and events that were
//!    acknowledged, nothing more.
//!
//! Counts come from the environment: `OUTBOXD_FUZZ_CASES` (inputs of part
//! 1), `OUTBOXD_FUZZ_STORE_CASES` (requests of part 2 on SQLite; a tenth of
//! it, at least 50, on PostgreSQL), `OUTBOXD_FUZZ_CONCURRENCY` (concurrent
//! callers of part 2) and `OUTBOXD_FUZZ_SEED` (part 2's seed; printed).

mod support;

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use uuid::Uuid;

use outboxd::api::{ApiError, convert};
use outboxd::domain::{AppendBatch, Limits, TokenMode, TraceContext};
use outboxd::proto;
use outboxd::proto::outbox_admin_client::OutboxAdminClient;
use outboxd::proto::outbox_client::OutboxClient;
use support::{AppendBuilder, EventBuilder, Gateway, MockKafka};

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------
// The model: which fields of an append are at fault, written from the
// rules as the API documents them (proto comments, README), independently of
// `domain::validate_batch`.

const RESERVED_PREFIX: &str = "outbox-";

fn topic_ok(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn name_ok(name: &str) -> bool {
    !name.is_empty() && name.chars().count() <= 255 && !name.chars().any(char::is_control)
}

/// A name a lookup (Commit, Abort, status by transaction) may carry: not
/// empty, and no NUL (which no stored name can hold).
fn name_looked_up(name: &str) -> bool {
    !name.is_empty() && !name.contains('\0')
}

fn timestamp_ok(timestamp: &prost_types::Timestamp) -> bool {
    timestamp.nanos >= 0
        && chrono::DateTime::from_timestamp(timestamp.seconds, timestamp.nanos as u32).is_some()
}

/// The two_phase timeout the caller asked for (absent or negative: none).
fn requested_timeout(token: &proto::TransactionToken) -> Duration {
    match &token.timeout {
        Some(d) if d.seconds >= 0 && d.nanos >= 0 => {
            Duration::new(d.seconds as u64, d.nanos as u32)
        }
        _ => Duration::ZERO,
    }
}

/// Every field the append breaks, sorted (a field may appear more than once
/// only if the request breaks it more than once).
fn model_violations(request: &proto::AppendRequest, limits: &Limits) -> Vec<String> {
    let mut fields = Vec::new();
    let token = request.token.clone().unwrap_or_default();
    match token.mode {
        0 | 1 => {}
        2 => {
            let timeout = requested_timeout(&token);
            if timeout.is_zero() || timeout.as_secs() > limits.max_two_phase_timeout_secs {
                fields.push("token.timeout".to_owned());
            }
        }
        3 => {
            if token.postgres_xid == 0 {
                fields.push("token.postgres_xid".to_owned());
            }
            if token.postgres_system_id == 0 {
                fields.push("token.postgres_system_id".to_owned());
            }
        }
        _ => fields.push("token.mode".to_owned()),
    }
    if !name_ok(&token.producer) {
        fields.push("token.producer".to_owned());
    }
    if !name_ok(&token.transaction_id) {
        fields.push("token.transaction_id".to_owned());
    }
    if request.events.is_empty() || request.events.len() > limits.max_batch_events {
        fields.push("events".to_owned());
    }
    let mut ids = HashSet::new();
    for (i, event) in request.events.iter().enumerate() {
        let field = |name: &str| format!("events[{i}].{name}");
        if !topic_ok(&event.topic) {
            fields.push(field("topic"));
        }
        if event.payload.len() > limits.max_payload_bytes {
            fields.push(field("payload"));
        }
        if event
            .key
            .as_ref()
            .is_some_and(|k| k.len() > limits.max_key_bytes)
        {
            fields.push(field("key"));
        }
        let header_bytes: usize = event
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.len())
            .sum();
        if header_bytes > limits.max_headers_bytes {
            fields.push(field("headers"));
        }
        for (j, header) in event.headers.iter().enumerate() {
            if header.key.is_empty() || header.key.starts_with(RESERVED_PREFIX) {
                fields.push(format!("events[{i}].headers[{j}].key"));
            }
        }
        for (name, value) in [
            ("aggregate_type", &event.aggregate_type),
            ("aggregate_id", &event.aggregate_id),
            ("event_type", &event.event_type),
        ] {
            if value.len() > 255 || value.contains('\0') {
                fields.push(field(name));
            }
        }
        if !event.event_id.is_empty() {
            match Uuid::try_parse(&event.event_id) {
                Err(_) => fields.push(field("event_id")),
                Ok(id) => {
                    if !ids.insert(id) {
                        fields.push(field("event_id"));
                    }
                }
            }
        }
        if event.occurred_at.as_ref().is_some_and(|t| !timestamp_ok(t)) {
            fields.push(field("occurred_at"));
        }
    }
    fields.sort();
    fields
}

/// An accepted append's batch holds exactly what was sent.
fn assert_converted(request: &proto::AppendRequest, batch: &AppendBatch, trace: &TraceContext) {
    let token = request.token.clone().unwrap_or_default();
    assert_eq!(batch.token.producer, token.producer);
    assert_eq!(batch.token.transaction_id, token.transaction_id);
    match (token.mode, &batch.token.mode) {
        (0 | 1, TokenMode::Immediate) => {}
        (2, TokenMode::TwoPhase { timeout }) => {
            assert_eq!(*timeout, requested_timeout(&token));
        }
        (
            3,
            TokenMode::PostgresXid {
                caller_xid,
                system_id,
            },
        ) => {
            assert_eq!(*caller_xid, token.postgres_xid);
            assert_eq!(*system_id, token.postgres_system_id);
        }
        (mode, converted) => panic!("token mode {mode} became {converted:?}"),
    }
    assert_eq!(batch.sequence, request.sequence);
    assert_eq!(&batch.trace, trace);
    assert_eq!(batch.events.len(), request.events.len());
    for (sent, event) in request.events.iter().zip(&batch.events) {
        assert_eq!(event.topic, sent.topic);
        assert_eq!(event.key.as_deref(), sent.key.as_deref());
        assert_eq!(event.payload, sent.payload.as_ref());
        assert_eq!(event.headers.len(), sent.headers.len());
        for (h, s) in event.headers.iter().zip(&sent.headers) {
            assert_eq!(
                (h.key.as_str(), h.value.as_slice()),
                (s.key.as_str(), s.value.as_ref())
            );
        }
        assert_eq!(event.aggregate_type, sent.aggregate_type);
        assert_eq!(event.aggregate_id, sent.aggregate_id);
        assert_eq!(event.event_type, sent.event_type);
        let sent_id = (!sent.event_id.is_empty()).then(|| Uuid::try_parse(&sent.event_id).unwrap());
        assert_eq!(event.event_id.map(|id| id.0), sent_id);
        match (&sent.occurred_at, event.occurred_at) {
            (None, None) => {}
            (Some(t), Some(at)) => {
                assert_eq!(
                    (at.timestamp(), at.timestamp_subsec_nanos()),
                    (t.seconds, t.nanos as u32)
                );
            }
            (sent, converted) => panic!("occurred_at {sent:?} became {converted:?}"),
        }
    }
}

/// A refusal is INVALID_ARGUMENT naming each field at fault, in its
/// message too.
fn refused_fields(error: &ApiError) -> Vec<String> {
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    let violations = error.violations();
    assert!(!violations.is_empty(), "{error:?}");
    let message = error.to_string();
    for v in violations {
        assert!(!v.description.is_empty(), "{error:?}");
        assert!(
            message.contains(&v.field),
            "{message:?} names {:?}",
            v.field
        );
    }
    let mut fields: Vec<String> = violations.iter().map(|v| v.field.clone()).collect();
    fields.sort();
    fields
}

fn check_append(request: proto::AppendRequest, limits: &Limits) -> Result<(), Vec<String>> {
    let expected = model_violations(&request, limits);
    let trace = TraceContext {
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        tracestate: None,
    };
    match convert::append_batch(request.clone(), trace.clone(), limits) {
        Ok(batch) => {
            assert!(
                expected.is_empty(),
                "accepted, but the model finds {expected:?} at fault: {request:?}"
            );
            assert_converted(&request, &batch, &trace);
            Ok(())
        }
        Err(error) => {
            let fields = refused_fields(&error);
            assert_eq!(fields, expected, "{error:?} for {request:?}");
            Err(fields)
        }
    }
}

fn check_event_ids(ids: &[String]) {
    let parsed: Vec<Option<Uuid>> = ids.iter().map(|id| Uuid::try_parse(id).ok()).collect();
    match convert::event_ids(ids, "event_ids") {
        Ok(converted) => {
            assert!(ids.len() <= convert::MAX_STATUS_TARGETS);
            let converted: Vec<Option<Uuid>> = converted.iter().map(|id| Some(id.0)).collect();
            assert_eq!(converted, parsed);
        }
        Err(error) => {
            let fields = refused_fields(&error);
            let mut expected: Vec<String> = parsed
                .iter()
                .enumerate()
                .filter(|(_, id)| id.is_none())
                .map(|(i, _)| format!("event_ids[{i}]"))
                .collect();
            if ids.len() > convert::MAX_STATUS_TARGETS {
                expected.push("event_ids".into());
            }
            expected.sort();
            assert_eq!(fields, expected, "{ids:?}");
        }
    }
}

fn check_transaction_refs(refs: Vec<proto::TransactionRef>) {
    let sent = refs.clone();
    match convert::transaction_refs(refs, "transactions") {
        Ok(converted) => {
            assert!(sent.len() <= convert::MAX_STATUS_TARGETS);
            assert_eq!(converted.len(), sent.len());
            for (c, s) in converted.iter().zip(&sent) {
                assert!(name_looked_up(&s.producer) && name_looked_up(&s.transaction_id));
                assert_eq!(
                    (&c.producer, &c.transaction_id),
                    (&s.producer, &s.transaction_id)
                );
            }
        }
        Err(error) => {
            let fields = refused_fields(&error);
            let mut expected = Vec::new();
            for (i, s) in sent.iter().enumerate() {
                if s.producer.is_empty() {
                    expected.push(format!("transactions[{i}].producer"));
                }
                if s.transaction_id.is_empty() {
                    expected.push(format!("transactions[{i}].transaction_id"));
                }
                if s.producer.contains('\0') {
                    expected.push(format!("transactions[{i}].producer"));
                }
                if s.transaction_id.contains('\0') {
                    expected.push(format!("transactions[{i}].transaction_id"));
                }
            }
            if sent.len() > convert::MAX_STATUS_TARGETS {
                expected.push("transactions".into());
            }
            expected.sort();
            assert_eq!(fields, expected, "{sent:?}");
        }
    }
}

fn check_transaction_ref(producer: String, transaction_id: String) {
    let sent = (producer.clone(), transaction_id.clone());
    match convert::transaction_ref(producer, transaction_id) {
        Ok(converted) => {
            assert!(name_looked_up(&sent.0) && name_looked_up(&sent.1));
            assert_eq!((converted.producer, converted.transaction_id), sent);
        }
        Err(error) => {
            let fields = refused_fields(&error);
            let mut expected = Vec::new();
            if sent.0.is_empty() {
                expected.push("producer".to_owned());
            }
            if sent.1.is_empty() {
                expected.push("transaction_id".to_owned());
            }
            if sent.0.contains('\0') {
                expected.push("producer".to_owned());
            }
            if sent.1.contains('\0') {
                expected.push("transaction_id".to_owned());
            }
            expected.sort();
            assert_eq!(fields, expected);
        }
    }
}

fn check_dead_letter_filter(
    producer: String,
    topic: String,
    since: Option<prost_types::Timestamp>,
) {
    let sent = (producer.clone(), topic.clone(), since);
    match convert::dead_letter_filter(Vec::new(), producer, topic, since) {
        Ok(filter) => {
            assert!(!sent.0.contains('\0') && !sent.1.contains('\0'));
            assert_eq!(filter.producer.is_none(), sent.0.is_empty());
            assert_eq!(filter.topic.is_none(), sent.1.is_empty());
            assert_eq!(filter.producer.unwrap_or_default(), sent.0);
            assert_eq!(filter.topic.unwrap_or_default(), sent.1);
            match (sent.2, filter.since) {
                (None, None) => {}
                (Some(t), Some(at)) => {
                    assert!(timestamp_ok(&t));
                    // Brought into years 1 to 9999.
                    let (earliest, latest) = (-62_135_596_800, 253_402_300_799);
                    if (earliest..=latest).contains(&t.seconds) {
                        assert_eq!(
                            (at.timestamp(), at.timestamp_subsec_nanos()),
                            (t.seconds, t.nanos as u32)
                        );
                    } else {
                        assert_eq!(at.timestamp(), t.seconds.clamp(earliest, latest));
                    }
                }
                (sent, converted) => panic!("since {sent:?} became {converted:?}"),
            }
        }
        Err(error) => {
            let mut expected = Vec::new();
            if sent.0.contains('\0') {
                expected.push("producer".to_owned());
            }
            if sent.2.is_some_and(|t| !timestamp_ok(&t)) {
                expected.push("since".to_owned());
            }
            if sent.1.contains('\0') {
                expected.push("topic".to_owned());
            }
            assert_eq!(refused_fields(&error), expected);
        }
    }
}

/// Decodes `bytes` as every request type and runs each one's conversions.
/// Returns what became of it as an append, when it decoded as one.
fn check_bytes(bytes: &[u8], limits: &Limits) -> Option<Result<(), Vec<String>>> {
    let append = proto::AppendRequest::decode(bytes)
        .ok()
        .map(|request| check_append(request, limits));
    if let Ok(r) = proto::CommitRequest::decode(bytes) {
        check_transaction_ref(r.producer, r.transaction_id);
    }
    if let Ok(r) = proto::AbortRequest::decode(bytes) {
        check_transaction_ref(r.producer, r.transaction_id);
    }
    if let Ok(r) = proto::GetStatusRequest::decode(bytes) {
        check_event_ids(&r.event_ids);
        check_transaction_refs(r.transactions);
    }
    if let Ok(r) = proto::WatchStatusRequest::decode(bytes) {
        check_event_ids(&r.event_ids);
        check_transaction_refs(r.transactions);
    }
    if let Ok(r) = proto::RedriveRequest::decode(bytes) {
        check_event_ids(&r.event_ids);
        check_dead_letter_filter(r.producer, r.topic, None);
    }
    if let Ok(r) = proto::ListDeadLettersRequest::decode(bytes) {
        check_dead_letter_filter(r.producer, r.topic, r.since);
    }
    // These carry nothing to convert (or are checked inside their handler,
    // which part 2 drives); decoding must not panic.
    let _ = proto::ListPreparedRequest::decode(bytes);
    let _ = proto::PauseRelayRequest::decode(bytes);
    let _ = proto::ResumeRelayRequest::decode(bytes);
    let _ = proto::GetBacklogRequest::decode(bytes);
    let _ = proto::ListLeasesRequest::decode(bytes);
    append
}

// ---------------------------------------------------------------------------
// Structure-aware inputs: valid appends, then a few fields broken.

fn limits() -> impl Strategy<Value = Limits> {
    (
        1usize..10,
        0usize..300,
        0usize..40,
        0usize..80,
        1u64..100_000,
    )
        .prop_map(|(events, payload, key, headers, timeout)| Limits {
            max_batch_events: events,
            max_payload_bytes: payload,
            max_key_bytes: key,
            max_headers_bytes: headers,
            max_two_phase_timeout_secs: timeout,
            ..Limits::default()
        })
}

/// A valid producer name or transaction id.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z][a-z0-9_.-]{0,24}",
        1 => Just("é".repeat(255)),
        1 => Just("n".repeat(255)),
        1 => "\\PC{1,16}",
    ]
}

/// A valid topic.
fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,30}",
        1 => Just("t".repeat(249)),
        1 => Just("...".to_owned()),
    ]
}

/// A UUID in one of the forms `Uuid::try_parse` reads.
fn uuid_text() -> impl Strategy<Value = String> {
    (any::<u128>(), 0u8..5).prop_map(|(n, form)| {
        let id = Uuid::from_u128(n);
        match form {
            0 | 1 => id.hyphenated().to_string(),
            2 => id.simple().to_string(),
            3 => id.braced().to_string(),
            _ => id.hyphenated().to_string().to_uppercase(),
        }
    })
}

fn timestamp() -> impl Strategy<Value = prost_types::Timestamp> {
    (-62_135_596_800i64..253_402_300_799, 0i32..1_000_000_000)
        .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=max)
}

fn any_event(limits: &Limits) -> impl Strategy<Value = proto::Event> + use<> {
    let header = ("x-[a-z0-9]{0,6}", bytes(8)).prop_map(|(key, value)| proto::Header {
        key,
        value: value.into(),
    });
    let max_headers = limits.max_headers_bytes;
    (
        topic(),
        prop::option::of(bytes(limits.max_key_bytes)),
        bytes(limits.max_payload_bytes.min(64)),
        prop::collection::vec(header, 0..3),
        ("[^\\x00]{0,8}", "[^\\x00]{0,12}", "[a-z.]{0,12}"),
        prop_oneof![2 => Just(String::new()), 1 => uuid_text()],
        prop::option::of(timestamp()),
    )
        .prop_map(
            move |(topic, key, payload, mut headers, texts, event_id, occurred_at)| {
                while headers
                    .iter()
                    .map(|h| h.key.len() + h.value.len())
                    .sum::<usize>()
                    > max_headers
                {
                    headers.pop();
                }
                EventBuilder::new(topic)
                    .maybe_key(key)
                    .payload(payload)
                    .headers(headers)
                    .aggregate(texts.0, texts.1)
                    .event_type(texts.2)
                    .id(event_id)
                    .occurred_at(occurred_at)
                    .build()
            },
        )
}

fn token(limits: &Limits) -> impl Strategy<Value = proto::TransactionToken> + use<> {
    let max_timeout = limits.max_two_phase_timeout_secs;
    (
        name(),
        name(),
        0i32..4,
        0..=max_timeout,
        0i32..1_000_000_000,
        1u64..,
        1u64..,
    )
        .prop_map(
            move |(producer, transaction_id, mode, secs, nanos, xid, system)| {
                let nanos = if secs == 0 && nanos == 0 { 1 } else { nanos };
                // A literal: every field is drawn, the mode too (as a number,
                // unspecified included).
                proto::TransactionToken {
                    producer,
                    transaction_id,
                    mode,
                    timeout: (mode == 2).then_some(prost_types::Duration {
                        seconds: secs as i64,
                        nanos,
                    }),
                    postgres_xid: if mode == 3 { xid } else { 0 },
                    postgres_system_id: if mode == 3 { system } else { 0 },
                }
            },
        )
}

/// One way of breaking a field of an append.
#[derive(Debug, Clone)]
enum Break {
    NoToken,
    Producer(BadName),
    TransactionId(BadName),
    UnknownMode(i32),
    Timeout(BadTimeout),
    XidMissing { xid: bool, system: bool },
    NoEvents,
    TooManyEvents(usize),
    Topic(usize, BadTopic),
    Payload(usize, usize),
    Key(usize, usize),
    HeadersTooBig(usize),
    HeaderKey(usize, bool),
    TextTooLong(usize, u8, usize),
    TextNul(usize, u8, usize),
    EventIdNotUuid(usize, String),
    DuplicateEventId(usize, usize, String),
    OccurredAt(usize, prost_types::Timestamp),
}

#[derive(Debug, Clone)]
enum BadName {
    Empty,
    TooLong(usize, bool),
    Control(char, usize),
}

#[derive(Debug, Clone)]
enum BadTimeout {
    Absent,
    Zero,
    Negative(i64, i32),
    TooLong(i64),
}

#[derive(Debug, Clone)]
enum BadTopic {
    Empty,
    TooLong(usize),
    Dots(bool),
    Character(char, usize),
}

fn bad_name() -> impl Strategy<Value = BadName> {
    prop_oneof![
        Just(BadName::Empty),
        (256usize..400, any::<bool>()).prop_map(|(n, wide)| BadName::TooLong(n, wide)),
        (
            prop_oneof![
                Just('\0'),
                Just('\n'),
                Just('\t'),
                Just('\u{7f}'),
                Just('\u{85}'),
                Just('\u{1b}')
            ],
            any::<usize>()
        )
            .prop_map(|(c, at)| BadName::Control(c, at)),
    ]
}

fn bad_break() -> impl Strategy<Value = Break> {
    let text = 0u8..3;
    prop_oneof![
        Just(Break::NoToken),
        bad_name().prop_map(Break::Producer),
        bad_name().prop_map(Break::TransactionId),
        prop_oneof![
            Just(-1i32),
            Just(4),
            Just(i32::MAX),
            Just(i32::MIN),
            5i32..1000
        ]
        .prop_map(Break::UnknownMode),
        prop_oneof![
            Just(BadTimeout::Absent),
            Just(BadTimeout::Zero),
            (i64::MIN..0, any::<i32>()).prop_map(|(s, n)| BadTimeout::Negative(s, n)),
            (0i64..10, i32::MIN..0).prop_map(|(s, n)| BadTimeout::Negative(s, n)),
            (100_000i64..=i64::MAX).prop_map(BadTimeout::TooLong),
        ]
        .prop_map(Break::Timeout),
        (any::<bool>(), any::<bool>()).prop_map(|(xid, system)| Break::XidMissing { xid, system }),
        Just(Break::NoEvents),
        (1usize..4).prop_map(Break::TooManyEvents),
        (
            any::<usize>(),
            prop_oneof![
                Just(BadTopic::Empty),
                (250usize..300).prop_map(BadTopic::TooLong),
                any::<bool>().prop_map(BadTopic::Dots),
                (
                    prop_oneof![
                        Just('/'),
                        Just(' '),
                        Just('ü'),
                        Just('\0'),
                        Just('*'),
                        Just(':'),
                        Just('\u{1f600}')
                    ],
                    any::<usize>()
                )
                    .prop_map(|(c, at)| BadTopic::Character(c, at)),
            ]
        )
            .prop_map(|(i, t)| Break::Topic(i, t)),
        (any::<usize>(), 1usize..2000).prop_map(|(i, n)| Break::Payload(i, n)),
        (any::<usize>(), 1usize..100).prop_map(|(i, n)| Break::Key(i, n)),
        any::<usize>().prop_map(Break::HeadersTooBig),
        (any::<usize>(), any::<bool>()).prop_map(|(i, empty)| Break::HeaderKey(i, empty)),
        (any::<usize>(), text.clone(), 256usize..300)
            .prop_map(|(i, t, n)| Break::TextTooLong(i, t, n)),
        (any::<usize>(), text, any::<usize>()).prop_map(|(i, t, at)| Break::TextNul(i, t, at)),
        (
            any::<usize>(),
            prop_oneof![
                Just("not-a-uuid".to_owned()),
                Just("0190f1c2-7d3e-7a4b-8c5d-6e7f8091020".to_owned()),
                Just("0190f1c2-7d3e-7a4b-8c5d-6e7f809102030".to_owned()),
                Just("0190f1c2_7d3e_7a4b_8c5d_6e7f80910203".to_owned()),
                Just(" 0190f1c2-7d3e-7a4b-8c5d-6e7f80910203".to_owned()),
                Just("{0190f1c2-7d3e-7a4b-8c5d-6e7f80910203".to_owned()),
                Just("0190f1c2-7d3e-7a4b-8c5d-6e7f8091020g".to_owned()),
                Just("０190f1c2-7d3e-7a4b-8c5d-6e7f80910203".to_owned()),
                "[0-9a-g]{1,40}".prop_filter("not a UUID", |s| Uuid::try_parse(s).is_err()),
                ".{1,40}".prop_filter("not a UUID", |s| Uuid::try_parse(s).is_err()),
            ]
        )
            .prop_map(|(i, s)| Break::EventIdNotUuid(i, s)),
        (any::<usize>(), any::<usize>(), uuid_text())
            .prop_map(|(a, b, id)| Break::DuplicateEventId(a, b, id)),
        (
            any::<usize>(),
            prop_oneof![
                (any::<i64>(), i32::MIN..0)
                    .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
                (
                    prop_oneof![Just(i64::MAX), Just(i64::MIN), 300_000_000_000i64..],
                    0..1_000_000_000
                )
                    .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
            ]
        )
            .prop_map(|(i, t)| Break::OccurredAt(i, t)),
    ]
}

/// A request, and the fields its breaks must be refused for.
#[derive(Debug, Clone)]
struct Plan {
    request: proto::AppendRequest,
    broken: BTreeSet<String>,
}

fn break_name(name: &mut String, bad: &BadName) {
    match bad {
        BadName::Empty => name.clear(),
        BadName::TooLong(n, wide) => *name = if *wide { "é" } else { "n" }.repeat(*n),
        BadName::Control(c, at) => {
            let chars: Vec<char> = name.chars().collect();
            let at = at % (chars.len() + 1);
            *name = chars[..at]
                .iter()
                .chain(std::iter::once(c))
                .chain(&chars[at..])
                .collect();
        }
    }
}

fn text_field(event: &mut proto::Event, which: u8) -> (&mut String, &'static str) {
    match which {
        0 => (&mut event.aggregate_type, "aggregate_type"),
        1 => (&mut event.aggregate_id, "aggregate_id"),
        _ => (&mut event.event_type, "event_type"),
    }
}

/// Applies `breaks` in order, each to a field no earlier break touched.
fn apply(mut request: proto::AppendRequest, breaks: &[Break], limits: &Limits) -> Plan {
    let mut broken = BTreeSet::new();
    let mut touched: HashSet<String> = HashSet::new();
    // Breaks that remove the token or change the number of events go
    // first.
    let first = |b: &&Break| {
        matches!(
            b,
            Break::NoToken | Break::NoEvents | Break::TooManyEvents(_)
        )
    };
    let mut ordered: Vec<&Break> = breaks.iter().filter(first).collect();
    ordered.extend(breaks.iter().filter(|b| !first(b)));
    for b in ordered {
        let events = request.events.len();
        match b {
            Break::NoToken => {
                if touched.insert("token".into()) {
                    request.token = None;
                    broken.insert("token.producer".to_owned());
                    broken.insert("token.transaction_id".to_owned());
                }
            }
            Break::Producer(bad) => {
                if !touched.contains("token") && touched.insert("token.producer".into()) {
                    let token = request.token.get_or_insert_with(Default::default);
                    break_name(&mut token.producer, bad);
                    broken.insert("token.producer".to_owned());
                }
            }
            Break::TransactionId(bad) => {
                if !touched.contains("token") && touched.insert("token.transaction_id".into()) {
                    let token = request.token.get_or_insert_with(Default::default);
                    break_name(&mut token.transaction_id, bad);
                    broken.insert("token.transaction_id".to_owned());
                }
            }
            Break::UnknownMode(mode) => {
                if !touched.contains("token") && touched.insert("token.mode".into()) {
                    request.token.get_or_insert_with(Default::default).mode = *mode;
                    broken.insert("token.mode".to_owned());
                }
            }
            Break::Timeout(bad) => {
                if !touched.contains("token") && touched.insert("token.mode".into()) {
                    let token = request.token.get_or_insert_with(Default::default);
                    token.mode = proto::TokenMode::TwoPhase as i32;
                    token.timeout = match bad {
                        BadTimeout::Absent => None,
                        BadTimeout::Zero => Some(prost_types::Duration::default()),
                        BadTimeout::Negative(seconds, nanos) => Some(prost_types::Duration {
                            seconds: *seconds,
                            nanos: *nanos,
                        }),
                        BadTimeout::TooLong(seconds) => Some(prost_types::Duration {
                            seconds: (*seconds).max(limits.max_two_phase_timeout_secs as i64 + 1),
                            nanos: 0,
                        }),
                    };
                    broken.insert("token.timeout".to_owned());
                }
            }
            Break::XidMissing { xid, system } => {
                if !touched.contains("token") && touched.insert("token.mode".into()) {
                    let token = request.token.get_or_insert_with(Default::default);
                    token.mode = proto::TokenMode::PostgresXid as i32;
                    token.postgres_xid = if *xid { 0 } else { token.postgres_xid.max(7) };
                    token.postgres_system_id = if *system || !*xid {
                        0
                    } else {
                        token.postgres_system_id.max(7)
                    };
                    if *xid {
                        broken.insert("token.postgres_xid".to_owned());
                    }
                    if *system || !*xid {
                        broken.insert("token.postgres_system_id".to_owned());
                    }
                }
            }
            Break::NoEvents => {
                if touched.insert("events".into()) {
                    request.events.clear();
                    broken.insert("events".to_owned());
                }
            }
            Break::TooManyEvents(extra) => {
                if events > 0 && touched.insert("events".into()) {
                    let mut copy = request.events[events - 1].clone();
                    copy.event_id.clear();
                    while request.events.len() < limits.max_batch_events + extra {
                        request.events.push(copy.clone());
                    }
                    broken.insert("events".to_owned());
                }
            }
            _ if events == 0 => {}
            Break::Topic(i, bad) => {
                let i = i % events;
                if touched.insert(format!("events[{i}].topic")) {
                    let topic = &mut request.events[i].topic;
                    match bad {
                        BadTopic::Empty => topic.clear(),
                        BadTopic::TooLong(n) => *topic = "t".repeat(*n),
                        BadTopic::Dots(two) => *topic = if *two { ".." } else { "." }.into(),
                        BadTopic::Character(c, at) => {
                            let at = at % (topic.len() + 1);
                            topic.insert(at, *c);
                        }
                    }
                    broken.insert(format!("events[{i}].topic"));
                }
            }
            Break::Payload(i, n) => {
                let i = i % events;
                if touched.insert(format!("events[{i}].payload")) {
                    request.events[i].payload = vec![0xa5; limits.max_payload_bytes + n].into();
                    broken.insert(format!("events[{i}].payload"));
                }
            }
            Break::Key(i, n) => {
                let i = i % events;
                if touched.insert(format!("events[{i}].key")) {
                    request.events[i].key = Some(vec![0x5a; limits.max_key_bytes + n].into());
                    broken.insert(format!("events[{i}].key"));
                }
            }
            Break::HeadersTooBig(i) => {
                let i = i % events;
                if touched.insert(format!("events[{i}].headers")) {
                    request.events[i].headers.push(proto::Header {
                        key: "x-big".into(),
                        value: vec![1; limits.max_headers_bytes + 1].into(),
                    });
                    broken.insert(format!("events[{i}].headers"));
                }
            }
            Break::HeaderKey(i, empty) => {
                let i = i % events;
                // Several bad keys may share one event; each names its index.
                let headers = &mut request.events[i].headers;
                let j = headers.len();
                headers.push(proto::Header {
                    key: if *empty {
                        String::new()
                    } else {
                        "outbox-event-id".into()
                    },
                    value: Default::default(),
                });
                broken.insert(format!("events[{i}].headers[{j}].key"));
                // The key counts toward the headers' bytes.
                let total: usize = headers.iter().map(|h| h.key.len() + h.value.len()).sum();
                if total > limits.max_headers_bytes
                    && touched.insert(format!("events[{i}].headers"))
                {
                    broken.insert(format!("events[{i}].headers"));
                }
            }
            Break::TextTooLong(i, which, n) => {
                let i = i % events;
                let (value, name) = text_field(&mut request.events[i], *which);
                if touched.insert(format!("events[{i}].{name}")) {
                    *value = "a".repeat(*n);
                    broken.insert(format!("events[{i}].{name}"));
                }
            }
            Break::TextNul(i, which, at) => {
                let i = i % events;
                let (value, name) = text_field(&mut request.events[i], *which);
                if touched.insert(format!("events[{i}].{name}")) {
                    let chars: Vec<char> = value.chars().collect();
                    let at = at % (chars.len() + 1);
                    *value = chars[..at]
                        .iter()
                        .chain(std::iter::once(&'\0'))
                        .chain(&chars[at..])
                        .collect();
                    broken.insert(format!("events[{i}].{name}"));
                }
            }
            Break::EventIdNotUuid(i, text) => {
                let i = i % events;
                if touched.insert(format!("events[{i}].event_id")) {
                    request.events[i].event_id = text.clone();
                    broken.insert(format!("events[{i}].event_id"));
                }
            }
            Break::DuplicateEventId(a, b, id) => {
                let (a, b) = (a % events, b % events);
                if a != b
                    && !touched.contains(&format!("events[{a}].event_id"))
                    && !touched.contains(&format!("events[{b}].event_id"))
                {
                    touched.insert(format!("events[{a}].event_id"));
                    touched.insert(format!("events[{b}].event_id"));
                    // The same UUID, perhaps written another way.
                    let parsed = Uuid::try_parse(id).unwrap();
                    request.events[a].event_id = id.clone();
                    request.events[b].event_id = parsed.hyphenated().to_string();
                    broken.insert(format!("events[{}].event_id", a.max(b)));
                }
            }
            Break::OccurredAt(i, timestamp) => {
                let i = i % events;
                if touched.insert(format!("events[{i}].occurred_at")) {
                    request.events[i].occurred_at = Some(*timestamp);
                    broken.insert(format!("events[{i}].occurred_at"));
                }
            }
        }
    }
    Plan { request, broken }
}

/// A valid append of at most `limits.max_batch_events` events, then up to
/// three breaks.
fn plan(limits: Limits) -> impl Strategy<Value = Plan> {
    let max_events = limits.max_batch_events;
    (
        token(&limits),
        prop_oneof![4 => Just(0u64), 1 => any::<u64>()],
        prop::collection::vec(any_event(&limits), 1..=max_events.min(4)),
        any::<u64>(),
        prop_oneof![
            4 => Just(Vec::new()),
            4 => prop::collection::vec(bad_break(), 1..=1),
            2 => prop::collection::vec(bad_break(), 2..=3),
        ],
    )
        .prop_map(move |(token, sequence, mut events, correlation, breaks)| {
            // Caller-chosen ids of a valid request are distinct.
            let mut seen = HashSet::new();
            for event in &mut events {
                if !event.event_id.is_empty()
                    && !seen.insert(Uuid::try_parse(&event.event_id).unwrap())
                {
                    event.event_id.clear();
                }
            }
            let request = AppendBuilder::with_token(Some(token))
                .sequence(sequence)
                .correlation(correlation)
                .events(events)
                .build();
            apply(request, &breaks, &limits)
        })
}

/// Any string a caller could send where an id or a name is expected.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9-]{1,12}",
        uuid_text(),
        ".{0,40}",
    ]
}

/// Other requests, encoded, with random fields.
fn refs() -> impl Strategy<Value = Vec<proto::TransactionRef>> {
    prop::collection::vec(
        (text(), text()).prop_map(|(producer, transaction_id)| proto::TransactionRef {
            producer,
            transaction_id,
        }),
        0..4,
    )
}

fn other_request() -> impl Strategy<Value = Vec<u8>> {
    let timestamp = (any::<i64>(), any::<i32>())
        .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos });
    prop_oneof![
        (text(), text()).prop_map(|(producer, transaction_id)| proto::CommitRequest {
            producer,
            transaction_id
        }
        .encode_to_vec()),
        (prop::collection::vec(text(), 0..5), refs()).prop_map(|(event_ids, transactions)| {
            proto::GetStatusRequest {
                event_ids,
                transactions,
            }
            .encode_to_vec()
        }),
        (
            prop::collection::vec(text(), 0..5),
            refs(),
            text(),
            any::<u64>()
        )
            .prop_map(|(event_ids, transactions, producer, after_cursor)| {
                proto::WatchStatusRequest {
                    event_ids,
                    transactions,
                    producer,
                    after_cursor,
                }
                .encode_to_vec()
            }),
        (prop::collection::vec(text(), 0..5), text(), text()).prop_map(
            |(event_ids, producer, topic)| proto::RedriveRequest {
                event_ids,
                producer,
                topic,
            }
            .encode_to_vec()
        ),
        (
            text(),
            text(),
            prop::option::of(timestamp),
            any::<u32>(),
            text()
        )
            .prop_map(|(producer, topic, since, page_size, page_token)| {
                proto::ListDeadLettersRequest {
                    producer,
                    topic,
                    since,
                    page_size,
                    page_token,
                }
                .encode_to_vec()
            }),
    ]
}

/// Byte-level damage: (where, byte, how) — overwrite, insert, or cut there.
fn damage(mut bytes: Vec<u8>, edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    for (at, byte, how) in edits {
        let at = at.index(bytes.len() + 1);
        match how {
            0 if at < bytes.len() => bytes[at] = *byte,
            1 => bytes.insert(at, *byte),
            _ => bytes.truncate(at),
        }
    }
    bytes
}

#[derive(Debug, Clone)]
struct Input {
    limits: Limits,
    bytes: Vec<u8>,
    /// When the bytes are a planned append as it was encoded.
    plan: Option<Plan>,
}

fn fuzz_input() -> impl Strategy<Value = Input> {
    limits().prop_flat_map(|limits| {
        let edits =
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4);
        (
            Just(limits.clone()),
            prop_oneof![
                2 => bytes(200).prop_map(|b| (b, None)),
                5 => plan(limits.clone()).prop_map(|p| (p.request.encode_to_vec(), Some(p))),
                3 => (plan(limits), edits)
                    .prop_map(|(p, edits)| (damage(p.request.encode_to_vec(), &edits), None)),
                2 => other_request().prop_map(|b| (b, None)),
            ],
        )
            .prop_map(|(limits, (bytes, plan))| Input {
                limits,
                bytes,
                plan,
            })
    })
}

static INPUTS: AtomicU64 = AtomicU64::new(0);
static ACCEPTED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);

proptest! {
    #![proptest_config(ProptestConfig {
        cases: u32::try_from(env_number("OUTBOXD_FUZZ_CASES", 5_000)).expect("a u32 count"),
        max_local_rejects: u32::MAX,
        // A failure is reported with its smallest input; it becomes a named
        // regression test rather than a file beside this one.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Part 1: decoding, validation and conversion to the domain.
    #[test]
    fn every_request_type_decodes_validates_and_converts_without_panic(input in fuzz_input()) {
        let outcome = check_bytes(&input.bytes, &input.limits);
        if let Some(plan) = &input.plan {
            // The planned request went through as it was encoded.
            match outcome.as_ref().expect("a planned append decodes") {
                Ok(()) => prop_assert!(plan.broken.is_empty(), "accepted despite {:?}", plan.broken),
                Err(fields) => {
                    let fields: BTreeSet<String> = fields.iter().cloned().collect();
                    prop_assert!(
                        plan.broken.is_subset(&fields),
                        "broke {:?}, refused for {:?}", plan.broken, fields
                    );
                }
            }
        }
        match outcome {
            Some(Ok(())) => ACCEPTED.fetch_add(1, Ordering::Relaxed),
            Some(Err(_)) => REFUSED.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        let n = INPUTS.fetch_add(1, Ordering::Relaxed) + 1;
        if n % 100_000 == 0 {
            eprintln!(
                "fuzz: {n} inputs, appends accepted {}, refused {}",
                ACCEPTED.load(Ordering::Relaxed),
                REFUSED.load(Ordering::Relaxed)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Part 2: requests through a real gateway, against a real store.

/// The gateway's limits: small, so that over-limit requests are cheap.
fn store_limits() -> Limits {
    Limits {
        max_batch_events: 8,
        max_payload_bytes: 256,
        max_key_bytes: 32,
        max_headers_bytes: 64,
        max_request_bytes: 16 * 1024,
        max_two_phase_timeout_secs: 3_600,
        ..Limits::default()
    }
}

/// What the gateway acknowledged: the store must hold exactly this.
#[derive(Default)]
struct Ledger {
    transactions: HashSet<(String, String)>,
    appends: HashSet<(String, String, u64)>,
    events: HashSet<Uuid>,
    /// Ids of acknowledged events with their (producer, transaction id).
    stored: Vec<(String, String, String)>,
    /// Acknowledged two_phase transactions not yet resolved by this test,
    /// with their event ids.
    two_phase: Vec<(String, String, Vec<String>)>,
}

#[derive(Default)]
struct Counts {
    calls: AtomicU64,
    appends: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    streamed: AtomicU64,
    raw: AtomicU64,
}

struct Fuzzer {
    client: OutboxClient<Channel>,
    admin: OutboxAdminClient<Channel>,
    channel: Channel,
    limits: Limits,
    /// postgres_xid tokens can be resolved (a PostgreSQL store).
    xid_resolvable: bool,
    ledger: Arc<Mutex<Ledger>>,
    counts: Arc<Counts>,
    worker: u64,
}

fn sample<S: Strategy>(runner: &mut TestRunner, strategy: &S) -> S::Value {
    strategy.new_tree(runner).expect("a value").current()
}

fn caller_ids(request: &proto::AppendRequest) -> Vec<String> {
    request
        .events
        .iter()
        .filter_map(|e| Uuid::try_parse(&e.event_id).ok())
        .map(|id| id.hyphenated().to_string())
        .collect()
}

fn is_xid(request: &proto::AppendRequest) -> bool {
    request.token.as_ref().is_some_and(|t| t.mode == 3)
}

fn is_two_phase(request: &proto::AppendRequest) -> bool {
    request.token.as_ref().is_some_and(|t| t.mode == 2)
}

fn token_names(request: &proto::AppendRequest) -> (String, String) {
    let token = request.token.clone().unwrap_or_default();
    (token.producer, token.transaction_id)
}

/// What the gateway said about one append.
enum Answer {
    Accepted(proto::AppendResponse),
    Refused { code: Code, fields: Vec<String> },
}

fn answer_of(result: Result<proto::AppendResponse, tonic::Status>) -> Answer {
    match result {
        Ok(response) => match response.failure {
            None => Answer::Accepted(response),
            Some(failure) => {
                assert!(response.event_ids.is_empty(), "{failure:?}");
                let mut fields: Vec<String> = failure
                    .field_violations
                    .into_iter()
                    .map(|v| v.field)
                    .collect();
                fields.sort();
                Answer::Refused {
                    code: Code::from_i32(failure.code),
                    fields,
                }
            }
        },
        Err(status) => {
            let mut fields: Vec<String> = status
                .get_details_bad_request()
                .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
                .unwrap_or_default();
            fields.sort();
            Answer::Refused {
                code: status.code(),
                fields,
            }
        }
    }
}

impl Fuzzer {
    async fn statuses(&self, ids: &[String]) -> Vec<proto::EventStatus> {
        if ids.is_empty() {
            return Vec::new();
        }
        self.client
            .clone()
            .get_status(proto::GetStatusRequest {
                event_ids: ids.to_vec(),
                ..Default::default()
            })
            .await
            .expect("GetStatus by ids")
            .into_inner()
            .events
    }

    async fn transaction_statuses(&self, producer: &str, tx: &str) -> Vec<proto::EventStatus> {
        self.client
            .clone()
            .get_status(proto::GetStatusRequest {
                transactions: vec![proto::TransactionRef {
                    producer: producer.into(),
                    transaction_id: tx.into(),
                }],
                ..Default::default()
            })
            .await
            .expect("GetStatus by transaction")
            .into_inner()
            .events
    }

    /// Checks one append's answer against the model and the store, and
    /// records what was acknowledged. `own_transaction`: no other request
    /// of this test names its transaction (then a refusal must leave it
    /// without events). `taken`: caller ids stored by an earlier append.
    async fn settle(
        &self,
        request: &proto::AppendRequest,
        answer: Answer,
        own_transaction: bool,
        taken: &[String],
    ) {
        let expected = model_violations(request, &self.limits);
        let (producer, tx) = token_names(request);
        self.counts.appends.fetch_add(1, Ordering::Relaxed);
        match answer {
            Answer::Accepted(response) => {
                self.counts.accepted.fetch_add(1, Ordering::Relaxed);
                assert!(
                    expected.is_empty(),
                    "accepted despite {expected:?}: {request:?}"
                );
                assert_eq!(response.correlation, request.correlation);
                assert_eq!(response.event_ids.len(), request.events.len());
                for (sent, id) in request.events.iter().zip(&response.event_ids) {
                    if let Ok(chosen) = Uuid::try_parse(&sent.event_id) {
                        assert_eq!(Uuid::try_parse(id).ok(), Some(chosen));
                    }
                }
                let statuses = self.statuses(&response.event_ids).await;
                assert_eq!(
                    statuses.len(),
                    response.event_ids.len(),
                    "acknowledged events missing from the store: {request:?}"
                );
                for (sent, id) in request.events.iter().zip(&response.event_ids) {
                    let status = statuses
                        .iter()
                        .find(|s| &s.event_id == id)
                        .unwrap_or_else(|| panic!("acknowledged event {id} is not stored"));
                    assert_eq!(
                        (&status.producer, &status.transaction_id, status.sequence),
                        (&producer, &tx, request.sequence)
                    );
                    assert_eq!(status.topic, sent.topic);
                }
                let mut ledger = self.ledger.lock().unwrap();
                ledger.transactions.insert((producer.clone(), tx.clone()));
                ledger
                    .appends
                    .insert((producer.clone(), tx.clone(), request.sequence));
                for id in &response.event_ids {
                    if ledger.events.insert(Uuid::try_parse(id).unwrap()) {
                        ledger
                            .stored
                            .push((id.clone(), producer.clone(), tx.clone()));
                    }
                }
                if is_two_phase(request) && own_transaction && !response.duplicate {
                    ledger
                        .two_phase
                        .push((producer, tx, response.event_ids.clone()));
                }
            }
            Answer::Refused { code, fields } => {
                self.counts.refused.fetch_add(1, Ordering::Relaxed);
                if !expected.is_empty() {
                    assert_eq!(code, Code::InvalidArgument, "{request:?}");
                    assert_eq!(fields, expected, "{request:?}");
                } else if is_xid(request) && !self.xid_resolvable {
                    assert_eq!(code, Code::FailedPrecondition, "{request:?}");
                } else {
                    assert!(
                        !taken.is_empty() || !own_transaction,
                        "a valid append was refused ({code:?}, {fields:?}): {request:?}"
                    );
                }
                let fresh: Vec<String> = caller_ids(request)
                    .into_iter()
                    .filter(|id| !taken.contains(id))
                    .collect();
                let stored = self.statuses(&fresh).await;
                assert!(
                    stored.is_empty(),
                    "a refused append ({code:?}) stored {stored:?}: {request:?}"
                );
                if own_transaction && name_looked_up(&producer) && name_looked_up(&tx) {
                    let stored = self.transaction_statuses(&producer, &tx).await;
                    assert!(
                        stored.is_empty(),
                        "a refused append ({code:?}) stored {stored:?}: {request:?}"
                    );
                }
            }
        }
    }

    /// A planned append with a transaction id no other request uses
    /// (unless the plan breaks it).
    fn own_plan(&self, runner: &mut TestRunner, n: u64) -> Plan {
        let mut plan = sample(runner, &plan(self.limits.clone()));
        if let Some(token) = plan.request.token.as_mut()
            && !plan.broken.contains("token.transaction_id")
        {
            let unique = format!("{}-{n}~{}", self.worker, token.transaction_id);
            token.transaction_id = unique.chars().take(255).collect();
        }
        plan
    }

    async fn unary(&self, runner: &mut TestRunner, n: u64) {
        let plan = self.own_plan(runner, n);
        let request = plan.request;
        let result = self.client.clone().append(request.clone()).await;
        let answer = answer_of(result.map(tonic::Response::into_inner));
        let accepted = match &answer {
            Answer::Accepted(response) => Some(response.clone()),
            Answer::Refused { .. } => None,
        };
        self.settle(&request, answer, true, &[]).await;
        let Some(first) = accepted else { return };
        // Sometimes the caller retries: the same content is a duplicate with
        // the same ids; other content is refused and stores nothing.
        match sample(runner, &(0u8..10)) {
            0..=1 => {
                let mut again = request.clone();
                again.correlation = again.correlation.wrapping_add(1);
                let response = self
                    .client
                    .clone()
                    .append(again)
                    .await
                    .expect("an identical retry")
                    .into_inner();
                assert!(response.duplicate, "{request:?}");
                assert_eq!(response.event_ids, first.event_ids);
                self.counts.appends.fetch_add(1, Ordering::Relaxed);
            }
            2 => {
                let mut changed = request.clone();
                let payload = changed.events[0].payload.to_vec();
                changed.events[0].payload = [payload, vec![1]].concat().into();
                changed.events[0].event_id.clear();
                let status = self
                    .client
                    .clone()
                    .append(changed)
                    .await
                    .expect_err("a retry with other content");
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                let (producer, tx) = token_names(&request);
                let mut stored: Vec<String> = self
                    .transaction_statuses(&producer, &tx)
                    .await
                    .into_iter()
                    .map(|s| s.event_id)
                    .collect();
                stored.sort();
                let mut expected = first.event_ids.clone();
                expected.sort();
                assert_eq!(stored, expected, "{request:?}");
                self.counts.appends.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// AppendStream: every message answered in order; a bad one fails
    /// alone.
    async fn stream(&self, runner: &mut TestRunner, n: u64) {
        let count = sample(runner, &(2usize..7));
        let requests: Vec<proto::AppendRequest> = (0..count)
            .map(|i| {
                let mut request = self.own_plan(runner, n * 10 + i as u64).request;
                request.correlation = i as u64;
                request
            })
            .collect();
        let mut responses = self
            .client
            .clone()
            .append_stream(tokio_stream::iter(requests.clone()))
            .await
            .expect("AppendStream")
            .into_inner();
        let mut answers = Vec::new();
        while let Some(response) = responses.message().await.expect("AppendStream answers") {
            answers.push(response);
        }
        assert_eq!(answers.len(), requests.len(), "one answer per request");
        for (i, (request, response)) in requests.iter().zip(answers).enumerate() {
            assert_eq!(response.correlation, i as u64, "answers in request order");
            self.counts.streamed.fetch_add(1, Ordering::Relaxed);
            self.settle(request, answer_of(Ok(response)), true, &[])
                .await;
        }
    }

    /// Raw bytes where an AppendRequest is expected.
    async fn raw(&self, runner: &mut TestRunner, n: u64) {
        let bytes = if sample(runner, &any::<bool>()) {
            sample(runner, &bytes(300))
        } else {
            let plan = self.own_plan(runner, n);
            let edits = sample(
                runner,
                &prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
            );
            damage(plan.request.encode_to_vec(), &edits)
        };
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.expect("a ready channel");
        let result = grpc
            .unary(
                tonic::Request::new(bytes.clone()),
                tonic::codegen::http::uri::PathAndQuery::from_static("/outboxd.v1.Outbox/Append"),
                RawCodec,
            )
            .await
            .map(tonic::Response::into_inner);
        self.counts.raw.fetch_add(1, Ordering::Relaxed);
        match proto::AppendRequest::decode(bytes.as_slice()) {
            Err(_) => {
                let status = result.expect_err("undecodable bytes are refused");
                assert_ne!(status.code(), Code::Ok);
            }
            // Its names may be another raw request's: only its own caller
            // ids and its answer are checked here, the store at the end.
            Ok(request) => self.settle(&request, answer_of(result), false, &[]).await,
        }
    }

    /// An append naming an event id that is already stored.
    async fn taken_id(&self, runner: &mut TestRunner, n: u64) {
        let taken = {
            let ledger = self.ledger.lock().unwrap();
            if ledger.stored.is_empty() {
                return;
            }
            let at = sample(runner, &any::<prop::sample::Index>());
            ledger.stored[at.index(ledger.stored.len())].clone()
        };
        let mut plan = self.own_plan(runner, n);
        for _ in 0..20 {
            if plan.broken.is_empty() {
                break;
            }
            plan = self.own_plan(runner, n);
        }
        if !plan.broken.is_empty() {
            return;
        }
        let mut request = plan.request;
        let token = request.token.as_mut().unwrap();
        token.mode = proto::TokenMode::Immediate as i32;
        let at = sample(runner, &any::<prop::sample::Index>()).index(request.events.len());
        request.events[at].event_id = taken.0.clone();
        let result = self.client.clone().append(request.clone()).await;
        let status = result.expect_err("an append naming a stored event id");
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        self.settle(
            &request,
            answer_of(Err(status)),
            true,
            std::slice::from_ref(&taken.0),
        )
        .await;
        // The taken id still belongs to its first transaction.
        let statuses = self.statuses(std::slice::from_ref(&taken.0)).await;
        assert_eq!(statuses.len(), 1);
        assert_eq!(
            (&statuses[0].producer, &statuses[0].transaction_id),
            (&taken.1, &taken.2)
        );
    }

    /// Commit or Abort of an acknowledged two_phase transaction, or of
    /// names that are none.
    async fn resolve(&self, runner: &mut TestRunner) {
        let commit = sample(runner, &any::<bool>());
        let pending = {
            let mut ledger = self.ledger.lock().unwrap();
            let len = ledger.two_phase.len();
            (len > 0).then(|| ledger.two_phase.swap_remove(len - 1))
        };
        let Some((producer, tx, ids)) = pending else {
            let (producer, tx) = sample(runner, &(text(), text()));
            let result = if commit {
                self.client
                    .clone()
                    .commit(proto::CommitRequest {
                        producer: producer.clone(),
                        transaction_id: tx.clone(),
                    })
                    .await
                    .map(|r| r.into_inner().events)
            } else {
                self.client
                    .clone()
                    .abort(proto::AbortRequest {
                        producer: producer.clone(),
                        transaction_id: tx.clone(),
                    })
                    .await
                    .map(|r| r.into_inner().events)
            };
            if !name_looked_up(&producer) || !name_looked_up(&tx) {
                assert_eq!(result.unwrap_err().code(), Code::InvalidArgument);
            } else if let Err(status) = result {
                assert!(
                    matches!(status.code(), Code::NotFound | Code::FailedPrecondition),
                    "{status:?}"
                );
            }
            return;
        };
        let request = proto::CommitRequest {
            producer: producer.clone(),
            transaction_id: tx.clone(),
        };
        let result = if commit {
            self.client.clone().commit(request).await
        } else {
            self.client
                .clone()
                .abort(proto::AbortRequest {
                    producer: request.producer,
                    transaction_id: request.transaction_id,
                })
                .await
                .map(|r| r.map(|a| proto::CommitResponse { events: a.events }))
        };
        let statuses = self.statuses(&ids).await;
        assert_eq!(statuses.len(), ids.len(), "a resolution lost events");
        let states: HashSet<i32> = statuses.iter().map(|s| s.state).collect();
        match result {
            Ok(response) => {
                assert_eq!(response.into_inner().events, ids.len() as u64);
                let discarded = proto::EventState::Discarded as i32;
                if commit {
                    // Publishable (the relay may have been quicker than its
                    // pause at the start).
                    assert!(
                        !states.contains(&(proto::EventState::Pending as i32))
                            && !states.contains(&discarded),
                        "committed {producer:?} {tx:?}: {states:?}"
                    );
                } else {
                    assert_eq!(states, HashSet::from([discarded]), "{producer:?} {tx:?}");
                }
            }
            // Its timeout ran out first: it was discarded whole.
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(
                    states,
                    HashSet::from([proto::EventState::Discarded as i32]),
                    "{status:?}"
                );
            }
        }
    }

    /// Reads and admin calls with random fields: each answers, with an
    /// expected code.
    async fn read(&self, runner: &mut TestRunner) {
        let ids = sample(runner, &prop::collection::vec(text(), 0..4));
        let refs = sample(
            runner,
            &prop::collection::vec(
                (text(), text()).prop_map(|(producer, transaction_id)| proto::TransactionRef {
                    producer,
                    transaction_id,
                }),
                0..3,
            ),
        );
        let (producer, topic, page_token) = sample(runner, &(text(), text(), text()));
        let duration = sample(runner, &(any::<i64>(), any::<i32>()));
        let timestamp = sample(runner, &(any::<i64>(), any::<i32>()));
        let allowed = |result: Result<(), tonic::Status>, codes: &[Code]| {
            if let Err(status) = result {
                assert!(codes.contains(&status.code()), "{status:?}");
            }
        };
        let mut client = self.client.clone();
        let mut admin = self.admin.clone();
        match sample(runner, &(0u8..7)) {
            0 => allowed(
                client
                    .get_status(proto::GetStatusRequest {
                        event_ids: ids,
                        transactions: refs,
                    })
                    .await
                    .map(drop),
                &[Code::InvalidArgument],
            ),
            1 => {
                let watch = client
                    .watch_status(proto::WatchStatusRequest {
                        event_ids: ids,
                        transactions: refs,
                        producer,
                        after_cursor: duration.0 as u64,
                    })
                    .await;
                match watch {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        let first =
                            tokio::time::timeout(Duration::from_millis(100), stream.message())
                                .await;
                        // Unknown targets are told in the stream.
                        if let Ok(Err(status)) = first {
                            assert_eq!(status.code(), Code::NotFound, "a watch failed: {status:?}");
                        }
                    }
                    Err(status) => assert!(
                        matches!(status.code(), Code::InvalidArgument | Code::NotFound),
                        "{status:?}"
                    ),
                }
            }
            2 => {
                let status = client
                    .get_status(proto::GetStatusRequest::default())
                    .await
                    .expect_err("a GetStatus naming nothing");
                assert_eq!(status.code(), Code::InvalidArgument);
            }
            3 => allowed(
                admin
                    .list_prepared(proto::ListPreparedRequest {
                        producer,
                        older_than: Some(prost_types::Duration {
                            seconds: duration.0,
                            nanos: duration.1,
                        }),
                    })
                    .await
                    .map(drop),
                &[Code::InvalidArgument],
            ),
            4 => allowed(
                admin
                    .list_dead_letters(proto::ListDeadLettersRequest {
                        producer,
                        topic,
                        since: Some(prost_types::Timestamp {
                            seconds: timestamp.0,
                            nanos: timestamp.1,
                        }),
                        page_size: duration.1 as u32,
                        page_token,
                    })
                    .await
                    .map(drop),
                &[Code::InvalidArgument],
            ),
            5 => {
                let result = admin
                    .redrive(proto::RedriveRequest {
                        event_ids: ids,
                        producer,
                        topic,
                    })
                    .await;
                match result {
                    // Nothing is dead-lettered: the relay is paused.
                    Ok(response) => assert_eq!(response.into_inner().events, 0),
                    Err(status) => assert_eq!(status.code(), Code::InvalidArgument),
                }
            }
            _ => {
                admin
                    .get_backlog(proto::GetBacklogRequest {})
                    .await
                    .expect("GetBacklog");
                admin
                    .list_leases(proto::ListLeasesRequest {})
                    .await
                    .expect("ListLeases");
            }
        }
    }

    /// A request larger than the gateway decodes.
    async fn oversized(&self, runner: &mut TestRunner, n: u64) {
        let mut request = self.own_plan(runner, n).request;
        if request.events.is_empty() {
            request.events.push(proto::Event::default());
        }
        request.events[0].payload = vec![7; self.limits.max_request_bytes + 1].into();
        let status = self
            .client
            .clone()
            .append(request.clone())
            .await
            .expect_err("an oversized request");
        assert!(
            matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
            "{status:?}"
        );
        self.counts.appends.fetch_add(1, Ordering::Relaxed);
        self.counts.refused.fetch_add(1, Ordering::Relaxed);
        assert!(self.statuses(&caller_ids(&request)).await.is_empty());
        let (producer, tx) = token_names(&request);
        if name_looked_up(&producer) && name_looked_up(&tx) {
            assert!(self.transaction_statuses(&producer, &tx).await.is_empty());
        }
    }

    async fn run(self, seed: u64, total: u64, cases: Arc<AtomicU64>) {
        let mut seed_bytes = [0u8; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        seed_bytes[8..16].copy_from_slice(&self.worker.to_le_bytes());
        let mut runner = TestRunner::new_with_rng(
            proptest::test_runner::Config::default(),
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
        );
        loop {
            let n = cases.fetch_add(1, Ordering::Relaxed);
            if n >= total {
                break;
            }
            self.counts.calls.fetch_add(1, Ordering::Relaxed);
            match sample(&mut runner, &(0u8..100)) {
                0..=44 => self.unary(&mut runner, n).await,
                45..=59 => self.stream(&mut runner, n).await,
                60..=71 => self.raw(&mut runner, n).await,
                72..=79 => self.taken_id(&mut runner, n).await,
                80..=87 => self.resolve(&mut runner).await,
                88..=97 => self.read(&mut runner).await,
                _ => self.oversized(&mut runner, n).await,
            }
        }
    }
}

/// Sends the bytes as they are; reads an AppendResponse.
#[derive(Clone, Copy)]
struct RawCodec;

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = proto::AppendResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<proto::AppendResponse>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<proto::AppendRequest, proto::AppendResponse>::raw_decoder(
            tonic::codec::BufferSettings::default(),
        )
    }
}

/// Everything the store holds: (producer, transaction id) pairs, appends,
/// event ids.
type Stored = (
    HashSet<(String, String)>,
    HashSet<(String, String, u64)>,
    HashSet<Uuid>,
);

async fn stored_in(store_url: &str) -> Stored {
    if store_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(store_url).await.unwrap();
        let transactions: Vec<(String, String)> =
            sqlx::query_as("SELECT producer, transaction_id FROM outbox_transactions")
                .fetch_all(&pool)
                .await
                .unwrap();
        let appends: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT producer, transaction_id, sequence FROM outbox_appends")
                .fetch_all(&pool)
                .await
                .unwrap();
        let events: Vec<Vec<u8>> = sqlx::query_scalar("SELECT event_id FROM outbox_events")
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        (
            transactions.into_iter().collect(),
            appends
                .into_iter()
                .map(|(p, t, s)| (p, t, s as u64))
                .collect(),
            events
                .iter()
                .map(|id| Uuid::from_slice(id).unwrap())
                .collect(),
        )
    } else {
        let pool = sqlx::PgPool::connect(store_url).await.unwrap();
        let transactions: Vec<(String, String)> =
            sqlx::query_as("SELECT producer, transaction_id FROM outbox_transactions")
                .fetch_all(&pool)
                .await
                .unwrap();
        let appends: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT producer, transaction_id, sequence FROM outbox_appends")
                .fetch_all(&pool)
                .await
                .unwrap();
        pool.close().await;
        let events: Vec<Uuid> = support::stored_event_ids(store_url).await;
        let count = events.len();
        let events: HashSet<Uuid> = events.into_iter().collect();
        assert_eq!(events.len(), count, "an event id is stored twice");
        (
            transactions.into_iter().collect(),
            appends
                .into_iter()
                .map(|(p, t, s)| (p, t, s as u64))
                .collect(),
            events,
        )
    }
}

/// Part 2 on one store: `total` requests from `concurrency` callers.
async fn fuzz_gateway(store_url: String, total: u64, concurrency: u64) {
    let seed = env_number("OUTBOXD_FUZZ_SEED", rand::random::<u32>() as u64);
    eprintln!("fuzz: {total} requests, {concurrency} callers, OUTBOXD_FUZZ_SEED={seed}");
    let started = Instant::now();
    let kafka = MockKafka::start(1);
    let mut config = support::test_config(&store_url, &kafka.bootstrap);
    let limits = store_limits();
    config.limits = limits.clone();
    let lease_ttl = config.relay.lease_ttl;
    let gateway = Gateway::start(config).await;
    let client = gateway.client().await;
    let channel = gateway.channel().await;
    let mut admin = OutboxAdminClient::new(channel.clone());
    // Nothing is published, so that every event keeps its row and its
    // state is the ingest path's alone.
    admin
        .pause_relay(proto::PauseRelayRequest {})
        .await
        .expect("PauseRelay");
    // The relay reads the flag at each lease renewal (a third of the lease).
    tokio::time::sleep(lease_ttl / 3 + Duration::from_millis(500)).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let counts = Arc::new(Counts::default());
    let cases = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let fuzzer = Fuzzer {
                client: client.clone(),
                admin: admin.clone(),
                channel: channel.clone(),
                limits: limits.clone(),
                xid_resolvable: !store_url.starts_with("sqlite:"),
                ledger: ledger.clone(),
                counts: counts.clone(),
                worker,
            };
            tokio::spawn(fuzzer.run(seed, total, cases.clone()))
        })
        .collect();
    for worker in workers {
        worker
            .await
            .unwrap_or_else(|e| panic!("OUTBOXD_FUZZ_SEED={seed}: {e}"));
    }
    let (transactions, appends, events) = stored_in(&store_url).await;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let missing: Vec<_> = ledger.events.difference(&events).collect();
    let extra: Vec<_> = events.difference(&ledger.events).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "acknowledged but not stored: {missing:?}; stored but never acknowledged: {extra:?}"
    );
    assert_eq!(
        transactions, ledger.transactions,
        "the stored transactions are not those acknowledged"
    );
    assert_eq!(
        appends, ledger.appends,
        "the stored appends are not those acknowledged"
    );
    eprintln!(
        "fuzz: {} requests ({} appends: {} accepted, {} refused; {} in streams, {} raw) \
         at {concurrency} callers in {:.1?}; the store holds exactly the {} acknowledged events",
        counts.calls.load(Ordering::Relaxed),
        counts.appends.load(Ordering::Relaxed),
        counts.accepted.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.streamed.load(Ordering::Relaxed),
        counts.raw.load(Ordering::Relaxed),
        started.elapsed(),
        events.len(),
    );
    gateway.stop().await;
}

/// Part 2 on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_through_the_gateway_are_stored_whole_or_not_at_all_on_sqlite() {
    fuzz_gateway(
        support::sqlite_url(),
        env_number("OUTBOXD_FUZZ_STORE_CASES", 400),
        env_number("OUTBOXD_FUZZ_CONCURRENCY", 16),
    )
    .await;
}

/// Part 2 on PostgreSQL (its batched first-append path included).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_through_the_gateway_are_stored_whole_or_not_at_all_on_postgresql() {
    fuzz_gateway(
        support::fresh_database().await,
        (env_number("OUTBOXD_FUZZ_STORE_CASES", 400) / 10).max(50),
        env_number("OUTBOXD_FUZZ_CONCURRENCY", 16),
    )
    .await;
}

// ---------------------------------------------------------------------------
// Regressions found by the fuzzing above.

/// An identical retry of an append whose events carry caller-chosen ids is
/// answered as a duplicate with the same ids: its own ids are not "taken".
/// (PostgreSQL's batched path once refused it with ALREADY_EXISTS.)
async fn a_retry_with_caller_chosen_ids_is_a_duplicate(store_url: String) {
    let kafka = MockKafka::start(1);
    let gateway = Gateway::start(support::test_config(&store_url, &kafka.bootstrap)).await;
    let mut client = gateway.client().await;
    let mut request = support::append_request(
        support::immediate_token("retrier", "chosen-ids"),
        vec![
            support::keyed_event("retries", "k1", b"one"),
            support::keyed_event("retries", "k2", b"two"),
        ],
    );
    let chosen = [Uuid::now_v7(), Uuid::now_v7()];
    for (event, id) in request.events.iter_mut().zip(chosen) {
        event.event_id = id.to_string();
    }
    let first = client.append(request.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate);
    let retry = client
        .append(request)
        .await
        .expect("an identical retry is accepted")
        .into_inner();
    assert!(retry.duplicate);
    assert_eq!(retry.event_ids, first.event_ids);
    assert_eq!(
        retry.event_ids,
        chosen.map(|id| id.to_string()).to_vec(),
        "the caller's ids"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_caller_chosen_ids_is_a_duplicate_on_postgresql() {
    a_retry_with_caller_chosen_ids_is_a_duplicate(support::fresh_database().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_caller_chosen_ids_is_a_duplicate_on_sqlite() {
    a_retry_with_caller_chosen_ids_is_a_duplicate(support::sqlite_url()).await;
}

/// A NUL character in a name a request looks up (which no stored name can
/// hold) is INVALID_ARGUMENT naming the field, on every RPC that takes one.
/// (PostgreSQL's text refuses it: these answered INTERNAL.)
async fn a_nul_in_a_looked_up_name_is_invalid_argument(store_url: String) {
    let kafka = MockKafka::start(1);
    let gateway = Gateway::start(support::test_config(&store_url, &kafka.bootstrap)).await;
    let mut client = gateway.client().await;
    let mut admin = OutboxAdminClient::new(gateway.channel().await);
    let nul = "or\0ders".to_owned();
    let field_of = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status
            .get_details_bad_request()
            .expect("BadRequest details")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect::<Vec<_>>()
    };
    let reference = proto::TransactionRef {
        producer: nul.clone(),
        transaction_id: "t".into(),
    };
    let status = client
        .get_status(proto::GetStatusRequest {
            transactions: vec![reference.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(status), ["transactions[0].producer"]);
    let status = client
        .watch_status(proto::WatchStatusRequest {
            transactions: vec![proto::TransactionRef {
                producer: "p".into(),
                transaction_id: nul.clone(),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(status), ["transactions[0].transaction_id"]);
    let status = client
        .watch_status(proto::WatchStatusRequest {
            producer: nul.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(status), ["producer"]);
    let status = client
        .commit(proto::CommitRequest {
            producer: nul.clone(),
            transaction_id: "t".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(status), ["producer"]);
    let status = client
        .abort(proto::AbortRequest {
            producer: "p".into(),
            transaction_id: nul.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(status), ["transaction_id"]);
    let status = admin
        .list_prepared(proto::ListPreparedRequest {
            producer: nul.clone(),
            older_than: None,
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(status), ["producer"]);
    let status = admin
        .list_dead_letters(proto::ListDeadLettersRequest {
            topic: nul.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(status), ["topic"]);
    let status = admin
        .redrive(proto::RedriveRequest {
            producer: nul,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(status), ["producer"]);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_looked_up_name_is_invalid_argument_on_postgresql() {
    a_nul_in_a_looked_up_name_is_invalid_argument(support::fresh_database().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_looked_up_name_is_invalid_argument_on_sqlite() {
    a_nul_in_a_looked_up_name_is_invalid_argument(support::sqlite_url()).await;
}

/// Extreme but well-formed durations and times in admin lookups answer
/// (OK or INVALID_ARGUMENT naming the field), never INTERNAL.
async fn extreme_times_in_lookups_are_answered(store_url: String) {
    let kafka = MockKafka::start(1);
    let gateway = Gateway::start(support::test_config(&store_url, &kafka.bootstrap)).await;
    let mut admin = OutboxAdminClient::new(gateway.channel().await);
    for seconds in [i64::MAX, 1 << 40, 10_000_000_000_000] {
        let result = admin
            .list_prepared(proto::ListPreparedRequest {
                producer: "p".into(),
                older_than: Some(prost_types::Duration { seconds, nanos: 0 }),
            })
            .await;
        if let Err(status) = result {
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "older_than {seconds}s: {status:?}"
            );
        }
    }
    for seconds in [
        -8_210_298_412_800,
        8_210_298_412_799,
        -210_000_000_000,
        9_300_000_000_000,
    ] {
        let result = admin
            .list_dead_letters(proto::ListDeadLettersRequest {
                since: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                ..Default::default()
            })
            .await;
        if let Err(status) = result {
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "since {seconds}s: {status:?}"
            );
        }
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_times_in_lookups_are_answered_on_postgresql() {
    extreme_times_in_lookups_are_answered(support::fresh_database().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_times_in_lookups_are_answered_on_sqlite() {
    extreme_times_in_lookups_are_answered(support::sqlite_url()).await;
}
