//! outboxd's own spans, named and attributed by OpenTelemetry's semantic
//! conventions. Each maker returns a disabled span when tracing is off, so
//! the code that uses them runs the same either way.

use opentelemetry::KeyValue;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{SPAN_TARGET, parent_context, span_context, tracing_enabled};
use std::collections::HashSet;

use crate::domain::{EventStatus, TraceContext};
use crate::store::RelayRow;

/// The span of one store transaction that commits coalesced appends. A
/// batch has many parents, so it is a root linked to the span of every
/// append it carries.
pub fn commit_span<'a>(
    db_system: &'static str,
    appends: impl ExactSizeIterator<Item = &'a TraceContext>,
    events: usize,
) -> tracing::Span {
    if !tracing_enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        parent: None,
        "commit",
        otel.name = "append commit",
        otel.kind = "internal",
        otel.status_code = Empty,
        db.system.name = db_system,
        db.operation.name = "append",
        db.operation.batch.size = appends.len(),
        outboxd.events = events,
        error.type = Empty,
    );
    for trace in appends {
        if let Some(link) = span_context(trace) {
            span.add_link(link);
        }
    }
    span
}

/// The PRODUCER span of one record from the relay's hand-off to Kafka's
/// acknowledgement, a child of the event's stored trace context. Its own
/// context is what the record's `traceparent` header carries.
pub fn publish_span(row: &RelayRow) -> tracing::Span {
    if !tracing_enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        parent: None,
        "publish",
        otel.name = %format_args!("{} publish", row.topic),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %row.topic,
        messaging.message.id = %row.event_id,
        messaging.kafka.message.key = Empty,
        messaging.destination.partition.id = Empty,
        messaging.kafka.offset = Empty,
        outboxd.attempt = row.attempts + 1,
        error.type = Empty,
    );
    if let Some(key) = &row.kafka_key {
        span.record(
            "messaging.kafka.message.key",
            String::from_utf8_lossy(key).as_ref(),
        );
    }
    let stored = TraceContext {
        traceparent: row.traceparent.clone(),
        tracestate: row.tracestate.clone(),
    };
    if span_context(&stored).is_some() {
        let _ = span.set_parent(parent_context(&stored));
    }
    span
}

/// Books Kafka's acknowledgement on a publish span.
pub fn published(span: &tracing::Span, partition: i32, offset: i64) {
    if span.is_disabled() {
        return;
    }
    span.record(
        "messaging.destination.partition.id",
        partition.to_string().as_str(),
    );
    span.record("messaging.kafka.offset", offset);
}

/// Marks a span as failed, with a short error type.
pub fn failed(span: &tracing::Span, error_type: &str) {
    if span.is_disabled() {
        return;
    }
    span.record("error.type", error_type);
    span.record("otel.status_code", "ERROR");
}

/// Marks token resolutions made in the background (expired two_phase
/// transactions, postgres_xid tokens): one short span per batch, with a
/// `token resolved` event per transaction saying what became of its events.
pub fn resolutions(changed: &[EventStatus]) {
    if !tracing_enabled() || changed.is_empty() {
        return;
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        parent: None,
        "resolve",
        otel.name = "resolve tokens",
        otel.kind = "internal",
        outboxd.events = changed.len(),
    );
    let mut seen = HashSet::new();
    for status in changed {
        if seen.insert((&status.producer, &status.transaction_id)) {
            span.add_event("token resolved", resolution_attributes(status));
        }
    }
}

/// What a `token resolved` event says about one transaction.
pub fn resolution_attributes(status: &EventStatus) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new("outboxd.producer", status.producer.clone()),
        KeyValue::new("outboxd.transaction_id", status.transaction_id.clone()),
        KeyValue::new("outboxd.event.state", format!("{:?}", status.state)),
    ];
    if !status.reason.is_empty() {
        attributes.push(KeyValue::new("outboxd.reason", status.reason.clone()));
    }
    attributes
}

/// Adds an event to the current span (an RPC's, a publish's), when tracing.
pub fn span_event(name: &'static str, attributes: Vec<KeyValue>) {
    if tracing_enabled() {
        tracing::Span::current().add_event(name, attributes);
    }
}
