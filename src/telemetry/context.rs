//! W3C trace context between `tracing` spans, gRPC metadata, the store and
//! Kafka headers.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::domain::TraceContext;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

impl Extractor for &TraceContext {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent.as_deref(),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// Reads `traceparent` / `tracestate` from HTTP/2 headers (gRPC metadata).
pub(super) struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The OpenTelemetry context a stored or received trace context names: the
/// parent of a span that continues it.
pub fn parent_context(trace: &TraceContext) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&trace)
}

/// The remote span a stored or received trace context names, if it is valid.
pub fn span_context(trace: &TraceContext) -> Option<SpanContext> {
    let cx = parent_context(trace);
    let span_context = cx.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// The trace context of `span` in W3C form, when it is an OpenTelemetry
/// span (tracing on, and the span enabled).
pub fn trace_context_of(span: &tracing::Span) -> Option<TraceContext> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut fields = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&cx, &mut fields as &mut dyn Injector);
    let traceparent = fields.remove(TRACEPARENT)?;
    Some(TraceContext {
        traceparent: Some(traceparent),
        tracestate: fields.remove(TRACESTATE).filter(|state| !state.is_empty()),
    })
}

/// The trace context an append stores for its events: with tracing on, that
/// of the RPC's server span (itself a child of the caller's span), so that
/// the relay's publish span sits under it; with tracing off, the caller's
/// own, forwarded as it came.
pub fn for_append(caller: TraceContext) -> TraceContext {
    if !super::tracing_enabled() {
        return caller;
    }
    trace_context_of(&tracing::Span::current()).unwrap_or(caller)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_w3c_traceparent() {
        let trace = TraceContext {
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: Some("vendor=1".into()),
        };
        let remote = span_context(&trace).unwrap();
        assert_eq!(
            remote.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(remote.span_id().to_string(), "b7ad6b7169203331");
        assert!(remote.is_sampled());
        assert!(remote.is_remote());
        assert_eq!(remote.trace_state().header(), "vendor=1");
        assert!(span_context(&TraceContext::default()).is_none());
        assert!(
            span_context(&TraceContext {
                traceparent: Some("00-x".into()),
                tracestate: None
            })
            .is_none()
        );
    }

    #[test]
    fn without_tracing_the_callers_context_is_kept() {
        let caller = TraceContext {
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: None,
        };
        assert_eq!(for_append(caller.clone()), caller);
    }
}
