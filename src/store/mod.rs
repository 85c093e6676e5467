//! The `Store` trait and its two implementations: PostgreSQL (production) and
//! SQLite (embedded: `outboxd dev`, sidecars, first runs).
//!
//! The relay and the API see only this trait, never SQL.

#[macro_use]
mod codes;
mod error;
pub mod postgres;
pub mod segment;
pub mod sqlite;
mod tokens;
pub mod xid;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{
    AppendBatch, AppendOutcome, EventId, EventStatus, FieldViolation, Header, TransactionRef,
};

pub use error::StoreError;

/// Why one append of a coalesced batch was refused; the others go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendRejection {
    /// The same (producer, transaction id, sequence) was stored with another body.
    #[error(
        "append {sequence} of transaction {transaction_id:?} already exists with different content"
    )]
    ConflictingRetry {
        /// The transaction appended to.
        transaction_id: String,
        /// The sequence of the refused append.
        sequence: u64,
    },
    /// A caller-chosen event id is already taken.
    #[error("{}: {}", .0.field, .0.description)]
    EventIdTaken(FieldViolation),
    /// The transaction exists with another token mode.
    #[error("transaction {transaction_id:?} was opened as {existing}, not {requested}")]
    ModeMismatch {
        /// The transaction appended to.
        transaction_id: String,
        /// The mode the transaction was opened with.
        existing: &'static str,
        /// The mode this append asked for.
        requested: &'static str,
    },
    /// The transaction is already resolved (committed, aborted, expired…).
    #[error("transaction {transaction_id:?} is already {resolution}")]
    TransactionResolved {
        /// The transaction appended to.
        transaction_id: String,
        /// How it was resolved: "committed", "aborted", "expired"….
        resolution: String,
    },
    /// The token of a later append disagrees with the transaction's first one.
    #[error("transaction {transaction_id:?}: {detail}")]
    TokenMismatch {
        /// The transaction appended to.
        transaction_id: String,
        /// What differs.
        detail: String,
    },
}

/// What became of a `Commit` or `Abort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done now.
    Done,
    /// It already was so; nothing changed (Commit and Abort are idempotent).
    AlreadyDone,
    /// No transaction has this (producer, transaction id).
    NotFound,
    /// Not a two_phase transaction.
    WrongMode(&'static str),
    /// Resolved the other way: the resolution ("aborted", "expired", "committed").
    Refused(String),
}

/// The outcome of resolving one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// What became of the request.
    pub verdict: Verdict,
    /// Events of the transaction.
    pub events: u64,
    /// State changes made now, for the status bus.
    pub changed: Vec<EventStatus>,
    /// Shards of the changed events, whose relays must look again.
    pub shards: Vec<u32>,
}

/// State changes made by a background resolution, and their shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The events whose state changed, for the status bus.
    pub changed: Vec<EventStatus>,
    /// Shards of the changed events, whose relays must look again.
    pub shards: Vec<u32>,
}

impl Resolved {
    /// Adds the changes of `other` to these.
    pub fn extend(&mut self, other: Resolved) {
        self.changed.extend(other.changed);
        self.shards.extend(other.shards);
    }
}

/// An open two_phase transaction, for recovery after a caller crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedTransaction {
    /// The producer the transaction belongs to.
    pub producer: String,
    /// The caller's id for the transaction.
    pub transaction_id: String,
    /// When its first append was stored.
    pub created_at: DateTime<Utc>,
    /// When it will be discarded unless committed.
    pub expires_at: DateTime<Utc>,
    /// Events appended to it so far.
    pub events: u64,
}

/// Which dead letters an admin operation means.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// These events (then the other fields are ignored).
    pub event_ids: Vec<EventId>,
    /// Only this producer's dead letters; `None`: any producer.
    pub producer: Option<String>,
    /// Only dead letters of this topic; `None`: any topic.
    pub topic: Option<String>,
    /// Only events dead-lettered (last changed) at or after this time; `None`:
    /// any time.
    pub since: Option<DateTime<Utc>>,
}

/// One shard's unpublished events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardBacklog {
    /// The shard.
    pub shard: u32,
    /// Events not yet final.
    pub depth: u64,
    /// When the oldest of those events was appended.
    pub oldest: Option<DateTime<Utc>>,
}

/// An open postgres_xid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidToken {
    /// The transaction the token names.
    pub transaction: TransactionRef,
    /// The caller's transaction id (`pg_current_xact_id()`).
    pub caller_xid: u64,
    /// The system identifier of the caller's cluster.
    pub system_id: u64,
}

/// What the caller's cluster said about a postgres_xid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XidVerdict {
    /// Committed: the events become publishable.
    Committed,
    /// Rolled back (or its session died before commit).
    Aborted,
    /// Too old to resolve: dead-letter with this reason.
    TooOld(String),
    /// Cannot be resolved now (wrong cluster, unreachable): stays PENDING,
    /// with this reason in its status.
    Unresolvable(String),
}

/// What the shard workers of other instances must look at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WakeUp {
    /// Shards with new rows.
    pub new_rows: std::collections::BTreeSet<u32>,
    /// Shards whose rows changed behind the workers' cursors (a commit, an
    /// abort, a resolved token, a redrive): read again from the start.
    pub rewind: std::collections::BTreeSet<u32>,
}

impl WakeUp {
    /// Whether there is nothing to look at.
    pub fn is_empty(&self) -> bool {
        self.new_rows.is_empty() && self.rewind.is_empty()
    }
}

/// Other instances' wake-ups, as they arrive.
#[async_trait]
pub trait WakeUpListener: Send {
    /// The next wake-up; `Ok(None)` when the connection was lost and made
    /// again, so that wake-ups may have been missed.
    async fn next(&mut self) -> Result<Option<WakeUp>, StoreError>;
}

/// A shard's lease: the right to relay it, fenced by `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The shard leased.
    pub shard: u32,
    /// The instance holding it; empty when nobody does.
    pub owner: String,
    /// Grows each time the shard changes owner; every relay write names it.
    pub epoch: i64,
    /// When the lease lapses unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// Position of the relay within a shard: rows are read in
/// (writer transaction, sequence) order, strictly after the cursor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RelayCursor {
    /// The id of outboxd's own writing transaction (`writer_xid`); 0 for
    /// stores whose writes are serialised.
    pub writer_xid: i64,
    /// The row's `seq`, the store-wide order of appended events.
    pub seq: i64,
}

/// A page of relay rows.
#[derive(Debug, Clone, Default)]
pub struct RelayPage {
    /// The rows, in relay order.
    pub rows: Vec<RelayRow>,
    /// Committed rows of the shard wait behind the visibility gate: they
    /// become readable when an older writer finishes.
    pub held_back: bool,
}

/// One not-yet-final row handed to the relay.
#[derive(Debug, Clone)]
pub struct RelayRow {
    /// Store-wide position of the event in append order; names it in
    /// [`Delivered`] and [`DeliveryFailed`].
    pub seq: i64,
    /// The writing transaction, as in [`RelayCursor::writer_xid`].
    pub writer_xid: i64,
    /// The event's id.
    pub event_id: EventId,
    /// The producer that appended it.
    pub producer: String,
    /// The transaction it was appended under.
    pub transaction_id: String,
    /// The Kafka topic to publish to.
    pub topic: String,
    /// The record key: the event's ordering key; `None` when it has none.
    pub kafka_key: Option<Vec<u8>>,
    /// The record value.
    pub payload: Vec<u8>,
    /// The caller's headers.
    pub headers: Vec<Header>,
    /// The kind of entity the event is about.
    pub aggregate_type: String,
    /// The id of the entity the event is about.
    pub aggregate_id: String,
    /// What happened, in the caller's words.
    pub event_type: String,
    /// READY, PENDING or RETRYING (DEAD_LETTERED only when asked for).
    pub state: crate::domain::EventState,
    /// Delivery attempts charged so far.
    pub attempts: u32,
    /// When a RETRYING event is next due; `None` otherwise.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When it happened: the caller's time, else when it was appended.
    pub occurred_at: DateTime<Utc>,
    /// When it was stored.
    pub appended_at: DateTime<Utc>,
    /// W3C `traceparent` of the append, if it carried one.
    pub traceparent: Option<String>,
    /// W3C `tracestate` of the append, if it carried one.
    pub tracestate: Option<String>,
}

impl RelayRow {
    /// The cursor just at this row: reading after it continues with the next.
    pub fn cursor(&self) -> RelayCursor {
        RelayCursor {
            writer_xid: self.writer_xid,
            seq: self.seq,
        }
    }
}

/// Kafka acknowledged the record of the event with this `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The event's [`RelayRow::seq`].
    pub seq: i64,
    /// The partition Kafka wrote the record to.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
}

/// A delivery of the event with this `seq` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFailed {
    /// The event's [`RelayRow::seq`].
    pub seq: i64,
    /// Why it failed, kept as the event's reason.
    pub error: String,
    /// When to try again; `None` dead-letters the event.
    pub retry_at: Option<DateTime<Utc>>,
}

/// The durable state behind outboxd.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending schema migrations and fixes the shard count on first use.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// The fixed number of shards, chosen at migration.
    fn shard_count(&self) -> u32;

    /// OpenTelemetry's `db.system.name` of this store.
    fn db_system(&self) -> &'static str;

    /// Stores several appends in one store transaction. Each append is stored
    /// whole or not at all and fails only itself; an `Err` means nothing was
    /// stored (store unreachable).
    async fn append(
        &self,
        batches: &[AppendBatch],
    ) -> Result<Vec<Result<AppendOutcome, AppendRejection>>, StoreError>;

    /// Takes or renews the leases of shards that are free, expired or already
    /// `owner`'s, up to `max_shards` in all; returns the leases `owner` holds.
    async fn acquire_leases(
        &self,
        owner: &str,
        ttl: Duration,
        max_shards: u32,
    ) -> Result<Vec<Lease>, StoreError>;

    /// Gives up `owner`'s leases, so that another instance may take them at
    /// once, and its place among the live instances.
    async fn release_leases(&self, owner: &str) -> Result<(), StoreError>;

    /// Gives up `owner`'s leases of shards not in `keep` (after instances joined).
    async fn release_leases_except(&self, owner: &str, keep: &[u32]) -> Result<(), StoreError>;

    /// Records that `owner` is alive; returns how many instances are (those
    /// heard from within `ttl`, `owner` included).
    async fn heartbeat(&self, owner: &str, ttl: Duration) -> Result<u32, StoreError>;

    /// The next not-final rows of `shard` after `after`, in relay order, that
    /// are safe to read: no row may later appear before the last one returned.
    async fn read_relay_rows(
        &self,
        shard: u32,
        after: RelayCursor,
        limit: u32,
    ) -> Result<Vec<RelayRow>, StoreError> {
        Ok(self.read_relay_page(shard, after, limit, false).await?.rows)
    }

    /// [`Store::read_relay_rows`], with dead letters among the rows when
    /// `with_dead_letters` (so that they can hold back their keys), and
    /// whether committed rows of the shard wait behind the visibility gate.
    async fn read_relay_page(
        &self,
        shard: u32,
        after: RelayCursor,
        limit: u32,
        with_dead_letters: bool,
    ) -> Result<RelayPage, StoreError>;

    /// The unit of the store that `seq`'s delivery is written to: the relay
    /// records the deliveries of one unit together, once none of its events
    /// is in flight, instead of writing the unit again for each ack. A
    /// PostgreSQL segment is one row for all its events; each SQLite event
    /// is a row of its own.
    fn recording_unit(&self, seq: i64) -> i64 {
        seq
    }

    /// Marks events published, fenced by the lease: `StoreError::LeaseLost`
    /// when `lease.epoch` is no longer current, and then nothing is written.
    async fn record_delivered(
        &self,
        lease: &Lease,
        delivered: &[Delivered],
    ) -> Result<Vec<EventStatus>, StoreError>;

    /// Records failed deliveries (retry or dead letter), fenced like
    /// [`Store::record_delivered`].
    async fn record_failed(
        &self,
        lease: &Lease,
        failed: &[DeliveryFailed],
    ) -> Result<Vec<EventStatus>, StoreError>;

    /// Makes a two_phase transaction's events publishable.
    async fn commit_transaction(
        &self,
        transaction: &TransactionRef,
    ) -> Result<Resolution, StoreError>;

    /// Discards a two_phase transaction's events.
    async fn abort_transaction(
        &self,
        transaction: &TransactionRef,
    ) -> Result<Resolution, StoreError>;

    /// Discards the events of up to `limit` two_phase transactions whose
    /// timeout has passed.
    async fn expire_transactions(&self, limit: u32) -> Result<Resolved, StoreError>;

    /// Open two_phase transactions of `producer` older than `older_than`.
    async fn list_prepared(
        &self,
        producer: &str,
        older_than: Duration,
        limit: u32,
    ) -> Result<Vec<PreparedTransaction>, StoreError>;

    /// Up to `limit` open postgres_xid tokens that are due to be asked
    /// about: half the most recently due, half the longest due, so that
    /// neither a flood of new tokens nor a pile of old ones that cannot be
    /// resolved holds the others back (see [`Store::defer_xid_tokens`]).
    async fn open_xid_tokens(&self, limit: u32) -> Result<Vec<XidToken>, StoreError>;

    /// Puts off asking about these open tokens for `delay`: they cannot be
    /// resolved now, and must not hold back tokens that can.
    async fn defer_xid_tokens(
        &self,
        transactions: &[TransactionRef],
        delay: Duration,
    ) -> Result<(), StoreError>;

    /// Applies what the callers' clusters said about postgres_xid tokens.
    async fn resolve_xid_tokens(
        &self,
        verdicts: &[(TransactionRef, XidVerdict)],
    ) -> Result<Resolved, StoreError>;

    /// Dead letters matching `filter`, after `after_seq`, in append order:
    /// (seq, status) pairs; the last seq is the next page's start.
    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, EventStatus)>, StoreError>;

    /// Makes matching dead letters READY again, with their attempts reset.
    async fn redrive(&self, filter: &DeadLetterFilter) -> Result<Resolved, StoreError>;

    /// Depth and oldest unpublished event of every shard that has any.
    async fn backlog(&self) -> Result<Vec<ShardBacklog>, StoreError>;

    /// Removes up to `limit` published or discarded events last changed more
    /// than `older_than` ago, with the bookkeeping of appends and resolved
    /// transactions that old; returns how many events went. Dead letters
    /// stay until redriven.
    async fn purge_finished(&self, older_than: Duration, limit: u32) -> Result<u64, StoreError>;

    /// Every shard's lease.
    async fn leases(&self) -> Result<Vec<Lease>, StoreError>;

    /// Pauses or resumes relaying, for every instance.
    async fn set_relay_paused(&self, paused: bool) -> Result<(), StoreError>;

    /// Whether relaying is paused (see [`Store::set_relay_paused`]).
    async fn relay_paused(&self) -> Result<bool, StoreError>;

    /// Starts hearing the wake-ups other instances of this store announce
    /// (not `instance`'s own); `None` when the store serves one instance.
    async fn listen_for_wake_ups(
        &self,
        instance: &str,
    ) -> Result<Option<Box<dyn WakeUpListener>>, StoreError> {
        let _ = instance;
        Ok(None)
    }

    /// Tells the other instances of this store what to look at.
    async fn announce_wake_up(&self, instance: &str, wake: &WakeUp) -> Result<(), StoreError> {
        let _ = (instance, wake);
        Ok(())
    }

    /// The store's own PostgreSQL cluster, when it can resolve postgres_xid
    /// tokens of callers on the same cluster.
    fn own_xid_source(&self) -> Option<xid::XidSource> {
        None
    }

    /// Current state of the given events; unknown ids are left out.
    async fn status_by_ids(&self, ids: &[EventId]) -> Result<Vec<EventStatus>, StoreError>;

    /// Current state of every event of the given transactions, in append order.
    async fn status_by_transactions(
        &self,
        transactions: &[TransactionRef],
    ) -> Result<Vec<EventStatus>, StoreError>;

    /// A producer's events whose latest change is after `after_cursor`, in
    /// cursor order.
    async fn status_changes(
        &self,
        producer: &str,
        after_cursor: u64,
        limit: u32,
    ) -> Result<Vec<EventStatus>, StoreError>;
}

/// Opens the store named by `url`: `postgres://…` or `sqlite://path`.
pub async fn connect(
    url: &str,
    max_connections: u32,
    shard_count: u32,
) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(
            postgres::PostgresStore::connect(url, max_connections, shard_count).await?,
        ))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(
            sqlite::SqliteStore::connect(url, max_connections, shard_count).await?,
        ))
    } else {
        Err(StoreError::Config(format!(
            "unsupported store url {url:?}: use postgres://… or sqlite://path"
        )))
    }
}
