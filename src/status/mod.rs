//! The status bus and `WatchStatus` fan-out.
//!
//! Every state change is announced on an in-process broadcast bus. A watcher
//! subscribes first, then reads the current state from the store, then
//! follows the bus. A watcher that falls behind the bus (or misses a change
//! made by another instance) is re-synced from the store, never silently
//! skipped: the store is the truth, the bus only makes it quick.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::domain::{EventId, EventStatus, TransactionRef};
use crate::store::{Store, StoreError};

/// In-process announcements of state changes.
#[derive(Clone)]
pub struct StatusBus {
    sender: broadcast::Sender<Arc<EventStatus>>,
}

impl StatusBus {
    /// `capacity` bounds how far a watcher may lag before it is re-synced.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(16));
        StatusBus { sender }
    }

    /// Announces state changes to every current subscriber; a no-op when
    /// nobody listens.
    pub fn publish(&self, statuses: impl IntoIterator<Item = EventStatus>) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        for status in statuses {
            // An error only means nobody listens right now.
            let _ = self.sender.send(Arc::new(status));
        }
    }

    /// Hears every change published from now on; a receiver that lags more
    /// than the capacity gets `RecvError::Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventStatus>> {
        self.sender.subscribe()
    }
}

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchTarget {
    /// These events, until all are final.
    Events(Vec<EventId>),
    /// Every event of these transactions, until all are final.
    Transactions(Vec<TransactionRef>),
    /// Every event of a producer, until cancelled, after a change cursor.
    Producer {
        /// The producer whose events are followed.
        producer: String,
        /// Only changes after this cursor are sent; from 0, the watch starts
        /// with the current state of every event of the producer.
        after_cursor: u64,
    },
}

/// One message of a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchUpdate {
    /// The event's state.
    pub status: EventStatus,
    /// Part of the initial current-state report.
    pub snapshot: bool,
}

/// Why a watch ended early.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// Some watched event ids are not in the store (the ids, comma-separated).
    #[error("unknown event ids: {0}")]
    UnknownEvents(String),
    /// Some watched transactions have no events in the store
    /// (`producer/transaction_id`, comma-separated).
    #[error("no events for transactions: {0}")]
    UnknownTransactions(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a watch behaves; from configuration.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    /// How often a watch re-reads the store, to learn of changes made by
    /// other instances.
    pub resync_interval: Duration,
    /// Page size of store reads.
    pub page_size: u32,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            resync_interval: Duration::from_secs(1),
            page_size: 1_000,
        }
    }
}

/// Tracks what a watch has sent, so that a change is sent once and never
/// regresses (the bus and a re-sync may both report it). Changes of one
/// event are ordered by their cursor, so a redriven dead letter's new states
/// come through like any later change.
struct Progress {
    /// Last cursor sent per event, and whether that state was final.
    sent: HashMap<EventId, (u64, bool)>,
    /// Producer watches: every change up to here was read from the store
    /// (in cursor order) and is no longer remembered per event.
    horizon: u64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            sent: HashMap::new(),
            horizon: 0,
        }
    }

    /// Whether `status` is news; records it when it is.
    fn admit(&mut self, status: &EventStatus) -> bool {
        // Behind the horizon, a state that is not final is old news (a later
        // change was read from the store already); a final one may be a
        // change that committed after a later-numbered one, so it goes.
        if status.cursor <= self.horizon && !status.state.is_final() {
            return false;
        }
        if let Some((last, _)) = self.sent.get(&status.event_id)
            && *last >= status.cursor
        {
            return false;
        }
        self.sent
            .insert(status.event_id, (status.cursor, status.state.is_final()));
        true
    }

    /// Events whose last state sent is not final.
    fn open_events(&self) -> Vec<EventId> {
        self.sent
            .iter()
            .filter(|(_, (_, is_final))| !is_final)
            .map(|(id, _)| *id)
            .collect()
    }

    fn all_final(&self) -> bool {
        self.sent.values().all(|(_, is_final)| *is_final)
    }

    /// A producer watch has read every change up to `cursor` from the
    /// store: what it sent up to there need not be remembered, which keeps
    /// a long watch's memory to the changes since its last read.
    fn forget_through(&mut self, cursor: u64) {
        if cursor > self.horizon {
            self.horizon = cursor;
            self.sent.retain(|_, (last, _)| *last > cursor);
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.sent.len()
    }
}

/// Starts a watch; updates arrive on the returned receiver, which closes when
/// the watch ends (all final, cancelled, or failed with the error sent last).
pub fn watch(
    store: Arc<dyn Store>,
    bus: &StatusBus,
    target: WatchTarget,
    settings: WatchSettings,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Result<WatchUpdate, WatchError>> {
    let (tx, rx) = mpsc::channel(256);
    // Subscribe before the first store read, so no change falls in between.
    let bus_rx = bus.subscribe();
    tokio::spawn(async move {
        let watcher = Watcher {
            store,
            tx,
            settings,
            progress: Progress::new(),
        };
        watcher.run(target, bus_rx, shutdown).await;
    });
    rx
}

struct Watcher {
    store: Arc<dyn Store>,
    tx: mpsc::Sender<Result<WatchUpdate, WatchError>>,
    settings: WatchSettings,
    progress: Progress,
}

impl Watcher {
    async fn run(
        mut self,
        target: WatchTarget,
        mut bus: broadcast::Receiver<Arc<EventStatus>>,
        shutdown: CancellationToken,
    ) {
        let tx = self.tx.clone();
        let result = tokio::select! {
            result = self.follow(&target, &mut bus) => result,
            _ = shutdown.cancelled() => Ok(()),
            _ = tx.closed() => Ok(()),
        };
        if let Err(error) = result {
            let _ = tx.send(Err(error)).await;
        }
    }

    /// Sends `status` if it is news. `Err(())` when the receiver is gone.
    async fn offer(&mut self, status: &EventStatus, snapshot: bool) -> Result<(), ()> {
        if self.progress.admit(status) {
            self.tx
                .send(Ok(WatchUpdate {
                    status: status.clone(),
                    snapshot,
                }))
                .await
                .map_err(|_| ())?;
        }
        Ok(())
    }

    fn matches(target: &WatchTarget, status: &EventStatus, known: &HashSet<EventId>) -> bool {
        match target {
            WatchTarget::Events(_) => known.contains(&status.event_id),
            WatchTarget::Transactions(transactions) => transactions.iter().any(|t| {
                t.producer == status.producer && t.transaction_id == status.transaction_id
            }),
            WatchTarget::Producer { producer, .. } => *producer == status.producer,
        }
    }

    /// Reads the current state of what `target` covers and sends what is new.
    /// Returns the highest cursor read (producer watches resume from it).
    async fn resync(&mut self, target: &WatchTarget, from_cursor: u64) -> Result<u64, WatchError> {
        let mut max_cursor = from_cursor;
        let statuses = match target {
            WatchTarget::Events(ids) => {
                let open: Vec<EventId> = if self.progress.sent.is_empty() {
                    ids.clone()
                } else {
                    self.progress.open_events()
                };
                self.store.status_by_ids(&open).await?
            }
            WatchTarget::Transactions(transactions) => {
                self.store.status_by_transactions(transactions).await?
            }
            WatchTarget::Producer { producer, .. } => {
                return Ok(self.page_producer(producer, from_cursor, false).await?.0);
            }
        };
        for status in &statuses {
            max_cursor = max_cursor.max(status.cursor);
            if self.offer(status, false).await.is_err() {
                break;
            }
        }
        Ok(max_cursor)
    }

    /// Sends a producer's changes after `cursor`, page by page. Returns the
    /// last cursor read, and whether the receiver went away.
    async fn page_producer(
        &mut self,
        producer: &str,
        mut cursor: u64,
        snapshot: bool,
    ) -> Result<(u64, bool), WatchError> {
        loop {
            let page = self
                .store
                .status_changes(producer, cursor, self.settings.page_size)
                .await?;
            // A page holds whole transactions, so one cut short of the page
            // size may still have more behind it.
            let full = page.len() as u32 >= self.settings.page_size / 2;
            for status in &page {
                cursor = cursor.max(status.cursor);
                if self.offer(status, snapshot).await.is_err() {
                    return Ok((cursor, true));
                }
            }
            if !full {
                self.progress.forget_through(cursor);
                return Ok((cursor, false));
            }
        }
    }

    fn done(&self, target: &WatchTarget) -> bool {
        !matches!(target, WatchTarget::Producer { .. }) && self.progress.all_final()
    }

    async fn follow(
        &mut self,
        target: &WatchTarget,
        bus: &mut broadcast::Receiver<Arc<EventStatus>>,
    ) -> Result<(), WatchError> {
        // The initial snapshot.
        let mut cursor = 0;
        let known: HashSet<EventId> = match target {
            WatchTarget::Events(ids) => {
                let statuses = self.store.status_by_ids(ids).await?;
                let found: HashSet<EventId> = statuses.iter().map(|s| s.event_id).collect();
                let missing: Vec<String> = ids
                    .iter()
                    .filter(|id| !found.contains(id))
                    .map(ToString::to_string)
                    .collect();
                if !missing.is_empty() {
                    return Err(WatchError::UnknownEvents(missing.join(", ")));
                }
                for status in &statuses {
                    if self.offer(status, true).await.is_err() {
                        return Ok(());
                    }
                }
                found
            }
            WatchTarget::Transactions(transactions) => {
                let statuses = self.store.status_by_transactions(transactions).await?;
                let missing: Vec<String> = transactions
                    .iter()
                    .filter(|t| {
                        !statuses.iter().any(|s| {
                            s.producer == t.producer && s.transaction_id == t.transaction_id
                        })
                    })
                    .map(|t| format!("{}/{}", t.producer, t.transaction_id))
                    .collect();
                if !missing.is_empty() {
                    return Err(WatchError::UnknownTransactions(missing.join(", ")));
                }
                for status in &statuses {
                    if self.offer(status, true).await.is_err() {
                        return Ok(());
                    }
                }
                HashSet::new()
            }
            WatchTarget::Producer {
                producer,
                after_cursor,
            } => {
                let (last, receiver_gone) =
                    self.page_producer(producer, *after_cursor, true).await?;
                if receiver_gone {
                    return Ok(());
                }
                cursor = last;
                HashSet::new()
            }
        };

        let mut resync = tokio::time::interval(self.settings.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.reset();
        while !self.done(target) {
            tokio::select! {
                message = bus.recv() => match message {
                    // A producer watch sends only what its feed reads, in
                    // commit order; the bus only tells it to read.
                    Ok(status) if matches!(target, WatchTarget::Producer { .. }) => {
                        if Self::matches(target, &status, &known) {
                            while let Ok(more) = bus.try_recv() {
                                drop(more);
                            }
                            cursor = self.resync(target, cursor).await?;
                        }
                    }
                    Ok(status) => {
                        if Self::matches(target, &status, &known)
                            && self.offer(&status, false).await.is_err()
                        {
                            return Ok(());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::debug!(skipped, "status watcher fell behind; re-syncing from the store");
                        cursor = self.resync(target, cursor).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = resync.tick() => {
                    cursor = self.resync(target, cursor).await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventState;
    use chrono::Utc;

    fn status(id: EventId, state: EventState, cursor: u64) -> EventStatus {
        EventStatus {
            event_id: id,
            producer: "p".into(),
            transaction_id: "t".into(),
            sequence: 0,
            topic: "t".into(),
            state,
            partition: None,
            offset: None,
            attempts: 0,
            reason: String::new(),
            updated_at: Utc::now(),
            cursor,
        }
    }

    #[test]
    fn a_redriven_event_s_new_states_come_through() {
        let id = EventId::generate();
        let mut progress = Progress::new();
        assert!(progress.admit(&status(id, EventState::DeadLettered, 5)));
        assert!(progress.all_final());
        assert!(progress.admit(&status(id, EventState::Ready, 8)));
        assert!(!progress.all_final());
        assert!(progress.admit(&status(id, EventState::Published, 9)));
        assert!(progress.all_final());
    }

    #[test]
    fn a_producer_watch_forgets_what_its_cursor_passed() {
        let mut progress = Progress::new();
        for cursor in 1..=1_000 {
            assert!(progress.admit(&status(EventId::generate(), EventState::Published, cursor)));
        }
        progress.forget_through(1_000);
        assert_eq!(progress.remembered(), 0);
        // A state the cursor passed that is not final is old news; a final
        // one may have committed late, and goes through.
        assert!(!progress.admit(&status(EventId::generate(), EventState::Ready, 999)));
        assert!(progress.admit(&status(EventId::generate(), EventState::Published, 998)));
        assert!(progress.admit(&status(EventId::generate(), EventState::Ready, 1_001)));
    }

    #[test]
    fn a_change_is_admitted_once_and_never_regresses() {
        let id = EventId::generate();
        let mut progress = Progress::new();
        assert!(progress.admit(&status(id, EventState::Ready, 5)));
        assert!(!progress.admit(&status(id, EventState::Ready, 5)));
        assert!(!progress.admit(&status(id, EventState::Ready, 4)));
        assert!(progress.admit(&status(id, EventState::Published, 9)));
        assert!(!progress.admit(&status(id, EventState::Ready, 7)));
        assert!(progress.open_events().is_empty());
    }
}
