//! Logging (`tracing` to stderr, filtered by `RUST_LOG`) and Prometheus
//! metrics (served on `metrics_listen`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call is a no-op.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,rdkafka=warn,sqlx=warn,h2=warn,tower=warn,hyper=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Metric names, in one place.
pub mod names {
    /// Append requests by outcome: stored, duplicate, rejected, failed.
    pub const APPEND_REQUESTS: &str = "outboxd_append_requests_total";
    pub const EVENTS_APPENDED: &str = "outboxd_events_appended_total";
    pub const EVENTS_PUBLISHED: &str = "outboxd_events_published_total";
    pub const EVENTS_DEAD_LETTERED: &str = "outboxd_events_dead_lettered_total";
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
    /// Unpublished events and the age of the oldest, per shard.
    pub const BACKLOG_EVENTS: &str = "outboxd_backlog_events";
    pub const BACKLOG_OLDEST_SECONDS: &str = "outboxd_backlog_oldest_seconds";
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

/// Serves `GET /metrics` (any path, in fact) in Prometheus' text format
/// until `shutdown`.
pub async fn serve_metrics(listener: TcpListener, shutdown: CancellationToken) {
    let handle = metrics();
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
        let body = handle.render();
        tokio::spawn(async move {
            // The request itself does not matter; read what came and answer.
            let mut request = [0u8; 1024];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut request))
                    .await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
