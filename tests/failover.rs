//! Several gateway processes on one store, killed and paused: every
//! acknowledged event reaches Kafka, in per-key order.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use outboxd::proto;
use outboxd::proto::outbox_admin_client::OutboxAdminClient;
use outboxd::proto::outbox_client::OutboxClient;
use support::{Load, ServeProcess, Tansu, consume_until, first_sightings_by_key};

fn failover_config(store: &str, brokers: &str) -> outboxd::config::Config {
    let mut config = support::test_config(store, brokers);
    config.relay.lease_ttl = Duration::from_secs(2);
    config.relay.shard_count = 8;
    config
}

/// Appends to whichever endpoint `current` names until stopped; events are
/// recorded only once acknowledged. Returns each key's ids in append order.
fn appender(
    endpoints: Arc<std::sync::Mutex<String>>,
    topic: String,
    keys: usize,
    stop: Arc<AtomicBool>,
    acked_requests: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<HashMap<String, Vec<String>>> {
    tokio::spawn(async move {
        let load = Load {
            producer: "failover",
            topic: &topic,
            events: 5,
            key_prefix: "k",
            keys,
        };
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        let mut transaction = 0;
        let mut client: Option<OutboxClient<tonic::transport::Channel>> = None;
        while !stop.load(Ordering::Relaxed) {
            let endpoint = endpoints.lock().unwrap().clone();
            if client.is_none() {
                client = OutboxClient::connect(endpoint).await.ok();
                if client.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
            let (request, event_keys) = load.append(transaction);
            match support::append_with_deadline(client.as_mut().unwrap(), request.build()).await {
                Ok(response) => {
                    transaction += 1;
                    acked_requests.fetch_add(1, Ordering::Relaxed);
                    for (key, id) in event_keys.into_iter().zip(response.event_ids) {
                        by_key.entry(key).or_default().push(id);
                    }
                }
                // Not acknowledged: retried with the same transaction id,
                // so a stored-but-unacked append comes back as a duplicate.
                Err(_) => {
                    client = None;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        by_key
    })
}

async fn verify(bootstrap: &str, topic: &str, by_key: &HashMap<String, Vec<String>>) -> usize {
    let expected: HashSet<String> = by_key.values().flatten().cloned().collect();
    let records = consume_until(
        bootstrap,
        topic,
        &expected,
        Duration::from_secs(2),
        Duration::from_secs(120),
    )
    .await;
    let order = first_sightings_by_key(&records);
    for (key, ids) in by_key {
        let seen: Vec<String> = order
            .get(key.as_bytes())
            .map(|all| {
                all.iter()
                    .filter(|id| expected.contains(*id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(&seen, ids, "per-key order of {key}");
    }
    records.len()
        - records
            .iter()
            .map(|r| r.event_id())
            .collect::<HashSet<_>>()
            .len()
}

/// Ordering keys `{prefix}-{n}`, the first one of each of `shards` shards,
/// in shard order.
fn one_key_per_shard(prefix: &str, shards: u32) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for n in 0.. {
        let key = format!("{prefix}-{n}");
        let shard = outboxd::domain::murmur2::kafka_partition(key.as_bytes(), shards);
        if shard as usize == keys.len() {
            keys.push(key);
            if keys.len() == shards as usize {
                break;
            }
        }
    }
    keys
}

async fn wait_for_acks(acked: &AtomicUsize, more: usize) {
    let target = acked.load(Ordering::Relaxed) + more;
    support::eventually(
        "appends to be acknowledged",
        Duration::from_secs(60),
        || async { (acked.load(Ordering::Relaxed) >= target).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_ten_times_loses_nothing_and_keeps_order() {
    let tansu = Tansu::shared();
    let topic = support::unique("crash");
    tansu.create_topic(&topic, 4).await;
    let config = failover_config(&support::fresh_database().await, &tansu.bootstrap);
    let port = support::free_port();
    let mut gateway = ServeProcess::start_on(&config, port).await;
    let endpoint = Arc::new(std::sync::Mutex::new(gateway.endpoint()));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let appends = appender(
        endpoint.clone(),
        topic.clone(),
        12,
        stop.clone(),
        acked.clone(),
    );
    for _ in 0..10 {
        wait_for_acks(&acked, 40).await;
        gateway.kill();
        gateway = ServeProcess::start_on(&config, port).await;
    }
    wait_for_acks(&acked, 40).await;
    stop.store(true, Ordering::Relaxed);
    let by_key = appends.await.unwrap();
    let duplicates = verify(&tansu.bootstrap, &topic, &by_key).await;
    println!(
        "crash test: {} events acknowledged, {duplicates} duplicates in Kafka after 10 SIGKILLs",
        by_key.values().map(Vec::len).sum::<usize>()
    );
    gateway.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_split_the_shards_and_survive_each_other() {
    let tansu = Tansu::shared();
    let topic = support::unique("pair");
    tansu.create_topic(&topic, 4).await;
    let config = failover_config(&support::fresh_database().await, &tansu.bootstrap);
    let first = ServeProcess::start(&config).await;
    let second = ServeProcess::start(&config).await;
    let mut admin = OutboxAdminClient::connect(first.endpoint()).await.unwrap();
    let owners = |leases: &[proto::Lease]| -> HashMap<String, usize> {
        let mut owners = HashMap::new();
        for lease in leases.iter().filter(|l| !l.owner.is_empty()) {
            *owners.entry(lease.owner.clone()).or_insert(0) += 1;
        }
        owners
    };
    let split = support::eventually(
        "the shards to split evenly",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                let leases = admin
                    .list_leases(proto::ListLeasesRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .leases;
                let owners = owners(&leases);
                (owners.len() == 2 && owners.values().all(|n| *n == 4)).then_some(owners)
            }
        },
    )
    .await;
    assert_eq!(
        split.values().sum::<usize>(),
        8,
        "each shard has exactly one owner"
    );

    let endpoint = Arc::new(std::sync::Mutex::new(first.endpoint()));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let appends = appender(
        endpoint.clone(),
        topic.clone(),
        12,
        stop.clone(),
        acked.clone(),
    );
    wait_for_acks(&acked, 50).await;

    // A long pause: the second instance's leases expire and move.
    second.pause();
    let taken_over = std::time::Instant::now();
    support::eventually(
        "the first instance to take every shard",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                let leases = admin
                    .list_leases(proto::ListLeasesRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .leases;
                let owners = owners(&leases);
                let live = leases.iter().filter(|l| {
                    l.expires_at
                        .as_ref()
                        .is_some_and(|t| t.seconds >= chrono::Utc::now().timestamp())
                });
                (owners.len() == 1 && live.count() == 8).then_some(())
            }
        },
    )
    .await;
    assert!(
        taken_over.elapsed() < Duration::from_secs(10),
        "taken over within a few lease periods"
    );
    wait_for_acks(&acked, 50).await;
    // The paused instance wakes up as a zombie (that its writes are refused
    // is the next test's subject), and dies.
    second.resume();
    wait_for_acks(&acked, 50).await;
    second.kill();
    wait_for_acks(&acked, 50).await;
    stop.store(true, Ordering::Relaxed);
    let by_key = appends.await.unwrap();
    let duplicates = verify(&tansu.bootstrap, &topic, &by_key).await;
    println!("two instances: {duplicates} duplicates after a pause and a kill");
    let _ = &mut admin;
    first.stop();
}

/// An instance paused past its leases wakes up as a zombie: the leases
/// expired and another owner took them (a new epoch), yet the zombie still
/// relays what it finds in its old shards. Kafka gets those records, but
/// every write of their outcomes is refused (counted in
/// `outboxd_relay_writes_fenced_total`): no event's final state comes from
/// the zombie. The events are published once the shards have an owner with
/// a current lease, each recorded with that owner's record, not the
/// zombie's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zombie_is_fenced_off_after_its_leases_expire() {
    use support::{AppendBuilder, keyed_event};
    const SHARDS: u32 = 8;
    let tansu = Tansu::shared();
    let topic = support::unique("zombie");
    tansu.create_topic(&topic, 4).await;
    let store_url = support::fresh_database().await;
    let mut config = failover_config(&store_url, &tansu.bootstrap);
    let metrics_port = support::free_port();
    config.metrics_listen = Some(([127, 0, 0, 1], metrics_port).into());
    let zombie = ServeProcess::start(&config).await;
    let mut client = OutboxClient::connect(zombie.endpoint()).await.unwrap();
    let admin = OutboxAdminClient::connect(zombie.endpoint()).await.unwrap();
    let live_leases = |admin: &OutboxAdminClient<tonic::transport::Channel>| {
        let mut admin = admin.clone();
        async move {
            let leases = admin
                .list_leases(proto::ListLeasesRequest {})
                .await
                .ok()?
                .into_inner()
                .leases;
            let now = chrono::Utc::now().timestamp();
            let live = leases
                .iter()
                .filter(|l| l.expires_at.as_ref().is_some_and(|t| t.seconds > now))
                .count();
            (live == SHARDS as usize).then_some(leases)
        }
    };
    let old_leases = support::eventually(
        "the instance to hold every shard",
        Duration::from_secs(30),
        || live_leases(&admin),
    )
    .await;
    let keys = one_key_per_shard("zombie", SHARDS);
    let event = |key: &String, label: &str| support::keyed_event(&topic, key, label.as_bytes());

    // It relays while its leases are current; once these are published it
    // has nothing in flight.
    let relayed = support::append_with_deadline(
        &mut client,
        support::append_request(
            support::immediate_token("zombie", "before"),
            keys.iter().map(|k| event(k, "before")).collect(),
        ),
    )
    .await
    .unwrap()
    .event_ids;
    support::statuses_when(
        &client,
        &relayed,
        "the first events to be published",
        Duration::from_secs(30),
        |s| s.state == proto::EventState::Published as i32,
    )
    .await;

    // Paused past its leases: they expire, and another owner takes them
    // through the store as an instance would, and holds them without
    // relaying. The paused instance released nothing.
    zombie.pause();
    let store = outboxd::store::connect(&store_url, 2, SHARDS)
        .await
        .unwrap();
    let taken = support::eventually(
        "the paused instance's leases to expire and be taken",
        Duration::from_secs(30),
        || {
            let store = store.clone();
            async move {
                let leases = store
                    .acquire_leases("new-owner", Duration::from_secs(120), SHARDS)
                    .await
                    .ok()?;
                (leases.len() == SHARDS as usize).then_some(leases)
            }
        },
    )
    .await;
    for lease in &taken {
        let old = old_leases
            .iter()
            .find(|l| l.shard == lease.shard)
            .expect("the shard had a lease");
        assert!(
            lease.epoch > old.epoch as i64,
            "taking an expired lease moves its epoch on: {lease:?} after {old:?}"
        );
    }
    // Meanwhile one event per shard is appended (through the store: the
    // paused instance answers no request). Only the zombie will relay them.
    let stranded: Vec<String> = store
        .append(&[AppendBuilder::new("zombie", "stranded")
            .events(keys.iter().map(|key| keyed_event(&topic, key, "stranded")))
            .batch()])
        .await
        .unwrap()
        .remove(0)
        .unwrap()
        .event_ids
        .iter()
        .map(|id| id.to_string())
        .collect();

    zombie.resume();
    // The zombie sends them: every stranded event is in Kafka...
    let stranded_set: HashSet<String> = stranded.iter().cloned().collect();
    let zombie_records: HashSet<(String, i32, i64)> = consume_until(
        &tansu.bootstrap,
        &topic,
        &stranded_set,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await
    .into_iter()
    .filter(|r| stranded_set.contains(&r.event_id()))
    .map(|r| (r.event_id(), r.partition, r.offset))
    .collect();
    // ...and each of its old shard workers has its write refused once.
    support::eventually(
        "the zombie's writes to be refused for every shard",
        Duration::from_secs(30),
        || async move {
            let metrics = support::scrape_metrics(metrics_port).await;
            (support::metric_value(&metrics, "outboxd_relay_writes_fenced_total")
                >= f64::from(SHARDS))
            .then_some(())
        },
    )
    .await;
    // No final state came from the zombie: with the leases held elsewhere
    // and not relayed, every stranded event is still waiting.
    let statuses = client
        .get_status(proto::GetStatusRequest {
            event_ids: stranded.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(statuses.len(), stranded.len());
    for status in &statuses {
        assert_eq!(
            status.state,
            proto::EventState::Ready as i32,
            "the zombie's delivery of {} was recorded: {status:?}",
            status.event_id
        );
    }

    // The owner gives the shards up; the instance, now current again, takes
    // them with a new epoch and publishes the stranded events itself.
    store.release_leases("new-owner").await.unwrap();
    let published = support::statuses_when(
        &client,
        &stranded,
        "the stranded events to be published by a current owner",
        Duration::from_secs(60),
        |s| s.state == proto::EventState::Published as i32,
    )
    .await;
    let records = consume_until(
        &tansu.bootstrap,
        &topic,
        &stranded_set,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    for status in &published {
        let recorded = (
            status.partition.expect("a published event has a partition"),
            status.offset.expect("a published event has an offset"),
        );
        assert!(
            !zombie_records.contains(&(status.event_id.clone(), recorded.0, recorded.1)),
            "{} is recorded with the zombie's record {recorded:?}",
            status.event_id
        );
        assert!(
            records
                .iter()
                .any(|r| (r.partition, r.offset) == recorded && r.event_id() == status.event_id),
            "{} is recorded at {recorded:?}, a record of another event",
            status.event_id
        );
    }
    let leases = support::eventually(
        "the instance to hold every shard again",
        Duration::from_secs(30),
        || live_leases(&admin),
    )
    .await;
    for lease in &leases {
        let usurped = taken.iter().find(|l| l.shard == lease.shard).unwrap();
        assert!(
            lease.epoch > usurped.epoch as u64,
            "{lease:?} after {usurped:?}"
        );
    }
    zombie.stop();
}

/// Appends, Commit and Redrive made through one instance wake the shard's
/// owner on another at once (the fallback poll is set far beyond the wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wake_ups_reach_the_owner_on_another_instance() {
    use support::{Gateway, MockKafka};
    let kafka = MockKafka::start(1);
    let topic = support::unique("wake");
    kafka.create_topic(&topic, 1).await;
    let store_url = support::fresh_database().await;
    let mut config = failover_config(&store_url, &kafka.bootstrap);
    config.relay.poll_interval = Duration::from_secs(120);
    let first = Gateway::start(config.clone()).await;
    let second = Gateway::start(config).await;
    let channel = first.channel().await;
    let mut client = OutboxClient::new(channel.clone());
    let mut admin = OutboxAdminClient::new(channel.clone());
    support::eventually(
        "both instances to hold shards",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                let leases = admin
                    .list_leases(proto::ListLeasesRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .leases;
                let now = std::time::SystemTime::now();
                let owners: HashSet<String> = leases
                    .iter()
                    .filter(|l| {
                        l.expires_at.as_ref().is_some_and(|t| {
                            std::time::SystemTime::try_from(*t).is_ok_and(|t| t > now)
                        })
                    })
                    .map(|l| l.owner.clone())
                    .collect();
                (leases.len() == 8 && owners.len() == 2).then_some(())
            }
        },
    )
    .await;
    // One key per shard, so that each instance owns some of them.
    let keys = one_key_per_shard("key", 8);
    let events = |label: &str| -> Vec<proto::Event> {
        keys.iter()
            .map(|key| support::keyed_event(&topic, key, label.as_bytes()))
            .collect()
    };
    let published_soon = |ids: Vec<String>| {
        let bootstrap = kafka.bootstrap.clone();
        let topic = topic.clone();
        async move {
            consume_until(
                &bootstrap,
                &topic,
                &ids.into_iter().collect(),
                Duration::from_millis(100),
                Duration::from_secs(5),
            )
            .await
        }
    };

    // Appends.
    let appended = client
        .append(support::append_request(
            support::immediate_token("wake", "appended"),
            events("appended"),
        ))
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    published_soon(appended).await;

    // Commit of a two_phase transaction.
    let token = support::two_phase_token("wake", "committed", Duration::from_secs(300));
    let committed = client
        .append(support::append_request(token, events("committed")))
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    client
        .commit(proto::CommitRequest {
            producer: "wake".into(),
            transaction_id: "committed".into(),
        })
        .await
        .unwrap();
    published_soon(committed).await;

    // Redrive of dead letters: each event is refused once by the broker.
    let mut dead = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        kafka.fail_produce_requests(vec![
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
        ]);
        let id = client
            .append(support::append_request(
                support::immediate_token("wake-dead", &format!("dead-{n}")),
                vec![support::keyed_event(&topic, key, b"dead")],
            ))
            .await
            .unwrap()
            .into_inner()
            .event_ids
            .remove(0);
        support::eventually(
            "the refused event to be dead-lettered",
            Duration::from_secs(5),
            || {
                let mut client = client.clone();
                let id = id.clone();
                async move {
                    (support::status_of(&mut client, &id).await.state
                        == proto::EventState::DeadLettered as i32)
                        .then_some(())
                }
            },
        )
        .await;
        dead.push(id);
    }
    let redriven = admin
        .redrive(proto::RedriveRequest {
            producer: "wake-dead".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(redriven, 8);
    published_soon(dead).await;

    first.stop().await;
    second.stop().await;
}
