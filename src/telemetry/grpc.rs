//! A tower layer around the gRPC server: a request counter and a latency
//! histogram per method and status code, and, with tracing on, the server
//! span of each RPC, parented by the caller's `traceparent`.
//!
//! The status code of a gRPC call is in the response headers when the call
//! failed before answering, and otherwise in the trailers at the end of the
//! body, so a call is booked when its body ends (for streams: when the stream
//! ends), not when the handler returns.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::context::HeaderExtractor;
use super::names;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Services whose methods are named in metrics; any other path counts as
/// `other`, so that made-up paths cannot grow the metrics without bound.
const KNOWN_SERVICES: [&str; 5] = [
    "outboxd.v1.Outbox",
    "outboxd.v1.OutboxAdmin",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// gRPC status code names, by code.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const CANCELLED: i32 = 1;
const UNKNOWN: i32 = 2;
const RESOURCE_EXHAUSTED: i32 = 8;

/// Whether a server span with this code is an error (OpenTelemetry's gRPC
/// conventions: a caller's mistake is not the server's error).
fn is_server_error(code: i32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// The layer; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTelemetryLayer;

impl<S> Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetry { inner }
    }
}

/// The service [`GrpcTelemetryLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct GrpcTelemetry<S> {
    inner: S,
}

/// `/package.Service/Method` as (service, method) labels.
fn rpc_names(path: &str) -> (&'static str, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    match KNOWN_SERVICES.iter().find(|known| **known == service) {
        Some(known)
            if !method.is_empty()
                && method.len() <= 64
                && method.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            (known, method.to_owned())
        }
        _ => ("other", "other".to_owned()),
    }
}

/// What is needed to book one call when it ends.
struct Call {
    service: &'static str,
    method: String,
    started: Instant,
    span: tracing::Span,
}

impl Call {
    fn finish(self, code: i32) {
        let name = usize::try_from(code)
            .ok()
            .and_then(|code| CODE_NAMES.get(code))
            .copied()
            .unwrap_or("UNKNOWN");
        metrics::counter!(
            names::GRPC_REQUESTS,
            "service" => self.service,
            "method" => self.method.clone(),
            "code" => name,
        )
        .increment(1);
        metrics::histogram!(
            names::GRPC_REQUEST_SECONDS,
            "service" => self.service,
            "method" => self.method,
        )
        .record(self.started.elapsed().as_secs_f64());
        if !self.span.is_disabled() {
            self.span.record("rpc.grpc.status_code", code as i64);
            if is_server_error(code) {
                self.span.record("otel.status_code", "ERROR");
            }
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
}

/// The server span of one call, continuing the caller's trace.
fn server_span<B>(request: &http::Request<B>, service: &str, method: &str) -> tracing::Span {
    let span = tracing::info_span!(
        target: super::SPAN_TARGET,
        "grpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    let _ = span.set_parent(parent);
    span
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcTelemetry<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let (service, method) = rpc_names(request.uri().path());
        let span = if super::tracing_enabled() && service != "other" {
            server_span(&request, service, &method)
        } else {
            tracing::Span::none()
        };
        let call = Call {
            service,
            method,
            started: Instant::now(),
            span: span.clone(),
        };
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                match response.await {
                    Ok(response) => {
                        let early = grpc_status(response.headers());
                        let (parts, body) = response.into_parts();
                        Ok(http::Response::from_parts(
                            parts,
                            ObservedBody {
                                inner: body,
                                call: Some(call),
                                early,
                            },
                        ))
                    }
                    Err(error) => {
                        let error: BoxError = error.into();
                        let code = if error.is::<tower::load_shed::error::Overloaded>() {
                            RESOURCE_EXHAUSTED
                        } else {
                            UNKNOWN
                        };
                        call.finish(code);
                        Err(error)
                    }
                }
            }
            .instrument(span),
        )
    }
}

pin_project_lite::pin_project! {
    /// A response body that books its call when it ends.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
        // The status sent in the headers (a call that failed at once).
        early: Option<i32>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped before its end: the caller went away.
            if let Some(call) = this.call.take() {
                call.finish(this.early.unwrap_or(CANCELLED));
            }
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = {
            let _entered = this.call.as_ref().map(|call| call.span.enter());
            this.inner.poll_frame(cx)
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.finish(grpc_status(trailers).unwrap_or(UNKNOWN));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = this.call.take() {
                    call.finish(UNKNOWN);
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = this.call.take() {
                    // No trailers: the status came in the headers.
                    call.finish(this.early.unwrap_or(UNKNOWN));
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_known_methods_only() {
        assert_eq!(
            rpc_names("/outboxd.v1.Outbox/Append"),
            ("outboxd.v1.Outbox", "Append".to_owned())
        );
        assert_eq!(
            rpc_names("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check".to_owned())
        );
        assert_eq!(rpc_names("/made.up.Service/X"), ("other", "other".into()));
        assert_eq!(
            rpc_names("/outboxd.v1.Outbox/../../etc"),
            ("other", "other".into())
        );
        assert_eq!(rpc_names("/"), ("other", "other".into()));
    }
}
