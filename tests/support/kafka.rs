//! Kafka: a shared Tansu broker, librdkafka mock clusters for faults, and an
//! independent consumer that reads what reached a topic.

use super::*;

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
