//! The integration-test harness: real PostgreSQL clusters, a real
//! Kafka-protocol broker (Tansu), librdkafka mock clusters for faults, a
//! gateway served on a free port, and an independent consumer.
//!
//! One PostgreSQL cluster and one Tansu per test process, started on first
//! use and shared; each test gets its own database and its own topics. A
//! watchdog process per server stops it when the test process ends, however
//! it ends (panic, abort, kill).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use outboxd::config::{Config, StoreConfig};
use outboxd::proto::outbox_client::OutboxClient;

/// The newest PostgreSQL server binaries installed (Debian's layout), or
/// those in `OUTBOXD_TEST_PG_BIN`.
fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("OUTBOXD_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
}

/// A name no other test in this process uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A port free at the time of asking.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits for `condition` until `deadline`, probing every 50 ms.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a watchdog that runs `cleanup` (a shell command) once this process
/// has exited.
// The watchdog must outlive this process, so it is never waited for.
#[allow(clippy::zombie_processes)]
fn watchdog(cleanup: &str) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {cleanup}",
        pid = std::process::id()
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting a cleanup watchdog");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A private PostgreSQL cluster in a temporary directory.
pub struct PgCluster {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// PostgreSQL refuses to run as root: then commands run as `postgres`.
    run_as: Option<&'static str>,
    /// fsync on, as in production; off (the default for tests) saves the
    /// shared cluster its disk flushes.
    durable: bool,
}

impl PgCluster {
    /// The cluster shared by every test of this process (or the one named by
    /// `OUTBOXD_TEST_DATABASE_URL`, then `None`).
    pub fn shared() -> Option<&'static PgCluster> {
        static SHARED: OnceLock<Option<PgCluster>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                if std::env::var("OUTBOXD_TEST_DATABASE_URL").is_ok() {
                    None
                } else {
                    Some(PgCluster::start())
                }
            })
            .as_ref()
    }

    /// A new cluster of its own, e.g. for a test that stops it.
    pub fn start() -> PgCluster {
        Self::start_with(false)
    }

    /// A new cluster of its own with fsync on, for a test that crashes it.
    pub fn start_durable() -> PgCluster {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> PgCluster {
        let bin = pg_bin_dir();
        let dir = std::env::temp_dir().join(unique("outboxd-pg"));
        std::fs::create_dir_all(&dir).unwrap();
        let run_as = is_root().then_some("postgres");
        if run_as.is_some() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown of the cluster directory failed");
        }
        let port = free_port();
        let cluster = PgCluster {
            port,
            dir,
            bin,
            run_as,
            durable,
        };
        watchdog(&format!(
            "{} ; rm -rf {}",
            cluster.shell(&format!(
                "{}/pg_ctl -D {}/data stop -m immediate",
                cluster.bin.display(),
                cluster.dir.display()
            )),
            cluster.dir.display()
        ));
        cluster.run(
            "initdb",
            &[
                "-D",
                &format!("{}/data", cluster.dir.display()),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        cluster.start_server();
        cluster
    }

    fn shell(&self, command: &str) -> String {
        match self.run_as {
            Some(user) => format!("runuser -u {user} -- {command}"),
            None => command.to_owned(),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let output = command
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        assert!(
            output.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts the server and waits (pg_ctl -w probes readiness) until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=400 -c shared_buffers=128MB",
            self.port,
            self.dir.display(),
            if self.durable { "on" } else { "off" }
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &format!("{}/data", self.dir.display()),
                "-l",
                &format!("{}/server.log", self.dir.display()),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server at once, as a crash or an operator would.
    pub fn stop_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &format!("{}/data", self.dir.display()),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// Immediate shutdown: every server process quits at once, with no
    /// checkpoint and nothing written that was not written already; the
    /// next start recovers from the WAL, as after a crash.
    pub fn crash_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &format!("{}/data", self.dir.display()),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

/// A new, empty database for one test: its URL.
pub async fn fresh_database() -> String {
    let admin_url = match PgCluster::shared() {
        Some(cluster) => cluster.url("postgres"),
        None => std::env::var("OUTBOXD_TEST_DATABASE_URL").unwrap(),
    };
    fresh_database_on(&admin_url).await
}

/// A new database on the server of `admin_url`: its URL.
pub async fn fresh_database_on(admin_url: &str) -> String {
    use sqlx::Connection;
    let name = unique("outboxd_test");
    let mut connection = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connecting to the test cluster");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut connection)
        .await
        .expect("creating a test database");
    let base = admin_url.rsplit_once('/').map(|(base, _)| base).unwrap();
    format!("{base}/{name}")
}

/// A Tansu broker process on a free port, with in-memory storage.
pub struct Tansu {
    pub bootstrap: String,
    child: std::sync::Mutex<Child>,
}

impl Tansu {
    pub fn shared() -> &'static Tansu {
        static SHARED: OnceLock<Tansu> = OnceLock::new();
        SHARED.get_or_init(Tansu::start)
    }

    fn binary() -> PathBuf {
        if let Ok(path) = std::env::var("TANSU_BIN") {
            return PathBuf::from(path);
        }
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let installed = Path::new(&home).join(".cargo/bin/tansu");
        assert!(
            installed.exists(),
            "tansu is not installed: cargo install --locked tansu@0.6.0 --features dynostore"
        );
        installed
    }

    fn start() -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::env::temp_dir().join(unique("outboxd-tansu") + ".log");
        let child = Command::new(Self::binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting tansu");
        watchdog(&format!("kill -9 {} ; rm -f {}", child.id(), log.display()));
        let bootstrap = format!("127.0.0.1:{port}");
        // Ready when it answers a metadata request.
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "probe")
            .create()
            .unwrap();
        while probe
            .fetch_metadata(None, Duration::from_millis(500))
            .is_err()
        {
            assert!(Instant::now() < deadline, "tansu did not answer within 30s");
        }
        Tansu {
            bootstrap,
            child: std::sync::Mutex::new(child),
        }
    }

    /// Creates a topic (Tansu has no auto-creation) and waits until its
    /// metadata shows every partition.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        let results = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("create_topics request");
        for result in results {
            result.unwrap_or_else(|(topic, code)| panic!("creating {topic}: {code:?}"));
        }
        wait_for_partitions(&self.bootstrap, name, partitions).await;
    }
}

pub async fn wait_for_partitions(bootstrap: &str, topic: &str, partitions: i32) {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "probe")
            .create()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(metadata) = probe.fetch_metadata(Some(&topic), Duration::from_secs(2)) {
                let count = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map_or(0, |t| t.partitions().len());
                if count as i32 == partitions {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "topic {topic} not ready within 30s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
}

/// Something to do with the mock cluster, on its thread.
type MockAction =
    Box<dyn FnOnce(&MockCluster<'static, rdkafka::producer::DefaultProducerContext>) + Send>;

/// Commands to a mock cluster's thread.
enum MockCommand {
    CreateTopic(String, i32, std::sync::mpsc::Sender<()>),
    BrokerDown(i32, std::sync::mpsc::Sender<()>),
    BrokerUp(i32, std::sync::mpsc::Sender<()>),
    Run(MockAction, std::sync::mpsc::Sender<()>),
}

/// A librdkafka mock cluster. It is `!Send`, so it lives on its own thread
/// and is driven by messages; dropped when this handle is.
pub struct MockKafka {
    pub bootstrap: String,
    commands: std::sync::mpsc::Sender<MockCommand>,
}

impl MockKafka {
    pub fn start(brokers: i32) -> MockKafka {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (commands, command_rx) = std::sync::mpsc::channel::<MockCommand>();
        std::thread::spawn(move || {
            let cluster = MockCluster::new(brokers).expect("starting a mock cluster");
            ready_tx.send(cluster.bootstrap_servers()).unwrap();
            while let Ok(command) = command_rx.recv() {
                match command {
                    MockCommand::CreateTopic(name, partitions, done) => {
                        cluster.create_topic(&name, partitions, 1).unwrap();
                        let _ = done.send(());
                    }
                    MockCommand::BrokerDown(id, done) => {
                        cluster.broker_down(id).unwrap();
                        let _ = done.send(());
                    }
                    MockCommand::BrokerUp(id, done) => {
                        cluster.broker_up(id).unwrap();
                        let _ = done.send(());
                    }
                    MockCommand::Run(action, done) => {
                        action(&cluster);
                        let _ = done.send(());
                    }
                }
            }
        });
        MockKafka {
            bootstrap: ready_rx.recv().unwrap(),
            commands,
        }
    }

    fn call(&self, command: impl FnOnce(std::sync::mpsc::Sender<()>) -> MockCommand) {
        let (done, wait) = std::sync::mpsc::channel();
        self.commands.send(command(done)).unwrap();
        wait.recv().unwrap();
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.call(|done| MockCommand::CreateTopic(name.to_owned(), partitions, done));
        wait_for_partitions(&self.bootstrap, name, partitions).await;
    }

    /// Takes broker `id` down (`-1`: all).
    pub fn broker_down(&self, id: i32) {
        self.call(|done| MockCommand::BrokerDown(id, done));
    }

    pub fn broker_up(&self, id: i32) {
        self.call(|done| MockCommand::BrokerUp(id, done));
    }

    /// Every request to broker `id` takes `rtt` longer.
    pub fn round_trip_time(&self, id: i32, rtt: Duration) {
        self.call(|done| {
            MockCommand::Run(
                Box::new(move |cluster| cluster.broker_round_trip_time(id, rtt).unwrap()),
                done,
            )
        });
    }

    /// The next Produce requests fail with these errors, one each.
    pub fn fail_produce_requests(&self, errors: Vec<rdkafka::types::RDKafkaRespErr>) {
        self.call(|done| {
            MockCommand::Run(
                Box::new(move |cluster| {
                    cluster.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &errors)
                }),
                done,
            )
        });
    }
}

/// A gateway served in this process on a free port.
pub struct Gateway {
    pub address: SocketAddr,
    pub config: Config,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// A configuration for tests: quick polls, small shard count.
pub fn test_config(store_url: &str, brokers: &str) -> Config {
    let mut config = Config {
        store: StoreConfig {
            url: store_url.to_owned(),
            max_connections: 8,
        },
        ..Config::default()
    };
    config.kafka.brokers = brokers.to_owned();
    config.relay.shard_count = 8;
    config.relay.poll_interval = Duration::from_millis(200);
    config.relay.lease_ttl = Duration::from_secs(5);
    config.watch.resync_interval = Duration::from_millis(500);
    config.shutdown_timeout = Duration::from_secs(20);
    config
}

/// A SQLite store URL in a fresh temporary directory (kept for the process).
pub fn sqlite_url() -> String {
    let dir = std::env::temp_dir().join(unique("outboxd-sqlite"));
    std::fs::create_dir_all(&dir).unwrap();
    watchdog(&format!("rm -rf {}", dir.display()));
    format!("sqlite://{}/outboxd.db", dir.display())
}

impl Gateway {
    pub async fn start(config: Config) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(outboxd::server::run(
            config.clone(),
            listener,
            shutdown.clone(),
        ));
        Gateway {
            address,
            config,
            shutdown,
            task,
        }
    }

    pub async fn client(&self) -> OutboxClient<tonic::transport::Channel> {
        let endpoint = format!("http://{}", self.address);
        eventually(
            "the gateway to accept connections",
            Duration::from_secs(30),
            || {
                let endpoint = endpoint.clone();
                async move { OutboxClient::connect(endpoint).await.ok() }
            },
        )
        .await
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Graceful shutdown; fails the test if the gateway reported an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("gateway task")
            .expect("gateway shut down cleanly");
    }
}

/// A record as an independent consumer read it.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn event_id(&self) -> String {
        self.header("outbox-event-id")
            .expect("an outbox-event-id header")
    }
}

/// Reads `topic` from offset 0 of every partition with a consumer of its own
/// until every id of `expected` was seen and the topic then stayed idle for
/// `idle`; fails after `timeout`. Returns every record read, in partition
/// order (records of one partition in offset order).
pub async fn consume_until(
    bootstrap: &str,
    topic: &str,
    expected: &HashSet<String>,
    idle: Duration,
    timeout: Duration,
) -> Vec<Consumed> {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    let expected = expected.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("verifier"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                assignment
                    .add_partition_offset(&topic, p.id(), Offset::Offset(0))
                    .unwrap();
            }
        }
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        let mut missing: HashSet<String> = expected;
        let mut last_record = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    last_record = Instant::now();
                    let headers = message
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default();
                    let record = Consumed {
                        partition: message.partition(),
                        offset: message.offset(),
                        key: message.key().map(<[u8]>::to_vec),
                        payload: message.payload().unwrap_or_default().to_vec(),
                        headers,
                    };
                    if let Some(id) = record.header("outbox-event-id") {
                        missing.remove(&id);
                    }
                    records.push(record);
                }
                Some(Err(error)) => panic!("consumer error: {error}"),
                None => {}
            }
            if missing.is_empty() && last_record.elapsed() >= idle {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} expected events not in Kafka after {timeout:?} ({} records read)",
                missing.len(),
                records.len()
            );
        }
        records.sort_by_key(|r| (r.partition, r.offset));
        records
    })
    .await
    .unwrap()
}

/// Groups consumed records' event ids by Kafka key, each key's ids in the
/// order the partition holds them, first sighting only.
pub fn first_sightings_by_key(records: &[Consumed]) -> HashMap<Vec<u8>, Vec<String>> {
    let mut seen = HashSet::new();
    let mut by_key: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
    for record in records {
        let id = record.event_id();
        if seen.insert(id.clone()) {
            by_key
                .entry(record.key.clone().unwrap_or_default())
                .or_default()
                .push(id);
        }
    }
    by_key
}

/// A caller's open PostgreSQL transaction and its postgres_xid token.
pub struct CallerTransaction {
    connection: sqlx::PgConnection,
    pub pid: i32,
    pub xid: u64,
    pub system_id: u64,
}

impl CallerTransaction {
    pub async fn begin(url: &str) -> CallerTransaction {
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut connection).await.unwrap();
        // Some business write of the caller's own.
        let (xid, system_id, pid): (String, i64, i32) = sqlx::query_as(
            "SELECT pg_current_xact_id()::text, (SELECT system_identifier FROM pg_control_system()), pg_backend_pid()",
        )
        .fetch_one(&mut connection)
        .await
        .unwrap();
        CallerTransaction {
            connection,
            pid,
            xid: xid.parse().unwrap(),
            system_id: system_id as u64,
        }
    }

    pub fn token(
        &self,
        producer: &str,
        transaction_id: &str,
    ) -> Option<outboxd::proto::TransactionToken> {
        Some(outboxd::proto::TransactionToken {
            producer: producer.into(),
            transaction_id: transaction_id.into(),
            mode: outboxd::proto::TokenMode::PostgresXid as i32,
            postgres_xid: self.xid,
            postgres_system_id: self.system_id,
            ..Default::default()
        })
    }

    pub async fn commit(mut self) {
        sqlx::query("COMMIT")
            .execute(&mut self.connection)
            .await
            .unwrap();
    }

    pub async fn rollback(mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.connection)
            .await
            .unwrap();
    }
}

/// How long a graceful stop of `outboxd serve` may take: its shutdown
/// timeout (20 s in [`test_config`]) and a margin.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(45);

/// A real `outboxd serve` process, for tests that kill or pause it.
pub struct ServeProcess {
    pub address: SocketAddr,
    child: Child,
    _config: PathBuf,
}

impl ServeProcess {
    /// Starts `outboxd serve` with `config` (its listen address is set here)
    /// and waits until it accepts gRPC connections.
    pub async fn start(config: &Config) -> ServeProcess {
        Self::start_on(config, free_port()).await
    }

    pub async fn start_on(config: &Config, port: u16) -> ServeProcess {
        let process = Self::spawn_on(config, port);
        let endpoint = process.endpoint();
        eventually(
            "outboxd serve to accept connections",
            Duration::from_secs(60),
            || {
                let endpoint = endpoint.clone();
                async move { OutboxClient::connect(endpoint).await.ok() }
            },
        )
        .await;
        process
    }

    /// Starts `outboxd serve` without waiting for it to accept connections
    /// (for a listener that plain gRPC cannot probe, such as TLS).
    pub fn spawn_on(config: &Config, port: u16) -> ServeProcess {
        let mut config = config.clone();
        config.listen = SocketAddr::from(([127, 0, 0, 1], port));
        let path = std::env::temp_dir().join(unique("outboxd-serve") + ".toml");
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        watchdog(&format!("rm -f {}", path.display()));
        let child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("starting outboxd serve");
        watchdog(&format!("kill -9 {} 2>/dev/null", child.id()));
        ServeProcess {
            address: config.listen,
            child,
            _config: path,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal}");
    }

    /// The most memory the process has had resident (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("reading the process status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in the process status");
        kib * 1024
    }

    /// SIGHUP: read the TLS certificates again.
    pub fn hang_up(&self) {
        self.signal("-HUP");
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// SIGSTOP / SIGCONT: a long pause, as a stalled VM or GC would make.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM and wait for a clean exit; a process still running after
    /// [`STOP_TIMEOUT`] is killed and fails the test.
    pub fn stop(mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("outboxd serve did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "outboxd serve exited with {status}");
    }
}

/// A gateway's Prometheus metrics (`metrics_listen` on `port`), as text.
pub async fn scrape_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("the metrics endpoint answers within 10s")
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of an unlabelled counter or gauge in scraped metrics (0 when
/// it has not been set yet).
pub fn metric_value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// How long a test's append may take before the test treats it as failed
/// (not acknowledged): a hung gateway fails the test instead of hanging it.
pub const APPEND_DEADLINE: Duration = Duration::from_secs(10);

/// `Append` with [`APPEND_DEADLINE`]: the deadline travels as `grpc-timeout`
/// and is enforced here too; running out of it is `DEADLINE_EXCEEDED`.
pub async fn append_with_deadline(
    client: &mut OutboxClient<tonic::transport::Channel>,
    request: outboxd::proto::AppendRequest,
) -> Result<outboxd::proto::AppendResponse, tonic::Status> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(APPEND_DEADLINE);
    match tokio::time::timeout(APPEND_DEADLINE, client.append(request)).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {APPEND_DEADLINE:?}"
        ))),
    }
}

/// Runs the `outboxd` binary with `args`; fails the test unless it exits 0.
/// Returns what it printed.
pub async fn run_outboxd(args: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .await
        .expect("running outboxd");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "outboxd {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The current status of one event.
pub async fn status_of(
    client: &mut OutboxClient<tonic::transport::Channel>,
    id: &str,
) -> outboxd::proto::EventStatus {
    client
        .get_status(outboxd::proto::GetStatusRequest {
            event_ids: vec![id.to_owned()],
            ..Default::default()
        })
        .await
        .expect("GetStatus")
        .into_inner()
        .events
        .remove(0)
}

/// An immediate-mode token.
pub fn immediate_token(
    producer: &str,
    transaction_id: &str,
) -> Option<outboxd::proto::TransactionToken> {
    Some(outboxd::proto::TransactionToken {
        producer: producer.into(),
        transaction_id: transaction_id.into(),
        mode: outboxd::proto::TokenMode::Immediate as i32,
        ..Default::default()
    })
}

/// A plain event of `topic` with Kafka key `key`.
pub fn keyed_event(topic: &str, key: &str, payload: &[u8]) -> outboxd::proto::Event {
    outboxd::proto::Event {
        topic: topic.to_owned(),
        key: Some(key.as_bytes().to_vec().into()),
        payload: payload.to_vec().into(),
        aggregate_type: "order".into(),
        aggregate_id: key.to_owned(),
        event_type: "created".into(),
        ..Default::default()
    }
}

/// A first append (sequence 0) of `events` under `token`.
pub fn append_request(
    token: Option<outboxd::proto::TransactionToken>,
    events: Vec<outboxd::proto::Event>,
) -> outboxd::proto::AppendRequest {
    outboxd::proto::AppendRequest {
        token,
        sequence: 0,
        events,
        correlation: 0,
    }
}

/// Waits until every event of `ids` has a status `accept` takes, and
/// returns those statuses; fails after `timeout`.
pub async fn statuses_when(
    client: &OutboxClient<tonic::transport::Channel>,
    ids: &[String],
    what: &str,
    timeout: Duration,
    accept: fn(&outboxd::proto::EventStatus) -> bool,
) -> Vec<outboxd::proto::EventStatus> {
    eventually(what, timeout, || {
        let mut client = client.clone();
        let request = outboxd::proto::GetStatusRequest {
            event_ids: ids.to_vec(),
            ..Default::default()
        };
        async move {
            let statuses = client.get_status(request).await.ok()?.into_inner().events;
            statuses.iter().all(accept).then_some(statuses)
        }
    })
    .await
}
