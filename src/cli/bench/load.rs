//! The load generator: gRPC clients appending events as fast as allowed, or
//! on a fixed schedule (`--rate`).
//!
//! At a fixed rate every request has a scheduled send time, and its latency
//! is measured from that time, not from when it could actually be sent: a
//! stalled gateway then shows in the latency of every request that had to
//! wait, instead of silently lowering the offered load (coordinated
//! omission). The time from the actual send is reported as service time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use rand::Rng;
use tokio::sync::mpsc;
// Tokio's clock, so that the schedule can be tested with paused time.
use crate::cli::client::{GatewayChannel, Target};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::{histogram, now_micros};
use crate::proto;
use crate::proto::outbox_client::OutboxClient;

/// Requests one AppendStream task keeps in flight.
const STREAM_WINDOW: usize = 8;

/// The shape of the load.
#[derive(Debug, Clone)]
pub struct LoadShape {
    /// gRPC connections.
    pub connections: usize,
    /// Requests in flight in all.
    pub concurrency: usize,
    /// Events per request.
    pub batch: usize,
    /// Pipelined AppendStreams instead of unary Appends.
    pub stream: bool,
    /// Distinct ordering keys.
    pub keys: usize,
    /// Payload size in bytes (at least 8: the send time).
    pub payload_bytes: usize,
    /// Target events per second; 0 is open throttle.
    pub rate: u64,
    /// How long the load runs.
    pub duration: Duration,
}

impl LoadShape {
    /// A payload that starts with the time it was (to be) sent, in
    /// microseconds since the epoch: the consumer reads it back.
    pub fn payload(&self, sent_micros: u64) -> Vec<u8> {
        let mut payload = sent_micros.to_le_bytes().to_vec();
        payload.resize(self.payload_bytes, b'x');
        payload
    }

    /// One of the shape's ordering keys, at random.
    pub fn key(&self, rng: &mut impl Rng) -> String {
        format!("key-{}", rng.random_range(0..self.keys.max(1)))
    }

    /// Sending tasks: one per request in flight, or one per stream window.
    fn tasks(&self) -> usize {
        if self.stream {
            self.concurrency.div_ceil(STREAM_WINDOW)
        } else {
            self.concurrency
        }
    }

    /// Time between two scheduled requests of one task at the target rate.
    fn interval(&self) -> Option<Duration> {
        (self.rate > 0).then(|| {
            Duration::from_secs_f64(self.batch as f64 * self.tasks() as f64 / self.rate as f64)
        })
    }
}

/// A monotonic instant as wall-clock microseconds, for payload times that
/// the consumer compares with its own clock.
#[derive(Clone, Copy)]
struct Clock {
    instant: Instant,
    wall_micros: u64,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            wall_micros: now_micros(),
        }
    }

    fn micros_at(&self, at: Instant) -> u64 {
        self.wall_micros + at.saturating_duration_since(self.instant).as_micros() as u64
    }
}

/// When one task's requests are due.
struct Schedule {
    next: Instant,
    interval: Option<Duration>,
}

impl Schedule {
    /// Task `task` of `shape`: its first request is offset by its share of
    /// the interval, so that the tasks' requests are spread evenly.
    fn new(shape: &LoadShape, task: usize, start: Instant) -> Schedule {
        let interval = shape.interval();
        let offset = interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(task as f64 / shape.tasks() as f64)
        });
        Schedule {
            next: start + offset,
            interval,
        }
    }

    /// The next request's scheduled send time, once it has come; at once
    /// (and now) when the load is open.
    async fn due(&mut self) -> Instant {
        match self.interval {
            None => Instant::now(),
            Some(interval) => {
                let due = self.next;
                self.next += interval;
                tokio::time::sleep_until(due).await;
                due
            }
        }
    }
}

/// What [`drive`] measured.
pub struct LoadResult {
    /// Events the gateway acknowledged.
    pub acked_events: u64,
    /// Requests that failed.
    pub failed_requests: u64,
    /// From each request's scheduled send time to its ack.
    pub ack_latency: Histogram<u64>,
    /// From each request's actual send to its ack.
    pub service_time: Histogram<u64>,
    /// Every acknowledged event id.
    pub acked_ids: Vec<u128>,
}

/// What one sending task measured.
struct TaskResult {
    ack_latency: Histogram<u64>,
    service_time: Histogram<u64>,
    acked_ids: Vec<u128>,
}

impl TaskResult {
    fn new() -> TaskResult {
        TaskResult {
            ack_latency: histogram(),
            service_time: histogram(),
            acked_ids: Vec::new(),
        }
    }

    fn record(&mut self, scheduled: Instant, sent: Instant) {
        let _ = self
            .ack_latency
            .record(scheduled.elapsed().as_micros().max(1) as u64);
        let _ = self
            .service_time
            .record(sent.elapsed().as_micros().max(1) as u64);
    }

    fn acked(&mut self, event_ids: &[String]) -> anyhow::Result<()> {
        for id in event_ids {
            self.acked_ids.push(uuid::Uuid::parse_str(id)?.as_u128());
        }
        Ok(())
    }
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
    sent_micros: u64,
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
                payload: shape.payload(sent_micros).into(),
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
pub async fn warm_up(gateway: Target, topic: &str, shape: &LoadShape) -> anyhow::Result<u64> {
    let channel = gateway.connect().await?;
    let mut client = OutboxClient::new(channel);
    let request = request(shape, topic, "bench-warm-up", 0, now_micros());
    let events = request.events.len() as u64;
    client.append(request).await?;
    Ok(events)
}

/// Runs the load for `shape.duration`, printing progress each second.
pub async fn drive(
    gateway: Target,
    topic: String,
    shape: LoadShape,
    delivered: Arc<AtomicU64>,
) -> anyhow::Result<LoadResult> {
    let mut channels = Vec::new();
    for _ in 0..shape.connections {
        channels.push(gateway.connect().await?);
    }
    let counters = Arc::new(Counters {
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let clock = Clock::now();
    let deadline = clock.instant + shape.duration;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut handles = Vec::new();
    for task in 0..shape.tasks() {
        let client = OutboxClient::new(channels[task % channels.len()].clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        let producer = format!("bench-{run}-{task}");
        let schedule = Schedule::new(&shape, task, clock.instant);
        let (shape, topic, counters) = (shape.clone(), topic.clone(), counters.clone());
        handles.push(tokio::spawn(async move {
            let task = Task {
                shape: &shape,
                topic: &topic,
                producer: &producer,
                clock,
                deadline,
                counters: &counters,
            };
            if shape.stream {
                task.stream(client, schedule).await
            } else {
                task.unary(client, schedule).await
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
    let (mut ack_latency, mut service_time) = (histogram(), histogram());
    let mut acked_ids = Vec::new();
    for handle in handles {
        let result = handle.await??;
        ack_latency.add(result.ack_latency)?;
        service_time.add(result.service_time)?;
        acked_ids.extend(result.acked_ids);
    }
    progress.abort();
    Ok(LoadResult {
        acked_events: counters.acked.load(Ordering::Relaxed),
        failed_requests: counters.failed.load(Ordering::Relaxed),
        ack_latency,
        service_time,
        acked_ids,
    })
}

/// One sending task of the load.
struct Task<'a> {
    shape: &'a LoadShape,
    topic: &'a str,
    producer: &'a str,
    clock: Clock,
    deadline: Instant,
    counters: &'a Counters,
}

impl Task<'_> {
    /// The task's request of `transaction`, due at `scheduled`.
    fn request(&self, transaction: u64, scheduled: Instant) -> proto::AppendRequest {
        request(
            self.shape,
            self.topic,
            self.producer,
            transaction,
            self.clock.micros_at(scheduled),
        )
    }

    /// One unary `Append` at a time.
    async fn unary(
        &self,
        mut client: OutboxClient<GatewayChannel>,
        mut schedule: Schedule,
    ) -> anyhow::Result<TaskResult> {
        let mut result = TaskResult::new();
        let mut transaction = 0;
        loop {
            let scheduled = schedule.due().await;
            if scheduled >= self.deadline {
                break;
            }
            let request = self.request(transaction, scheduled);
            transaction += 1;
            let sent = Instant::now();
            let acked = client
                .append(request)
                .await
                .ok()
                .map(|response| response.into_inner().event_ids);
            self.answered(&mut result, scheduled, sent, acked.as_deref())?;
        }
        Ok(result)
    }

    /// Requests pipelined on one `AppendStream`, up to a window.
    async fn stream(
        &self,
        mut client: OutboxClient<GatewayChannel>,
        mut schedule: Schedule,
    ) -> anyhow::Result<TaskResult> {
        let mut result = TaskResult::new();
        let (tx, rx) = mpsc::channel(STREAM_WINDOW);
        let mut responses = client
            .append_stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        // (scheduled, sent) of each request in flight, in order.
        let mut in_flight: VecDeque<(Instant, Instant)> = VecDeque::new();
        let mut transaction = 0;
        let mut sending = true;
        loop {
            if !sending && in_flight.is_empty() {
                break;
            }
            if sending && in_flight.len() < STREAM_WINDOW {
                let scheduled = schedule.due().await;
                if scheduled >= self.deadline {
                    sending = false;
                    continue;
                }
                tx.send(self.request(transaction, scheduled)).await?;
                transaction += 1;
                in_flight.push_back((scheduled, Instant::now()));
                continue;
            }
            let Some(response) = responses.message().await? else {
                break;
            };
            let (scheduled, sent) = in_flight
                .pop_front()
                .unwrap_or_else(|| (Instant::now(), Instant::now()));
            let acked = response
                .failure
                .is_none()
                .then_some(response.event_ids.as_slice());
            self.answered(&mut result, scheduled, sent, acked)?;
        }
        Ok(result)
    }

    /// Counts the answer to a request due at `scheduled` and sent at
    /// `sent`: its latencies and event ids when it was acknowledged
    /// (`acked`), a failure when not.
    fn answered(
        &self,
        result: &mut TaskResult,
        scheduled: Instant,
        sent: Instant,
        acked: Option<&[String]>,
    ) -> anyhow::Result<()> {
        let Some(event_ids) = acked else {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        result.record(scheduled, sent);
        result.acked(event_ids)?;
        self.counters
            .acked
            .fetch_add(event_ids.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Appends exactly `total` events (rounded up to whole requests) as fast as
/// the gateway takes them; returns the acknowledged event ids.
pub async fn fill(
    gateway: Target,
    topic: String,
    shape: LoadShape,
    total: u64,
) -> anyhow::Result<Vec<u128>> {
    let channel = gateway.connect().await?;
    let requests = total.div_ceil(shape.batch as u64);
    let next = Arc::new(AtomicU64::new(0));
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut handles = Vec::new();
    for task in 0..shape.concurrency {
        let mut client =
            OutboxClient::new(channel.clone()).max_encoding_message_size(64 * 1024 * 1024);
        let (shape, topic, next) = (shape.clone(), topic.clone(), next.clone());
        let producer = format!("backlog-{run}-{task}");
        handles.push(tokio::spawn(async move {
            let mut result = TaskResult::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    return anyhow::Ok(result.acked_ids);
                }
                let response = client
                    .append(request(&shape, &topic, &producer, n, now_micros()))
                    .await?;
                result.acked(&response.into_inner().event_ids)?;
            }
        }));
    }
    let mut acked = Vec::new();
    for handle in handles {
        acked.extend(handle.await??);
    }
    Ok(acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rate: u64) -> LoadShape {
        LoadShape {
            connections: 1,
            concurrency: 2,
            batch: 10,
            stream: false,
            keys: 1,
            payload_bytes: 8,
            rate,
            duration: Duration::from_secs(1),
        }
    }

    const MS: Duration = Duration::from_millis(1);

    /// At a fixed rate, requests are due on their schedule whatever the
    /// gateway does: a stall makes the requests due during it late, each
    /// is sent as soon as it can be, and its latency counts from when it was
    /// due (no coordinated omission); the service time does not.
    #[tokio::test(start_paused = true)]
    async fn a_stall_shows_in_the_latency_of_every_request_due_during_it() {
        // 1,000 events/s in batches of 10 from two tasks: one request per
        // task every 20 ms, the second task 10 ms after the first.
        let start = Instant::now();
        assert_eq!(Schedule::new(&shape(1_000), 1, start).next, start + 10 * MS);
        let mut schedule = Schedule::new(&shape(1_000), 0, start);
        let mut result = TaskResult::new();

        let due = schedule.due().await;
        assert_eq!(due, start);
        let sent = Instant::now();
        tokio::time::advance(100 * MS).await; // the gateway stalls
        result.record(due, sent);
        // Four more were due during the stall: sent at once, answered at once.
        for n in 1..=4 {
            let due = schedule.due().await;
            assert_eq!(due, start + 20 * n * MS);
            assert_eq!(Instant::now(), start + 100 * MS, "no wait when behind");
            result.record(due, Instant::now());
        }
        // Caught up: the next one waits for its time.
        let due = schedule.due().await;
        assert_eq!(due, start + 100 * MS);
        let due = schedule.due().await;
        assert_eq!((due, Instant::now()), (start + 120 * MS, start + 120 * MS));

        let latencies: Vec<u64> = [0.0, 0.25, 0.5, 0.75, 1.0]
            .iter()
            .map(|q| result.ack_latency.value_at_quantile(*q) / 1_000)
            .collect();
        assert_eq!(
            latencies,
            [20, 40, 60, 80, 100],
            "ms from each scheduled send"
        );
        assert_eq!(
            result.service_time.value_at_quantile(1.0) / 1_000,
            100,
            "only the stalled request took long once sent"
        );
        assert!(result.service_time.value_at_quantile(0.75) < 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_load_sends_at_once() {
        let mut schedule = Schedule::new(&shape(0), 3, Instant::now());
        tokio::time::advance(5 * MS).await;
        assert_eq!(schedule.due().await, Instant::now());
        assert_eq!(schedule.due().await, Instant::now());
    }
}
