//! The baselines outboxd is measured against, on the same broker and store,
//! each on a runtime of its own.
//!
//! - **direct produce**: a bare producer with outboxd's settings sending
//!   records of the shape outboxd sends: the key, the payload, the six
//!   `outbox-*` headers and the append time as timestamp.
//! - **naive outbox**: the relay services write by hand: poll the oldest 100
//!   unpublished rows, send each and wait for its ack, mark each published in
//!   a statement of its own; poll again at once while rows remain, sleep a
//!   second when the table is empty.
//! - **careful outbox**: the same table and poll, written with care: a page
//!   of 1,000 rows, every send of the page in flight at once, one `UPDATE`
//!   for the page; a 100 ms sleep when the table is empty.
//!
//! Both relays get the offered load outboxd had: inserts of the same shape
//! (the same records, `--concurrency` writers of `--batch` rows each) at
//! the rate outboxd sustained end to end, for the same duration, on a
//! freshly created table in a vacuumed store. The relay starts with the
//! first insert, so no idle sleep falls in the measured time. Its rate is
//! what it published, divided by the time from its start to its last
//! publish (it gets as long again as the inserts ran to catch up).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::{BenchArgs, LoadShape, now_micros};
use crate::relay::KafkaConfig;

/// A producer with outboxd's settings; `linger_ms` overrides its batching
/// delay.
fn producer(args: &BenchArgs, linger_ms: Option<u32>) -> anyhow::Result<FutureProducer> {
    let mut config = KafkaConfig {
        brokers: args.brokers.clone(),
        ..KafkaConfig::default()
    };
    if let Some(linger) = linger_ms {
        config
            .producer
            .insert("linger.ms".into(), linger.to_string());
    }
    Ok(config.producer_config().create()?)
}

/// What outboxd puts in a record besides key and payload: the headers of
/// an event with no caller headers and no trace context, as the bench's
/// events are.
struct RecordMeta {
    event_id: String,
    event_type: String,
    aggregate_type: String,
    aggregate_id: String,
    producer: String,
    transaction_id: String,
    timestamp_millis: i64,
}

impl RecordMeta {
    fn headers(&self) -> OwnedHeaders {
        [
            ("outbox-event-id", &self.event_id),
            ("outbox-event-type", &self.event_type),
            ("outbox-aggregate-type", &self.aggregate_type),
            ("outbox-aggregate-id", &self.aggregate_id),
            ("outbox-producer", &self.producer),
            ("outbox-transaction-id", &self.transaction_id),
        ]
        .into_iter()
        .fold(
            OwnedHeaders::new_with_capacity(6),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(value.as_str()),
                })
            },
        )
    }
}

/// A bare producer with outboxd's settings sending `records` records of
/// outboxd's shape, pipelined: records per second.
pub async fn direct_produce(
    args: &BenchArgs,
    shape: &LoadShape,
    topic: &str,
    records: u64,
) -> anyhow::Result<f64> {
    let producer = producer(args, None)?;
    let shape = shape.clone();
    let topic = topic.to_owned();
    // Its own runtime, away from everything else of the bench.
    let rate = std::thread::spawn(move || -> anyhow::Result<f64> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let mut rng = rand::rng();
            let mut in_flight = FuturesUnordered::new();
            let started = Instant::now();
            let mut done = 0u64;
            for n in 0..records {
                let key = shape.key(&mut rng);
                let payload = shape.payload(now_micros());
                let meta = RecordMeta {
                    event_id: uuid::Uuid::now_v7().to_string(),
                    event_type: "bench".into(),
                    aggregate_type: String::new(),
                    aggregate_id: String::new(),
                    producer: "bench-direct".into(),
                    transaction_id: format!("tx-{}", n / shape.batch as u64),
                    timestamp_millis: chrono::Utc::now().timestamp_millis(),
                };
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
                    .key(key.as_bytes())
                    .payload(&payload[..])
                    .headers(meta.headers())
                    .timestamp(meta.timestamp_millis);
                loop {
                    match producer.send_result(record) {
                        Ok(delivery) => {
                            in_flight.push(delivery);
                            break;
                        }
                        Err((_, returned)) => {
                            record = returned;
                            // Queue full: let deliveries complete.
                            if let Some(result) = in_flight.next().await {
                                anyhow::ensure!(
                                    matches!(result, Ok(Ok(_))),
                                    "direct produce failed"
                                );
                                done += 1;
                            }
                        }
                    }
                }
            }
            while let Some(result) = in_flight.next().await {
                anyhow::ensure!(matches!(result, Ok(Ok(_))), "direct produce failed");
                done += 1;
            }
            producer.flush(Duration::from_secs(30))?;
            Ok(done as f64 / started.elapsed().as_secs_f64())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the direct-produce thread panicked"))??;
    Ok(rate)
}

/// The hand-written relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandRelay {
    /// Send each record and wait, mark each row.
    Naive,
    /// Pipelined sends, one update per page.
    Careful,
}

impl HandRelay {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            HandRelay::Naive => "naive outbox",
            HandRelay::Careful => "careful outbox",
        }
    }

    fn page(self) -> i64 {
        match self {
            HandRelay::Naive => 100,
            HandRelay::Careful => 1_000,
        }
    }

    fn idle_sleep(self) -> Duration {
        match self {
            HandRelay::Naive => Duration::from_secs(1),
            HandRelay::Careful => Duration::from_millis(100),
        }
    }
}

/// What one hand-written relay achieved.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayFigures {
    /// Inserts per second it was offered.
    pub offered_rate: f64,
    /// Rows the writers inserted.
    pub inserted: u64,
    /// Rows it published.
    pub published: u64,
    /// Published per second, from its start to its last publish.
    pub rate: f64,
}

const SCHEMA: &str = "
DROP TABLE IF EXISTS bench_outbox;
CREATE TABLE bench_outbox (
    id             bigserial   PRIMARY KEY,
    event_id       uuid        NOT NULL,
    topic          text        NOT NULL,
    key            bytea,
    payload        bytea       NOT NULL,
    event_type     text        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    producer       text        NOT NULL,
    transaction_id text        NOT NULL,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    published      boolean     NOT NULL DEFAULT false
);
CREATE INDEX bench_outbox_unpublished ON bench_outbox (id) WHERE NOT published;
";

const INSERT: &str = "
INSERT INTO bench_outbox (event_id, topic, key, payload, event_type, aggregate_type, aggregate_id, producer, transaction_id)
SELECT id, $2, k, p, 'bench', '', '', $3, $4
FROM UNNEST($1::uuid[], $5::bytea[], $6::bytea[]) AS u(id, k, p)";

const POLL: &str = "
SELECT id, event_id, key, payload, event_type, aggregate_type, aggregate_id, producer, transaction_id, occurred_at
FROM bench_outbox WHERE NOT published ORDER BY id LIMIT $1";

/// The store as a service's relay would find it: dead rows of earlier runs
/// vacuumed, statistics fresh, dirty pages written out.
pub async fn settle_store(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql("VACUUM (ANALYZE)").execute(pool).await?;
    // Needs a superuser or pg_checkpoint; without it the run goes on.
    if let Err(error) = sqlx::raw_sql("CHECKPOINT").execute(pool).await {
        println!("  (no CHECKPOINT before the baseline: {error})");
    }
    Ok(())
}

/// Runs `relay` against inserts offered at `offered_rate` events per second
/// for the run's duration.
pub async fn hand_written_outbox(
    args: &BenchArgs,
    shape: &LoadShape,
    topic: &str,
    relay: HandRelay,
    offered_rate: f64,
) -> anyhow::Result<RelayFigures> {
    anyhow::ensure!(
        offered_rate > 0.0,
        "no offered rate for the {}: outboxd delivered nothing",
        relay.name()
    );
    let pool = PgPoolOptions::new()
        .max_connections((shape.concurrency + 2) as u32)
        .connect(&args.database_url)
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    settle_store(&pool).await?;

    let inserted = Arc::new(AtomicU64::new(0));
    let writers_stop = Instant::now() + shape.duration;
    // Each writer inserts a batch every `interval`, the writers spread over it.
    let interval =
        Duration::from_secs_f64(shape.batch as f64 * shape.concurrency as f64 / offered_rate);
    let first = Instant::now();
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut writers = Vec::new();
    for writer in 0..shape.concurrency {
        let (pool, shape, topic, inserted) = (
            pool.clone(),
            shape.clone(),
            topic.to_owned(),
            inserted.clone(),
        );
        let producer = format!("bench-{run}-{writer}");
        let mut due = first + interval.mul_f64(writer as f64 / shape.concurrency as f64);
        writers.push(tokio::spawn(async move {
            let mut transaction = 0u64;
            while due < writers_stop {
                tokio::time::sleep_until(due.into()).await;
                due += interval;
                let ids: Vec<uuid::Uuid> = (0..shape.batch).map(|_| uuid::Uuid::now_v7()).collect();
                let keys: Vec<Vec<u8>> = {
                    let mut rng = rand::rng();
                    (0..shape.batch)
                        .map(|_| shape.key(&mut rng).into_bytes())
                        .collect()
                };
                let payloads: Vec<Vec<u8>> = (0..shape.batch)
                    .map(|_| shape.payload(now_micros()))
                    .collect();
                sqlx::query(INSERT)
                    .bind(&ids)
                    .bind(&topic)
                    .bind(&producer)
                    .bind(format!("tx-{transaction}"))
                    .bind(&keys)
                    .bind(&payloads)
                    .execute(&pool)
                    .await?;
                transaction += 1;
                inserted.fetch_add(shape.batch as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    // The relay starts once there is something to relay.
    while inserted.load(Ordering::Relaxed) == 0 {
        anyhow::ensure!(
            !writers.iter().any(|w| w.is_finished()),
            "the {} writers stopped before their first insert",
            relay.name()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stop_relay = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    // Microseconds from the relay's start to its last publish.
    let last_publish = Arc::new(AtomicU64::new(0));
    let relay_started = Instant::now();
    let relay_thread = {
        let linger = match relay {
            // Waiting for each ack, lingering gains nothing: it does not.
            HandRelay::Naive => Some(0),
            HandRelay::Careful => None,
        };
        let (producer, url, topic) = (
            producer(args, linger)?,
            args.database_url.clone(),
            topic.to_owned(),
        );
        let (stop, published, last_publish) =
            (stop_relay.clone(), published.clone(), last_publish.clone());
        // On a runtime of its own; the inserts stay on the caller's.
        std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await?;
                let relay_loop = RelayLoop {
                    relay,
                    pool: &pool,
                    producer: &producer,
                    topic: &topic,
                    stop: &stop,
                };
                while !stop.load(Ordering::Relaxed) {
                    let sent = relay_loop.round().await?;
                    if sent > 0 {
                        published.fetch_add(sent, Ordering::Relaxed);
                        last_publish.store(
                            relay_started.elapsed().as_micros() as u64,
                            Ordering::Relaxed,
                        );
                    }
                }
                anyhow::Ok(())
            })
        })
    };

    for writer in writers {
        writer.await??;
    }
    let inserted = inserted.load(Ordering::Relaxed);
    // As long again to catch up, then it is measured as it stands.
    let catch_up = Instant::now() + shape.duration;
    while published.load(Ordering::Relaxed) < inserted
        && Instant::now() < catch_up
        && !relay_thread.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_relay.store(true, Ordering::Relaxed);
    relay_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the {} relay panicked", relay.name()))??;
    let published = published.load(Ordering::Relaxed);
    let seconds = (last_publish.load(Ordering::Relaxed) as f64 / 1e6).max(f64::MIN_POSITIVE);
    println!(
        "  {}: offered {offered_rate:.0} events/s, {inserted} inserted, {published} published in {seconds:.1}s",
        relay.name()
    );
    Ok(RelayFigures {
        offered_rate,
        inserted,
        published,
        rate: published as f64 / seconds,
    })
}

/// The record of a stored row, in outboxd's shape.
fn stored_record<'a>(
    topic: &'a str,
    key: &'a Option<Vec<u8>>,
    payload: &'a [u8],
    meta: &RecordMeta,
) -> FutureRecord<'a, [u8], [u8]> {
    let mut record = FutureRecord::to(topic)
        .payload(payload)
        .headers(meta.headers())
        .timestamp(meta.timestamp_millis);
    if let Some(key) = key {
        record = record.key(&key[..]);
    }
    record
}

/// One hand-written relay's loop.
struct RelayLoop<'a> {
    relay: HandRelay,
    pool: &'a PgPool,
    producer: &'a FutureProducer,
    topic: &'a str,
    stop: &'a AtomicBool,
}

impl RelayLoop<'_> {
    /// Polls one page and relays it: how many rows it published.
    async fn round(&self) -> anyhow::Result<u64> {
        let rows = sqlx::query(POLL)
            .bind(self.relay.page())
            .fetch_all(self.pool)
            .await?;
        if rows.is_empty() {
            // Checked often, so that the bench can stop it.
            let until = Instant::now() + self.relay.idle_sleep();
            while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return Ok(0);
        }
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let occurred_at: chrono::DateTime<chrono::Utc> = row.try_get("occurred_at")?;
            let meta = RecordMeta {
                event_id: row.try_get::<uuid::Uuid, _>("event_id")?.to_string(),
                event_type: row.try_get("event_type")?,
                aggregate_type: row.try_get("aggregate_type")?,
                aggregate_id: row.try_get("aggregate_id")?,
                producer: row.try_get("producer")?,
                transaction_id: row.try_get("transaction_id")?,
                timestamp_millis: occurred_at.timestamp_millis(),
            };
            let id: i64 = row.try_get("id")?;
            let key: Option<Vec<u8>> = row.try_get("key")?;
            let payload: Vec<u8> = row.try_get("payload")?;
            records.push((id, key, payload, meta));
        }
        match self.relay {
            HandRelay::Naive => {
                for (id, key, payload, meta) in &records {
                    self.producer
                        .send(
                            stored_record(self.topic, key, payload, meta),
                            Duration::from_secs(30),
                        )
                        .await
                        .map_err(|(e, _)| anyhow::anyhow!("naive relay send failed: {e}"))?;
                    sqlx::query("UPDATE bench_outbox SET published = true WHERE id = $1")
                        .bind(id)
                        .execute(self.pool)
                        .await?;
                }
            }
            HandRelay::Careful => {
                let deliveries: FuturesUnordered<_> = records
                    .iter()
                    .map(|(_, key, payload, meta)| {
                        self.producer.send(
                            stored_record(self.topic, key, payload, meta),
                            Duration::from_secs(30),
                        )
                    })
                    .collect();
                let results: Vec<_> = deliveries.collect().await;
                for result in results {
                    result.map_err(|(e, _)| anyhow::anyhow!("careful relay send failed: {e}"))?;
                }
                let ids: Vec<i64> = records.iter().map(|(id, ..)| *id).collect();
                sqlx::query("UPDATE bench_outbox SET published = true WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(self.pool)
                    .await?;
            }
        }
        Ok(records.len() as u64)
    }
}
