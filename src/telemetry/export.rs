//! The span pipeline: a bounded queue in front of the OTLP exporter.
//!
//! Ending a span only puts it in a bounded queue (`try_send`, never a wait);
//! one task, on a thread and runtime of its own, exports what is queued in
//! batches. When the collector is slow or gone, the queue fills and further
//! spans are dropped and counted in `outboxd_spans_dropped_total`: exporting
//! can cost spans, never appends.
//! The SDK's own batch processor drops the same way but does not count what
//! it drops, hence this one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::names;

/// Most spans sent in one export request.
const MAX_EXPORT_BATCH: usize = 512;
/// How long a span may wait for a batch to fill.
const EXPORT_DELAY: Duration = Duration::from_millis(500);
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the last export may take at shutdown.
const FINAL_EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// A span processor that queues finished spans for [`run_export`].
#[derive(Debug)]
pub struct QueueingProcessor {
    queue: mpsc::Sender<SpanData>,
    /// Spans dropped since the export task last looked: it logs them, since
    /// logging from inside a span's end would re-enter the subscriber.
    dropped: Arc<AtomicU64>,
}

impl QueueingProcessor {
    /// A processor whose queue holds `capacity` spans, and the receiving end
    /// for [`run_export`].
    pub fn new(capacity: usize) -> (Self, SpanQueue) {
        let (queue, spans) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        (
            QueueingProcessor {
                queue,
                dropped: dropped.clone(),
            },
            SpanQueue { spans, dropped },
        )
    }
}

impl SpanProcessor for QueueingProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            metrics::counter!(names::SPANS_DROPPED).increment(1);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Starts the export on a thread of its own, with its own single-threaded
/// runtime: encoding and sending spans never take a turn from the gateway's
/// runtime. Returns once the exporter is built.
pub fn spawn(
    endpoint: String,
    resource: Resource,
    queue: SpanQueue,
    stop: CancellationToken,
) -> Result<std::thread::JoinHandle<()>, String> {
    let (built, outcome) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = built.send(Err(error.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                // The exporter's channel lives on the runtime it is built on.
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .with_timeout(EXPORT_TIMEOUT)
                    .build();
                let mut exporter = match exporter {
                    Ok(exporter) => exporter,
                    Err(error) => {
                        let _ = built.send(Err(error.to_string()));
                        return;
                    }
                };
                exporter.set_resource(&resource);
                let _ = built.send(Ok(()));
                run_export(exporter, queue, stop).await;
            });
        })
        .map_err(|error| error.to_string())?;
    outcome
        .recv()
        .map_err(|_| "the span export thread ended at once".to_owned())??;
    Ok(thread)
}

/// The export task's end of the queue.
pub struct SpanQueue {
    spans: mpsc::Receiver<SpanData>,
    dropped: Arc<AtomicU64>,
}

/// Exports queued spans in batches until `shutdown`, then exports what is
/// left (bounded by a timeout). A collector that cannot be reached is logged
/// once, and again once it answers; its spans are dropped and counted.
async fn run_export<E: SpanExporter>(
    mut exporter: E,
    queue: SpanQueue,
    shutdown: CancellationToken,
) {
    let SpanQueue { mut spans, dropped } = queue;
    let unreachable = AtomicBool::new(false);
    // Logged once per episode of a full queue.
    let mut dropping = false;
    let mut batch = Vec::with_capacity(MAX_EXPORT_BATCH);
    loop {
        let mut stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            received = spans.recv_many(&mut batch, MAX_EXPORT_BATCH) => received == 0,
        };
        // Let a batch fill a little: one request per span would cost more
        // than the spans.
        if !stopping && batch.len() < MAX_EXPORT_BATCH {
            let deadline = tokio::time::Instant::now() + EXPORT_DELAY;
            while batch.len() < MAX_EXPORT_BATCH {
                let want = MAX_EXPORT_BATCH - batch.len();
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        stopping = true;
                        break;
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                    received = spans.recv_many(&mut batch, want) => if received == 0 { break },
                }
            }
        }
        if stopping {
            while let Ok(span) = spans.try_recv() {
                batch.push(span);
            }
            if !batch.is_empty() {
                let last = std::mem::take(&mut batch);
                let count = last.len() as u64;
                let exported = tokio::time::timeout(
                    FINAL_EXPORT_TIMEOUT,
                    export(&exporter, last, &unreachable),
                )
                .await;
                if exported.is_err() {
                    metrics::counter!(names::SPANS_DROPPED).increment(count);
                }
            }
            let _ = exporter.shutdown();
            return;
        }
        let full = std::mem::replace(&mut batch, Vec::with_capacity(MAX_EXPORT_BATCH));
        let count = full.len() as u64;
        tokio::select! {
            _ = export(&exporter, full, &unreachable) => {}
            // A collector that hangs must not hold up the shutdown: this
            // batch is given up, what is queued gets one last try.
            _ = shutdown.cancelled() => {
                metrics::counter!(names::SPANS_DROPPED).increment(count);
            }
        }
        match dropped.swap(0, Ordering::Relaxed) {
            0 => dropping = false,
            count if !dropping => {
                dropping = true;
                tracing::warn!(
                    target: "outboxd::telemetry",
                    dropped = count,
                    "span export queue full: dropping spans (counted in outboxd_spans_dropped_total)"
                );
            }
            _ => {}
        }
    }
}

async fn export<E: SpanExporter>(exporter: &E, batch: Vec<SpanData>, unreachable: &AtomicBool) {
    let count = batch.len() as u64;
    match exporter.export(batch).await {
        Ok(()) => {
            metrics::counter!(names::SPANS_EXPORTED).increment(count);
            if unreachable.swap(false, Ordering::Relaxed) {
                tracing::info!(target: "outboxd::telemetry", "span export works again");
            }
        }
        Err(error) => {
            metrics::counter!(names::SPANS_DROPPED).increment(count);
            if !unreachable.swap(true, Ordering::Relaxed) {
                let error = match error {
                    OTelSdkError::InternalFailure(message) => message,
                    other => other.to_string(),
                };
                tracing::warn!(
                    target: "outboxd::telemetry",
                    %error,
                    "cannot export spans to the OTLP endpoint; dropping them until it answers"
                );
            }
        }
    }
}
