//! The `outboxd` binary as an operator runs it: serve with graceful shutdown,
//! migrate, tail, and grpcurl against the reflection service.

mod support;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use outboxd::proto;
use support::{AppendBuilder, EventBuilder, Gateway, MockKafka, Tansu, consume_until};

const OUTBOXD: &str = env!("CARGO_BIN_EXE_outboxd");

fn append(topic: &str, producer: &str, transaction: usize) -> proto::AppendRequest {
    let payload = format!("{{\"n\":{transaction}}}");
    AppendBuilder::new(producer, &format!("tx-{transaction}"))
        .correlation(transaction as u64)
        .events((0..5).map(|i| {
            let key = format!("cart-{}", (transaction + i) % CART_KEYS);
            EventBuilder::new(topic)
                .key(&key)
                .payload(payload.clone())
                .aggregate("cart", key)
                .event_type("item-added")
        }))
        .build()
}

/// Ordering keys of the SIGTERM test's events: more than the records the
/// relay can have in flight (one per key), so a backlog larger than this
/// holds events that were not even sent.
const CART_KEYS: usize = 31;

/// One append as a producer saw it.
struct Sent {
    sent: std::time::Instant,
    answered: std::time::Instant,
    result: Result<Vec<String>, tonic::Status>,
}

/// SIGTERM with an unpublished backlog and appends in flight: the appends
/// held in the store when the signal arrives complete and are acknowledged,
/// the relay publishes the whole backlog and the new events before the
/// process exits 0, and records them as published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_drains_appends_and_publishes_on_sigterm() {
    use sqlx::Connection;
    use tokio::io::AsyncBufReadExt;
    let kafka = MockKafka::start(1);
    let topic = support::unique("carts");
    kafka.create_topic(&topic, 3).await;
    let database = support::fresh_database().await;
    let port = support::free_port();
    let mut child = tokio::process::Command::new(OUTBOXD)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--database-url", &database, "--brokers", &kafka.bootstrap])
        .env("RUST_LOG", "warn,outboxd=info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Its log, line by line, to see when it has taken the signal.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let log = log.clone();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().unwrap().push(line);
            }
        });
    }
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = support::eventually(
        "outboxd serve to accept connections",
        Duration::from_secs(30),
        || {
            let endpoint = endpoint.clone();
            async move {
                proto::outbox_client::OutboxClient::connect(endpoint)
                    .await
                    .ok()
            }
        },
    )
    .await;
    // A slow broker: the relay falls behind the appends.
    kafka.round_trip_time(1, Duration::from_millis(50));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..8 {
        let mut client = client.clone();
        let topic = topic.clone();
        let stop = stop.clone();
        producers.push(tokio::spawn(async move {
            let mut appends = Vec::new();
            let mut t = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = std::time::Instant::now();
                let result =
                    support::append_with_deadline(&mut client, append(&topic, &format!("p{p}"), t))
                        .await
                        .map(|response| response.event_ids);
                let failed = result.is_err();
                appends.push(Sent {
                    sent,
                    answered: std::time::Instant::now(),
                    result,
                });
                if failed {
                    break; // the server is going away: not acked, not promised
                }
                t += 1;
            }
            appends
        }));
    }
    // A backlog: events stored and not yet published.
    support::eventually(
        "a backlog of unpublished events",
        Duration::from_secs(30),
        || {
            let store = database.clone();
            async move {
                let unpublished = support::stored_events(&store)
                    .await
                    .ok()?
                    .into_iter()
                    .filter(|(_, state)| *state != outboxd::domain::EventState::Published as i16)
                    .count();
                (unpublished > 4 * CART_KEYS).then_some(())
            }
        },
    )
    .await;
    // Appends are held in the store: they wait for a lock that only appends
    // take (the relay never writes transactions).
    let mut holder = sqlx::PgConnection::connect(&database).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE outbox_transactions IN SHARE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    support::eventually(
        "an append to wait in the store",
        Duration::from_secs(30),
        || {
            let store = database.clone();
            async move {
                let mut db = sqlx::PgConnection::connect(&store).await.ok()?;
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks \
                     WHERE relation = 'outbox_transactions'::regclass AND NOT granted",
                )
                .fetch_one(&mut db)
                .await
                .ok()?;
                (waiting > 0).then_some(())
            }
        },
    )
    .await;
    let backlog: Vec<uuid::Uuid> = support::stored_events(&database)
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, state)| *state != outboxd::domain::EventState::Published as i16)
        .map(|(id, _)| id)
        .collect();
    assert!(
        backlog.len() > CART_KEYS,
        "a backlog of {} events, more than the relay can have in flight",
        backlog.len()
    );

    let signalled = std::time::Instant::now();
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    // The broker recovers, so that draining the backlog takes little time.
    kafka.round_trip_time(1, Duration::ZERO);
    support::eventually(
        "outboxd to take the signal",
        Duration::from_secs(30),
        || async {
            let log = log.lock().unwrap();
            log.iter()
                .any(|line| line.contains("shutdown requested"))
                .then_some(())
        },
    )
    .await;
    // The appends held at the signal go on.
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("outboxd exits within 60s of SIGTERM")
        .unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut appends = Vec::new();
    for producer in producers {
        appends.extend(producer.await.unwrap());
    }
    let acked: HashSet<String> = appends
        .iter()
        .filter_map(|a| a.result.as_ref().ok())
        .flatten()
        .cloned()
        .collect();
    let in_flight: Vec<&String> = appends
        .iter()
        .filter(|a| a.sent < signalled && a.answered > signalled)
        .filter_map(|a| a.result.as_ref().ok())
        .flatten()
        .collect();
    assert!(
        !in_flight.is_empty(),
        "an append in flight at the signal was acknowledged"
    );
    let backlog: HashSet<String> = backlog.iter().map(|id| id.to_string()).collect();
    // Nothing relays any more: what is in Kafka now was published before exit.
    let expected: HashSet<String> = acked.union(&backlog).cloned().collect();
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &expected,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    let in_kafka: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert!(
        backlog.is_subset(&in_kafka),
        "the backlog at the signal was published before exit"
    );
    assert!(
        in_flight.iter().all(|id| in_kafka.contains(*id)),
        "the appends in flight at the signal were published before exit"
    );
    assert!(
        acked.is_subset(&in_kafka),
        "every acknowledged event was published before exit"
    );
    // And recorded as published: the next start has nothing to send again.
    let ids: HashSet<uuid::Uuid> = expected.iter().map(|id| id.parse().unwrap()).collect();
    let unrecorded = support::stored_events(&database)
        .await
        .unwrap()
        .into_iter()
        .filter(|(id, state)| {
            ids.contains(id) && *state != outboxd::domain::EventState::Published as i16
        })
        .count();
    assert_eq!(unrecorded, 0, "every delivery was recorded before exit");
    println!(
        "SIGTERM: a backlog of {} events and {} events in flight at the signal; {} acknowledged in all",
        backlog.len(),
        in_flight.len(),
        acked.len()
    );
}

#[tokio::test]
async fn migrate_fixes_the_shard_count_once() {
    let database = support::fresh_database().await;
    let run = |shards: &'static str| {
        let database = database.clone();
        async move {
            support::run_outboxd(&[
                "migrate",
                "--database-url",
                &database,
                "--shard-count",
                shards,
            ])
            .await
        }
    };
    assert!(run("3").await.contains("(3 shards)"));
    assert!(
        run("5").await.contains("(3 shards)"),
        "the first migration's shard count stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_records_with_their_headers() {
    let tansu = Tansu::shared();
    let topic = support::unique("tail");
    tansu.create_topic(&topic, 2).await;
    let gateway = Gateway::start(support::test_config(
        &support::sqlite_url(),
        &tansu.bootstrap,
    ))
    .await;
    let mut client = gateway.client().await;
    let ids = client
        .append(append(&topic, "tailer", 1))
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    let stdout = support::run_outboxd(&[
        "tail",
        "--brokers",
        &tansu.bootstrap,
        "--topic",
        &topic,
        "--count",
        "5",
        "--idle-exit",
        "30s",
    ])
    .await;
    for id in &ids {
        assert!(
            stdout.contains(&format!("outbox-event-id={id}")),
            "{id} in:\n{stdout}"
        );
    }
    assert!(stdout.contains("outbox-producer=tailer"));
    assert!(stdout.contains("{\"n\":1}"));
    gateway.stop().await;
}

/// grpcurl from the test tools (scripts/test installs it), or on PATH.
fn grpcurl() -> String {
    std::env::var("OUTBOXD_TEST_GRPCURL").unwrap_or_else(|_| "grpcurl".into())
}

async fn run_grpcurl(args: &[&str]) -> String {
    let output = tokio::process::Command::new(grpcurl())
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("grpcurl not found ({e}); run ./scripts/test, which installs it")
        });
    assert!(
        output.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The README's walkthrough: list services by reflection, append, read status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_and_appends_by_reflection() {
    let kafka = MockKafka::start(1);
    kafka.create_topic("outboxd-demo", 3).await;
    let gateway = Gateway::start(support::test_config(
        &support::sqlite_url(),
        &kafka.bootstrap,
    ))
    .await;
    let _ = gateway.client().await;
    let address = gateway.address.to_string();

    let services = run_grpcurl(&["-plaintext", &address, "list"]).await;
    for service in [
        "outboxd.v1.Outbox",
        "outboxd.v1.OutboxAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} in:\n{services}"
        );
    }

    let body = r#"{"token":{"producer":"shop","transaction_id":"order-1001"},"events":[{"topic":"outboxd-demo","aggregate_type":"order","aggregate_id":"order-1001","event_type":"created","payload":"eyJ0b3RhbCI6NDJ9"}]}"#;
    let appended = run_grpcurl(&[
        "-plaintext",
        "-d",
        body,
        &address,
        "outboxd.v1.Outbox/Append",
    ])
    .await;
    let id = appended
        .split('"')
        .find(|part| part.len() == 36 && part.matches('-').count() == 4)
        .unwrap_or_else(|| panic!("an event id in {appended}"))
        .to_owned();
    let expected: HashSet<String> = [id.clone()].into();
    let records = consume_until(
        &kafka.bootstrap,
        "outboxd-demo",
        &expected,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records[0].payload, br#"{"total":42}"#);
    assert_eq!(records[0].key.as_deref(), Some(&b"order-1001"[..]));

    let watch = run_grpcurl(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"event_ids":["{id}"]}}"#),
        &address,
        "outboxd.v1.Outbox/WatchStatus",
    ])
    .await;
    assert!(watch.contains("EVENT_STATE_PUBLISHED"), "{watch}");
    gateway.stop().await;
}
