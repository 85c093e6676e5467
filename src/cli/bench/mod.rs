//! `outboxd bench`: outboxd against its baselines, in one run, on the same
//! store and broker (docs/benchmarks.md says what each figure means).
//!
//! - **outboxd**: a real `outboxd serve` process (measured: CPU, peak RSS),
//!   driven through gRPC by a load generator on its own runtime; an
//!   independent consumer times each record's arrival in Kafka and the run
//!   fails unless every acknowledged event id is among what it read.
//! - **direct produce**: a bare rdkafka producer with the same settings
//!   sending as many records of the same shape (headers included): the
//!   ceiling of the Kafka side.
//! - **naive outbox** and **careful outbox**: the relay services write by
//!   hand, as such code usually is and as it is when written with care, fed
//!   the load outboxd sustained (see `baselines.rs`).

mod baselines;
mod load;
mod process;
mod trace;
mod xid;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use clap::Args;
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Headers, Message};
use tokio_util::sync::CancellationToken;

use crate::cli::tail;

pub use load::LoadShape;

/// The arguments of `outboxd bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// PostgreSQL database for the store (the bench creates its tables).
    #[arg(long, env = "OUTBOXD_DATABASE_URL")]
    pub database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "OUTBOXD_KAFKA_BROKERS")]
    pub brokers: String,
    /// How long the load runs.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// gRPC connections of the load generator.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight in all.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Events per request.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// Use pipelined AppendStreams instead of unary Appends.
    #[arg(long)]
    pub stream: bool,
    /// Distinct ordering keys.
    #[arg(long, default_value_t = 1_000)]
    pub keys: usize,
    /// Payload size in bytes (at least 8).
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Target events per second; 0 runs open throttle.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Target rate as a fraction of the direct-produce rate, measured first
    /// in the same run (0.05: a twentieth of what a bare producer does).
    #[arg(long, conflicts_with = "rate")]
    pub rate_fraction: Option<f64>,
    /// Partitions of the bench topics.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Skip the direct-produce and hand-written outbox baselines.
    #[arg(long)]
    pub skip_baselines: bool,
    /// Where the markdown report goes.
    #[arg(long, default_value = "target/bench-report.md")]
    pub report: PathBuf,
    /// Extra gateway configuration (TOML); store, brokers and listen are set
    /// by the bench.
    #[arg(long)]
    pub gateway_config: Option<PathBuf>,
    /// Also build a backlog of this many events while the relay cannot reach
    /// the broker, then time its drain.
    #[arg(long)]
    pub backlog: Option<u64>,
    /// Also time this many postgres_xid resolutions (caller COMMIT → READY
    /// and → PUBLISHED), the callers' transactions on the store's database.
    #[arg(long)]
    pub xid_samples: Option<usize>,
    /// TLS and token for a gateway whose `--gateway-config` secures it.
    #[command(flatten)]
    pub access: crate::cli::client::GatewayAccess,
    /// Run the measured gateway with tracing on, every trace sampled, its
    /// spans exported over OTLP to a sink in the bench process.
    #[arg(long)]
    pub trace: bool,
}

/// Microseconds since the epoch: payloads carry their send time, so the
/// consumer can time each record without a shared table.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// A histogram of microseconds, up to an hour.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Quantile `q` of a histogram of microseconds, in milliseconds.
pub(crate) fn quantile_ms(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64 / 1_000.0
}

async fn create_topics(brokers: &str, names: &[String], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        result.map_err(|(topic, code)| anyhow::anyhow!("creating {topic}: {code:?}"))?;
    }
    Ok(())
}

/// How long [`Arrivals::restart_count`] waits for the consumer thread.
const CONSUMER_RESPONSE: Duration = Duration::from_secs(30);
/// Acknowledged events still missing after the topic was quiet this long
/// are taken as lost.
const ARRIVALS_IDLE: Duration = Duration::from_secs(30);
/// How long the broker may hold back a fetch for the arrivals consumer:
/// short, as it times each record's arrival.
const ARRIVALS_FETCH_WAIT: Duration = Duration::from_millis(10);
/// How long the arrivals consumer waits for a record in one poll (it
/// answers [`Arrivals::restart_count`] and [`Arrivals::finish`] between).
const ARRIVALS_POLL: Duration = Duration::from_millis(5);

/// Counts a topic's records as they arrive, keeps their event ids and times
/// each from its send.
pub(crate) struct Arrivals {
    /// Distinct events read since the last restart of the count.
    pub delivered: Arc<AtomicU64>,
    /// Records read again since the last restart of the count.
    pub duplicates: Arc<AtomicU64>,
    /// Every event id read (the warm-up's too), for matching acknowledged
    /// ids rather than counts.
    seen: Arc<Mutex<HashSet<u128>>>,
    stop: CancellationToken,
    restart: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Histogram<u64>>>,
}

/// A record's event id; records without one (none of outboxd's) are told
/// apart by partition and offset, in a range no UUIDv7 uses.
fn record_id(message: &rdkafka::message::BorrowedMessage<'_>) -> u128 {
    message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "outbox-event-id"))
        .and_then(|h| h.value)
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(|value| uuid::Uuid::parse_str(value).ok())
        .map_or_else(
            || (u128::from(message.partition() as u32) << 64) | u128::from(message.offset() as u64),
            |id| id.as_u128(),
        )
}

impl Arrivals {
    /// Starts an independent consumer of every partition of `topic`.
    pub fn start(brokers: &str, topic: &str) -> anyhow::Result<Arrivals> {
        let consumer = tail::assigned_consumer(
            brokers,
            topic,
            tail::ConsumerOptions {
                fetch_wait: Some(ARRIVALS_FETCH_WAIT),
                ..tail::ConsumerOptions::default()
            },
        )?;
        let delivered = Arc::new(AtomicU64::new(0));
        let duplicates = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let stop = CancellationToken::new();
        let restart = Arc::new(AtomicBool::new(false));
        let (d, dup, ids, s, r) = (
            delivered.clone(),
            duplicates.clone(),
            seen.clone(),
            stop.clone(),
            restart.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("bench-consumer".into())
            .spawn(move || {
                let mut lag = histogram();
                tail::read_messages(&consumer, ARRIVALS_POLL, None, &s, |message| {
                    if let Some(message) = message {
                        let arrived = now_micros();
                        let first_sighting = ids
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(record_id(message));
                        if first_sighting {
                            if let Some(payload) = message.payload()
                                && payload.len() >= 8
                            {
                                let sent =
                                    u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                                let _ = lag.record(arrived.saturating_sub(sent).max(1));
                            }
                            d.fetch_add(1, Ordering::Relaxed);
                        } else {
                            dup.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if r.load(Ordering::Relaxed) {
                        lag.reset();
                        d.store(0, Ordering::Relaxed);
                        dup.store(0, Ordering::Relaxed);
                        r.store(false, Ordering::Relaxed);
                    }
                    true
                })?;
                Ok(lag)
            })?;
        Ok(Arrivals {
            delivered,
            duplicates,
            seen,
            stop,
            restart,
            thread,
        })
    }

    /// Waits until `count` records arrived or `timeout` passed; false at
    /// once when the consumer has stopped ([`Arrivals::finish`] says why).
    pub fn wait_for(&self, count: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.delivered.load(Ordering::Relaxed) < count {
            if Instant::now() >= deadline || self.thread.is_finished() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Waits until every id of `ids` was read; gives up after `timeout`,
    /// when the consumer stopped, or when nothing new arrived for
    /// [`ARRIVALS_IDLE`] while ids were still missing. Returns the ids
    /// still missing.
    pub fn wait_for_ids(&self, ids: &[u128], timeout: Duration) -> Vec<u128> {
        let deadline = Instant::now() + timeout;
        let mut missing = ids.to_vec();
        let (mut delivered, mut last_arrival) = (u64::MAX, Instant::now());
        loop {
            // Cheap first: no use looking for every id before as many
            // distinct events as expected have come.
            if self.delivered.load(Ordering::Relaxed) >= ids.len() as u64 {
                let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                missing.retain(|id| !seen.contains(id));
            }
            if missing.is_empty() || Instant::now() >= deadline || self.thread.is_finished() {
                return missing;
            }
            let now_delivered = self.delivered.load(Ordering::Relaxed);
            if now_delivered != delivered {
                (delivered, last_arrival) = (now_delivered, Instant::now());
            } else if last_arrival.elapsed() >= ARRIVALS_IDLE {
                return missing;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Counts (and times) from zero again: what arrived so far was warm-up.
    /// Fails when the consumer thread is gone or does not answer.
    pub fn restart_count(&self) -> anyhow::Result<()> {
        self.restart.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + CONSUMER_RESPONSE;
        while self.restart.load(Ordering::Relaxed) {
            ensure!(
                !self.thread.is_finished(),
                "the bench consumer stopped before the load started"
            );
            ensure!(
                Instant::now() < deadline,
                "the bench consumer did not restart its count within {CONSUMER_RESPONSE:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stops the consumer; returns the publish lag of what it counted
    /// since the last restart of the count, or the error that stopped it.
    pub fn finish(self) -> anyhow::Result<Histogram<u64>> {
        self.stop.cancel();
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the bench consumer panicked"))?
    }
}

/// Figures of one outboxd run.
#[derive(Debug, Clone, Default)]
pub struct OutboxdFigures {
    /// Events the gateway acknowledged during the load.
    pub acked_events: u64,
    /// Requests that failed.
    pub failed_requests: u64,
    /// Acknowledged event ids the consumer did not read (the run fails
    /// unless this is 0).
    pub missing_events: u64,
    /// How long the load ran.
    pub load_seconds: f64,
    /// Acknowledged events per second during the load.
    pub append_rate: f64,
    /// Distinct events in Kafka by the end of the load.
    pub delivered_during_load: u64,
    /// Acknowledged events per second from the start of the load until
    /// the last of them was in Kafka.
    pub end_to_end_rate: f64,
    /// How long after the load the last acknowledged event took to reach
    /// Kafka.
    pub drain_seconds: f64,
    /// From each request's scheduled send time (its actual send when the
    /// load is open).
    pub ack_p50_ms: f64,
    /// Append ack latency p99 (ms), as `ack_p50_ms`.
    pub ack_p99_ms: f64,
    /// Append ack latency p99.9 (ms), as `ack_p50_ms`.
    pub ack_p999_ms: f64,
    /// From each request's actual send.
    pub service_p50_ms: f64,
    /// Append service time p99 (ms), as `service_p50_ms`.
    pub service_p99_ms: f64,
    /// Append service time p99.9 (ms), as `service_p50_ms`.
    pub service_p999_ms: f64,
    /// Publish lag p50 (ms): from a record's scheduled send until the
    /// consumer read it.
    pub lag_p50_ms: f64,
    /// Publish lag p99 (ms), as `lag_p50_ms`.
    pub lag_p99_ms: f64,
    /// Records the consumer read more than once.
    pub duplicates: u64,
    /// The gateway's CPU during the load, in % of one core.
    pub gateway_cpu_percent: f64,
    /// The gateway's resident memory at the end of the load (MB).
    pub gateway_rss_mb: f64,
    /// The gateway's peak resident memory (MB).
    pub gateway_peak_rss_mb: f64,
    /// Spans the sink received, with `--trace`.
    pub spans_exported: Option<u64>,
    /// How much the store's database grew (MB).
    pub store_growth_mb: f64,
    /// That growth per acknowledged event (bytes).
    pub bytes_per_event: f64,
}

/// The whole run's results.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    /// outboxd's own run.
    pub outboxd: OutboxdFigures,
    /// Records per second of the bare producer, unless skipped.
    pub direct_rate: Option<f64>,
    /// The naive hand-written outbox relay, unless skipped.
    pub naive: Option<baselines::RelayFigures>,
    /// The careful hand-written outbox relay, unless skipped.
    pub careful: Option<baselines::RelayFigures>,
    /// With `--backlog`: the events of the backlog and its drain time (s).
    pub backlog: Option<(u64, f64)>,
    /// With `--xid-samples`: the postgres_xid resolution latencies, as
    /// the report prints them.
    pub xid_latency: Option<String>,
}

/// Records the direct producer sends when it is measured first, to set the
/// rate of `--rate-fraction`.
const DIRECT_PROBE_RECORDS: u64 = 200_000;

/// Runs the bench, writes the markdown report to `--report` and prints it.
pub async fn run(mut args: BenchArgs) -> anyhow::Result<BenchReport> {
    ensure!(
        args.payload_bytes >= 8,
        "--payload-bytes must be at least 8"
    );
    ensure!(
        args.concurrency >= 1 && args.connections >= 1 && args.batch >= 1,
        "--concurrency, --connections and --batch must be positive"
    );
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let topic = format!("bench-outboxd-{run_id}");
    let direct_topic = format!("bench-direct-{run_id}");
    let naive_topic = format!("bench-naive-{run_id}");
    let careful_topic = format!("bench-careful-{run_id}");
    create_topics(
        &args.brokers,
        &[
            topic.clone(),
            direct_topic.clone(),
            naive_topic.clone(),
            careful_topic.clone(),
        ],
        args.partitions,
    )
    .await
    .context("creating the bench topics")?;
    if let Some(fraction) = args.rate_fraction {
        ensure!(
            fraction > 0.0 && fraction <= 1.0,
            "--rate-fraction must be in (0, 1]"
        );
    }
    let mut shape = LoadShape {
        connections: args.connections,
        concurrency: args.concurrency,
        batch: args.batch,
        stream: args.stream,
        keys: args.keys,
        payload_bytes: args.payload_bytes,
        rate: args.rate,
        duration: args.duration,
    };

    let mut report = BenchReport::default();
    if let Some(fraction) = args.rate_fraction {
        println!(
            "baseline first: direct produce of {DIRECT_PROBE_RECORDS} records, to set the rate"
        );
        let direct =
            baselines::direct_produce(&args, &shape, &direct_topic, DIRECT_PROBE_RECORDS).await?;
        args.rate = ((direct * fraction).round() as u64).max(1);
        shape.rate = args.rate;
        println!(
            "direct produce: {direct:.0} records/s; outboxd's rate: {} events/s",
            args.rate
        );
        report.direct_rate = Some(direct);
    }
    report.outboxd = outboxd_run(&args, &shape, &topic).await?;
    // The baselines right after outboxd's run, before the backlog run
    // leaves a million dead rows behind.
    if !args.skip_baselines {
        if report.direct_rate.is_none() {
            let records = report.outboxd.acked_events.max(1);
            println!("baseline: direct produce of {records} records");
            report.direct_rate =
                Some(baselines::direct_produce(&args, &shape, &direct_topic, records).await?);
        }
        // The offered load outboxd sustained, end to end.
        let offered = report.outboxd.end_to_end_rate;
        for (relay, topic) in [
            (baselines::HandRelay::Naive, &naive_topic),
            (baselines::HandRelay::Careful, &careful_topic),
        ] {
            println!(
                "baseline: {} for {:?}, offered {offered:.0} events/s",
                relay.name(),
                args.duration
            );
            let figures =
                baselines::hand_written_outbox(&args, &shape, topic, relay, offered).await?;
            match relay {
                baselines::HandRelay::Naive => report.naive = Some(figures),
                baselines::HandRelay::Careful => report.careful = Some(figures),
            }
        }
    }
    if let Some(samples) = args.xid_samples {
        let gateway = process::Gateway::start(&args, None).await?;
        let latency = xid::measure(&gateway.endpoint(), &args.database_url, &topic, samples).await;
        gateway.stop().await?;
        let latency = latency?;
        println!("postgres_xid resolution: {}", latency.summary());
        report.xid_latency = Some(latency.summary());
    }
    if let Some(events) = args.backlog {
        report.backlog = Some(process::backlog_drain(&args, events, &run_id).await?);
    }
    let markdown = render(&args, &report);
    if let Some(dir) = args.report.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.report, &markdown)
        .with_context(|| format!("writing {}", args.report.display()))?;
    println!("\n{markdown}");
    println!("report written to {}", args.report.display());
    Ok(report)
}

async fn outboxd_run(
    args: &BenchArgs,
    shape: &LoadShape,
    topic: &str,
) -> anyhow::Result<OutboxdFigures> {
    let database_size_before = process::database_size(&args.database_url).await?;
    let traced = if args.trace {
        Some(trace::TracedRun::start(args).await?)
    } else {
        None
    };
    let gateway_args = traced.as_ref().map_or(args, |traced| &traced.args);
    let gateway = process::Gateway::start(gateway_args, None).await?;
    let arrivals = Arrivals::start(&args.brokers, topic)?;
    let warm_up = load::warm_up(gateway.endpoint(), topic, shape).await?;
    if !arrivals.wait_for(warm_up, Duration::from_secs(60)) {
        arrivals.finish()?;
        anyhow::bail!("the warm-up events did not reach Kafka");
    }
    if let Err(error) = arrivals.restart_count() {
        // The consumer's own error, when it has one, says more.
        return Err(arrivals.finish().err().unwrap_or(error));
    }
    let cpu_before = gateway.cpu_seconds()?;
    println!(
        "outboxd: {} for {:?}, {} connections, {} in flight, {} events per request, {} keys, {} B payloads",
        if shape.stream {
            "AppendStream"
        } else {
            "unary Append"
        },
        shape.duration,
        shape.connections,
        shape.concurrency,
        shape.batch,
        shape.keys,
        shape.payload_bytes
    );
    let started = Instant::now();
    let load = load::drive(
        gateway.endpoint(),
        topic.to_owned(),
        shape.clone(),
        arrivals.delivered.clone(),
    )
    .await
    .context("running the load")?;
    let load_seconds = started.elapsed().as_secs_f64();
    let delivered_during_load = arrivals.delivered.load(Ordering::Relaxed);
    let cpu_during_load = gateway.cpu_seconds()? - cpu_before;
    let rss_mb = gateway.rss_mb()?;
    let missing = arrivals.wait_for_ids(&load.acked_ids, Duration::from_secs(300));
    let total_seconds = started.elapsed().as_secs_f64();
    let peak_rss_mb = gateway.peak_rss_mb()?;
    // The gateway exports what it still holds as it stops.
    gateway.stop().await?;
    let spans_exported = traced.as_ref().map(|traced| traced.sink.span_count());
    let duplicates = arrivals.duplicates.load(Ordering::Relaxed);
    let lag = arrivals.finish()?;
    ensure!(
        missing.is_empty(),
        "{} of {} acknowledged events did not reach Kafka, e.g. {}",
        missing.len(),
        load.acked_ids.len(),
        uuid::Uuid::from_u128(missing[0])
    );
    ensure!(
        load.acked_ids.len() as u64 == load.acked_events,
        "{} event ids acknowledged for {} events",
        load.acked_ids.len(),
        load.acked_events
    );
    let database_size_after = process::database_size(&args.database_url).await?;
    let growth = database_size_after.saturating_sub(database_size_before) as f64;
    Ok(OutboxdFigures {
        acked_events: load.acked_events,
        failed_requests: load.failed_requests,
        missing_events: missing.len() as u64,
        load_seconds,
        append_rate: load.acked_events as f64 / load_seconds,
        delivered_during_load,
        end_to_end_rate: load.acked_events as f64 / total_seconds,
        drain_seconds: total_seconds - load_seconds,
        ack_p50_ms: quantile_ms(&load.ack_latency, 0.50),
        ack_p99_ms: quantile_ms(&load.ack_latency, 0.99),
        ack_p999_ms: quantile_ms(&load.ack_latency, 0.999),
        service_p50_ms: quantile_ms(&load.service_time, 0.50),
        service_p99_ms: quantile_ms(&load.service_time, 0.99),
        service_p999_ms: quantile_ms(&load.service_time, 0.999),
        lag_p50_ms: quantile_ms(&lag, 0.50),
        lag_p99_ms: quantile_ms(&lag, 0.99),
        duplicates,
        gateway_cpu_percent: 100.0 * cpu_during_load / load_seconds,
        gateway_rss_mb: rss_mb,
        gateway_peak_rss_mb: peak_rss_mb,
        store_growth_mb: growth / 1_048_576.0,
        bytes_per_event: growth / load.acked_events.max(1) as f64,
        spans_exported,
    })
}

fn render(args: &BenchArgs, report: &BenchReport) -> String {
    let o = &report.outboxd;
    let mut out = String::new();
    out.push_str("## outboxd bench\n\n");
    out.push_str(&format!(
        "Load: {} for {:?}; {} connections, {} requests in flight, {} events per request, {} keys, {} B payloads, {} partitions, rate {}.\n\n",
        if args.stream { "AppendStream" } else { "unary Append" },
        args.duration,
        args.connections,
        args.concurrency,
        args.batch,
        args.keys,
        args.payload_bytes,
        args.partitions,
        match (args.rate, args.rate_fraction) {
            (0, _) => "open".to_owned(),
            (rate, Some(fraction)) => format!(
                "{rate} events/s ({fraction} of the direct-produce rate measured first)"
            ),
            (rate, None) => format!("{rate} events/s"),
        }
    ));
    if args.trace {
        out.push_str(
            "Tracing on: every trace sampled (ratio 1.0), spans exported over OTLP to a sink in the bench process.\n\n",
        );
    }
    out.push_str("| figure | value |\n|---|---|\n");
    let rows: Vec<(&str, String)> = vec![
        ("events acknowledged", o.acked_events.to_string()),
        ("failed requests", o.failed_requests.to_string()),
        (
            "acknowledged events missing from Kafka (matched by event id)",
            o.missing_events.to_string(),
        ),
        (
            "append rate (acked events/s during load)",
            format!("{:.0}", o.append_rate),
        ),
        (
            "end-to-end rate (acked → in Kafka, events/s, incl. drain)",
            format!("{:.0}", o.end_to_end_rate),
        ),
        (
            "in Kafka by the end of the load",
            o.delivered_during_load.to_string(),
        ),
        (
            "drain after the load (s)",
            format!("{:.2}", o.drain_seconds),
        ),
        (
            "append ack latency p50 / p99 / p99.9 (ms, from the scheduled send)",
            format!(
                "{:.2} / {:.2} / {:.2}",
                o.ack_p50_ms, o.ack_p99_ms, o.ack_p999_ms
            ),
        ),
        (
            "append service time p50 / p99 / p99.9 (ms, from the actual send)",
            format!(
                "{:.2} / {:.2} / {:.2}",
                o.service_p50_ms, o.service_p99_ms, o.service_p999_ms
            ),
        ),
        (
            "publish lag p50 / p99 (scheduled send → readable in Kafka, ms)",
            format!("{:.1} / {:.1}", o.lag_p50_ms, o.lag_p99_ms),
        ),
        ("duplicates seen by the consumer", o.duplicates.to_string()),
        (
            "gateway CPU during load (% of one core)",
            format!("{:.0}", o.gateway_cpu_percent),
        ),
        (
            "gateway RSS at end of load / peak (MB)",
            format!("{:.0} / {:.0}", o.gateway_rss_mb, o.gateway_peak_rss_mb),
        ),
        (
            "store growth (MB; bytes per event)",
            format!("{:.1}; {:.0}", o.store_growth_mb, o.bytes_per_event),
        ),
    ];
    for (name, value) in rows {
        out.push_str(&format!("| {name} | {value} |\n"));
    }
    if let Some(spans) = o.spans_exported {
        out.push_str(&format!(
            "| spans received by the OTLP sink (per acknowledged event) | {spans}; {:.2} |\n",
            spans as f64 / o.acked_events.max(1) as f64
        ));
    }
    if let Some((events, seconds)) = report.backlog {
        out.push_str(&format!(
            "| backlog of {events} built while the broker was unreachable: drain time (s); rate (events/s) | {seconds:.1}; {:.0} |\n",
            events as f64 / seconds
        ));
    }
    if let Some(latency) = &report.xid_latency {
        out.push_str(&format!(
            "| postgres_xid resolution (caller COMMIT → READY / PUBLISHED) | {latency} |\n"
        ));
    }
    if let Some(direct) = report.direct_rate {
        out.push_str(&format!("| direct produce (records/s) | {direct:.0} |\n"));
        out.push_str(&format!(
            "| outboxd / direct produce | {:.2} |\n",
            o.end_to_end_rate / direct
        ));
    }
    for (name, figures) in [
        ("naive outbox", report.naive),
        ("careful outbox", report.careful),
    ] {
        if let Some(f) = figures {
            out.push_str(&format!(
                "| {name} relay (events/s; published; offered events/s) | {:.0}; {}; {:.0} |\n",
                f.rate, f.published, f.offered_rate
            ));
            out.push_str(&format!(
                "| outboxd / {name} | {:.1}× |\n",
                o.end_to_end_rate / f.rate.max(f64::MIN_POSITIVE)
            ));
        }
    }
    out
}
