//! The relay engine: shard leases, shard workers and the Kafka publisher.
//!
//! The supervisor holds this instance's shard leases (owner, expiry, epoch)
//! and runs one worker per leased shard. A worker reads its shard's rows in
//! relay order behind the store's visibility gate, pipelines them to the
//! producer, and records outcomes in batches fenced by the lease epoch.

mod backoff;
pub mod breaker;
mod changes;
mod housekeeping;
mod publish;
pub mod publisher;
pub mod resolver;
mod shard;
mod waker;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use backoff::retry_delay;
pub use breaker::{BreakerState, SharedBreaker};
pub use changes::StateChanges;
pub use housekeeping::Housekeeping;
pub use publisher::{KafkaConfig, Publisher};
pub use resolver::{Resolver, TokenConfig, XidSources};
pub use waker::RelayWaker;
pub(crate) use waker::ShardSignal;

use crate::status::StatusBus;
use crate::store::Store;

/// Relay settings (`[relay]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Number of shards, fixed when the store is first migrated.
    pub shard_count: u32,
    /// Fallback poll period when no wake-up arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Rows read per store query.
    pub read_batch: u32,
    /// After a wake-up of a busy shard (records in flight), wait this long
    /// before reading, so that several commits are read with one query. An
    /// idle shard reads at once.
    #[serde(with = "humantime_serde")]
    pub read_linger: Duration,
    /// Records read and not yet recorded, per shard: handed to the
    /// producer, or waiting in memory behind their key's record in flight.
    /// Each key has one record in flight, so what is sent at once is
    /// bounded by the keys; more only holds more payloads in memory.
    pub max_in_flight_per_shard: usize,
    /// Longest wait of an acked record for the others of its store unit (a
    /// PostgreSQL segment) that are still in flight, so that the unit is
    /// written once for all of them rather than once per ack.
    #[serde(with = "humantime_serde")]
    pub record_hold: Duration,
    /// Lease lifetime; renewed every third of it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// First retry delay of a failed delivery.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_cap: Duration,
    /// How long shutdown waits for records in flight.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Attempts before a retriable failure dead-letters the event.
    pub max_attempts: u32,
    /// Also copy dead-lettered records to this topic.
    pub dead_letter_topic: Option<String>,
    /// A dead letter holds back later events of its key until it is
    /// redriven (strict order), instead of letting them pass (the default).
    pub dead_letter_holds_key: bool,
    /// First wait of the circuit breaker before it probes the broker.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Longest wait between probes.
    #[serde(with = "humantime_serde")]
    pub breaker_max_cooldown: Duration,
    /// Published and discarded events (and the idempotency records of
    /// appends) are removed this long after their last change.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            shard_count: 16,
            poll_interval: Duration::from_secs(1),
            read_batch: 1_000,
            read_linger: Duration::from_millis(5),
            max_in_flight_per_shard: 1_000,
            record_hold: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(10),
            retry_base: Duration::from_millis(200),
            retry_cap: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            max_attempts: 12,
            dead_letter_topic: None,
            dead_letter_holds_key: false,
            breaker_cooldown: Duration::from_secs(1),
            breaker_max_cooldown: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// What the relay reports about itself, for health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayHealth {
    /// No lease held yet, or the store could not be reached for leases.
    Starting,
    /// Relaying the shards it holds.
    Serving {
        /// How many shards this instance holds.
        shards: usize,
    },
    /// Paused by an operator (OutboxAdmin.PauseRelay).
    Paused,
    /// Shut down: leases released.
    Stopped,
}

/// Why the relay stopped before its orderly end.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A shard worker panicked: a defect, not a broker or store failure
    /// (those are retried).
    #[error("shard worker panicked")]
    WorkerPanicked(#[source] tokio::task::JoinError),
    /// The producer's flush at shutdown did not run to its end.
    #[error("flushing the Kafka producer at shutdown failed")]
    Flush(#[source] tokio::task::JoinError),
}

/// Runs the relay until `shutdown`; then drains records in flight, flushes
/// the producer and releases its leases.
pub struct Relay {
    /// Where the events, leases and delivery records are.
    pub store: Arc<dyn Store>,
    /// Sends the records to Kafka.
    pub publisher: Arc<Publisher>,
    /// Stops sending while Kafka is unreachable.
    pub breaker: Arc<SharedBreaker>,
    /// Where published, retried and dead-lettered events are announced.
    pub bus: StatusBus,
    /// Wakes the shard workers.
    pub waker: RelayWaker,
    /// Relay settings (`[relay]`).
    pub config: RelayConfig,
    /// This instance's name in the lease table; unique per process.
    pub owner: String,
    /// Where the relay reports its health.
    pub health: watch::Sender<RelayHealth>,
}

impl Relay {
    /// Takes and renews leases and runs a worker per shard held, until
    /// `shutdown`; then drains, flushes and releases the leases.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        let shard_count = self.store.shard_count();
        let mut workers: HashMap<u32, (i64, CancellationToken)> = HashMap::new();
        let mut running: JoinSet<(u32, i64, Result<(), shard::ShardError>)> = JoinSet::new();
        let mut renew = tokio::time::interval(self.config.lease_ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe = tokio::time::interval(Duration::from_millis(100));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut breaker_state = self.breaker.subscribe();
        let paused = Arc::new(AtomicBool::new(false));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = probe.tick() => {
                    if self.breaker.probe_due() {
                        let publisher = self.publisher.clone();
                        let reachable = tokio::task::spawn_blocking(move || publisher.probe(Duration::from_secs(2)))
                            .await
                            .unwrap_or(false);
                        if reachable {
                            self.breaker.success();
                        } else {
                            self.breaker.probe_failed();
                        }
                    }
                }
                _ = self.publisher.error_seen() => {
                    match self.publisher.replace_if_fatal() {
                        Ok(None) => {}
                        // Dropping the old producer purges and flushes: off the runtime.
                        Ok(Some(old)) => {
                            if let Err(error) = tokio::task::spawn_blocking(move || drop(old)).await {
                                tracing::warn!(%error, "dropping the old kafka producer failed");
                            }
                        }
                        Err(error) => {
                            tracing::error!(%error, "could not create a new kafka producer; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            self.publisher.raise_error_seen();
                        }
                    }
                }
                Ok(()) = breaker_state.changed() => {
                    if *breaker_state.borrow_and_update() == BreakerState::Closed {
                        // Resume every shard at once.
                        self.waker.wake_all();
                    }
                }
                _ = renew.tick() => {
                    match self.store.relay_paused().await {
                        Ok(now_paused) => {
                            if paused.swap(now_paused, Ordering::AcqRel) && !now_paused {
                                tracing::info!("relaying resumed");
                                self.waker.wake_all();
                            } else if now_paused {
                                tracing::debug!("relaying paused by an operator");
                            }
                        }
                        Err(error) => tracing::warn!(%error, "cannot read the relay's pause flag"),
                    }
                    // A fair share: live instances split the shards evenly.
                    let fair_share = match self.store.heartbeat(&self.owner, self.config.lease_ttl).await {
                        Ok(live) => shard_count.div_ceil(live),
                        Err(error) => {
                            tracing::warn!(%error, "heartbeat failed");
                            shard_count
                        }
                    };
                    match self
                        .store
                        .acquire_leases(&self.owner, self.config.lease_ttl, fair_share)
                        .await
                    {
                        Ok(leases) => {
                            let held: HashSet<u32> = leases.iter().map(|l| l.shard).collect();
                            // Beyond the fair share (an instance joined): let go.
                            let keep: Vec<u32> = held.iter().copied().collect();
                            if let Err(error) = self.store.release_leases_except(&self.owner, &keep).await {
                                tracing::warn!(%error, "could not release leases beyond the fair share");
                            }
                            workers.retain(|shard, (_, token)| {
                                let keep = held.contains(shard);
                                if !keep {
                                    tracing::info!(shard, "lease lost; stopping shard");
                                    token.cancel();
                                }
                                keep
                            });
                            for lease in leases {
                                let current = workers.get(&lease.shard).map(|(epoch, _)| *epoch);
                                if current == Some(lease.epoch) {
                                    continue;
                                }
                                if let Some((_, token)) = workers.remove(&lease.shard) {
                                    token.cancel();
                                }
                                let token = shutdown.child_token();
                                let worker = shard::ShardWorker::new(
                                    lease.clone(),
                                    self.store.clone(),
                                    self.publisher.clone(),
                                    self.breaker.clone(),
                                    paused.clone(),
                                    self.bus.clone(),
                                    self.config.clone(),
                                );
                                let wake = self.waker.clone();
                                let (shard, epoch) = (lease.shard, lease.epoch);
                                let worker_token = token.clone();
                                running.spawn(async move {
                                    let signal = wake.shard(shard).expect("a signal per shard");
                                    (shard, epoch, worker.run(signal, worker_token).await)
                                });
                                tracing::info!(shard, epoch, "relaying shard");
                                workers.insert(shard, (epoch, token));
                            }
                            metrics::gauge!(crate::telemetry::names::RELAY_SHARDS).set(workers.len() as f64);
                            let _ = self.health.send(if paused.load(Ordering::Acquire) {
                                RelayHealth::Paused
                            } else {
                                RelayHealth::Serving { shards: workers.len() }
                            });
                        }
                        Err(error) => {
                            tracing::warn!(%error, "lease renewal failed");
                        }
                    }
                }
                Some(finished) = running.join_next(), if !running.is_empty() => {
                    match finished {
                        Ok((shard, epoch, result)) => {
                            if let Err(error) = result {
                                tracing::warn!(shard, epoch, %error, "shard worker stopped");
                            }
                            if workers.get(&shard).is_some_and(|(e, _)| *e == epoch) {
                                workers.remove(&shard);
                                // Take it again at the next renewal if it is still ours.
                            }
                        }
                        Err(join_error) => {
                            return Err(RelayError::WorkerPanicked(join_error));
                        }
                    }
                }
            }
        }
        // Shutdown: workers see the cancelled parent token and drain.
        while let Some(finished) = running.join_next().await {
            if let Ok((shard, _, Err(error))) = finished {
                tracing::warn!(shard, %error, "shard worker stopped during shutdown");
            }
        }
        let publisher = self.publisher.clone();
        let drain = self.config.drain_timeout;
        match tokio::task::spawn_blocking(move || publisher.flush(drain))
            .await
            .map_err(RelayError::Flush)?
        {
            Ok(()) => {}
            // What is left is recorded as not published: the next owner sends it.
            Err(error) => tracing::warn!(%error, "producer flush at shutdown incomplete"),
        }
        if let Err(error) = self.store.release_leases(&self.owner).await {
            tracing::warn!(%error, "could not release leases; they expire by themselves");
        }
        let _ = self.health.send(RelayHealth::Stopped);
        Ok(())
    }
}
