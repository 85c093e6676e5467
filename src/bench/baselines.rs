//! The baselines outboxd is measured against, on the same broker and store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::Row;
use sqlx::postgres::PgPoolOptions;

use super::{BenchArgs, LoadShape};
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

/// A bare producer with outboxd's settings sending `records` records of the
/// same shape, pipelined: records per second.
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
            for _ in 0..records {
                let key = shape.key(&mut rng);
                let payload = shape.payload();
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
                    .key(key.as_bytes())
                    .payload(&payload);
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

const NAIVE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS naive_outbox (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    key bytea,
    payload bytea NOT NULL,
    published boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
)";

/// The hand-written relay at its best, against inserts from the same load
/// shape for the run's duration: events per second it published, and how many.
pub async fn naive_outbox(
    args: &BenchArgs,
    shape: &LoadShape,
    topic: &str,
) -> anyhow::Result<(f64, u64)> {
    let pool = PgPoolOptions::new()
        .max_connections((shape.concurrency + 2) as u32)
        .connect(&args.database_url)
        .await?;
    sqlx::query(NAIVE_SCHEMA).execute(&pool).await?;
    sqlx::query("CREATE INDEX IF NOT EXISTS naive_outbox_unpublished ON naive_outbox (id) WHERE NOT published")
        .execute(&pool)
        .await?;

    let stop_relay = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let relay = {
        // At its best: a relay that waits for each ack gains nothing from
        // lingering, so it does not.
        let (producer, url, topic) = (
            producer(args, Some(0))?,
            args.database_url.clone(),
            topic.to_owned(),
        );
        let (stop, published) = (stop_relay.clone(), published.clone());
        // The relay on a runtime of its own; the inserts on the caller's.
        std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let pool = PgPoolOptions::new().max_connections(1).connect(&url).await?;
                while !stop.load(Ordering::Relaxed) {
                    let rows = sqlx::query(
                        "SELECT id, key, payload FROM naive_outbox WHERE NOT published ORDER BY id LIMIT 100",
                    )
                    .fetch_all(&pool)
                    .await?;
                    if rows.is_empty() {
                        // Poll again after a second, as the hand-written relay does;
                        // checked often so the bench can stop it.
                        for _ in 0..20 {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                    for row in rows {
                        let id: i64 = row.try_get("id")?;
                        let key: Option<Vec<u8>> = row.try_get("key")?;
                        let payload: Vec<u8> = row.try_get("payload")?;
                        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).payload(&payload);
                        if let Some(key) = &key {
                            record = record.key(key);
                        }
                        producer
                            .send(record, Duration::from_secs(30))
                            .await
                            .map_err(|(e, _)| anyhow::anyhow!("naive relay send failed: {e}"))?;
                        sqlx::query("UPDATE naive_outbox SET published = true WHERE id = $1")
                            .bind(id)
                            .execute(&pool)
                            .await?;
                        published.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            })
        })
    };

    let started = Instant::now();
    let deadline = started + shape.duration;
    let inserted = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..shape.concurrency {
        let (pool, shape, topic, inserted) = (
            pool.clone(),
            shape.clone(),
            topic.to_owned(),
            inserted.clone(),
        );
        writers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let keys: Vec<Vec<u8>> = {
                    let mut rng = rand::rng();
                    (0..shape.batch).map(|_| shape.key(&mut rng).into_bytes()).collect()
                };
                let payloads: Vec<Vec<u8>> = (0..shape.batch).map(|_| shape.payload()).collect();
                sqlx::query(
                    "INSERT INTO naive_outbox (topic, key, payload) SELECT $1, k, p FROM UNNEST($2::bytea[], $3::bytea[]) AS u(k, p)",
                )
                .bind(&topic)
                .bind(&keys)
                .bind(&payloads)
                .execute(&pool)
                .await?;
                inserted.fetch_add(shape.batch as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    // Give it as long again to catch up, then measure what it managed.
    let catch_up = Instant::now() + shape.duration;
    while published.load(Ordering::Relaxed) < inserted.load(Ordering::Relaxed)
        && Instant::now() < catch_up
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop_relay.store(true, Ordering::Relaxed);
    relay
        .join()
        .map_err(|_| anyhow::anyhow!("the naive relay panicked"))??;
    let published = published.load(Ordering::Relaxed);
    println!(
        "  naive outbox: {} inserted, {published} published in {elapsed:.1}s",
        inserted.load(Ordering::Relaxed)
    );
    Ok((published as f64 / elapsed, published))
}
