//! A span sink: an OTLP/gRPC trace receiver on a local port that keeps or
//! counts what it is sent. `outboxd bench --trace` exports to it, and tests
//! read from it what a real collector would have received.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// A span as the sink received it, ids in lowercase hex.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service_name: String,
    /// The span's name (e.g. `outboxd.v1.Outbox/Append`, `orders publish`).
    pub name: String,
    /// OTLP's span kind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// Attribute values as text.
    pub attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    /// Event names, in order, each with its attributes as text.
    pub events: Vec<(String, BTreeMap<String, String>)>,
    /// OTLP's status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
}

impl ReceivedSpan {
    /// An attribute's value as text.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// OTLP span kinds, as [`ReceivedSpan::kind`] holds them.
pub mod kind {
    /// Work inside outboxd (a store commit, token resolution).
    pub const INTERNAL: i32 = 1;
    /// The serving side of an RPC.
    pub const SERVER: i32 = 2;
    /// Sending a record to Kafka.
    pub const PRODUCER: i32 = 4;
}

#[derive(Clone, Default)]
struct Received {
    /// Kept spans; `None` when only counting.
    spans: Option<Arc<Mutex<Vec<ReceivedSpan>>>>,
    count: Arc<AtomicU64>,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|value| value.value.as_ref()) {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(any_value::Value::BoolValue(value)) => value.to_string(),
        Some(any_value::Value::IntValue(value)) => value.to_string(),
        Some(any_value::Value::DoubleValue(value)) => value.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        for resource_spans in &request.resource_spans {
            let service_name = resource_spans
                .resource
                .as_ref()
                .and_then(|resource| {
                    resource
                        .attributes
                        .iter()
                        .find(|kv| kv.key == "service.name")
                })
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for scope_spans in &resource_spans.scope_spans {
                self.count
                    .fetch_add(scope_spans.spans.len() as u64, Ordering::Relaxed);
                let Some(kept) = &self.spans else {
                    continue;
                };
                let converted = scope_spans.spans.iter().map(|span| ReceivedSpan {
                    service_name: service_name.clone(),
                    name: span.name.clone(),
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                    links: span
                        .links
                        .iter()
                        .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                        .collect(),
                    events: span
                        .events
                        .iter()
                        .map(|event| (event.name.clone(), attributes(&event.attributes)))
                        .collect(),
                    status_code: span.status.as_ref().map_or(0, |status| status.code),
                });
                kept.lock().expect("sink lock").extend(converted);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP trace receiver on `127.0.0.1`, until [`SpanSink::stop`] or drop.
pub struct SpanSink {
    /// Where it listens.
    pub address: SocketAddr,
    received: Received,
    shutdown: CancellationToken,
}

impl SpanSink {
    /// Starts a sink on a free port; with `keep`, it keeps every span for
    /// [`SpanSink::spans`], otherwise it only counts them.
    pub async fn start(keep: bool) -> std::io::Result<SpanSink> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let address = listener.local_addr()?;
        let received = Received {
            spans: keep.then(Default::default),
            count: Arc::default(),
        };
        let shutdown = CancellationToken::new();
        let service =
            TraceServiceServer::new(received.clone()).max_decoding_message_size(64 * 1024 * 1024);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled())
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "span sink failed");
            }
        });
        Ok(SpanSink {
            address,
            received,
            shutdown,
        })
    }

    /// The OTLP endpoint to configure (`telemetry.otlp_endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Spans received so far.
    pub fn span_count(&self) -> u64 {
        self.received.count.load(Ordering::Relaxed)
    }

    /// Every span received so far (empty when only counting).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .spans
            .as_ref()
            .map(|spans| spans.lock().expect("sink lock").clone())
            .unwrap_or_default()
    }

    /// Stops listening.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for SpanSink {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
