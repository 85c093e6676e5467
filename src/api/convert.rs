//! proto ↔ domain conversions. Everything a caller sent is checked here or in
//! `domain::validate_batch` before anything is stored.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tonic::metadata::MetadataMap;

use super::error::ApiError;
use crate::domain::{
    AppendBatch, AppendOutcome, EventId, EventState, EventStatus, FieldViolation, Header, Limits,
    NewEvent, TokenMode, TraceContext, TransactionRef, TransactionToken, validate_batch,
};
use crate::proto;

/// Most ids or transactions one status request may name.
pub const MAX_STATUS_TARGETS: usize = 10_000;

/// The caller's W3C trace context, from gRPC metadata.
pub fn trace_context(metadata: &MetadataMap) -> TraceContext {
    let text = |name: &str| {
        metadata
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    TraceContext {
        traceparent: text("traceparent"),
        tracestate: text("tracestate"),
    }
}

/// A violation when `value` holds a NUL character: PostgreSQL's text cannot
/// hold one, so no stored producer, transaction or topic has one, and a
/// lookup by such a name is refused rather than failing in the store.
pub fn nul_violation(field: impl Into<String>, value: &str) -> Option<FieldViolation> {
    value
        .contains('\0')
        .then(|| FieldViolation::new(field, "must not contain NUL characters"))
}

fn timestamp_to_utc(timestamp: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    DateTime::from_timestamp(timestamp.seconds, nanos)
}

/// A time as a protobuf `Timestamp` (nanosecond precision kept).
pub fn utc_to_timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

fn token_mode(token: &proto::TransactionToken, violations: &mut Vec<FieldViolation>) -> TokenMode {
    match proto::TokenMode::try_from(token.mode) {
        Ok(proto::TokenMode::Unspecified | proto::TokenMode::Immediate) => TokenMode::Immediate,
        Ok(proto::TokenMode::TwoPhase) => {
            let timeout = token
                .timeout
                .as_ref()
                .and_then(|d| {
                    (d.seconds >= 0 && d.nanos >= 0)
                        .then(|| Duration::new(d.seconds as u64, d.nanos as u32))
                })
                .unwrap_or_default();
            TokenMode::TwoPhase { timeout }
        }
        Ok(proto::TokenMode::PostgresXid) => {
            if token.postgres_xid == 0 {
                violations.push(FieldViolation::new(
                    "token.postgres_xid",
                    "postgres_xid tokens need the caller's pg_current_xact_id()",
                ));
            }
            if token.postgres_system_id == 0 {
                violations.push(FieldViolation::new(
                    "token.postgres_system_id",
                    "postgres_xid tokens need the caller's cluster system_identifier",
                ));
            }
            TokenMode::PostgresXid {
                caller_xid: token.postgres_xid,
                system_id: token.postgres_system_id,
            }
        }
        Err(_) => {
            violations.push(FieldViolation::new(
                "token.mode",
                format!("unknown token mode {}", token.mode),
            ));
            TokenMode::Immediate
        }
    }
}

/// Converts and validates one append request.
pub fn append_batch(
    request: proto::AppendRequest,
    trace: TraceContext,
    limits: &Limits,
) -> Result<AppendBatch, ApiError> {
    let mut violations = Vec::new();
    let token = request.token.unwrap_or_default();
    let mode = token_mode(&token, &mut violations);
    let mut events = Vec::with_capacity(request.events.len());
    for (index, event) in request.events.into_iter().enumerate() {
        let event_id = if event.event_id.is_empty() {
            None
        } else {
            match EventId::parse(&event.event_id) {
                Some(id) => Some(id),
                None => {
                    violations.push(FieldViolation::new(
                        format!("events[{index}].event_id"),
                        "must be a UUID (e.g. 0190f1c2-7d3e-7a4b-8c5d-6e7f80910203) or empty",
                    ));
                    None
                }
            }
        };
        let occurred_at = match &event.occurred_at {
            None => None,
            Some(timestamp) => match timestamp_to_utc(timestamp) {
                Some(time) => Some(time),
                None => {
                    violations.push(FieldViolation::new(
                        format!("events[{index}].occurred_at"),
                        "is not a valid timestamp",
                    ));
                    None
                }
            },
        };
        events.push(NewEvent {
            event_id,
            topic: event.topic,
            key: event.key.map(|key| key.to_vec()),
            payload: event.payload.to_vec(),
            headers: event
                .headers
                .into_iter()
                .map(|h| Header {
                    key: h.key,
                    value: h.value.to_vec(),
                })
                .collect(),
            aggregate_type: event.aggregate_type,
            aggregate_id: event.aggregate_id,
            event_type: event.event_type,
            occurred_at,
        });
    }
    let batch = AppendBatch {
        token: TransactionToken {
            producer: token.producer,
            transaction_id: token.transaction_id,
            mode,
        },
        sequence: request.sequence,
        events,
        trace,
    };
    violations.extend(validate_batch(&batch, limits));
    if !violations.is_empty() {
        return Err(ApiError::invalid(violations));
    }
    Ok(batch)
}

/// The response to a stored (or duplicate) append, echoing the stream's
/// `correlation`.
pub fn append_response(outcome: AppendOutcome, correlation: u64) -> proto::AppendResponse {
    proto::AppendResponse {
        event_ids: outcome.event_ids.iter().map(ToString::to_string).collect(),
        duplicate: outcome.duplicate,
        correlation,
        failure: None,
    }
}

/// The in-stream form of a failed append.
pub fn append_failure(error: &ApiError, correlation: u64) -> proto::AppendResponse {
    proto::AppendResponse {
        event_ids: Vec::new(),
        duplicate: false,
        correlation,
        failure: Some(proto::AppendFailure {
            code: error.code() as i32,
            message: match error {
                ApiError::Internal(_) => "internal error".into(),
                other => other.to_string(),
            },
            field_violations: error
                .violations()
                .iter()
                .map(|v| proto::FieldViolation {
                    field: v.field.clone(),
                    description: v.description.clone(),
                })
                .collect(),
        }),
    }
}

/// An event state as the API names it.
pub fn event_state(state: EventState) -> proto::EventState {
    match state {
        EventState::Pending => proto::EventState::Pending,
        EventState::Ready => proto::EventState::Ready,
        EventState::Retrying => proto::EventState::Retrying,
        EventState::Published => proto::EventState::Published,
        EventState::DeadLettered => proto::EventState::DeadLettered,
        EventState::Discarded => proto::EventState::Discarded,
    }
}

/// An event's status as the API reports it.
pub fn event_status(status: &EventStatus) -> proto::EventStatus {
    proto::EventStatus {
        event_id: status.event_id.to_string(),
        producer: status.producer.clone(),
        transaction_id: status.transaction_id.clone(),
        sequence: status.sequence,
        topic: status.topic.clone(),
        state: event_state(status.state) as i32,
        partition: status.partition,
        offset: status.offset,
        attempts: status.attempts,
        reason: status.reason.clone(),
        updated_at: Some(utc_to_timestamp(status.updated_at)),
        cursor: status.cursor,
    }
}

/// Parses the event ids of a request; INVALID_ARGUMENT naming each id that
/// is no UUID (as `field[i]`), or when there are more than
/// [`MAX_STATUS_TARGETS`].
pub fn event_ids(ids: &[String], field: &str) -> Result<Vec<EventId>, ApiError> {
    let mut violations = Vec::new();
    let mut parsed = Vec::with_capacity(ids.len());
    for (index, id) in ids.iter().enumerate() {
        match EventId::parse(id) {
            Some(id) => parsed.push(id),
            None => violations.push(FieldViolation::new(
                format!("{field}[{index}]"),
                "must be a UUID",
            )),
        }
    }
    if ids.len() > MAX_STATUS_TARGETS {
        violations.push(FieldViolation::new(
            field,
            format!(
                "names {} events; the limit is {MAX_STATUS_TARGETS}",
                ids.len()
            ),
        ));
    }
    if violations.is_empty() {
        Ok(parsed)
    } else {
        Err(ApiError::invalid(violations))
    }
}

/// The (producer, transaction id) of a Commit or Abort.
pub fn transaction_ref(
    producer: String,
    transaction_id: String,
) -> Result<TransactionRef, ApiError> {
    let mut violations = Vec::new();
    if producer.is_empty() {
        violations.push(FieldViolation::new("producer", "must not be empty"));
    }
    if transaction_id.is_empty() {
        violations.push(FieldViolation::new("transaction_id", "must not be empty"));
    }
    violations.extend(nul_violation("producer", &producer));
    violations.extend(nul_violation("transaction_id", &transaction_id));
    if violations.is_empty() {
        Ok(TransactionRef {
            producer,
            transaction_id,
        })
    } else {
        Err(ApiError::invalid(violations))
    }
}

/// An open two_phase transaction as `ListPrepared` reports it.
pub fn prepared_transaction(
    prepared: &crate::store::PreparedTransaction,
) -> proto::PreparedTransaction {
    proto::PreparedTransaction {
        producer: prepared.producer.clone(),
        transaction_id: prepared.transaction_id.clone(),
        created_at: Some(utc_to_timestamp(prepared.created_at)),
        expires_at: Some(utc_to_timestamp(prepared.expires_at)),
        events: prepared.events,
    }
}

/// The range a ListDeadLetters `since` is brought into, in seconds of the
/// Unix epoch: 0001-01-01 to 9999-12-31T23:59:59Z.
const SINCE_RANGE: (i64, i64) = (-62_135_596_800, 253_402_300_799);

/// A dead-letter filter from a request's fields: an empty producer or topic
/// means any; `since` is clamped to the years 1 to 9999. INVALID_ARGUMENT
/// for a NUL character or a timestamp that is no time.
pub fn dead_letter_filter(
    event_ids: Vec<EventId>,
    producer: String,
    topic: String,
    since: Option<prost_types::Timestamp>,
) -> Result<crate::store::DeadLetterFilter, ApiError> {
    let mut violations: Vec<FieldViolation> = nul_violation("producer", &producer)
        .into_iter()
        .chain(nul_violation("topic", &topic))
        .collect();
    let since = match since {
        None => None,
        Some(timestamp) => {
            let since = timestamp_to_utc(&timestamp);
            if since.is_none() {
                violations.push(FieldViolation::new("since", "is not a valid timestamp"));
            }
            // Years 1 to 9999 hold every stored time and ask the same;
            // PostgreSQL cannot compare with times far beyond them.
            since.map(|since| {
                let bound = |seconds| DateTime::from_timestamp(seconds, 0).expect("in range");
                since.clamp(bound(SINCE_RANGE.0), bound(SINCE_RANGE.1))
            })
        }
    };
    if !violations.is_empty() {
        return Err(ApiError::invalid(violations));
    }
    Ok(crate::store::DeadLetterFilter {
        event_ids,
        producer: (!producer.is_empty()).then_some(producer),
        topic: (!topic.is_empty()).then_some(topic),
        since,
    })
}

/// Checks the transactions a status request names: INVALID_ARGUMENT for an
/// empty or NUL-holding producer or transaction id (as `field[i].…`), or
/// for more than [`MAX_STATUS_TARGETS`].
pub fn transaction_refs(
    refs: Vec<proto::TransactionRef>,
    field: &str,
) -> Result<Vec<TransactionRef>, ApiError> {
    let mut violations = Vec::new();
    if refs.len() > MAX_STATUS_TARGETS {
        violations.push(FieldViolation::new(
            field,
            format!(
                "names {} transactions; the limit is {MAX_STATUS_TARGETS}",
                refs.len()
            ),
        ));
    }
    for (index, r) in refs.iter().enumerate() {
        if r.producer.is_empty() {
            violations.push(FieldViolation::new(
                format!("{field}[{index}].producer"),
                "must not be empty",
            ));
        }
        if r.transaction_id.is_empty() {
            violations.push(FieldViolation::new(
                format!("{field}[{index}].transaction_id"),
                "must not be empty",
            ));
        }
        violations.extend(nul_violation(
            format!("{field}[{index}].producer"),
            &r.producer,
        ));
        violations.extend(nul_violation(
            format!("{field}[{index}].transaction_id"),
            &r.transaction_id,
        ));
    }
    if !violations.is_empty() {
        return Err(ApiError::invalid(violations));
    }
    Ok(refs
        .into_iter()
        .map(|r| TransactionRef {
            producer: r.producer,
            transaction_id: r.transaction_id,
        })
        .collect())
}
