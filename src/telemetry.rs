//! Logging (`tracing` to stderr, filtered by `RUST_LOG`, as text or JSON),
//! OpenTelemetry spans exported over OTLP when configured, Prometheus
//! metrics and the `/healthz` and `/readyz` probes (served on
//! `metrics_listen`).

mod context;
mod export;
mod grpc;
mod json;
mod settings;
pub mod sink;
mod spans;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use context::{for_append, parent_context, span_context, trace_context_of};
pub use grpc::{GrpcTelemetry, GrpcTelemetryLayer, ObservedBody};
pub use settings::{LogFormat, TelemetryConfig};
pub use spans::{
    commit_span, failed, publish_span, published, resolution_attributes, resolutions, span_event,
};

use crate::relay::{BreakerState, RelayHealth};
use crate::store::Store;

/// Target of outboxd's OpenTelemetry spans. JSON log lines made inside them
/// carry their ids whatever level `RUST_LOG` lets through.
pub const SPAN_TARGET: &str = "outboxd::span";

/// Set once spans are exported: the code that makes spans asks first, so
/// that with tracing off nothing of it runs.
static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether OpenTelemetry spans are made and exported.
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `[telemetry]` or the OTEL_* variables say something unusable.
    #[error("invalid telemetry configuration: {0}")]
    Invalid(String),
    /// The exporter could not be built (e.g. an endpoint that is no URI).
    #[error("cannot build the OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The OTLP endpoint configured.
        endpoint: String,
        /// What the exporter builder said.
        message: String,
    },
}

/// Keeps the span exporter running; [`Telemetry::shutdown`] exports what is
/// left.
#[must_use = "dropping the handle leaves queued spans unexported"]
pub struct Telemetry {
    exporting: Option<Exporting>,
}

/// The parts of a running span export.
struct Exporting {
    /// Makes the spans; dropping it would stop recording them.
    provider: SdkTracerProvider,
    /// Tells the export thread to send what is queued and stop.
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl Telemetry {
    /// Stops exporting after one last export of queued spans (bounded).
    pub async fn shutdown(self) {
        if let Some(Exporting {
            provider,
            stop,
            thread,
        }) = self.exporting
        {
            TRACING.store(false, Ordering::Relaxed);
            // Ends nothing still open; spans ended so far are queued.
            let _ = provider.force_flush();
            stop.cancel();
            match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(())) => {}
                _ => tracing::warn!("the span export thread failed"),
            }
        }
    }
}

/// Installs the global subscriber: logs in `config.log_format`, and with an
/// `otlp_endpoint`, spans exported to it from a thread of their own. A
/// second call sets up nothing.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    config.validate().map_err(TelemetryError::Invalid)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,rdkafka=warn,sqlx=warn,h2=warn,tower=warn,hyper=warn")
    });
    let logs = match config.log_format {
        // Text lines stay as they were: outboxd's spans are not shown
        // (unless RUST_LOG asks for `outboxd::span`).
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        // JSON lines name the span they were written in, whatever level
        // RUST_LOG lets through; its fields are not written, so not kept.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(json::JsonLines)
            .fmt_fields(json::NoSpanFields)
            .with_filter(
                filter.add_directive(
                    format!("{SPAN_TARGET}=info")
                        .parse()
                        .expect("a valid directive"),
                ),
            )
            .boxed(),
    };
    let Some(endpoint) = &config.otlp_endpoint else {
        let _ = tracing_subscriber::registry().with(logs).try_init();
        return Ok(Telemetry { exporting: None });
    };
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("telemetry.sdk.language", "rust"),
            KeyValue::new("telemetry.sdk.name", "opentelemetry"),
        ])
        .with_attributes(
            config
                .resource_attributes
                .iter()
                .map(|(key, value)| KeyValue::new(key.clone(), value.clone())),
        )
        .build();
    let (processor, queue) = export::QueueingProcessor::new(config.max_queued_spans);
    let stop = CancellationToken::new();
    let thread = export::spawn(endpoint.clone(), resource.clone(), queue, stop.clone()).map_err(
        |message| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            message,
        },
    )?;
    let ratio = Sampler::TraceIdRatioBased(config.sampling_ratio);
    let sampler = if config.parent_based {
        Sampler::ParentBased(Box::new(ratio))
    } else {
        ratio
    };
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("outboxd");
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target("outboxd", tracing::Level::INFO));
    if tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .is_err()
    {
        stop.cancel();
        return Ok(Telemetry { exporting: None });
    }
    TRACING.store(true, Ordering::Relaxed);
    tracing::info!(%endpoint, service_name = %config.service_name, sampling_ratio = config.sampling_ratio, "exporting spans over OTLP");
    Ok(Telemetry {
        exporting: Some(Exporting {
            provider,
            stop,
            thread,
        }),
    })
}

/// Metric names, in one place.
pub mod names {
    /// Append requests by outcome: stored, duplicate, rejected, failed.
    pub const APPEND_REQUESTS: &str = "outboxd_append_requests_total";
    /// New events stored (duplicates not counted).
    pub const EVENTS_APPENDED: &str = "outboxd_events_appended_total";
    /// Events Kafka acknowledged.
    pub const EVENTS_PUBLISHED: &str = "outboxd_events_published_total";
    /// Events given up on after a failed delivery.
    pub const EVENTS_DEAD_LETTERED: &str = "outboxd_events_dead_lettered_total";
    /// Failed deliveries that will be tried again.
    pub const DELIVERY_RETRIES: &str = "outboxd_delivery_retries_total";
    /// Seconds from append to Kafka's acknowledgement.
    pub const PUBLISH_SECONDS: &str = "outboxd_publish_seconds";
    /// 0 closed, 1 open, 2 half-open.
    pub const BREAKER_STATE: &str = "outboxd_breaker_state";
    /// Times the breaker opened after being closed.
    pub const BREAKER_OPENED: &str = "outboxd_breaker_opened_total";
    /// Kafka producers replaced after a fatal error.
    pub const PRODUCER_REPLACED: &str = "outboxd_producer_replaced_total";
    /// Relay writes refused because the shard's lease had moved to another
    /// instance (this one was paused or cut off past its lease).
    pub const RELAY_WRITES_FENCED: &str = "outboxd_relay_writes_fenced_total";
    /// Shards this instance relays.
    pub const RELAY_SHARDS: &str = "outboxd_relay_shards";
    /// Events not yet final, per shard.
    pub const BACKLOG_EVENTS: &str = "outboxd_backlog_events";
    /// Age in seconds of the oldest event not yet final, per shard.
    pub const BACKLOG_OLDEST_SECONDS: &str = "outboxd_backlog_oldest_seconds";
    /// gRPC calls by service, method and status code name.
    pub const GRPC_REQUESTS: &str = "outboxd_grpc_requests_total";
    /// Seconds from a call's arrival to its last response frame.
    pub const GRPC_REQUEST_SECONDS: &str = "outboxd_grpc_request_seconds";
    /// Finished spans given to the OTLP exporter.
    pub const SPANS_EXPORTED: &str = "outboxd_spans_exported_total";
    /// Finished spans dropped: the export queue was full or the collector
    /// refused or could not be reached.
    pub const SPANS_DROPPED: &str = "outboxd_spans_dropped_total";
}

/// The process's metrics recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .expect("fixed buckets are valid");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was installed already; outboxd's metrics go there");
        }
        handle
    })
}

/// What `/readyz` looks at, filled in once the store is migrated and the
/// relay is started; not ready before.
#[derive(Clone, Default)]
pub struct Readiness {
    sources: Arc<OnceLock<ReadinessSources>>,
}

struct ReadinessSources {
    store: Arc<dyn Store>,
    relay: watch::Receiver<RelayHealth>,
    breaker: watch::Receiver<BreakerState>,
}

/// How long `/readyz` waits for the store.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Readiness {
    /// Readiness depends on `store` from now on; the relay's state and its
    /// breaker are reported alongside.
    pub fn set(
        &self,
        store: Arc<dyn Store>,
        relay: watch::Receiver<RelayHealth>,
        breaker: watch::Receiver<BreakerState>,
    ) {
        let _ = self.sources.set(ReadinessSources {
            store,
            relay,
            breaker,
        });
    }

    /// Ready when the store answers a read of a migrated table; the body
    /// says what was found, the relay included (a Kafka outage makes the
    /// relay wait, not the gateway unready: appends still succeed).
    async fn check(&self) -> (bool, String) {
        let Some(sources) = self.sources.get() else {
            return (
                false,
                "not ready\nstore: not connected or not migrated yet\n".into(),
            );
        };
        let store =
            match tokio::time::timeout(STORE_PROBE_TIMEOUT, sources.store.relay_paused()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err(format!("no answer within {STORE_PROBE_TIMEOUT:?}")),
            };
        let relay = match *sources.relay.borrow() {
            RelayHealth::Starting => "starting".to_owned(),
            RelayHealth::Serving { shards } => format!("serving ({shards} shards)"),
            RelayHealth::Paused => "paused".to_owned(),
            RelayHealth::Stopped => "stopped".to_owned(),
        };
        let breaker = match *sources.breaker.borrow() {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open (Kafka unreachable)",
            BreakerState::HalfOpen => "half-open",
        };
        match store {
            Ok(()) => (
                true,
                format!("ready\nstore: ok\nrelay: {relay}\nbreaker: {breaker}\n"),
            ),
            Err(error) => (
                false,
                format!(
                    "not ready\nstore: unreachable: {error}\nrelay: {relay}\nbreaker: {breaker}\n"
                ),
            ),
        }
    }
}

/// Serves until `shutdown`: `GET /healthz` (the process answers),
/// `GET /readyz` (see [`Readiness`]) and, on any other path, the metrics in
/// Prometheus' text format.
pub async fn serve_metrics(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    metrics();
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener failed to accept");
                    continue;
                }
            },
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let read =
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await;
            let length = match read {
                Ok(Ok(length)) => length,
                _ => 0,
            };
            // "GET /path HTTP/1.1": only the path matters.
            let path = std::str::from_utf8(&request[..length])
                .ok()
                .and_then(|text| text.split_whitespace().nth(1))
                .unwrap_or("/metrics")
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned();
            let (status, content_type, body) = match path.as_str() {
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                "/readyz" => match readiness.check().await {
                    (true, body) => ("200 OK", "text/plain", body),
                    (false, body) => ("503 Service Unavailable", "text/plain", body),
                },
                _ => ("200 OK", "text/plain; version=0.0.4", metrics().render()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
