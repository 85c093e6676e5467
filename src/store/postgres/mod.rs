//! The production store: PostgreSQL through sqlx.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row};

use super::codes::{XidTokenRow, unpack_ids};
use super::tokens::{EXPIRED, two_phase_step, xid_step};
use super::xid::XidSource;
use super::{
    AppendRejection, DeadLetterFilter, Delivered, DeliveryFailed, Lease, PreparedTransaction,
    RelayCursor, RelayPage, Resolution, Resolved, ShardBacklog, Store, StoreError, Verdict,
    XidToken, XidVerdict,
};
use crate::domain::{AppendBatch, AppendOutcome, EventId, EventState, EventStatus, TransactionRef};

mod append;
mod events;
mod legacy;
mod queries;
mod reader;
mod recorder;
mod segments;
mod wake_ups;

use events::Loaded;
const ACQUIRE_LEASES: &str = include_str!("../sql/postgres/acquire_leases.sql");

/// Registers a writer before its transaction takes an xid (migration 0002).
const REGISTER_WRITER: &str = "INSERT INTO outbox_writer_slots (floor_xid, backend_pid, backend_start) \
     SELECT pg_snapshot_xmax(pg_current_snapshot()), pid, backend_start \
     FROM pg_stat_activity WHERE pid = pg_backend_pid() \
     RETURNING id";

/// A pooled connection whose backend holds a visibility-gate slot. Unless
/// the slot is known to be removed, the connection is closed instead of
/// going back to the pool: a slot whose backend is gone no longer counts,
/// while one left behind by a live backend would hold back every shard.
/// (This also covers an append whose future is dropped halfway.)
struct SlotHolder {
    connection: sqlx::pool::PoolConnection<Postgres>,
    released: bool,
}

impl Drop for SlotHolder {
    fn drop(&mut self) {
        if !self.released {
            self.connection.close_on_drop();
        }
    }
}

/// PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    pool: PgPool,
    /// Bodies of the segments written or read lately.
    cache: Arc<segments::SegmentCache>,
    /// Segment numbers reserved for this instance's writers.
    numbers: append::SegmentNumbers,
    /// Reads the segments of all the shards relayed through this store.
    reader: reader::Reader,
    /// Records the deliveries of all the shards relayed through this store.
    recorder: recorder::Recorder,
    /// The shard count asked for by configuration; the stored one wins once
    /// the schema exists (see [`Store::migrate`]).
    shard_count: std::sync::atomic::AtomicU32,
}

impl PostgresStore {
    /// Connects lazily-checked: fails at once when the server cannot be reached.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        shard_count: u32,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("bad postgres url: {e}")))?
            .application_name("outboxd")
            // A safety net: a transaction whose client stalls between its
            // statements (a paused process) holds its locks only this long.
            // The relay's fenced writes are single statements anyway.
            .options([("idle_in_transaction_session_timeout", "10s")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        let cache = Arc::new(segments::SegmentCache::default());
        Ok(PostgresStore {
            reader: reader::Reader::start(pool.clone(), events::SEGMENTS_PER_READ),
            recorder: recorder::Recorder::start(pool.clone(), cache.clone()),
            cache,
            numbers: append::SegmentNumbers::default(),
            pool,
            shard_count: std::sync::atomic::AtomicU32::new(shard_count),
        })
    }

    /// The pool, for tests and tools that inspect the schema.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends that the one-statement path refused: planned from what the
    /// store holds, in a transaction, tried again when a concurrent writer
    /// got in the way.
    async fn append_in_transaction(
        &self,
        connection: &mut PgConnection,
        batches: &[AppendBatch],
    ) -> Result<Vec<Result<AppendOutcome, AppendRejection>>, StoreError> {
        let shard_count = self.shard_count();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = connection.begin().await?;
            match append::append(&mut tx, &self.numbers, batches, shard_count).await {
                Ok(Some((results, packed))) => {
                    tx.commit().await?;
                    packed.cache(&self.cache);
                    return Ok(results);
                }
                // A concurrent writer stored one of these appends or ids
                // meanwhile: its commit is visible to the next attempt.
                Ok(None) if attempt < 5 => {
                    tracing::debug!("a concurrent writer stored one of these appends; again");
                    tx.rollback().await?
                }
                Ok(None) => {
                    return Err(StoreError::Unavailable(sqlx::Error::Protocol(
                        "appends kept meeting concurrent writers of the same keys".into(),
                    )));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Sets the state and reason of `transactions`, and moves their
    /// PENDING events.
    async fn finish_transactions(
        &self,
        tx: &mut PgConnection,
        transactions: &[TransactionRef],
        transaction_state: i16,
        resolution: &str,
        event_state: EventState,
        reason: Option<&str>,
    ) -> Result<Resolved, StoreError> {
        let (producers, ids) = transaction_columns(transactions);
        sqlx::query(
            "UPDATE outbox_transactions AS t \
             SET state = $3, resolution = $4, resolved_at = now(), reason = $5 \
             FROM UNNEST($1::text[], $2::text[]) AS u(producer, transaction_id) \
             WHERE t.producer = u.producer AND t.transaction_id = u.transaction_id",
        )
        .bind(&producers)
        .bind(&ids)
        .bind(transaction_state)
        .bind(resolution)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        self.transition_pending(tx, transactions, Some(event_state), reason)
            .await
    }

    async fn resolve_two_phase(
        &self,
        transaction: &TransactionRef,
        commit: bool,
    ) -> Result<Resolution, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT mode, state, resolution, coalesce(expires_at < now(), false) AS expired \
             FROM outbox_transactions WHERE producer = $1 AND transaction_id = $2 FOR UPDATE",
        )
        .bind(&transaction.producer)
        .bind(&transaction.transaction_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Resolution {
                verdict: Verdict::NotFound,
                events: 0,
                changed: vec![],
                shards: vec![],
            });
        };
        let mode: i16 = row.try_get("mode")?;
        let state: i16 = row.try_get("state")?;
        let resolution: Option<String> = row.try_get("resolution")?;
        let expired: bool = row.try_get("expired")?;
        let events: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(length(event_ids) / 16), 0)::bigint FROM outbox_appends \
             WHERE producer = $1 AND transaction_id = $2",
        )
        .bind(&transaction.producer)
        .bind(&transaction.transaction_id)
        .fetch_one(&mut *tx)
        .await?;
        let step = two_phase_step(mode, state, resolution, expired, commit);
        let resolved = match &step.finish {
            Some((txn_state, name, event_state, reason)) => {
                self.finish_transactions(
                    &mut tx,
                    std::slice::from_ref(transaction),
                    *txn_state,
                    name,
                    *event_state,
                    *reason,
                )
                .await?
            }
            None => Resolved::default(),
        };
        tx.commit().await?;
        Ok(Resolution {
            verdict: step.verdict,
            events: events as u64,
            changed: resolved.changed,
            shards: resolved.shards,
        })
    }
}

/// Transaction refs from (producer, transaction id) pairs.
fn transaction_refs(pairs: Vec<(String, String)>) -> Vec<TransactionRef> {
    pairs
        .into_iter()
        .map(|(producer, transaction_id)| TransactionRef {
            producer,
            transaction_id,
        })
        .collect()
}

/// The producers and transaction ids of `transactions`, as two arrays for
/// an `UNNEST`.
pub(super) fn transaction_columns(transactions: &[TransactionRef]) -> (Vec<&str>, Vec<&str>) {
    transactions
        .iter()
        .map(|t| (t.producer.as_str(), t.transaction_id.as_str()))
        .unzip()
}

/// A row of the change feed: a producer's events that a statement changed
/// (see migration 0014).
#[derive(sqlx::FromRow)]
struct FeedRow {
    segments: Vec<i64>,
    positions: Option<Vec<i32>>,
    xid: i64,
    change_seq: i64,
}

/// A producer's events of one segment that a statement changed
/// (`positions`; `None`: all of them).
struct FeedChange {
    segment: i64,
    positions: Option<Vec<i32>>,
    xid: i64,
    change_seq: i64,
}

/// The rows' changes, segment by segment, in the rows' order.
fn feed_changes(rows: Vec<FeedRow>) -> Vec<FeedChange> {
    let mut changes = Vec::with_capacity(rows.len());
    for row in rows {
        for (segment, positions) in
            segments::change_entries(&row.segments, row.positions.as_deref())
        {
            changes.push(FeedChange {
                segment,
                positions,
                xid: row.xid,
                change_seq: row.change_seq,
            });
        }
    }
    changes
}

/// Where the change feed may be read up to (exclusive): the oldest xid of a
/// transaction still running on an outboxd connection to this database, or
/// the snapshot's xmax (one past the latest completed xid), whichever is
/// lower. pg_stat_activity shows 32-bit xids; each is widened to the xid8
/// nearest xmax with the same low bits (a running xid may be above xmax).
/// Other transactions on the cluster (callers' own) hold nothing back.
const CHANGE_FEED_GATE: &str = include_str!("../sql/postgres/change_feed_gate.sql");

/// Cursors of a producer's changes, in feed order: a change's cursor is
/// twice its transaction's xid, less one except for the transaction's last
/// change, so that resuming after any change reads on from the first change
/// of its transaction not surely delivered (`after_cursor / 2` is the last
/// transaction delivered whole).
fn feed_positions(changes: Vec<(i64, EventStatus)>) -> Vec<EventStatus> {
    let mut statuses = Vec::with_capacity(changes.len());
    let mut changes = changes.into_iter().peekable();
    while let Some((xid, mut status)) = changes.next() {
        let last_of_transaction = changes.peek().is_none_or(|(next, _)| *next != xid);
        status.cursor = 2 * xid as u64 - u64::from(!last_of_transaction);
        statuses.push(status);
    }
    statuses
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.pool)
            .await?;
        let wanted = self.shard_count();
        let mut tx = self.pool.begin().await?;
        // Serialises concurrent first starts of several instances.
        sqlx::query("LOCK TABLE outbox_meta IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT value FROM outbox_meta WHERE key = 'shard_count'")
                .fetch_optional(&mut *tx)
                .await?;
        let shard_count = match stored {
            Some(value) => value
                .parse::<u32>()
                .map_err(|_| StoreError::Corrupt(format!("stored shard_count {value:?}")))?,
            None => {
                sqlx::query("INSERT INTO outbox_meta (key, value) VALUES ('shard_count', $1)")
                    .bind(wanted.to_string())
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO outbox_leases (shard) SELECT generate_series(0, $1 - 1) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(wanted as i32)
                .execute(&mut *tx)
                .await?;
                wanted
            }
        };
        let packed = legacy::pack_old_rows(&mut tx, &self.numbers).await?;
        tx.commit().await?;
        if packed > 0 {
            tracing::info!(
                events = packed,
                "packed the events of the old layout into segments"
            );
        }
        if shard_count != wanted {
            tracing::warn!(
                stored = shard_count,
                configured = wanted,
                "shard count is fixed at first migration; using the stored one"
            );
        }
        self.shard_count
            .store(shard_count, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn shard_count(&self) -> u32 {
        self.shard_count.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn db_system(&self) -> &'static str {
        "postgresql"
    }

    async fn append(
        &self,
        batches: &[AppendBatch],
    ) -> Result<Vec<Result<AppendOutcome, AppendRejection>>, StoreError> {
        let mut writer = SlotHolder {
            connection: self.pool.acquire().await?,
            released: false,
        };
        let slot: i64 = sqlx::query_scalar(REGISTER_WRITER)
            .fetch_one(&mut *writer.connection)
            .await?;
        // Appends to new transactions, the common case: one statement, which
        // releases the slot in its own commit.
        let result = match append::append_new(
            &mut writer.connection,
            &self.numbers,
            slot,
            batches,
            self.shard_count(),
        )
        .await
        {
            Ok(Some((results, packed))) => {
                writer.released = true;
                packed.cache(&self.cache);
                return Ok(results);
            }
            Ok(None) => {
                self.append_in_transaction(&mut writer.connection, batches)
                    .await
            }
            Err(error) => Err(error),
        };
        // Whatever happened, the slot goes.
        match sqlx::query("DELETE FROM outbox_writer_slots WHERE id = $1")
            .bind(slot)
            .execute(&mut *writer.connection)
            .await
        {
            Ok(_) => writer.released = true,
            Err(error) => {
                tracing::warn!(%error, "could not remove a writer slot; closing its connection")
            }
        }
        result
    }

    async fn acquire_leases(
        &self,
        owner: &str,
        ttl: Duration,
        max_shards: u32,
    ) -> Result<Vec<Lease>, StoreError> {
        let rows = sqlx::query(ACQUIRE_LEASES)
            .bind(owner)
            .bind(ttl.as_secs_f64())
            .bind(max_shards as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut leases = rows
            .iter()
            .map(|row| {
                Ok(Lease {
                    shard: row.try_get::<i32, _>("shard")? as u32,
                    owner: row.try_get("owner")?,
                    epoch: row.try_get("epoch")?,
                    expires_at: row.try_get("expires_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        leases.sort_by_key(|l| l.shard);
        Ok(leases)
    }

    async fn release_leases(&self, owner: &str) -> Result<(), StoreError> {
        self.release_leases_except(owner, &[]).await?;
        sqlx::query("DELETE FROM outbox_instances WHERE owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_leases_except(&self, owner: &str, keep: &[u32]) -> Result<(), StoreError> {
        let keep: Vec<i32> = keep.iter().map(|&s| s as i32).collect();
        sqlx::query(
            "UPDATE outbox_leases SET owner = NULL, expires_at = '-infinity' \
             WHERE owner = $1 AND shard <> ALL($2)",
        )
        .bind(owner)
        .bind(&keep)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn heartbeat(&self, owner: &str, ttl: Duration) -> Result<u32, StoreError> {
        sqlx::query(
            "INSERT INTO outbox_instances (owner, heartbeat_at) VALUES ($1, now()) \
             ON CONFLICT (owner) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?;
        // Long gone instances are forgotten.
        let live: i64 = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM outbox_instances \
                 WHERE heartbeat_at < now() - make_interval(secs => $1::double precision) * 10) \
             SELECT count(*) FROM outbox_instances \
             WHERE heartbeat_at >= now() - make_interval(secs => $1::double precision)",
        )
        .bind(ttl.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        Ok(live.max(1) as u32)
    }

    async fn read_relay_page(
        &self,
        shard: u32,
        after: RelayCursor,
        limit: u32,
        with_dead_letters: bool,
    ) -> Result<RelayPage, StoreError> {
        self.read_segments(shard, after, limit, with_dead_letters)
            .await
    }

    fn recording_unit(&self, seq: i64) -> i64 {
        segments::location_of(seq).0
    }

    async fn record_delivered(
        &self,
        lease: &Lease,
        delivered: &[Delivered],
    ) -> Result<Vec<EventStatus>, StoreError> {
        if delivered.is_empty() {
            return Ok(Vec::new());
        }
        self.recorder.record(lease, delivered).await
    }

    async fn record_failed(
        &self,
        lease: &Lease,
        failed: &[DeliveryFailed],
    ) -> Result<Vec<EventStatus>, StoreError> {
        if failed.is_empty() {
            return Ok(Vec::new());
        }
        self.record_failures(lease, failed).await
    }

    async fn commit_transaction(
        &self,
        transaction: &TransactionRef,
    ) -> Result<Resolution, StoreError> {
        self.resolve_two_phase(transaction, true).await
    }

    async fn abort_transaction(
        &self,
        transaction: &TransactionRef,
    ) -> Result<Resolution, StoreError> {
        self.resolve_two_phase(transaction, false).await
    }

    async fn expire_transactions(&self, limit: u32) -> Result<Resolved, StoreError> {
        let mut tx = self.pool.begin().await?;
        let expired: Vec<(String, String)> = sqlx::query_as(concat!(
            "SELECT producer, transaction_id FROM outbox_transactions \
             WHERE state = ",
            stored!(transaction open),
            " AND mode = ",
            stored!(mode two_phase),
            " AND expires_at < now() \
             ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let expired: Vec<TransactionRef> = transaction_refs(expired);
        let (txn_state, name, event_state, reason) = EXPIRED;
        let resolved = if expired.is_empty() {
            Resolved::default()
        } else {
            self.finish_transactions(&mut tx, &expired, txn_state, name, event_state, reason)
                .await?
        };
        tx.commit().await?;
        Ok(resolved)
    }

    async fn list_prepared(
        &self,
        producer: &str,
        older_than: Duration,
        limit: u32,
    ) -> Result<Vec<PreparedTransaction>, StoreError> {
        let rows = sqlx::query(
            concat!("SELECT t.producer, t.transaction_id, t.created_at, t.expires_at, \
                    (SELECT coalesce(sum(length(a.event_ids) / 16), 0)::bigint FROM outbox_appends AS a \
                     WHERE a.producer = t.producer AND a.transaction_id = t.transaction_id) AS events \
             FROM outbox_transactions AS t \
             WHERE t.producer = $1 AND t.mode = ", stored!(mode two_phase), " AND t.state = ", stored!(transaction open), " \
               AND t.created_at <= now() - make_interval(secs => $2::double precision) \
             ORDER BY t.created_at LIMIT $3"),
        )
        .bind(producer)
        .bind(older_than.as_secs_f64())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(PreparedTransaction {
                    producer: row.try_get("producer")?,
                    transaction_id: row.try_get("transaction_id")?,
                    created_at: row.try_get("created_at")?,
                    expires_at: row.try_get("expires_at")?,
                    events: row.try_get::<i64, _>("events")? as u64,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn open_xid_tokens(&self, limit: u32) -> Result<Vec<XidToken>, StoreError> {
        let rows: Vec<XidTokenRow> = sqlx::query_as(concat!(
            "(SELECT producer, transaction_id, caller_xid, caller_system_id FROM outbox_transactions \
              WHERE state = ", stored!(transaction open), " AND mode = ", stored!(mode postgres_xid), " AND resolve_after <= now() \
              ORDER BY resolve_after DESC LIMIT $1) \
             UNION \
             (SELECT producer, transaction_id, caller_xid, caller_system_id FROM outbox_transactions \
              WHERE state = ", stored!(transaction open), " AND mode = ", stored!(mode postgres_xid), " AND resolve_after <= now() \
              ORDER BY resolve_after LIMIT $1)"),
        )
        .bind(limit.div_ceil(2) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(XidToken::from).collect())
    }

    async fn listen_for_wake_ups(
        &self,
        instance: &str,
    ) -> Result<Option<Box<dyn super::WakeUpListener>>, StoreError> {
        Ok(Some(
            wake_ups::listen(&self.pool, instance, self.shard_count()).await?,
        ))
    }

    async fn announce_wake_up(
        &self,
        instance: &str,
        wake: &super::WakeUp,
    ) -> Result<(), StoreError> {
        wake_ups::announce(&self.pool, instance, wake).await
    }

    async fn defer_xid_tokens(
        &self,
        transactions: &[TransactionRef],
        delay: Duration,
    ) -> Result<(), StoreError> {
        let (producers, ids) = transaction_columns(transactions);
        sqlx::query(concat!(
            "UPDATE outbox_transactions t \
             SET resolve_after = now() + make_interval(secs => $3::double precision) \
             FROM UNNEST($1::text[], $2::text[]) AS u(producer, transaction_id) \
             WHERE t.producer = u.producer AND t.transaction_id = u.transaction_id AND t.state = ",
            stored!(transaction open)
        ))
        .bind(&producers)
        .bind(&ids)
        .bind(delay.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn resolve_xid_tokens(
        &self,
        verdicts: &[(TransactionRef, XidVerdict)],
    ) -> Result<Resolved, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut resolved = Resolved::default();
        // Why tokens cannot be resolved, all in one statement: there may be
        // thousands, and they stay PENDING. The reason shows in their
        // events' status (written only when it changes).
        let (mut producers, mut transaction_ids, mut reasons) = (vec![], vec![], vec![]);
        for (transaction, verdict) in verdicts {
            if let XidVerdict::Unresolvable(reason) = verdict {
                producers.push(transaction.producer.as_str());
                transaction_ids.push(transaction.transaction_id.as_str());
                reasons.push(reason.as_str());
            }
        }
        if !producers.is_empty() {
            let annotated: Vec<(String, String)> = sqlx::query_as(concat!(
                "UPDATE outbox_transactions AS t SET reason = u.reason \
                 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(producer, transaction_id, reason) \
                 WHERE t.producer = u.producer AND t.transaction_id = u.transaction_id \
                   AND t.state = ",
                stored!(transaction open),
                " AND t.reason IS DISTINCT FROM u.reason \
                 RETURNING t.producer, t.transaction_id"
            ))
            .bind(&producers)
            .bind(&transaction_ids)
            .bind(&reasons)
            .fetch_all(&mut *tx)
            .await?;
            let annotated: Vec<TransactionRef> = transaction_refs(annotated);
            resolved.extend(
                self.transition_pending(&mut tx, &annotated, None, None)
                    .await?,
            );
        }
        // The others, by what becomes of them, each group in one pass;
        // another instance may have resolved some meanwhile.
        let mut steps: HashMap<_, Vec<TransactionRef>> = HashMap::new();
        for (transaction, verdict) in verdicts {
            if let Some(step) = xid_step(verdict) {
                steps.entry(step).or_default().push(transaction.clone());
            }
        }
        for ((txn_state, name, event_state, reason), transactions) in steps {
            let (producers, ids) = transaction_columns(&transactions);
            let open: Vec<(String, String)> = sqlx::query_as(concat!(
                "SELECT t.producer, t.transaction_id FROM outbox_transactions AS t \
                 JOIN UNNEST($1::text[], $2::text[]) AS u(producer, transaction_id) \
                   ON t.producer = u.producer AND t.transaction_id = u.transaction_id \
                 WHERE t.state = ",
                stored!(transaction open),
                " ORDER BY t.producer, t.transaction_id FOR UPDATE OF t"
            ))
            .bind(&producers)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            if open.is_empty() {
                continue;
            }
            let open: Vec<TransactionRef> = transaction_refs(open);
            resolved.extend(
                self.finish_transactions(
                    &mut tx,
                    &open,
                    txn_state,
                    name,
                    event_state,
                    reason.as_deref(),
                )
                .await?,
            );
        }
        tx.commit().await?;
        Ok(resolved)
    }

    async fn purge_finished(&self, older_than: Duration, limit: u32) -> Result<u64, StoreError> {
        self.purge(older_than, limit).await
    }

    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, EventStatus)>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        Ok(self
            .dead_letters(&mut connection, filter, after_seq, limit)
            .await?
            .0)
    }

    async fn redrive(&self, filter: &DeadLetterFilter) -> Result<Resolved, StoreError> {
        self.redrive_dead_letters(filter).await
    }

    async fn backlog(&self) -> Result<Vec<ShardBacklog>, StoreError> {
        self.shard_backlog().await
    }

    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let rows: Vec<(i32, Option<String>, i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT shard, owner, epoch, CASE WHEN expires_at = '-infinity' THEN 'epoch'::timestamptz \
                 ELSE expires_at END FROM outbox_leases ORDER BY shard",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(shard, owner, epoch, expires_at)| Lease {
                shard: shard as u32,
                owner: owner.unwrap_or_default(),
                epoch,
                expires_at,
            })
            .collect())
    }

    async fn set_relay_paused(&self, paused: bool) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox_meta (key, value) VALUES ('relay_paused', $1) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        )
        .bind(paused.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn relay_paused(&self) -> Result<bool, StoreError> {
        let value: Option<String> =
            sqlx::query_scalar("SELECT value FROM outbox_meta WHERE key = 'relay_paused'")
                .fetch_optional(&self.pool)
                .await?;
        Ok(value.as_deref() == Some("true"))
    }

    fn own_xid_source(&self) -> Option<XidSource> {
        Some(XidSource::from_pool(self.pool.clone()))
    }

    async fn status_by_ids(&self, ids: &[EventId]) -> Result<Vec<EventStatus>, StoreError> {
        self.statuses(ids).await
    }

    async fn status_by_transactions(
        &self,
        transactions: &[TransactionRef],
    ) -> Result<Vec<EventStatus>, StoreError> {
        let producers: Vec<&str> = transactions.iter().map(|t| t.producer.as_str()).collect();
        let ids: Vec<&str> = transactions
            .iter()
            .map(|t| t.transaction_id.as_str())
            .collect();
        // The event ids are kept per append, so no index on events by
        // transaction is needed (one fewer index to maintain per event).
        let appended: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT a.event_ids FROM outbox_appends AS a \
             JOIN UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS t(producer, transaction_id, n) \
               ON a.producer = t.producer AND a.transaction_id = t.transaction_id \
             ORDER BY t.n, a.sequence",
        )
        .bind(&producers)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let event_ids: Vec<EventId> = appended.iter().flat_map(|ids| unpack_ids(ids)).collect();
        let mut statuses = self.status_by_ids(&event_ids).await?;
        let position: std::collections::HashMap<EventId, usize> = event_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i))
            .collect();
        statuses.sort_by_key(|s| position.get(&s.event_id).copied().unwrap_or(usize::MAX));
        Ok(statuses)
    }

    async fn status_changes(
        &self,
        producer: &str,
        after_cursor: u64,
        limit: u32,
    ) -> Result<Vec<EventStatus>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        // First the gate, then (in a later snapshot) the page below it:
        // every transaction under the gate had ended when it was read.
        let gate: i64 = sqlx::query_scalar(CHANGE_FEED_GATE)
            .fetch_one(&mut *connection)
            .await?;
        drop(connection);
        // The page and the states it shows in one snapshot, so that no
        // status carries a change older than its state's.
        let mut connection = events::read_snapshot(&self.pool).await?;
        let after_xid = (after_cursor / 2) as i64;
        let mut rows: Vec<FeedRow> = sqlx::query_as(
            "SELECT segments, positions, (change_xid::text)::bigint AS xid, change_seq \
             FROM outbox_changes \
             WHERE producer = $1 AND change_xid > ($2::bigint)::text::xid8 \
               AND change_xid < ($3::bigint)::text::xid8 \
             ORDER BY change_xid, change_seq LIMIT $4",
        )
        .bind(producer)
        .bind(after_xid)
        .bind(gate)
        .bind(limit.max(1) as i64)
        .fetch_all(&mut *connection)
        .await?;
        // A page holds whole transactions: a position inside one would
        // otherwise skip the rest of it on resume.
        if rows.len() == limit.max(1) as usize
            && let Some(last) = rows.last().map(|c| c.xid)
        {
            if rows.first().is_some_and(|first| first.xid == last) {
                rows = sqlx::query_as(
                    "SELECT segments, positions, (change_xid::text)::bigint AS xid, change_seq \
                     FROM outbox_changes \
                     WHERE producer = $1 AND change_xid = ($2::bigint)::text::xid8 \
                     ORDER BY change_seq",
                )
                .bind(producer)
                .bind(last)
                .fetch_all(&mut *connection)
                .await?;
            } else {
                rows.retain(|change| change.xid != last);
            }
        }
        let changes = feed_changes(rows);
        let numbers: Vec<i64> = changes.iter().map(|c| c.segment).collect();
        let loaded = Loaded::load(&mut connection, &self.cache, &numbers, false).await?;
        let facts = loaded.facts(&mut connection, &numbers).await?;
        // Each event once, at its latest change read.
        let mut latest: HashMap<(i64, u16), usize> = HashMap::new();
        for (index, change) in changes.iter().enumerate() {
            let Some(body) = loaded.bodies.get(&change.segment) else {
                continue;
            };
            for event in body.events() {
                let named = change
                    .positions
                    .as_ref()
                    .is_none_or(|p| p.contains(&i32::from(event.position)));
                if event.transaction.producer == producer && named {
                    latest.insert((change.segment, event.position), index);
                }
            }
        }
        // Within a transaction's changes, the events in the order they
        // were appended: by append (its first segment, then its place in
        // its commit), then by index in the append.
        let mut first_segment: HashMap<(i64, &str, u64), i64> = HashMap::new();
        let mut found = Vec::with_capacity(latest.len());
        for (&(segment, position), &index) in &latest {
            if let Some((row, event)) = loaded.event(segment, position)
                && !row.gone(position)
            {
                let xid = changes[index].xid;
                let append = (
                    xid,
                    event.transaction.transaction_id.as_str(),
                    event.transaction.append_sequence,
                );
                let first = first_segment.entry(append).or_insert(segment);
                *first = (*first).min(segment);
                found.push((segment, position, index));
            }
        }
        let mut ordered = Vec::with_capacity(found.len());
        for (segment, position, index) in found {
            let Some((row, event)) = loaded.event(segment, position) else {
                continue;
            };
            let change = &changes[index];
            let append = (
                change.xid,
                event.transaction.transaction_id.as_str(),
                event.transaction.append_sequence,
            );
            let key = (
                change.xid,
                first_segment[&append],
                event.transaction.batch,
                event.event.index,
                segment,
                position,
            );
            let status = facts.status(row, &event, change.change_seq as u64)?;
            ordered.push((key, (change.xid, status)));
        }
        ordered.sort_by_key(|(key, _)| *key);
        connection.commit().await?;
        Ok(feed_positions(
            ordered.into_iter().map(|(_, change)| change).collect(),
        ))
    }
}
