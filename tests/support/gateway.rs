//! An in-process gateway on a free port, its test configuration, and the
//! calls tests make of it.

use super::*;

/// A gateway served in this process on a free port.
pub struct Gateway {
    pub address: SocketAddr,
    pub config: Config,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), outboxd::server::ServeError>>,
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
