//! The operators' actions on stored events (OutboxAdmin): dead letters and
//! their redrive, the relay's pause flag, backlog and leases, and open
//! two_phase transactions.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::EventStatus;
use crate::relay::StateChanges;
use crate::store::{DeadLetterFilter, Lease, PreparedTransaction, ShardBacklog, Store, StoreError};

/// Operator actions; a state change goes out through [`StateChanges`], like
/// a Commit or Abort.
#[derive(Clone)]
pub struct Operations {
    /// Where the events and the relay's state live.
    pub store: Arc<dyn Store>,
    /// Where redriven events are announced.
    pub changes: StateChanges,
}

impl Operations {
    /// A page of dead letters matching `filter`, after the position
    /// `after_seq`, each with its position (the next page's start).
    pub async fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after_seq: i64,
        page_size: u32,
    ) -> Result<Vec<(i64, EventStatus)>, StoreError> {
        self.store
            .list_dead_letters(filter, after_seq, page_size)
            .await
    }

    /// Puts the dead letters matching `filter` back to be published, and
    /// has their shards' relays read them again. Returns how many.
    pub async fn redrive(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        let resolved = self.store.redrive(filter).await?;
        let events = resolved.changed.len() as u64;
        self.changes.announce(resolved);
        Ok(events)
    }

    /// Pauses (or resumes) relaying on every instance.
    pub async fn set_relay_paused(&self, paused: bool) -> Result<(), StoreError> {
        self.store.set_relay_paused(paused).await
    }

    /// Each shard's unpublished events.
    pub async fn backlog(&self) -> Result<Vec<ShardBacklog>, StoreError> {
        self.store.backlog().await
    }

    /// The shards' leases.
    pub async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.store.leases().await
    }

    /// Up to `limit` open two_phase transactions of `producer` older than
    /// `older_than`, for recovery after a caller crash.
    pub async fn prepared(
        &self,
        producer: &str,
        older_than: Duration,
        limit: u32,
    ) -> Result<Vec<PreparedTransaction>, StoreError> {
        self.store.list_prepared(producer, older_than, limit).await
    }
}
