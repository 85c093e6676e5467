//! Housekeeping beside the relay, in a task of its own so that a slow
//! purge never holds up token resolution or relaying: removes what is final
//! and past its retention, in small batches, and refreshes the backlog
//! gauges.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often finished events past their retention are removed.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// How often the backlog gauges are refreshed.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);
/// Rows removed per statement.
const PURGE_BATCH: u32 = 1_000;

/// The housekeeping task: retention purges and backlog gauges.
pub struct Housekeeping {
    /// The store to purge and measure.
    pub store: Arc<dyn Store>,
    /// How long finished events are kept (see `relay.retention`).
    pub retention: Duration,
}

impl Housekeeping {
    /// Purges and measures on their own intervals until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut purge = tokio::time::interval(PURGE_INTERVAL);
        let mut backlog = tokio::time::interval(BACKLOG_INTERVAL);
        purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        backlog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = purge.tick() => self.purge(&shutdown).await,
                _ = backlog.tick() => self.report_backlog().await,
            }
        }
    }

    /// Removes finished events past their retention, in small batches.
    async fn purge(&self, shutdown: &CancellationToken) {
        let mut removed = 0;
        while !shutdown.is_cancelled() {
            match self.store.purge_finished(self.retention, PURGE_BATCH).await {
                Ok(0) => break,
                Ok(n) => removed += n,
                Err(error) => {
                    tracing::warn!(%error, "retention purge failed");
                    break;
                }
            }
            // Leave room for the hot path between batches.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if removed > 0 {
            tracing::info!(removed, "removed finished events past their retention");
        }
    }

    /// Sets the backlog gauges of every shard.
    async fn report_backlog(&self) {
        use crate::telemetry::names;
        match self.store.backlog().await {
            Ok(backlog) => {
                let now = chrono::Utc::now();
                let mut depths = vec![(0u64, 0f64); self.store.shard_count() as usize];
                for shard in backlog {
                    if let Some(slot) = depths.get_mut(shard.shard as usize) {
                        let age = shard
                            .oldest
                            .map(|oldest| (now - oldest).num_milliseconds().max(0) as f64 / 1e3)
                            .unwrap_or(0.0);
                        *slot = (shard.depth, age);
                    }
                }
                for (shard, (depth, age)) in depths.into_iter().enumerate() {
                    let shard = shard.to_string();
                    metrics::gauge!(names::BACKLOG_EVENTS, "shard" => shard.clone())
                        .set(depth as f64);
                    metrics::gauge!(names::BACKLOG_OLDEST_SECONDS, "shard" => shard).set(age);
                }
            }
            Err(error) => tracing::debug!(%error, "cannot read the backlog"),
        }
    }
}
