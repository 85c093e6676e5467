//! `outboxd dev`: the embedded default. A SQLite store and an in-process
//! Kafka-protocol broker (librdkafka's mock cluster), so outboxd runs with no
//! outside services. `--demo` also makes a round trip through the public API
//! and reads the events back with an independent consumer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Args;
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::cli::tail;
use crate::config::{Config, StoreConfig};
use crate::proto;
use crate::proto::outbox_client::OutboxClient;

/// Topic created on the in-process broker for the demo and the examples.
pub const DEV_TOPIC: &str = "outboxd-demo";

/// The arguments of `outboxd dev`.
#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// SQLite database file (default: outboxd-dev.db; a temporary file with --demo).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Append sample events, watch them to PUBLISHED, read them back from the
    /// broker, print a summary and exit.
    #[arg(long)]
    pub demo: bool,
    /// Partitions of the dev topic.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Log lines as text or as JSON objects (with trace and span ids).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
}

/// The in-process broker. `MockCluster` is not `Send`, so it lives on its own
/// thread until `stop`.
struct DevBroker {
    bootstrap: String,
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DevBroker {
    fn start(topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let topic = topic.to_owned();
        let thread = std::thread::Builder::new()
            .name("dev-broker".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(cluster) => cluster,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error.to_string()));
                        return;
                    }
                };
                if let Err(error) = cluster.create_topic(&topic, partitions, 1) {
                    let _ = ready_tx.send(Err(error.to_string()));
                    return;
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Held until stop is sent or its sender dropped.
                let _ = stop_rx.recv();
                drop(cluster);
            })?;
        let bootstrap = ready_rx
            .recv()
            .context("the dev broker thread ended early")?
            .map_err(|e| anyhow::anyhow!("starting the in-process broker: {e}"))?;
        Ok(DevBroker {
            bootstrap,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs a gateway on a SQLite store and an in-process broker until
/// `shutdown`; with `--demo`, makes its round trip and returns.
pub async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = DevBroker::start(DEV_TOPIC, args.partitions)?;
    let temp_dir = if args.demo && args.db.is_none() {
        Some(tempfile_dir()?)
    } else {
        None
    };
    let db_path = match (&args.db, &temp_dir) {
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => dir.join("outboxd-demo.db"),
        (None, None) => PathBuf::from("outboxd-dev.db"),
    };
    let mut config = Config {
        store: StoreConfig {
            url: format!("sqlite://{}", db_path.display()),
            max_connections: 4,
        },
        ..Config::default()
    };
    config.kafka.brokers = broker.bootstrap.clone();
    config.relay.shard_count = 4;
    config.relay.poll_interval = Duration::from_millis(250);
    config.ingest.writers = 1;
    config.validate()?;

    let listen = if args.demo {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        args.listen
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let address = listener.local_addr()?;
    let server_shutdown = shutdown.child_token();
    let server = tokio::spawn(crate::server::run(
        config,
        listener,
        server_shutdown.clone(),
    ));

    println!("outboxd dev: embedded store and in-process Kafka broker");
    println!("  gRPC      {address}");
    println!("  store     {}", db_path.display());
    println!(
        "  brokers   {}  (topic {DEV_TOPIC}, {} partitions)",
        broker.bootstrap, args.partitions
    );
    println!();
    println!("Append an event:");
    println!(
        "  grpcurl -plaintext -d '{{\"token\":{{\"producer\":\"shop\",\"transaction_id\":\"tx-1\"}},\"events\":[{{\"topic\":\"{DEV_TOPIC}\",\"aggregate_type\":\"order\",\"aggregate_id\":\"order-1\",\"event_type\":\"created\",\"payload\":\"eyJ0b3RhbCI6NDJ9\"}}]}}' {address} outboxd.v1.Outbox/Append"
    );
    println!("Read the topic:");
    println!(
        "  outboxd tail --brokers {} --topic {DEV_TOPIC}",
        broker.bootstrap
    );
    println!();

    let result = if args.demo {
        let outcome = demo(address, &broker.bootstrap).await;
        server_shutdown.cancel();
        outcome
    } else {
        println!("Ctrl-C stops.");
        shutdown.cancelled().await;
        Ok(())
    };
    let served = server.await.context("the server task failed")?;
    drop(broker);
    drop(temp_dir);
    result?;
    Ok(served?)
}

/// A private directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> anyhow::Result<TempDir> {
    let path = std::env::temp_dir().join(format!("outboxd-demo-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir(path))
}

/// One sample event: (order id, event type, payload).
fn sample_events() -> Vec<(String, &'static str, String)> {
    let mut events = Vec::new();
    for step in ["created", "paid", "packed", "shipped"] {
        for order in 1..=3 {
            events.push((
                format!("order-{order}"),
                step,
                format!("{{\"order\":{order},\"step\":\"{step}\"}}"),
            ));
        }
    }
    events
}

async fn demo(address: SocketAddr, brokers: &str) -> anyhow::Result<()> {
    let mut client = OutboxClient::connect(format!("http://{address}"))
        .await
        .context("connecting to outboxd")?;
    let samples = sample_events();
    let mut ids = Vec::new();
    // One Append per step: four business transactions over three orders.
    for (index, chunk) in samples.chunks(3).enumerate() {
        let request = proto::AppendRequest {
            token: Some(proto::TransactionToken {
                producer: "demo-shop".into(),
                transaction_id: format!("demo-{}-{index}", uuid::Uuid::now_v7().simple()),
                mode: proto::TokenMode::Immediate as i32,
                ..Default::default()
            }),
            sequence: 0,
            events: chunk
                .iter()
                .map(|(order, step, payload)| proto::Event {
                    topic: DEV_TOPIC.into(),
                    payload: payload.clone().into_bytes().into(),
                    aggregate_type: "order".into(),
                    aggregate_id: order.clone(),
                    event_type: (*step).into(),
                    headers: vec![proto::Header {
                        key: "content-type".into(),
                        value: b"application/json".to_vec().into(),
                    }],
                    ..Default::default()
                })
                .collect(),
            correlation: index as u64,
        };
        let response = client.append(request).await?.into_inner();
        ids.extend(response.event_ids);
    }
    println!("appended {} events in 4 transactions", ids.len());

    let mut watch = client
        .watch_status(proto::WatchStatusRequest {
            event_ids: ids.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut published: HashMap<String, (i32, i64)> = HashMap::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(update) = watch.message().await? {
            let status = update.status.context("a status update without status")?;
            if status.state == proto::EventState::Published as i32 {
                published.insert(
                    status.event_id.clone(),
                    (status.partition.unwrap_or(-1), status.offset.unwrap_or(-1)),
                );
            } else if status.state != proto::EventState::Ready as i32 {
                bail!("event {} reached state {}", status.event_id, status.state);
            }
        }
        Ok(())
    })
    .await
    .context("events were not published within 60s")??;
    ensure!(
        published.len() == ids.len(),
        "only {} of {} events published",
        published.len(),
        ids.len()
    );
    println!("watched all {} to PUBLISHED", ids.len());

    // Read back with a consumer of its own, independent of the relay.
    let brokers = brokers.to_owned();
    let expected: Vec<String> = ids.clone();
    let records = tokio::task::spawn_blocking(move || {
        let consumer =
            tail::assigned_consumer(&brokers, DEV_TOPIC, tail::ConsumerOptions::default())?;
        let mut seen = Vec::new();
        let stop = CancellationToken::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        tail::read_records(&consumer, Some(Duration::from_secs(10)), &stop, |record| {
            seen.push(record);
            let have = seen
                .iter()
                .filter(|r| {
                    r.header("outbox-event-id")
                        .is_some_and(|id| expected.contains(&id))
                })
                .count();
            have < expected.len() && std::time::Instant::now() < deadline
        })?;
        anyhow::Ok(seen)
    })
    .await??;

    let mut by_order: HashMap<String, Vec<String>> = HashMap::new();
    let mut matched = 0;
    for record in &records {
        let Some(id) = record.header("outbox-event-id") else {
            continue;
        };
        let Some(index) = ids.iter().position(|i| *i == id) else {
            continue;
        };
        let (order, step, payload) = &samples[index];
        ensure!(
            record.key.as_deref() == Some(order.as_bytes()),
            "event {id}: key differs"
        );
        ensure!(
            record.payload.as_deref() == Some(payload.as_bytes()),
            "event {id}: payload differs"
        );
        ensure!(
            published.get(&id) == Some(&(record.partition, record.offset)),
            "event {id}: partition/offset differ from its status"
        );
        by_order
            .entry(order.clone())
            .or_default()
            .push((*step).to_owned());
        matched += 1;
    }
    ensure!(
        matched == ids.len(),
        "the consumer found {matched} of {} events",
        ids.len()
    );
    for (order, steps) in &by_order {
        ensure!(
            steps == &["created", "paid", "packed", "shipped"],
            "{order}: events arrived as {steps:?}"
        );
    }
    println!(
        "consumer read {matched} records: keys, payloads and headers as appended, order kept for each of {} orders",
        by_order.len()
    );
    println!("demo ok");
    Ok(())
}
