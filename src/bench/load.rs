//! The load generator: gRPC clients appending events as fast as allowed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::{histogram, now_micros};
use crate::proto;
use crate::proto::outbox_client::OutboxClient;

/// Requests one AppendStream task keeps in flight.
const STREAM_WINDOW: usize = 8;

/// The shape of the load.
#[derive(Debug, Clone)]
pub struct LoadShape {
    pub connections: usize,
    pub concurrency: usize,
    pub batch: usize,
    pub stream: bool,
    pub keys: usize,
    pub payload_bytes: usize,
    pub rate: u64,
    pub duration: Duration,
}

impl LoadShape {
    /// A payload that starts with its send time (read back by the consumer).
    pub fn payload(&self) -> Vec<u8> {
        let mut payload = now_micros().to_le_bytes().to_vec();
        payload.resize(self.payload_bytes, b'x');
        payload
    }

    pub fn key(&self, rng: &mut impl Rng) -> String {
        format!("key-{}", rng.random_range(0..self.keys.max(1)))
    }

    /// Pause between two requests of one task to hold the target rate.
    fn pace(&self) -> Option<Duration> {
        (self.rate > 0).then(|| {
            Duration::from_secs_f64(self.batch as f64 * self.concurrency as f64 / self.rate as f64)
        })
    }
}

pub struct LoadResult {
    pub acked_events: u64,
    pub failed_requests: u64,
    pub ack_latency: Histogram<u64>,
}

struct Counters {
    acked: AtomicU64,
    failed: AtomicU64,
}

fn request(
    shape: &LoadShape,
    topic: &str,
    producer: &str,
    transaction: u64,
) -> proto::AppendRequest {
    let mut rng = rand::rng();
    proto::AppendRequest {
        token: Some(proto::TransactionToken {
            producer: producer.to_owned(),
            transaction_id: format!("tx-{transaction}"),
            mode: proto::TokenMode::Immediate as i32,
            ..Default::default()
        }),
        sequence: 0,
        events: (0..shape.batch)
            .map(|_| proto::Event {
                topic: topic.to_owned(),
                key: Some(shape.key(&mut rng).into_bytes().into()),
                payload: shape.payload().into(),
                event_type: "bench".into(),
                ..Default::default()
            })
            .collect(),
        correlation: transaction,
    }
}

/// Appends one request of `shape` and returns its event count: run before
/// the load, so that connections, topic metadata and the consumer are ready
/// when timing starts.
pub async fn warm_up(endpoint: String, topic: &str, shape: &LoadShape) -> anyhow::Result<u64> {
    let channel = Endpoint::from_shared(endpoint)?.connect().await?;
    let mut client = OutboxClient::new(channel);
    let request = request(shape, topic, "bench-warm-up", 0);
    let events = request.events.len() as u64;
    client.append(request).await?;
    Ok(events)
}

/// Runs the load for `shape.duration`, printing progress each second.
pub async fn drive(
    endpoint: String,
    topic: String,
    shape: LoadShape,
    delivered: Arc<AtomicU64>,
) -> anyhow::Result<LoadResult> {
    let mut channels = Vec::new();
    for _ in 0..shape.connections {
        channels.push(Endpoint::from_shared(endpoint.clone())?.connect().await?);
    }
    let counters = Arc::new(Counters {
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let deadline = Instant::now() + shape.duration;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let tasks = if shape.stream {
        shape.concurrency.div_ceil(STREAM_WINDOW)
    } else {
        shape.concurrency
    };
    let mut handles = Vec::new();
    for task in 0..tasks {
        let client = OutboxClient::new(channels[task % channels.len()].clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        let producer = format!("bench-{run}-{task}");
        let (shape, topic, counters) = (shape.clone(), topic.clone(), counters.clone());
        handles.push(tokio::spawn(async move {
            if shape.stream {
                stream_task(client, &shape, &topic, &producer, deadline, &counters).await
            } else {
                unary_task(client, &shape, &topic, &producer, deadline, &counters).await
            }
        }));
    }
    let progress = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (mut last_acked, mut last_delivered) = (0, 0);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let acked = counters.acked.load(Ordering::Relaxed);
                let arrived = delivered.load(Ordering::Relaxed);
                println!(
                    "  t={:>3.0}s  appended {:>8} ev/s  in Kafka {:>8} ev/s  (total {acked} / {arrived})",
                    started.elapsed().as_secs_f64(),
                    acked - last_acked,
                    arrived - last_delivered
                );
                (last_acked, last_delivered) = (acked, arrived);
            }
        })
    };
    let mut ack_latency = histogram();
    for handle in handles {
        ack_latency.add(handle.await??)?;
    }
    progress.abort();
    Ok(LoadResult {
        acked_events: counters.acked.load(Ordering::Relaxed),
        failed_requests: counters.failed.load(Ordering::Relaxed),
        ack_latency,
    })
}

async fn unary_task(
    mut client: OutboxClient<Channel>,
    shape: &LoadShape,
    topic: &str,
    producer: &str,
    deadline: Instant,
    counters: &Counters,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = histogram();
    let pace = shape.pace();
    let mut next = Instant::now();
    let mut transaction = 0;
    while Instant::now() < deadline {
        if let Some(pace) = pace {
            tokio::time::sleep_until(next.into()).await;
            next += pace;
        }
        let request = request(shape, topic, producer, transaction);
        transaction += 1;
        let sent = Instant::now();
        match client.append(request).await {
            Ok(response) => {
                let _ = latency.record(sent.elapsed().as_micros().max(1) as u64);
                counters.acked.fetch_add(
                    response.into_inner().event_ids.len() as u64,
                    Ordering::Relaxed,
                );
            }
            Err(_) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(latency)
}

async fn stream_task(
    mut client: OutboxClient<Channel>,
    shape: &LoadShape,
    topic: &str,
    producer: &str,
    deadline: Instant,
    counters: &Counters,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = histogram();
    let (tx, rx) = mpsc::channel(STREAM_WINDOW);
    let mut responses = client
        .append_stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut in_flight: VecDeque<Instant> = VecDeque::new();
    let pace = shape.pace().map(|p| p / STREAM_WINDOW as u32);
    let mut next = Instant::now();
    let mut transaction = 0;
    let mut sending = true;
    loop {
        if sending && Instant::now() >= deadline {
            sending = false;
        }
        if !sending && in_flight.is_empty() {
            break;
        }
        if sending && in_flight.len() < STREAM_WINDOW {
            if let Some(pace) = pace {
                tokio::time::sleep_until(next.into()).await;
                next += pace;
            }
            tx.send(request(shape, topic, producer, transaction))
                .await?;
            transaction += 1;
            in_flight.push_back(Instant::now());
            continue;
        }
        let Some(response) = responses.message().await? else {
            break;
        };
        let sent = in_flight.pop_front().unwrap_or_else(Instant::now);
        let _ = latency.record(sent.elapsed().as_micros().max(1) as u64);
        match response.failure {
            None => {
                counters
                    .acked
                    .fetch_add(response.event_ids.len() as u64, Ordering::Relaxed);
            }
            Some(_) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(latency)
}

/// Appends exactly `total` events (rounded up to whole requests) as fast as
/// the gateway takes them; returns how many were acknowledged.
pub async fn fill(
    endpoint: String,
    topic: String,
    shape: LoadShape,
    total: u64,
) -> anyhow::Result<u64> {
    let channel = Endpoint::from_shared(endpoint)?.connect().await?;
    let requests = total.div_ceil(shape.batch as u64);
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut handles = Vec::new();
    for task in 0..shape.concurrency {
        let mut client =
            OutboxClient::new(channel.clone()).max_encoding_message_size(64 * 1024 * 1024);
        let (shape, topic, next, acked) =
            (shape.clone(), topic.clone(), next.clone(), acked.clone());
        let producer = format!("backlog-{run}-{task}");
        handles.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    return anyhow::Ok(());
                }
                let response = client.append(request(&shape, &topic, &producer, n)).await?;
                acked.fetch_add(
                    response.into_inner().event_ids.len() as u64,
                    Ordering::Relaxed,
                );
            }
        }));
    }
    for handle in handles {
        handle.await??;
    }
    Ok(acked.load(Ordering::Relaxed))
}
