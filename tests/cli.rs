//! The `outboxd` binary as an operator runs it: serve with graceful shutdown,
//! migrate, tail, and grpcurl against the reflection service.

mod support;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use outboxd::proto;
use support::{Gateway, MockKafka, Tansu, consume_until};

const OUTBOXD: &str = env!("CARGO_BIN_EXE_outboxd");

fn event(topic: &str, key: &str, n: usize) -> proto::Event {
    proto::Event {
        topic: topic.into(),
        key: Some(key.as_bytes().to_vec().into()),
        payload: format!("{{\"n\":{n}}}").into_bytes().into(),
        aggregate_type: "cart".into(),
        aggregate_id: key.into(),
        event_type: "item-added".into(),
        ..Default::default()
    }
}

fn append(topic: &str, producer: &str, transaction: usize) -> proto::AppendRequest {
    proto::AppendRequest {
        token: Some(proto::TransactionToken {
            producer: producer.into(),
            transaction_id: format!("tx-{transaction}"),
            mode: proto::TokenMode::Immediate as i32,
            ..Default::default()
        }),
        sequence: 0,
        events: (0..5)
            .map(|i| {
                event(
                    topic,
                    &format!("cart-{}", (transaction + i) % 7),
                    transaction,
                )
            })
            .collect(),
        correlation: transaction as u64,
    }
}

/// SIGTERM while appends are in flight: the process exits 0, and every
/// acknowledged event is in Kafka by then (the relay drained before exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_drains_appends_and_publishes_on_sigterm() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("carts");
    kafka.create_topic(&topic, 3).await;
    let database = support::fresh_database().await;
    let port = support::free_port();
    let mut child = tokio::process::Command::new(OUTBOXD)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--database-url", &database, "--brokers", &kafka.bootstrap])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
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

    let mut producers = Vec::new();
    for p in 0..8 {
        let mut client = client.clone();
        let topic = topic.clone();
        producers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for t in 0..200 {
                match client.append(append(&topic, &format!("p{p}"), t)).await {
                    Ok(response) => acked.extend(response.into_inner().event_ids),
                    Err(_) => break, // the server is going away: not acked, not promised
                }
            }
            acked
        }));
    }
    support::eventually(
        "some appends to be acknowledged",
        Duration::from_secs(30),
        || {
            let store = database.clone();
            async move {
                use sqlx::Connection;
                let mut db = sqlx::PgConnection::connect(&store).await.ok()?;
                let count: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event_statuses")
                    .fetch_one(&mut db)
                    .await
                    .ok()?;
                (count >= 200).then_some(())
            }
        },
    )
    .await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("outboxd exits within 60s of SIGTERM")
        .unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");

    let mut acked = HashSet::new();
    for producer in producers {
        acked.extend(producer.await.unwrap());
    }
    assert!(acked.len() >= 200);
    // Nothing relays any more: what is in Kafka now was published before exit.
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &acked,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    let in_kafka: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert!(
        acked.is_subset(&in_kafka),
        "every acknowledged event was published before exit"
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
