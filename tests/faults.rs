//! The relay under the failures real deployments meet. Faults are injected
//! with librdkafka's mock cluster; an independent consumer checks what
//! reached Kafka.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outboxd::proto;
use outboxd::proto::outbox_client::OutboxClient;
use support::{
    AppendBuilder, EventBuilder, Gateway, Load, MockKafka, consume_until, first_sightings_by_key,
    status_of,
};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn relay_health(channel: &Channel) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: outboxd::server::RELAY_HEALTH_SERVICE.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

async fn wait_for_relay_health(channel: &Channel, wanted: ServingStatus) {
    support::eventually(
        &format!("relay health {wanted:?}"),
        Duration::from_secs(60),
        || {
            let channel = channel.clone();
            async move { (relay_health(&channel).await == wanted as i32).then_some(()) }
        },
    )
    .await;
}

/// One acknowledged append: when it was sent, when its ack came, its ids.
struct Ack {
    sent: Instant,
    acked: Instant,
    event_ids: Vec<String>,
}

/// What [`keep_appending`] saw.
#[derive(Default)]
struct Appended {
    /// Each key's event ids in append order.
    by_key: HashMap<String, Vec<String>>,
    /// Every acknowledged append, in the order the acks came.
    acks: Vec<Ack>,
    failures: usize,
}

impl Appended {
    /// Acks of appends that were sent at or after `since`.
    fn acked_since(&self, since: Instant) -> impl Iterator<Item = &Ack> {
        self.acks.iter().filter(move |ack| ack.sent >= since)
    }
}

/// Appends batches over `keys` keys, one at a time, until told to stop;
/// what it saw is shared as it goes.
fn keep_appending(
    mut client: OutboxClient<Channel>,
    topic: String,
    keys: usize,
    stop: Arc<AtomicBool>,
) -> (
    Arc<Mutex<Appended>>,
    tokio::task::JoinHandle<Arc<Mutex<Appended>>>,
) {
    let appended = Arc::new(Mutex::new(Appended::default()));
    let shared = appended.clone();
    let task = tokio::spawn(async move {
        let load = Load {
            producer: "ledger",
            topic: &topic,
            events: 10,
            key_prefix: "account-",
            keys,
        };
        let mut transaction = 0;
        while !stop.load(Ordering::Relaxed) {
            let (request, event_keys) = load.append(transaction);
            transaction += 1;
            let sent = Instant::now();
            let result = support::append_with_deadline(&mut client, request.build()).await;
            let acked = Instant::now();
            {
                let mut appended = shared.lock().unwrap();
                match result {
                    Ok(response) => {
                        for (key, id) in event_keys.into_iter().zip(&response.event_ids) {
                            appended.by_key.entry(key).or_default().push(id.clone());
                        }
                        appended.acks.push(Ack {
                            sent,
                            acked,
                            event_ids: response.event_ids,
                        });
                    }
                    Err(_) => appended.failures += 1,
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shared
    });
    (appended, task)
}

/// Waits until `count` more appends, sent from now on, are acknowledged.
async fn wait_for_new_acks(appended: &Mutex<Appended>, count: usize, what: &str) -> Instant {
    let since = Instant::now();
    support::eventually(what, Duration::from_secs(30), || async {
        let appended = appended.lock().unwrap();
        (appended.acked_since(since).count() >= count).then_some(())
    })
    .await;
    since
}

/// Appends are acknowledged *while* every broker is down: hundreds of them
/// are sent and answered inside the outage, their events stored and waiting
/// for Kafka. Once the brokers are back the relay delivers everything, in
/// per-key order and at no cost in attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kafka_outage_fails_no_append_and_loses_nothing() {
    let kafka = MockKafka::start(3);
    let topic = support::unique("outage");
    kafka.create_topic(&topic, 3).await;
    let mut config = support::test_config(&support::fresh_database().await, &kafka.bootstrap);
    config.relay.breaker_cooldown = Duration::from_millis(200);
    config.relay.breaker_max_cooldown = Duration::from_secs(1);
    let metrics_port = support::free_port();
    config.metrics_listen = Some(([127, 0, 0, 1], metrics_port).into());
    let gateway = Gateway::start(config).await;
    let client = gateway.client().await;
    let channel = gateway.channel().await;
    wait_for_relay_health(&channel, ServingStatus::Serving).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (appended, appender) = keep_appending(client.clone(), topic.clone(), 8, stop.clone());
    wait_for_new_acks(&appended, 20, "appends before the outage").await;

    for broker in 1..=3 {
        kafka.broker_down(broker);
    }
    wait_for_relay_health(&channel, ServingStatus::NotServing).await;
    // Open, or half-open while it probes; other gateways of this test
    // process share the metrics, so look until it shows.
    support::eventually(
        "the breaker to show open in the metrics",
        Duration::from_secs(10),
        || async move {
            let text = support::scrape_metrics(metrics_port).await;
            text.lines()
                .any(|l| l == "outboxd_breaker_state 1" || l == "outboxd_breaker_state 2")
                .then_some(())
        },
    )
    .await;
    // The outage is established: from here until the brokers come back, a
    // gateway that held appends until Kafka returned would ack nothing.
    const DURING_OUTAGE: usize = 200;
    let outage_seen = wait_for_new_acks(
        &appended,
        DURING_OUTAGE,
        "appends to be acknowledged while every broker is down",
    )
    .await;
    assert_eq!(
        relay_health(&channel).await,
        ServingStatus::NotServing as i32,
        "the relay could not reach Kafka the whole time"
    );
    let during: Vec<String> = {
        let appended = appended.lock().unwrap();
        appended
            .acked_since(outage_seen)
            .flat_map(|ack| ack.event_ids.iter().cloned())
            .collect()
    };
    let mut probe = client.clone();
    let statuses = probe
        .get_status(proto::GetStatusRequest {
            event_ids: during.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(statuses.len(), during.len());
    for status in &statuses {
        assert_eq!(
            status.state,
            proto::EventState::Ready as i32,
            "{} was acknowledged while Kafka could not have it",
            status.event_id
        );
    }
    let outage_over = Instant::now();
    for broker in 1..=3 {
        kafka.broker_up(broker);
    }
    {
        let appended = appended.lock().unwrap();
        let mut latencies: Vec<Duration> = appended
            .acked_since(outage_seen)
            .filter(|ack| ack.acked < outage_over)
            .map(|ack| ack.acked - ack.sent)
            .collect();
        latencies.sort();
        assert!(
            latencies.len() >= DURING_OUTAGE,
            "{} appends sent and acknowledged during the outage",
            latencies.len()
        );
        println!(
            "outage: {} appends acknowledged while every broker was down, in {:?}; ack latency p50 {:?}, max {:?}",
            latencies.len(),
            outage_over - outage_seen,
            latencies[latencies.len() / 2],
            latencies[latencies.len() - 1]
        );
    }
    wait_for_relay_health(&channel, ServingStatus::Serving).await;
    let after = support::scrape_metrics(metrics_port).await;
    assert!(
        support::metric_value(&after, "outboxd_breaker_opened_total") >= 1.0,
        "the breaker's openings are counted:\n{after}"
    );
    assert!(after.contains("outboxd_events_published_total"), "{after}");
    wait_for_new_acks(&appended, 20, "appends after the outage").await;
    stop.store(true, Ordering::Relaxed);
    let by_key = {
        let appended = appender.await.unwrap();
        let appended = appended.lock().unwrap();
        assert_eq!(appended.failures, 0, "no append failed during the outage");
        appended.by_key.clone()
    };

    let all: Vec<String> = by_key.values().flatten().cloned().collect();
    let expected: HashSet<String> = all.iter().cloned().collect();
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &expected,
        Duration::from_secs(2),
        Duration::from_secs(120),
    )
    .await;
    let order = first_sightings_by_key(&records);
    for (key, ids) in &by_key {
        assert_eq!(
            order.get(key.as_bytes()),
            Some(ids),
            "order of {key} kept across the outage"
        );
    }
    // The outage cost no event an attempt: none was retried or dead-lettered.
    let mut client = client.clone();
    for chunk in all.chunks(5_000) {
        let statuses = client
            .get_status(proto::GetStatusRequest {
                event_ids: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        for status in statuses {
            assert_eq!(
                status.attempts, 0,
                "event {} was charged an attempt",
                status.event_id
            );
        }
    }
    gateway.stop().await;
}

async fn outboxd_admin(address: &str, args: &[&str]) -> String {
    let address = format!("http://{address}");
    let mut all = vec!["admin", "--address", address.as_str()];
    all.extend_from_slice(args);
    support::run_outboxd(&all).await
}

/// An oversize record dead-letters at once; other keys, and later events of
/// its own key, flow; after the limit is raised, a redrive delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_record_dead_letters_at_once_and_redrives() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("poison");
    kafka.create_topic(&topic, 2).await;
    let store = support::fresh_database().await;
    let mut config = support::test_config(&store, &kafka.bootstrap);
    config
        .kafka
        .producer
        .insert("message.max.bytes".into(), "10000".into());
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    let event =
        |key: &str, size: usize| EventBuilder::new(&topic).key(key).payload(vec![b'p'; size]);
    let ids = client
        .append(
            AppendBuilder::new("media", "t1")
                .events([
                    event("poison", 50_000),
                    event("healthy", 100),
                    event("poison", 10),
                ])
                .build(),
        )
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    let (poison, healthy, after_poison) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    let others: HashSet<String> = [healthy.clone(), after_poison.clone()].into();
    consume_until(
        &kafka.bootstrap,
        &topic,
        &others,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;

    let dead = status_of(&mut client, &poison).await;
    assert_eq!(dead.state, proto::EventState::DeadLettered as i32);
    assert_eq!(dead.attempts, 1, "dead-lettered at the first attempt");
    assert!(dead.reason.contains("permanent"), "{}", dead.reason);
    let listed = outboxd_admin(
        &gateway.address.to_string(),
        &["dead-letters", "--producer", "media"],
    )
    .await;
    assert!(listed.contains(&poison), "{listed}");
    assert!(!listed.contains(&healthy));
    gateway.stop().await;

    // The operator raises the limit and redrives.
    let gateway = Gateway::start(support::test_config(&store, &kafka.bootstrap)).await;
    let mut client = gateway.client().await;
    let redriven = outboxd_admin(
        &gateway.address.to_string(),
        &["redrive", "--event-id", &poison],
    )
    .await;
    assert!(redriven.contains("redriven: 1 events"), "{redriven}");
    let all: HashSet<String> = [poison.clone(), healthy, after_poison].into();
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &all,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    let delivered = records.iter().find(|r| r.event_id() == poison).unwrap();
    assert_eq!(delivered.payload.len(), 50_000);
    support::eventually(
        "the redriven event to be PUBLISHED",
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let poison = poison.clone();
            async move {
                (status_of(&mut client, &poison).await.state == proto::EventState::Published as i32)
                    .then_some(())
            }
        },
    )
    .await;
    let _ = &mut client;
    gateway.stop().await;
}

/// With `dead_letter_holds_key`, a dead letter holds back the later events
/// of its key until it is redriven; then both go, in append order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_can_hold_its_key_until_redriven() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("held");
    kafka.create_topic(&topic, 2).await;
    let store = support::fresh_database().await;
    let mut config = support::test_config(&store, &kafka.bootstrap);
    config.relay.dead_letter_holds_key = true;
    config
        .kafka
        .producer
        .insert("message.max.bytes".into(), "10000".into());
    let gateway = Gateway::start(config.clone()).await;
    let mut client = gateway.client().await;
    let event =
        |key: &str, size: usize| EventBuilder::new(&topic).key(key).payload(vec![b'h'; size]);
    let ids = client
        .append(
            AppendBuilder::new("held", "t")
                .events([
                    event("strict", 50_000),
                    event("strict", 10),
                    event("other", 10),
                ])
                .build(),
        )
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    let (poison, held, other) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    consume_until(
        &kafka.bootstrap,
        &topic,
        &[other.clone()].into(),
        Duration::from_millis(1_500),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        status_of(&mut client, &poison).await.state,
        proto::EventState::DeadLettered as i32
    );
    assert_eq!(
        status_of(&mut client, &held).await.state,
        proto::EventState::Ready as i32,
        "held behind the dead letter"
    );
    gateway.stop().await;

    config.kafka.producer.remove("message.max.bytes");
    let gateway = Gateway::start(config).await;
    outboxd_admin(
        &gateway.address.to_string(),
        &["redrive", "--producer", "held"],
    )
    .await;
    let all: HashSet<String> = [poison.clone(), held.clone(), other].into();
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &all,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        first_sightings_by_key(&records)[&b"strict".to_vec()],
        vec![poison, held],
        "append order kept"
    );
    gateway.stop().await;
}

/// A record the broker refuses for good is dead-lettered at once and copied
/// to the dead-letter topic, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_copied_to_the_dead_letter_topic() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("refused");
    let dead_letter_topic = format!("{topic}.dlq");
    kafka.create_topic(&topic, 1).await;
    kafka.create_topic(&dead_letter_topic, 1).await;
    let mut config = support::test_config(&support::fresh_database().await, &kafka.bootstrap);
    config.relay.dead_letter_topic = Some(dead_letter_topic.clone());
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    wait_for_relay_health(&gateway.channel().await, ServingStatus::Serving).await;
    kafka.fail_produce_requests(vec![
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
    ]);
    let id = client
        .append(
            AppendBuilder::new("audit", "t")
                .event(EventBuilder::new(&topic).key("k").payload(b"refused"))
                .build(),
        )
        .await
        .unwrap()
        .into_inner()
        .event_ids
        .remove(0);
    let copies = consume_until(
        &kafka.bootstrap,
        &dead_letter_topic,
        &[id.clone()].into(),
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    let copy = &copies[0];
    assert_eq!(copy.payload, b"refused");
    assert_eq!(
        copy.header("outbox-original-topic").as_deref(),
        Some(topic.as_str())
    );
    assert!(
        copy.header("outbox-dead-letter-reason")
            .is_some_and(|r| r.contains("permanent")),
        "{copy:?}"
    );
    let status = status_of(&mut client, &id).await;
    assert_eq!(status.state, proto::EventState::DeadLettered as i32);
    gateway.stop().await;
}

/// Pauses the relay once it serves; returns when it reports NOT_SERVING.
async fn pause_relay(
    channel: &Channel,
) -> outboxd::proto::outbox_admin_client::OutboxAdminClient<Channel> {
    let mut admin = outboxd::proto::outbox_admin_client::OutboxAdminClient::new(channel.clone());
    wait_for_relay_health(channel, ServingStatus::Serving).await;
    admin
        .pause_relay(proto::PauseRelayRequest {})
        .await
        .unwrap();
    wait_for_relay_health(channel, ServingStatus::NotServing).await;
    admin
}

/// PauseRelay holds publishing on every instance while appends go on; the
/// backlog shows what waits; ResumeRelay delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_holds_publishing_and_shows_the_backlog() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("paused");
    kafka.create_topic(&topic, 2).await;
    let mut config = support::test_config(&support::fresh_database().await, &kafka.bootstrap);
    config.relay.lease_ttl = Duration::from_secs(3);
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    let channel = gateway.channel().await;
    let mut admin = pause_relay(&channel).await;
    let ids = client
        .append(
            AppendBuilder::new("paused", "t")
                .events((0..5).map(|i| {
                    EventBuilder::new(&topic)
                        .key(format!("k{}", i % 3))
                        .payload(vec![b'p'; 8])
                }))
                .build(),
        )
        .await
        .expect("appends go on while the relay is paused")
        .into_inner()
        .event_ids;
    let backlog = admin
        .get_backlog(proto::GetBacklogRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        backlog.shards.iter().map(|s| s.depth).sum::<u64>(),
        5,
        "{backlog:?}"
    );
    assert!(backlog.shards.iter().all(|s| s.oldest_age.is_some()));
    // A few relay cycles later, still nothing published.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in &ids {
        assert_eq!(
            status_of(&mut client, id).await.state,
            proto::EventState::Ready as i32
        );
    }

    admin
        .resume_relay(proto::ResumeRelayRequest {})
        .await
        .unwrap();
    wait_for_relay_health(&channel, ServingStatus::Serving).await;
    let expected: HashSet<String> = ids.iter().cloned().collect();
    consume_until(
        &kafka.bootstrap,
        &topic,
        &expected,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    support::eventually("the backlog to empty", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let backlog = admin
                .get_backlog(proto::GetBacklogRequest {})
                .await
                .ok()?
                .into_inner();
            (backlog.shards.iter().map(|s| s.depth).sum::<u64>() == 0).then_some(())
        }
    })
    .await;
    gateway.stop().await;
}

/// In strict mode a record the broker refuses is not overtaken by the next
/// record of its key, even one appended in the same batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_keeps_a_refused_record_ahead_of_its_key() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("strict");
    kafka.create_topic(&topic, 1).await;
    let mut config = support::test_config(&support::fresh_database().await, &kafka.bootstrap);
    config.relay.dead_letter_holds_key = true;
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    let channel = gateway.channel().await;
    wait_for_relay_health(&channel, ServingStatus::Serving).await;
    kafka.fail_produce_requests(vec![
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
    ]);
    let ids = client
        .append(
            AppendBuilder::new("strict", "t")
                .events(
                    ["first", "second"]
                        .map(|p| EventBuilder::new(&topic).key("account-1").payload(p)),
                )
                .build(),
        )
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    support::eventually(
        "the first to be dead-lettered",
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let first = ids[0].clone();
            async move {
                (status_of(&mut client, &first).await.state
                    == proto::EventState::DeadLettered as i32)
                    .then_some(())
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status_of(&mut client, &ids[1]).await.state,
        proto::EventState::Ready as i32,
        "held behind it"
    );
    outboxd_admin(
        &gateway.address.to_string(),
        &["redrive", "--producer", "strict"],
    )
    .await;
    let expected: HashSet<String> = ids.iter().cloned().collect();
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &expected,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        first_sightings_by_key(&records)[&b"account-1".to_vec()],
        ids,
        "append order kept"
    );
    gateway.stop().await;
}

/// In the default mode too, a record that comes back with an error outboxd
/// retries (POLICY_VIOLATION) is never overtaken by a later record of its
/// key, though the broker accepted the requests sent after it: each record
/// goes in its own request, several requests in flight behind a slow broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_record_is_never_overtaken_by_its_key() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("overtake");
    kafka.create_topic(&topic, 1).await;
    let mut config = support::test_config(&support::fresh_database().await, &kafka.bootstrap);
    config.relay.retry_base = Duration::from_millis(50);
    for (name, value) in [("linger.ms", "0"), ("batch.num.messages", "1")] {
        config.kafka.producer.insert(name.into(), value.into());
    }
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    wait_for_relay_health(&gateway.channel().await, ServingStatus::Serving).await;
    kafka.round_trip_time(1, Duration::from_millis(100));
    kafka.fail_produce_requests(vec![
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_POLICY_VIOLATION,
    ]);
    let keys = ["account-1", "account-2"];
    let events: Vec<proto::Event> = (0..6)
        .map(|n| support::keyed_event(&topic, keys[n % 2], n.to_string().as_bytes()))
        .collect();
    let ids = client
        .append(support::append_request(
            support::immediate_token("overtake", "t"),
            events,
        ))
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &ids.iter().cloned().collect(),
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    let sightings = first_sightings_by_key(&records);
    for (k, key) in keys.iter().enumerate() {
        let appended: Vec<String> = ids.iter().skip(k).step_by(2).cloned().collect();
        assert_eq!(
            sightings[key.as_bytes()],
            appended,
            "{key}: first sightings in append order"
        );
    }
    gateway.stop().await;
}

/// A fatal error of the idempotent producer (here its sequence
/// desynchronisation: OUT_OF_ORDER_SEQUENCE_NUMBER on the head-of-line
/// request) replaces the producer: every event is published in order, none
/// is dead-lettered or charged an attempt, and the replacement is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_replaces_the_producer() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("fatal");
    kafka.create_topic(&topic, 1).await;
    let mut config = support::test_config(&support::fresh_database().await, &kafka.bootstrap);
    let metrics_port = support::free_port();
    config.metrics_listen = Some(([127, 0, 0, 1], metrics_port).into());
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    wait_for_relay_health(&gateway.channel().await, ServingStatus::Serving).await;
    let keys = ["k1", "k2", "k3", "k4"];
    let append = |transaction: &str, count: usize| {
        let mut client = client.clone();
        let request = support::append_request(
            support::immediate_token("fatal", transaction),
            (0..count)
                .map(|n| support::keyed_event(&topic, keys[n % 4], n.to_string().as_bytes()))
                .collect(),
        );
        async move { client.append(request).await.unwrap().into_inner().event_ids }
    };
    // Acked first, so that the producer has sequence numbers to lose.
    let before = append("before", 4).await;
    consume_until(
        &kafka.bootstrap,
        &topic,
        &before.iter().cloned().collect(),
        Duration::from_millis(100),
        Duration::from_secs(30),
    )
    .await;
    kafka.fail_produce_requests(vec![
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
    ]);
    let after = append("after", 40).await;
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &after.iter().cloned().collect(),
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await;
    let sightings = first_sightings_by_key(&records);
    for (k, key) in keys.iter().enumerate() {
        let appended: Vec<String> = before
            .iter()
            .skip(k)
            .step_by(4)
            .chain(after.iter().skip(k).step_by(4))
            .cloned()
            .collect();
        assert_eq!(sightings[key.as_bytes()], appended, "{key}: append order");
    }
    for id in &after {
        let status = status_of(&mut client, id).await;
        assert_eq!(
            status.state,
            proto::EventState::Published as i32,
            "{status:?}"
        );
        assert_eq!(
            status.attempts, 0,
            "a fatal producer error cost {id} an attempt"
        );
    }
    let metrics = support::scrape_metrics(metrics_port).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("outboxd_producer_replaced_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    gateway.stop().await;
}

/// A delivery that cannot be recorded (the store refuses the statement
/// that publishes that one event) does not wedge its shard: that event is
/// dead-lettered with the reason, and every other outcome of the batch is
/// recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_cannot_be_recorded_dead_letters_only_its_event() {
    use sqlx::Connection;
    let kafka = MockKafka::start(1);
    let topic = support::unique("unrecordable");
    kafka.create_topic(&topic, 1).await;
    let store_url = support::fresh_database().await;
    let mut config = support::test_config(&store_url, &kafka.bootstrap);
    config.relay.shard_count = 1;
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    let channel = gateway.channel().await;
    wait_for_relay_health(&channel, ServingStatus::Serving).await;
    let mut admin = outboxd::proto::outbox_admin_client::OutboxAdminClient::new(channel.clone());
    admin
        .pause_relay(proto::PauseRelayRequest {})
        .await
        .unwrap();
    wait_for_relay_health(&channel, ServingStatus::NotServing).await;
    let chosen = uuid::Uuid::now_v7().to_string();
    let mut events: Vec<proto::Event> = ["k1", "k2", "k1"]
        .iter()
        .map(|key| support::keyed_event(&topic, key, key.as_bytes()))
        .collect();
    events[0].event_id = chosen.clone();
    let ids = client
        .append(support::append_request(
            support::immediate_token("unrecordable", "t"),
            events,
        ))
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    // The store refuses any write that publishes the first event (the
    // first of its segment: one shard, one append).
    let mut store = sqlx::PgConnection::connect(&store_url).await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_first_publication() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
             IF get_byte(NEW.states, 0) = 4 AND get_byte(OLD.states, 0) <> 4 THEN \
                 RAISE EXCEPTION 'the first event cannot be published here'; \
             END IF; \
             RETURN NEW; \
         END $$; \
         CREATE TRIGGER refuse_first_publication BEFORE UPDATE ON outbox_segments \
             FOR EACH ROW EXECUTE FUNCTION refuse_first_publication();",
    )
    .execute(&mut store)
    .await
    .unwrap();
    admin
        .resume_relay(proto::ResumeRelayRequest {})
        .await
        .unwrap();
    for id in &ids[1..] {
        support::eventually(
            "the other events to be published",
            Duration::from_secs(30),
            || {
                let mut client = client.clone();
                let id = id.clone();
                async move {
                    (status_of(&mut client, &id).await.state == proto::EventState::Published as i32)
                        .then_some(())
                }
            },
        )
        .await;
    }
    // By transaction.
    let status = client
        .get_status(proto::GetStatusRequest {
            transactions: vec![proto::TransactionRef {
                producer: "unrecordable".into(),
                transaction_id: "t".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .find(|s| s.event_id == ids[0] && s.producer == "unrecordable")
        .expect("the event's own status");
    assert_eq!(
        status.state,
        proto::EventState::DeadLettered as i32,
        "{status:?}"
    );
    assert!(
        status.reason.contains("could not be recorded"),
        "{status:?}"
    );
    gateway.stop().await;
}

/// A paused relay stays paused through shutdown: stopping the gateway
/// publishes nothing of the backlog (a running relay's shutdown does send
/// what it can, see `cli::serve_drains_appends_and_publishes_on_sigterm`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_relay_publishes_nothing_at_shutdown() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("paused-shutdown");
    kafka.create_topic(&topic, 2).await;
    let config = support::test_config(&support::fresh_database().await, &kafka.bootstrap);
    let gateway = Gateway::start(config.clone()).await;
    let mut client = gateway.client().await;
    let channel = gateway.channel().await;
    pause_relay(&channel).await;
    let mut ids = Vec::new();
    for t in 0..20 {
        let request = support::append_request(
            support::immediate_token("paused", &format!("t{t}")),
            (0..10)
                .map(|i| support::keyed_event(&topic, &format!("k{i}"), b"p"))
                .collect(),
        );
        ids.extend(client.append(request).await.unwrap().into_inner().event_ids);
    }
    gateway.stop().await;

    let published = consume_until(
        &kafka.bootstrap,
        &topic,
        &HashSet::new(),
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        published.is_empty(),
        "{} records were published by a paused relay at shutdown",
        published.len()
    );
    // Still READY in the store (the pause outlives the process).
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    for id in &ids {
        assert_eq!(
            status_of(&mut client, id).await.state,
            proto::EventState::Ready as i32
        );
    }
    gateway.stop().await;
}
