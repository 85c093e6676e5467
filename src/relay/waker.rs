//! Wake-ups of shard workers and the token resolver: in this process at
//! once, and in every other instance on the same store through it
//! (PostgreSQL `LISTEN/NOTIFY`), so that a change made through one instance
//! never waits for the owner's fallback poll.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, WakeUp};

/// How a shard worker is told that something changed in its shard.
#[derive(Default)]
pub(crate) struct ShardSignal {
    /// Raised when the shard has something new to read.
    pub(crate) notify: Notify,
    /// Rows behind the worker's cursor may have become sendable (a token was
    /// resolved): it must rewind, not just read on.
    pub(crate) rewind: AtomicBool,
}

/// Wake-ups waiting to be passed on to the other instances.
#[derive(Default)]
struct Outgoing {
    pending: Mutex<WakeUp>,
    ready: Notify,
}

/// Wakes shard workers (and the token resolver) when this process commits
/// something they must look at; other instances hear of it through the
/// store (see [`RelayWaker::bridge`]).
#[derive(Clone)]
pub struct RelayWaker {
    shards: Arc<Vec<ShardSignal>>,
    /// Raised when the token resolver should look for pending tokens.
    pub(crate) resolver: Arc<Notify>,
    outgoing: Arc<Outgoing>,
}

/// Most often the bridge announces to other instances: each announcement is
/// a `NOTIFY`, which PostgreSQL serialises at commit, so wake-ups are
/// gathered rather than sent one per append.
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(5);

impl RelayWaker {
    /// A waker with one signal per shard of `shard_count`.
    pub fn new(shard_count: u32) -> Self {
        RelayWaker {
            shards: Arc::new((0..shard_count).map(|_| ShardSignal::default()).collect()),
            resolver: Arc::new(Notify::new()),
            outgoing: Arc::default(),
        }
    }

    /// New rows in these shards. A worker that is busy keeps the wake-up (a
    /// permit) and reads again when it next waits.
    pub fn wake_shards(&self, shards: impl IntoIterator<Item = u32>) {
        let unique: HashSet<u32> = shards.into_iter().collect();
        if unique.is_empty() {
            return;
        }
        self.wake_local(&WakeUp {
            new_rows: unique.iter().copied().collect(),
            ..WakeUp::default()
        });
        self.announce(|pending| pending.new_rows.extend(unique));
    }

    /// Rows in these shards changed state behind the workers' cursors.
    pub fn rewind_shards(&self, shards: impl IntoIterator<Item = u32>) {
        let unique: HashSet<u32> = shards.into_iter().collect();
        if unique.is_empty() {
            return;
        }
        self.wake_local(&WakeUp {
            rewind: unique.iter().copied().collect(),
            ..WakeUp::default()
        });
        self.announce(|pending| pending.rewind.extend(unique));
    }

    /// Every shard of this process, e.g. when the breaker closes.
    pub fn wake_all(&self) {
        for signal in self.shards.iter() {
            signal.notify.notify_one();
        }
    }

    /// Pending tokens were appended: the resolver should look soon. (Each
    /// instance's resolver resolves every token, so this stays local.)
    pub fn wake_resolver(&self) {
        self.resolver.notify_one();
    }

    /// The signal of `shard`; `None` beyond the shard count.
    pub(crate) fn shard(&self, shard: u32) -> Option<&ShardSignal> {
        self.shards.get(shard as usize)
    }

    /// Wakes this process's workers only.
    fn wake_local(&self, wake: &WakeUp) {
        for &shard in &wake.rewind {
            if let Some(signal) = self.shard(shard) {
                signal.rewind.store(true, Ordering::Release);
                signal.notify.notify_one();
            }
        }
        for &shard in &wake.new_rows {
            if let Some(signal) = self.shard(shard) {
                signal.notify.notify_one();
            }
        }
    }

    fn announce(&self, add: impl FnOnce(&mut WakeUp)) {
        add(&mut self.outgoing.pending.lock().expect("wake-up lock"));
        self.outgoing.ready.notify_one();
    }

    /// Passes this process's wake-ups on to the other instances and theirs
    /// to this one, until `shutdown`. A store that serves a single instance
    /// (SQLite) has nothing to bridge. When the listening connection was
    /// lost, wake-ups may have been missed: every shard rewinds then.
    pub async fn bridge(
        self,
        store: Arc<dyn Store>,
        instance: String,
        shutdown: CancellationToken,
    ) {
        let mut listener = loop {
            match store.listen_for_wake_ups(&instance).await {
                Ok(Some(listener)) => break listener,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for other instances' wake-ups; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let announcer = {
            let waker = self.clone();
            let shutdown = shutdown.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = waker.outgoing.ready.notified() => {}
                    }
                    let wake =
                        std::mem::take(&mut *waker.outgoing.pending.lock().expect("wake-up lock"));
                    if !wake.is_empty()
                        && let Err(error) = store.announce_wake_up(&instance, &wake).await
                    {
                        // The others find the rows at their next poll.
                        tracing::warn!(%error, "could not announce a wake-up to other instances");
                    }
                    tokio::time::sleep(ANNOUNCE_INTERVAL).await;
                }
            }
        };
        let receiver = async {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    heard = listener.next() => match heard {
                        Ok(Some(wake)) => self.wake_local(&wake),
                        Ok(None) => {
                            let all: Vec<u32> = (0..self.shards.len() as u32).collect();
                            self.wake_local(&WakeUp {
                                rewind: all.into_iter().collect(),
                                ..WakeUp::default()
                            });
                        }
                        Err(error) => {
                            tracing::warn!(%error, "listening for other instances' wake-ups failed; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
            }
        };
        tokio::join!(announcer, receiver);
    }
}
