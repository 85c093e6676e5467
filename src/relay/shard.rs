//! One shard's relay loop (docs/architecture.md, "Per-key order").
//!
//! Rows are read in relay order after a cursor. Walking them with a set of
//! blocked keys: a key is blocked once one of its rows is PENDING, waiting
//! for a retry, or failed in flight; no later row of a blocked key is sent,
//! every other READY row is handed to the producer without waiting, one
//! record per key at a time (the next of a key waits in memory for the ack
//! of the one ahead). Outcomes are recorded in batches fenced by the lease
//! epoch. Blocked rows are passed by the cursor, so the worker rewinds to the
//! start of the shard when one of them may have become sendable.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::sync::atomic::Ordering;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::breaker::SharedBreaker;
use super::publish::{Delivery, FailureKind, Publish, PublishFailure, SendRefused};
use super::{RelayConfig, ShardSignal, retry_delay};
use crate::domain::{EventState, EventStatus};
use crate::status::StatusBus;
use crate::store::{Delivered, DeliveryFailed, Lease, RelayCursor, RelayRow, Store, StoreError};
use crate::telemetry::names;

/// How soon a shard looks again when committed rows wait behind the
/// visibility gate: about one writer transaction.
const HELD_BACK_RECHECK: Duration = Duration::from_millis(5);

/// A finished write of outcomes: what was to be written, and how it went
/// (`failures` is `None` when the deliveries' write failed first).
struct Recorded {
    delivered: Vec<Delivered>,
    published: Result<Vec<EventStatus>, StoreError>,
    failed: Vec<DeliveryFailed>,
    failures: Option<Result<Vec<EventStatus>, StoreError>>,
}

/// Why a shard worker stopped before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Another instance holds the shard now (a fenced write).
    #[error(transparent)]
    LeaseLost(StoreError),
}

/// The result of one record's delivery.
struct Outcome<R> {
    seq: i64,
    key: Option<Vec<u8>>,
    /// Attempts including this one.
    attempts: u32,
    /// Its publish span (disabled with tracing off), ended once booked.
    span: tracing::Span,
    result: Delivery<R>,
}

type Pending<R> = Pin<Box<dyn Future<Output = Outcome<R>> + Send>>;

/// The producer's local queue is full: the record was not sent.
struct QueueFull;

/// Relays one leased shard through a publisher `P` until told to stop or
/// the lease is lost.
pub(super) struct ShardWorker<P: Publish> {
    lease: Lease,
    store: Arc<dyn Store>,
    publisher: Arc<P>,
    breaker: Arc<SharedBreaker>,
    /// Set while an operator has paused relaying.
    paused: Arc<std::sync::atomic::AtomicBool>,
    bus: StatusBus,
    config: RelayConfig,
    /// Rows up to here were looked at since the last rewind.
    cursor: RelayCursor,
    /// Ordering keys that must not be sent past until the next rewind.
    blocked: HashSet<Vec<u8>>,
    /// Earliest time a blocked row may become sendable (a retry falls due).
    rewind_at: Option<Instant>,
    /// Something is blocked that only a rewind can release (a PENDING row).
    blocked_pending: bool,
    /// Seqs handed to the producer and not yet recorded; skipped by reads.
    sent: HashSet<i64>,
    /// Keys with a record in flight: each key has at most one.
    keys_in_flight: HashSet<Vec<u8>>,
    /// Sendable rows read while their key had a record in flight, in relay
    /// order per key: the next is sent as soon as the one ahead is acked,
    /// without reading the store again. Dropped at a rewind (the cursor is
    /// past them, so the rewind reads them again).
    held: HashMap<Vec<u8>, VecDeque<RelayRow>>,
    /// Rows in `held`, counted against `max_in_flight_per_shard`.
    held_rows: usize,
    /// When each sent event was appended, for the publish latency metric.
    appended_at: HashMap<i64, DateTime<Utc>>,
    in_flight: FuturesUnordered<Pending<P::Record>>,
    /// The store unit each seq is recorded in (`Store::recording_unit`).
    unit_of: Box<dyn Fn(i64) -> i64 + Send + Sync>,
    /// Records in flight per store unit.
    units_in_flight: HashMap<i64, u32>,
    /// Acked records waiting for the others of their unit, in the order
    /// they were acked, with when.
    acked: Vec<(Delivered, Instant)>,
    /// Acked records to be recorded at the next write.
    delivered: Vec<Delivered>,
    /// The write of outcomes in progress, if any.
    recording: Option<tokio::task::JoinHandle<Recorded>>,
    failed: Vec<DeliveryFailed>,
    /// The last read filled its page: read again at once.
    want_read: bool,
    /// Committed rows wait behind the visibility gate: read again then.
    recheck_at: Option<Instant>,
    /// The last read stopped because too much is in flight: read again once
    /// outcomes come back.
    capacity_limited: bool,
}

impl<P: Publish> ShardWorker<P> {
    /// A worker for the shard of `lease`, starting at the shard's first row.
    /// `paused` is the operator's pause flag, shared by every worker.
    pub(super) fn new(
        lease: Lease,
        store: Arc<dyn Store>,
        publisher: Arc<P>,
        breaker: Arc<SharedBreaker>,
        paused: Arc<std::sync::atomic::AtomicBool>,
        bus: StatusBus,
        config: RelayConfig,
    ) -> Self {
        let unit_of: Box<dyn Fn(i64) -> i64 + Send + Sync> = {
            let store = store.clone();
            Box::new(move |seq| store.recording_unit(seq))
        };
        ShardWorker {
            lease,
            store,
            publisher,
            breaker,
            paused,
            bus,
            config,
            cursor: RelayCursor::default(),
            blocked: HashSet::new(),
            rewind_at: None,
            blocked_pending: false,
            sent: HashSet::new(),
            appended_at: HashMap::new(),
            keys_in_flight: HashSet::new(),
            held: HashMap::new(),
            held_rows: 0,
            in_flight: FuturesUnordered::new(),
            unit_of,
            units_in_flight: HashMap::new(),
            acked: Vec::new(),
            delivered: Vec::new(),
            recording: None,
            failed: Vec::new(),
            want_read: true,
            recheck_at: None,
            capacity_limited: false,
        }
    }

    /// The worker, with `unit_of` for the store's recording units.
    #[cfg(test)]
    fn with_recording_units(mut self, unit_of: fn(i64) -> i64) -> Self {
        self.unit_of = Box::new(unit_of);
        self
    }

    /// Relays the shard until `shutdown`, woken by `signal`; then drains what
    /// is in flight. Returns an error only when the lease was lost.
    pub(super) async fn run(
        mut self,
        signal: &ShardSignal,
        shutdown: CancellationToken,
    ) -> Result<(), ShardError> {
        let shard = self.lease.shard;
        let mut next_poll = Instant::now() + self.config.poll_interval;
        while !shutdown.is_cancelled() {
            if self.rewind_at.is_some_and(|at| at <= Instant::now()) {
                self.rewind();
            }
            // Deliveries are written while the worker reads and sends on; a
            // failure is written before anything else is read, so that its
            // key moves on only once its retry or dead letter is stored.
            let written = if self.failed.is_empty() {
                self.begin_recording(false);
                Ok(())
            } else {
                self.record(false).await
            };
            if let Err(error) = written {
                self.on_store_error(error, &shutdown).await?;
                continue;
            }
            if self.want_read
                && self.occupancy() < self.config.max_in_flight_per_shard
                && self.breaker.allows_claims()
                && !self.paused.load(Ordering::Acquire)
            {
                if let Err(error) = self.dispatch().await {
                    self.on_store_error(error, &shutdown).await?;
                    continue;
                }
                if self.want_read && self.occupancy() < self.config.max_in_flight_per_shard {
                    continue;
                }
            }
            // An ack's hold ends with a write, once none is in progress.
            let hold_until = self
                .acked
                .first()
                .filter(|_| self.recording.is_none())
                .map(|(_, at)| *at + self.config.record_hold);
            let deadline = [self.rewind_at, self.recheck_at, hold_until]
                .into_iter()
                .flatten()
                .fold(next_poll, Instant::min);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = signal.notify.notified() => {
                    // A busy shard (records in flight) lingers a moment so
                    // that the commits of the next few appends are read
                    // together, not one query each. An idle one reads at
                    // once: at low rates a lone event's lag, not the number
                    // of queries, is what counts.
                    if !self.config.read_linger.is_zero() && !self.in_flight.is_empty() {
                        tokio::time::sleep(self.config.read_linger).await;
                        let _ = signal.notify.notified().now_or_never();
                    }
                    self.want_read = true;
                    if signal.rewind.swap(false, Ordering::AcqRel) {
                        self.rewind();
                    }
                }
                Some(outcome) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.absorb(outcome);
                }
                recorded = async { self.recording.as_mut().expect("a write in progress").await }, if self.recording.is_some() => {
                    self.recording = None;
                    let recorded = recorded.expect("a relay write does not panic");
                    if let Err(error) = self.book(recorded).await {
                        self.on_store_error(error, &shutdown).await?;
                        continue;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if self.recheck_at.is_some_and(|at| at <= Instant::now()) {
                        self.recheck_at = None;
                        self.want_read = true;
                    }
                    if Instant::now() >= next_poll {
                        next_poll = Instant::now() + self.config.poll_interval;
                        self.want_read = true;
                        if self.blocked_pending {
                            self.rewind();
                        }
                    }
                }
            }
            // Take every outcome that is already there, to record them together.
            while let Some(Some(outcome)) = self.in_flight.next().now_or_never() {
                self.absorb(outcome);
            }
            if self.capacity_limited && self.occupancy() <= self.config.max_in_flight_per_shard / 2
            {
                self.capacity_limited = false;
                self.want_read = true;
            }
        }
        self.drain(shard).await
    }

    /// On shutdown: publish what is already committed and record the
    /// outcomes, bounded by the drain timeout. What is left stays in the store
    /// for the next owner.
    async fn drain(mut self, shard: u32) -> Result<(), ShardError> {
        let deadline = Instant::now() + self.config.drain_timeout;
        // A running relay sends what it can before it stops; a paused one
        // only takes the outcomes of what is in flight already.
        let paused = self.paused.load(Ordering::Acquire);
        if paused {
            self.held.clear();
            self.held_rows = 0;
        }
        self.want_read = !paused;
        loop {
            match self.record(false).await {
                Ok(()) => {}
                Err(StoreError::LeaseLost { .. }) => return Ok(()),
                Err(error) => {
                    tracing::warn!(shard, %error, "could not record outcomes at shutdown; they will be sent again");
                    return Ok(());
                }
            }
            if self.want_read && self.occupancy() < self.config.max_in_flight_per_shard {
                if let Err(error) = self.dispatch().await {
                    tracing::warn!(shard, %error, "could not read the shard at shutdown");
                    self.want_read = false;
                }
                continue;
            }
            if self.in_flight.is_empty() {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.in_flight.next()).await {
                Ok(Some(outcome)) => {
                    self.absorb(outcome);
                    while let Some(Some(outcome)) = self.in_flight.next().now_or_never() {
                        self.absorb(outcome);
                    }
                    if self.capacity_limited
                        && self.occupancy() <= self.config.max_in_flight_per_shard / 2
                    {
                        self.capacity_limited = false;
                        self.want_read = !paused;
                    }
                }
                Ok(None) => {}
                Err(_) => {
                    tracing::warn!(shard, left = self.in_flight.len(), "drain timed out");
                    self.want_read = false;
                    let _ = self.record(true).await;
                    return Ok(());
                }
            }
        }
    }

    async fn on_store_error(
        &mut self,
        error: StoreError,
        shutdown: &CancellationToken,
    ) -> Result<(), ShardError> {
        if matches!(error, StoreError::LeaseLost { .. }) {
            return Err(ShardError::LeaseLost(error));
        }
        tracing::warn!(shard = self.lease.shard, %error, "relay store access failed; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        Ok(())
    }

    /// Back to the start of the shard, forgetting blocked keys: rows that were
    /// passed while blocked are looked at again.
    fn rewind(&mut self) {
        self.cursor = RelayCursor::default();
        self.blocked.clear();
        self.held.clear();
        self.held_rows = 0;
        self.rewind_at = None;
        self.blocked_pending = false;
        self.want_read = true;
    }

    /// Records handed to the producer or held for their key, against
    /// `max_in_flight_per_shard`.
    fn occupancy(&self) -> usize {
        self.sent.len() + self.held_rows
    }

    fn block(&mut self, key: Option<Vec<u8>>) {
        if let Some(key) = key {
            if let Some(rows) = self.held.remove(&key) {
                self.held_rows -= rows.len();
            }
            self.blocked.insert(key);
        }
    }

    fn rewind_no_later_than(&mut self, at: Instant) {
        self.rewind_at = Some(self.rewind_at.map_or(at, |current| current.min(at)));
    }

    fn instant_of(time: DateTime<Utc>) -> Instant {
        let wait = (time - Utc::now()).to_std().unwrap_or_default();
        Instant::now() + wait
    }

    /// Reads the next page after the cursor and sends what may be sent.
    async fn dispatch(&mut self) -> Result<(), StoreError> {
        let page = self
            .store
            .read_relay_page(
                self.lease.shard,
                self.cursor,
                self.config.read_batch,
                self.config.dead_letter_holds_key,
            )
            .await?;
        let rows = page.rows;
        let full_page = rows.len() as u32 == self.config.read_batch;
        // The writer that lifts the gate wakes only its own shards.
        self.recheck_at = page.held_back.then(|| Instant::now() + HELD_BACK_RECHECK);
        let now = Utc::now();
        for row in rows {
            if self.occupancy() >= self.config.max_in_flight_per_shard {
                // The cursor stays before this row; read on when capacity frees.
                self.want_read = false;
                self.capacity_limited = true;
                return Ok(());
            }
            if self.sent.contains(&row.seq) {
                self.cursor = row.cursor();
                continue;
            }
            let key_blocked = row
                .kafka_key
                .as_ref()
                .is_some_and(|key| self.blocked.contains(key));
            let sendable = match row.state {
                EventState::Ready => true,
                EventState::Retrying => match row.next_attempt_at {
                    Some(at) if at > now => {
                        self.rewind_no_later_than(Self::instant_of(at));
                        false
                    }
                    _ => true,
                },
                // Both wait for something outside the relay (a commit, a
                // redrive), possibly on another instance: look again at polls.
                EventState::Pending | EventState::DeadLettered => {
                    self.blocked_pending = true;
                    false
                }
                _ => false,
            };
            if key_blocked || !sendable {
                self.block(row.kafka_key.clone());
                self.cursor = row.cursor();
                continue;
            }
            // One record per key in flight: a record that fails (for any
            // reason, on this instance or on a zombie that lost the shard)
            // can then never be overtaken by a later one of its key, which
            // would otherwise be acked while the failed one waits for its
            // retry. The next one waits in memory; other keys flow around.
            if let Some(key) = &row.kafka_key
                && self.keys_in_flight.contains(key)
            {
                self.cursor = row.cursor();
                self.held.entry(key.clone()).or_default().push_back(row);
                self.held_rows += 1;
                continue;
            }
            if let Err(QueueFull) = self.send(&row) {
                // The producer's queue is shared by all shards: wait for
                // outcomes, or the next poll if none of them are ours.
                self.want_read = false;
                self.capacity_limited = !self.in_flight.is_empty();
                return Ok(());
            }
            self.cursor = row.cursor();
        }
        self.want_read = full_page;
        Ok(())
    }

    /// Hands `row` to the producer. A record the producer refuses at once
    /// is booked as a failed delivery here (in its publish span); only a
    /// full producer queue, which is nobody's fault, is left to the caller.
    fn send(&mut self, row: &RelayRow) -> Result<(), QueueFull> {
        let span = crate::telemetry::publish_span(row);
        let trace = if span.is_disabled() {
            None
        } else {
            crate::telemetry::trace_context_of(&span)
        };
        let delivery = match self.publisher.send(row, trace.as_ref()) {
            Ok(delivery) => delivery,
            Err(SendRefused::QueueFull { error_type }) => {
                crate::telemetry::failed(&span, &error_type);
                return Err(QueueFull);
            }
            Err(SendRefused::Failed(failure)) => {
                crate::telemetry::failed(&span, &failure.error_type);
                let _publishing = span.enter();
                self.fail(row.seq, row.kafka_key.clone(), row.attempts + 1, failure);
                return Ok(());
            }
        };
        let seq = row.seq;
        self.appended_at.insert(seq, row.appended_at);
        let key = row.kafka_key.clone();
        let attempts = row.attempts + 1;
        self.sent.insert(seq);
        *self.units_in_flight.entry((self.unit_of)(seq)).or_default() += 1;
        if let Some(key) = &key {
            self.keys_in_flight.insert(key.clone());
        }
        self.in_flight.push(Box::pin(async move {
            Outcome {
                seq,
                key,
                attempts,
                span,
                result: delivery.await,
            }
        }));
        Ok(())
    }

    fn absorb(&mut self, outcome: Outcome<P::Record>) {
        if let Some(key) = &outcome.key {
            self.keys_in_flight.remove(key);
        }
        let unit = (self.unit_of)(outcome.seq);
        if let Some(count) = self.units_in_flight.get_mut(&unit) {
            *count -= 1;
            if *count == 0 {
                self.units_in_flight.remove(&unit);
            }
        }
        let delivered = outcome.result.is_ok();
        let key = outcome.key.clone();
        match outcome.result {
            Ok(placement) => {
                crate::telemetry::published(&outcome.span, placement.partition, placement.offset);
                self.breaker.success();
                let delivered = Delivered {
                    seq: outcome.seq,
                    partition: placement.partition,
                    offset: placement.offset,
                };
                self.acked.push((delivered, Instant::now()));
            }
            Err(failure) => {
                crate::telemetry::failed(&outcome.span, &failure.error_type);
                // What befalls the record (a retry, a dead letter) is an
                // event of its publish span, which ends right after.
                let _publishing = outcome.span.enter();
                self.fail(outcome.seq, outcome.key, outcome.attempts, failure)
            }
        }
        // Dropping the last handle ends the publish span.
        drop(outcome.span);
        if delivered && let Some(key) = key {
            self.send_held(key);
        }
    }

    /// Sends the next row held behind `key`'s record that was just acked.
    fn send_held(&mut self, key: Vec<u8>) {
        let Some(rows) = self.held.get_mut(&key) else {
            return;
        };
        let Some(row) = rows.pop_front() else {
            return;
        };
        if rows.is_empty() {
            self.held.remove(&key);
        }
        self.held_rows -= 1;
        if let Err(QueueFull) = self.send(&row) {
            // Read again from the start once the queue has room.
            self.block(Some(key));
            self.rewind_no_later_than(Instant::now() + HELD_BACK_RECHECK);
        }
    }

    /// A delivery failed. The key is held either way; what happens to the
    /// event depends on the kind of failure.
    fn fail(
        &mut self,
        seq: i64,
        key: Option<Vec<u8>>,
        attempts: u32,
        failure: PublishFailure<P::Record>,
    ) {
        let shard = self.lease.shard;
        self.block(key);
        let PublishFailure {
            kind,
            error,
            record,
            ..
        } = failure;
        match kind {
            FailureKind::Purged | FailureKind::BrokerLevel => {
                // Not the event's fault: nothing is recorded, its attempts do
                // not grow; it is sent again after a rewind.
                if kind == FailureKind::BrokerLevel {
                    self.breaker.trip();
                }
                tracing::debug!(shard, seq, %error, "delivery not completed; will resend");
                self.sent.remove(&seq);
                self.rewind_no_later_than(Instant::now() + self.config.retry_base);
            }
            FailureKind::Permanent => {
                let reason = format!("permanent failure: {error}");
                tracing::warn!(shard, seq, %reason, "dead-lettering event");
                self.dead_letter(seq, reason, record);
            }
            FailureKind::Retriable if attempts >= self.config.max_attempts => {
                let reason = format!("gave up after {attempts} attempts: {error}");
                tracing::warn!(shard, seq, %reason, "dead-lettering event");
                self.dead_letter(seq, reason, record);
            }
            FailureKind::Retriable => {
                let delay = retry_delay(
                    attempts,
                    self.config.retry_base,
                    self.config.retry_cap,
                    &mut rand::rng(),
                );
                tracing::warn!(shard, seq, attempts, %error, ?delay, "delivery failed; will retry");
                self.sent.insert(seq);
                self.rewind_no_later_than(Instant::now() + delay);
                self.failed.push(DeliveryFailed {
                    seq,
                    error,
                    retry_at: Some(Utc::now() + delay),
                });
            }
        }
    }

    fn dead_letter(&mut self, seq: i64, reason: String, record: Option<P::Record>) {
        if let Some(record) = &record {
            self.publisher.copy_to_dead_letter_topic(record, &reason);
        }
        self.sent.insert(seq);
        // Its key is released at the next rewind (the row is final then).
        self.rewind_no_later_than(Instant::now());
        self.failed.push(DeliveryFailed {
            seq,
            error: reason,
            retry_at: None,
        });
    }

    /// Moves the acked records that may be recorded now to `delivered`: an
    /// acked record waits while others of its unit are in flight, up to
    /// `record_hold`, unless `all`.
    fn take_recordable(&mut self, all: bool) {
        let hold = self.config.record_hold;
        let now = Instant::now();
        let units_in_flight = &self.units_in_flight;
        let unit_of = &self.unit_of;
        let delivered = &mut self.delivered;
        self.acked.retain(|&(record, at)| {
            let waits =
                !all && at + hold > now && units_in_flight.contains_key(&unit_of(record.seq));
            if !waits {
                delivered.push(record);
            }
            waits
        });
    }

    /// Starts writing the outcomes gathered so far, unless a write is in
    /// progress: the worker reads and sends on while the store writes.
    fn begin_recording(&mut self, all: bool) {
        if self.recording.is_some() {
            return;
        }
        self.take_recordable(all);
        if self.delivered.is_empty() && self.failed.is_empty() {
            return;
        }
        let store = self.store.clone();
        let lease = self.lease.clone();
        let delivered = std::mem::take(&mut self.delivered);
        let failed = std::mem::take(&mut self.failed);
        self.recording = Some(tokio::spawn(async move {
            let published = if delivered.is_empty() {
                Ok(Vec::new())
            } else {
                store.record_delivered(&lease, &delivered).await
            };
            let failures = if failed.is_empty() || published.is_err() {
                None
            } else {
                Some(store.record_failed(&lease, &failed).await)
            };
            Recorded {
                delivered,
                published,
                failed,
                failures,
            }
        }));
    }

    /// Waits for the write in progress, if any, and books its outcome.
    async fn finish_recording(&mut self) -> Result<(), StoreError> {
        let Some(recording) = self.recording.take() else {
            return Ok(());
        };
        let recorded = recording.await.expect("a relay write does not panic");
        self.book(recorded).await
    }

    /// Records every outcome gathered so far (`all`: also the acks that
    /// wait for their unit), and waits for it.
    async fn record(&mut self, all: bool) -> Result<(), StoreError> {
        self.finish_recording().await?;
        self.begin_recording(all);
        self.finish_recording().await
    }

    /// Books a finished write: what was written is published to the bus;
    /// what was not goes back to be written again.
    async fn book(&mut self, recorded: Recorded) -> Result<(), StoreError> {
        let Recorded {
            delivered,
            published,
            failed,
            failures,
        } = recorded;
        let outcome = self.book_delivered(delivered, published).await;
        match failures {
            Some(Ok(statuses)) => {
                let dead = failed.iter().filter(|f| f.retry_at.is_none()).count() as u64;
                metrics::counter!(names::EVENTS_DEAD_LETTERED).increment(dead);
                metrics::counter!(names::DELIVERY_RETRIES).increment(failed.len() as u64 - dead);
                for failed in &failed {
                    self.appended_at.remove(&failed.seq);
                    self.sent.remove(&failed.seq);
                }
                self.bus.publish(statuses);
            }
            Some(Err(error)) => {
                self.failed.splice(0..0, failed);
                return Err(self.fenced(error));
            }
            None => {
                self.failed.splice(0..0, failed);
            }
        }
        outcome
    }

    async fn book_delivered(
        &mut self,
        delivered: Vec<Delivered>,
        published: Result<Vec<EventStatus>, StoreError>,
    ) -> Result<(), StoreError> {
        match published {
            Ok(statuses) => {
                self.published(&delivered, statuses);
                Ok(())
            }
            Err(error) if is_transient(&error) => {
                self.delivered.splice(0..0, delivered);
                Err(self.fenced(error))
            }
            // One bad row must not fail the batch for ever.
            Err(error) => {
                tracing::warn!(shard = self.lease.shard, %error, "recording deliveries failed; recording them one by one");
                self.delivered.splice(0..0, delivered);
                self.record_delivered_one_by_one()
                    .await
                    .map_err(|error| self.fenced(error))
            }
        }
    }

    /// `error`, counted when it is a fenced write.
    fn fenced(&self, error: StoreError) -> StoreError {
        if matches!(error, StoreError::LeaseLost { .. }) {
            metrics::counter!(names::RELAY_WRITES_FENCED).increment(1);
        }
        error
    }

    /// Records each delivery on its own; one that cannot be recorded is
    /// dead-lettered with the reason, so that the shard goes on.
    async fn record_delivered_one_by_one(&mut self) -> Result<(), StoreError> {
        while let Some(&delivered) = self.delivered.first() {
            match self.store.record_delivered(&self.lease, &[delivered]).await {
                Ok(statuses) => {
                    self.delivered.remove(0);
                    self.published(&[delivered], statuses);
                }
                Err(error) if is_transient(&error) => return Err(error),
                Err(error) => {
                    self.delivered.remove(0);
                    let reason = format!(
                        "delivered to Kafka (partition {}, offset {}), but the delivery could not be recorded: {error}",
                        delivered.partition, delivered.offset
                    );
                    tracing::error!(shard = self.lease.shard, seq = delivered.seq, %reason, "dead-lettering event");
                    self.failed.push(DeliveryFailed {
                        seq: delivered.seq,
                        error: reason,
                        retry_at: None,
                    });
                }
            }
        }
        Ok(())
    }

    /// Books recorded deliveries: metrics, in-flight accounting, the bus.
    fn published(&mut self, batch: &[Delivered], statuses: Vec<EventStatus>) {
        metrics::counter!(names::EVENTS_PUBLISHED).increment(statuses.len() as u64);
        let now = Utc::now();
        for delivered in batch {
            if let Some(appended_at) = self.appended_at.remove(&delivered.seq) {
                let seconds = (now - appended_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
                metrics::histogram!(names::PUBLISH_SECONDS).record(seconds);
            }
            self.sent.remove(&delivered.seq);
        }
        self.bus.publish(statuses);
    }
}

/// Errors after which the same write may succeed later (the store is
/// back) or must not be tried again (the lease is gone).
fn is_transient(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Unavailable(_) | StoreError::LeaseLost { .. }
    )
}

#[cfg(test)]
mod tests;
