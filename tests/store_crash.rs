//! Durable ack against a store crash: PostgreSQL runs as in production (fsync
//! on) and is stopped with an immediate shutdown, no checkpoint and nothing
//! flushed, right while appends are being acknowledged, several times.
//! After each restart (crash recovery from the WAL), every acknowledged
//! event is stored and reaches Kafka, in per-key order.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outboxd::proto::outbox_client::OutboxClient;
use support::{Gateway, PgCluster, Tansu, consume_until, first_sightings_by_key};
use tonic::transport::Channel;

/// Appenders in parallel, so that several appends are being committed and
/// acknowledged at the moment of the crash.
const APPENDERS: usize = 8;
/// Immediate shutdowns in one run.
const CRASHES: usize = 5;
/// Keys per appender.
const KEYS: usize = 4;

/// Appends 5-event batches until `stop`; what was acknowledged goes into
/// `acked` (key → ids in append order) as the acks come.
fn appender(
    mut client: OutboxClient<Channel>,
    topic: String,
    producer: String,
    acked: Arc<Mutex<HashMap<String, Vec<String>>>>,
    acks: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut transaction = 0usize;
        while !stop.load(Ordering::Relaxed) {
            // Each appender has keys of its own: their order is its order.
            let keys: Vec<String> = (0..5)
                .map(|i| format!("{producer}-key-{}", (transaction * 5 + i) % KEYS))
                .collect();
            let request = support::append_request(
                support::immediate_token(&producer, &format!("tx-{transaction}")),
                keys.iter()
                    .map(|key| support::keyed_event(&topic, key, producer.as_bytes()))
                    .collect(),
            );
            match support::append_with_deadline(&mut client, request).await {
                Ok(response) => {
                    transaction += 1;
                    let mut acked = acked.lock().unwrap();
                    for (key, id) in keys.into_iter().zip(response.event_ids) {
                        acked.entry(key).or_default().push(id);
                    }
                    drop(acked);
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                // Not acknowledged: nothing is promised. The store is down;
                // try again (same transaction id) until told to stop.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_events_survive_an_immediate_store_shutdown() {
    let cluster = PgCluster::start_durable();
    let store_url = support::fresh_database_on(&cluster.url("postgres")).await;
    let tansu = Tansu::shared();
    let topic = support::unique("crash-store");
    tansu.create_topic(&topic, 4).await;
    let gateway = Gateway::start(support::test_config(&store_url, &tansu.bootstrap)).await;
    let client = gateway.client().await;

    let acked = Arc::new(Mutex::new(HashMap::new()));
    let acks = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let appenders: Vec<_> = (0..APPENDERS)
        .map(|n| {
            appender(
                client.clone(),
                topic.clone(),
                format!("crash-{n}"),
                acked.clone(),
                acks.clone(),
                stop.clone(),
            )
        })
        .collect();
    // Each crash comes while the appenders go on: the acks of the last
    // moment are the ones a commit that is not yet durable would lose (a
    // small window, so the store crashes several times).
    let mut acked_before_crashes = Vec::new();
    for crash in 0..CRASHES {
        let target = acks.load(Ordering::Relaxed) + 100;
        support::eventually(
            &format!("appends to be acknowledged before crash {crash}"),
            Duration::from_secs(60),
            || async { (acks.load(Ordering::Relaxed) >= target).then_some(()) },
        )
        .await;
        cluster.crash_server();
        acked_before_crashes.push(acks.load(Ordering::Relaxed));
        cluster.start_server();
    }
    // Appends succeed again once the store is back.
    let target = acks.load(Ordering::Relaxed) + 50;
    support::eventually(
        "appends to be acknowledged after the last restart",
        Duration::from_secs(60),
        || async { (acks.load(Ordering::Relaxed) >= target).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for appender in appenders {
        appender.await.unwrap();
    }
    let by_key = acked.lock().unwrap().clone();
    let expected: HashSet<String> = by_key.values().flatten().cloned().collect();

    // Every acknowledged event is in the store, published or waiting.
    {
        let ids: Vec<uuid::Uuid> = expected.iter().map(|id| id.parse().unwrap()).collect();
        let stored: Vec<uuid::Uuid> = support::stored_event_ids(&store_url)
            .await
            .into_iter()
            .filter(|id| ids.contains(id))
            .collect();
        let stored: HashSet<String> = stored.into_iter().map(|id| id.to_string()).collect();
        let lost: Vec<&String> = expected.difference(&stored).collect();
        assert!(
            lost.is_empty(),
            "{} of {} acknowledged events are not in the store after the crashes: {lost:?}",
            lost.len(),
            expected.len()
        );
    }
    // And every one reaches Kafka, each key's events in append order.
    let records = consume_until(
        &tansu.bootstrap,
        &topic,
        &expected,
        Duration::from_secs(1),
        Duration::from_secs(120),
    )
    .await;
    let order = first_sightings_by_key(&records);
    for (key, ids) in &by_key {
        assert_eq!(
            order.get(key.as_bytes()),
            Some(ids),
            "order of {key} across the crash"
        );
    }
    println!(
        "store crashes: {} events acknowledged (appends acknowledged before each crash: {acked_before_crashes:?}), all stored and published",
        expected.len()
    );
    gateway.stop().await;
}
