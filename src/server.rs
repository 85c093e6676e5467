//! Wiring of one gateway instance: store, ingest writers, relay, gRPC server,
//! and the order in which they stop.

use std::sync::Arc;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::api::{AdminApi, Authenticator, OutboxApi};
use crate::config::Config;
use crate::ingest::{Ingest, Operations, Transactions};
use crate::proto;
use crate::relay::{
    BreakerState, Housekeeping, Publisher, Relay, RelayError, RelayHealth, RelayWaker, Resolver,
    SharedBreaker, StateChanges, XidSources,
};
use crate::status::StatusBus;
use crate::store::StoreError;
use crate::tls::TlsError;

/// Why a gateway could not start, or did not stop in order.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The `[tls]` files do not make a server configuration.
    #[error("loading the TLS certificates")]
    Tls(#[source] TlsError),
    /// The metrics listener's address cannot be bound.
    #[error("binding the metrics listener {address}")]
    MetricsListener {
        /// `metrics_listen`.
        address: SocketAddr,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// A listener's own address cannot be read.
    #[error("reading a listener's address")]
    ListenerAddress(#[source] std::io::Error),
    /// The store cannot be reached.
    #[error("connecting to the store")]
    Connect(#[source] StoreError),
    /// The store's schema cannot be brought up to date.
    #[error("migrating the store")]
    Migrate(#[source] StoreError),
    /// The Kafka producer cannot be created from `[kafka]`.
    #[error("creating the Kafka producer")]
    Producer(#[source] rdkafka::error::KafkaError),
    /// A `tokens.postgres_xid_clusters` entry is not a usable URL.
    #[error("configuring postgres_xid clusters")]
    XidClusters(#[source] StoreError),
    /// The reflection service cannot be built from the descriptors.
    #[error("building the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The gRPC server failed while serving.
    #[error("gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    /// The relay stopped with an error.
    #[error("relay failed")]
    Relay(#[source] RelayError),
    /// The relay's task panicked.
    #[error("relay task failed")]
    RelayTask(#[source] tokio::task::JoinError),
    /// Writers and relay did not finish within `shutdown_timeout`.
    #[error("shutdown took longer than {0:?}")]
    ShutdownTimeout(Duration),
}

/// Health service name of the relay (the ingest path reports under
/// `outboxd.v1.Outbox`): "Kafka down" shows as relay NOT_SERVING while
/// ingest stays SERVING.
pub const RELAY_HEALTH_SERVICE: &str = "outboxd.relay";

/// Serves on `listener` until `shutdown`, then stops in order: stop taking
/// requests and let in-flight ones finish, commit what the writers hold,
/// drain the relay's records in flight, release leases.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let tls = crate::tls::TlsServer::load(&config.tls).map_err(ServeError::Tls)?;
    let readiness = crate::telemetry::Readiness::default();
    let metrics_task = match config.metrics_listen {
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| ServeError::MetricsListener { address, source })?;
            crate::telemetry::metrics();
            let address = listener.local_addr().map_err(ServeError::ListenerAddress)?;
            tracing::info!(%address, "serving Prometheus metrics");
            Some(tokio::spawn(crate::telemetry::serve_metrics(
                listener,
                readiness.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let store = crate::store::connect(
        &config.store.url,
        config.store.max_connections,
        config.relay.shard_count,
    )
    .await
    .map_err(ServeError::Connect)?;
    store.migrate().await.map_err(ServeError::Migrate)?;
    let breaker = Arc::new(SharedBreaker::new(
        config.relay.breaker_cooldown,
        config.relay.breaker_max_cooldown,
    ));
    let publisher = Arc::new(
        Publisher::new(
            &config.kafka,
            breaker.clone(),
            config.relay.dead_letter_topic.clone(),
        )
        .map_err(ServeError::Producer)?,
    );

    let bus = StatusBus::new(config.watch.bus_capacity);
    let waker = RelayWaker::new(store.shard_count());
    let changes = StateChanges {
        bus: bus.clone(),
        waker: waker.clone(),
    };
    let xid_sources =
        XidSources::new(store.as_ref(), &config.tokens).map_err(ServeError::XidClusters)?;
    let mut writers = JoinSet::new();
    let ingest = Ingest::start(
        store.clone(),
        bus.clone(),
        waker.clone(),
        xid_sources.clone(),
        &config.ingest,
        &mut writers,
    );

    let relay_shutdown = CancellationToken::new();
    let (relay_health, mut relay_health_rx) = watch::channel(RelayHealth::Starting);
    let mut breaker_rx = breaker.subscribe();
    readiness.set(store.clone(), relay_health_rx.clone(), breaker.subscribe());
    // This instance's name in the lease table and in wake-ups; unique per
    // process and per start.
    let instance = format!(
        "{}-{}-{}",
        hostname(),
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let relay = Relay {
        store: store.clone(),
        publisher,
        breaker,
        bus: bus.clone(),
        waker: waker.clone(),
        config: config.relay.clone(),
        owner: instance.clone(),
        health: relay_health,
    };
    let relay_task = tokio::spawn(relay.run(relay_shutdown.clone()));
    let bridge_task = tokio::spawn(waker.clone().bridge(
        store.clone(),
        instance,
        relay_shutdown.clone(),
    ));
    let housekeeping_task = tokio::spawn(
        Housekeeping {
            store: store.clone(),
            retention: config.relay.retention,
        }
        .run(relay_shutdown.clone()),
    );
    let resolver = Resolver {
        store: store.clone(),
        changes: changes.clone(),
        sources: xid_sources.clone(),
        config: config.tokens.clone(),
        idle_interval: config.relay.poll_interval,
    };
    let resolver_task = tokio::spawn(resolver.run(relay_shutdown.clone()));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::outbox_server::OutboxServer<OutboxApi>>()
        .await;
    health_reporter
        .set_service_status(RELAY_HEALTH_SERVICE, ServingStatus::NotServing)
        .await;
    let health_task = {
        let reporter = health_reporter.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                // Serving: holding shards, and Kafka reachable (breaker closed).
                let relay = *relay_health_rx.borrow_and_update();
                let breaker = *breaker_rx.borrow_and_update();
                let status = match (relay, breaker) {
                    (RelayHealth::Serving { .. }, BreakerState::Closed) => ServingStatus::Serving,
                    _ => ServingStatus::NotServing,
                };
                reporter
                    .set_service_status(RELAY_HEALTH_SERVICE, status)
                    .await;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    changed = relay_health_rx.changed() => if changed.is_err() { break },
                    changed = breaker_rx.changed() => if changed.is_err() { break },
                }
            }
        })
    };

    // Both reflection versions: grpcurl before 1.8.8 and many tools still
    // speak only v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServeError::Reflection)?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;

    let auth = Authenticator::new(&config.auth, &config.limits);
    if auth.is_open() {
        tracing::warn!(
            "no [auth] identities configured: every caller may act for every producer and use OutboxAdmin"
        );
    }
    let api = OutboxApi {
        ingest: ingest.clone(),
        transactions: Transactions {
            store: store.clone(),
            changes: changes.clone(),
        },
        store: store.clone(),
        bus,
        limits: config.limits.clone(),
        watch: config.watch.settings(),
        auth: auth.clone(),
        open_watches: Arc::new(tokio::sync::Semaphore::new(config.watch.max_open)),
        shutdown: shutdown.clone(),
    };
    let max_message = config.limits.max_request_bytes;
    let address = listener.local_addr().map_err(ServeError::ListenerAddress)?;
    tracing::info!(%address, store = %redact(&config.store.url), brokers = %config.kafka.brokers, "outboxd serving");
    let tls_task = tls
        .clone()
        .map(|tls| tokio::spawn(tls.watch(shutdown.clone())));
    if config.tls.mutual() {
        tracing::info!("serving mutual TLS: clients present certificates");
    } else if config.tls.enabled() {
        tracing::info!("serving TLS");
    }
    let incoming = crate::tls::incoming(listener, tls, shutdown.clone());
    // Server-wide, across connections: past `max_concurrent_requests`
    // requests being served, the next is shed at once (RESOURCE_EXHAUSTED)
    // rather than read and queued, which bounds the memory of requests in
    // flight. Load shedding sits outside the limit, so that a full limit
    // answers instead of waiting. Request metrics and server spans sit
    // outside both, so that shed requests are counted too.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(
        config.limits.max_concurrent_requests,
    ));
    let serve = tonic::transport::Server::builder()
        .layer(
            tower::ServiceBuilder::new()
                .layer(crate::telemetry::GrpcTelemetryLayer)
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
                    in_flight,
                )),
        )
        // Bounds work per connection; a slow client cannot hold unbounded requests.
        .concurrency_limit_per_connection(1_024)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            proto::outbox_server::OutboxServer::new(api).max_decoding_message_size(max_message),
        )
        .add_service(proto::outbox_admin_server::OutboxAdminServer::new(
            AdminApi {
                operations: Operations {
                    store: store.clone(),
                    changes,
                },
                auth,
            },
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled());

    let served = serve.await;
    tracing::info!("gRPC server stopped; draining");
    // Every request has returned; the writers finish their queues and stop.
    drop(ingest);
    let drained = tokio::time::timeout(config.shutdown_timeout, async {
        while let Some(result) = writers.join_next().await {
            if let Err(error) = result {
                tracing::error!(%error, "append writer failed");
            }
        }
        relay_shutdown.cancel();
        if let Err(error) = resolver_task.await {
            tracing::error!(%error, "token resolver task failed");
        }
        if let Err(error) = bridge_task.await {
            tracing::error!(%error, "wake-up bridge task failed");
        }
        if let Err(error) = housekeeping_task.await {
            tracing::error!(%error, "housekeeping task failed");
        }
        relay_task.await
    })
    .await;
    health_task.abort();
    if let Some(task) = tls_task {
        task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    served.map_err(ServeError::Serve)?;
    match drained {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(ServeError::Relay(error)),
        Ok(Err(join_error)) => Err(ServeError::RelayTask(join_error)),
        Err(_) => Err(ServeError::ShutdownTimeout(config.shutdown_timeout)),
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "outboxd".into())
}

/// The store URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
