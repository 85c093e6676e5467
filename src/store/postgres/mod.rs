//! The production store: PostgreSQL through sqlx.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::codes::{
    NewTransaction, event_id_taken, initial_event_state, mode_code, pack_ids, unpack_ids,
};
use super::error::is_unique_violation;
use super::tokens::{EXPIRED, ExistingTransaction, two_phase_step, xid_step};
use super::xid::XidSource;
use super::{
    AppendRejection, DeadLetterFilter, Delivered, DeliveryFailed, Lease, PreparedTransaction,
    RelayCursor, RelayPage, RelayRow, Resolution, Resolved, ShardBacklog, Store, StoreError,
    Verdict, XidToken, XidVerdict,
};
use crate::domain::{
    AppendBatch, AppendOutcome, EventId, EventState, EventStatus, TransactionRef, decode_headers,
    shard_of,
};

mod append;
mod queries;
mod recorder;
mod wake_ups;

use queries::{
    READ_RELAY_ROWS, READ_RELAY_ROWS_WITH_DEAD_LETTERS, RECORD_FAILED, TRANSITION_PENDING_EVENTS,
};
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
            .application_name("outboxd");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(PostgresStore {
            recorder: recorder::Recorder::start(pool.clone()),
            pool,
            shard_count: std::sync::atomic::AtomicU32::new(shard_count),
        })
    }

    /// The pool, for tests and tools that inspect the schema.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn append_one(
        tx: &mut Transaction<'_, Postgres>,
        batch: &AppendBatch,
        shard_count: u32,
    ) -> Result<Result<AppendOutcome, AppendRejection>, sqlx::Error> {
        let token = &batch.token;
        let new = NewTransaction::of(&token.mode);
        let row = sqlx::query(
            "INSERT INTO outbox_transactions \
                 (producer, transaction_id, mode, state, caller_xid, caller_system_id, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7::double precision)) \
             ON CONFLICT (producer, transaction_id) DO UPDATE SET producer = EXCLUDED.producer \
             RETURNING mode, state, resolution, caller_xid, caller_system_id, \
                       coalesce(expires_at < now(), false) AS expired",
        )
        .bind(&token.producer)
        .bind(&token.transaction_id)
        .bind(mode_code(&token.mode))
        .bind(new.state)
        .bind(new.caller_xid)
        .bind(new.caller_system_id)
        .bind(new.expires_in.map(|d| d.as_secs_f64()))
        .fetch_one(&mut **tx)
        .await?;
        let existing = ExistingTransaction::from_row(&row)?;
        if let Some(rejection) = existing.token_conflict(batch) {
            return Ok(Err(rejection));
        }

        let content_hash = batch.content_hash();
        let event_ids: Vec<EventId> = batch
            .events
            .iter()
            .map(|e| e.event_id.unwrap_or_else(EventId::generate))
            .collect();
        let inserted = sqlx::query(
            "INSERT INTO outbox_appends (producer, transaction_id, sequence, content_hash, event_ids) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&token.producer)
        .bind(&token.transaction_id)
        .bind(batch.sequence as i64)
        .bind(&content_hash[..])
        .bind(pack_ids(&event_ids))
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            let stored = sqlx::query(
                "SELECT content_hash, event_ids FROM outbox_appends \
                 WHERE producer = $1 AND transaction_id = $2 AND sequence = $3",
            )
            .bind(&token.producer)
            .bind(&token.transaction_id)
            .bind(batch.sequence as i64)
            .fetch_one(&mut **tx)
            .await?;
            let stored_hash: Vec<u8> = stored.try_get("content_hash")?;
            if stored_hash != content_hash {
                return Ok(Err(AppendRejection::ConflictingRetry {
                    transaction_id: token.transaction_id.clone(),
                    sequence: batch.sequence,
                }));
            }
            let stored_ids: Vec<u8> = stored.try_get("event_ids")?;
            return Ok(Ok(AppendOutcome {
                event_ids: unpack_ids(&stored_ids),
                duplicate: true,
                statuses: Vec::new(),
                shards: Vec::new(),
            }));
        }

        if let Some(rejection) = existing.resolved(batch) {
            return Ok(Err(rejection));
        }
        // Published events left outbox_events and its unique index.
        let taken = taken_event_ids(tx, std::slice::from_ref(batch)).await?;
        if !taken.is_empty() {
            return Ok(Err(event_id_taken(batch, &taken)));
        }
        let state = initial_event_state(batch);
        let now = Utc::now();
        let mut rows = append::EventRows::default();
        rows.push_batch(batch, &event_ids, shard_count, now);
        let change_of = rows.insert(tx).await?;
        let shards: Vec<u32> = batch
            .events
            .iter()
            .zip(&event_ids)
            .map(|(event, id)| shard_of(event.ordering_key(), *id, shard_count))
            .collect();
        let statuses = batch
            .events
            .iter()
            .zip(&event_ids)
            .map(|(event, id)| {
                let (cursor, updated_at) = change_of.get(&id.0).copied().unwrap_or((0, now));
                EventStatus::appended(batch, event, *id, state, cursor as u64, updated_at)
            })
            .collect();
        Ok(Ok(AppendOutcome {
            event_ids,
            duplicate: false,
            statuses,
            shards,
        }))
    }

    async fn append_in_transaction(
        &self,
        connection: &mut PgConnection,
        batches: &[AppendBatch],
    ) -> Result<Vec<Result<AppendOutcome, AppendRejection>>, StoreError> {
        let shard_count = self.shard_count();
        // The fast path: a handful of statements for the whole batch. It
        // gives up (and the slow path below takes over) only when a
        // concurrent writer stored the same append or event id meanwhile.
        let mut tx = connection.begin().await?;
        match append::append(&mut tx, batches, shard_count).await {
            Ok(Some(results)) => {
                tx.commit().await?;
                return Ok(results);
            }
            Ok(None) => {
                tracing::debug!(
                    "a concurrent writer stored one of these appends; taking the slow path"
                );
                tx.rollback().await?
            }
            Err(error) if is_unique_violation(&error) => {
                tracing::debug!(
                    "a concurrent writer took one of these event ids; taking the slow path"
                );
                tx.rollback().await?
            }
            Err(error) => return Err(error.into()),
        }
        self.append_one_by_one(connection, batches, shard_count)
            .await
    }

    /// The slow path: a savepoint per append, a few statements each.
    async fn append_one_by_one(
        &self,
        connection: &mut PgConnection,
        batches: &[AppendBatch],
        shard_count: u32,
    ) -> Result<Vec<Result<AppendOutcome, AppendRejection>>, StoreError> {
        let mut tx = connection.begin().await?;
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            // A savepoint per append: one bad append fails only itself.
            sqlx::query("SAVEPOINT append").execute(&mut *tx).await?;
            let result = match Self::append_one(&mut tx, batch, shard_count).await {
                Ok(result) => result,
                Err(error) if is_unique_violation(&error) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT append")
                        .execute(&mut *tx)
                        .await?;
                    let taken = taken_event_ids(&mut tx, std::slice::from_ref(batch)).await?;
                    Err(event_id_taken(batch, &taken))
                }
                Err(error) => return Err(error.into()),
            };
            if result.is_err() {
                sqlx::query("ROLLBACK TO SAVEPOINT append")
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("RELEASE SAVEPOINT append")
                .execute(&mut *tx)
                .await?;
            results.push(result);
        }
        tx.commit().await?;
        Ok(results)
    }

    /// Sets the transaction's state and moves its PENDING events.
    async fn finish_transaction(
        tx: &mut PgConnection,
        transaction: &TransactionRef,
        transaction_state: i16,
        resolution: &str,
        event_state: EventState,
        reason: Option<&str>,
    ) -> Result<Resolved, StoreError> {
        sqlx::query(
            "UPDATE outbox_transactions SET state = $3, resolution = $4, resolved_at = now() \
             WHERE producer = $1 AND transaction_id = $2",
        )
        .bind(&transaction.producer)
        .bind(&transaction.transaction_id)
        .bind(transaction_state)
        .bind(resolution)
        .execute(&mut *tx)
        .await?;
        Self::transition_pending(tx, transaction, event_state, reason).await
    }

    async fn transition_pending(
        tx: &mut PgConnection,
        transaction: &TransactionRef,
        event_state: EventState,
        reason: Option<&str>,
    ) -> Result<Resolved, StoreError> {
        let rows = sqlx::query(TRANSITION_PENDING_EVENTS)
            .bind(&transaction.producer)
            .bind(&transaction.transaction_id)
            .bind(event_state as i16)
            .bind(reason)
            .fetch_all(&mut *tx)
            .await?;
        let mut resolved = Resolved::default();
        for row in &rows {
            resolved.changed.push(status_from_row(row)?);
            resolved.shards.push(row.try_get::<i32, _>("shard")? as u32);
        }
        Ok(resolved)
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
                Self::finish_transaction(
                    &mut tx,
                    transaction,
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

/// The caller-chosen event ids of `batches` that are stored already,
/// published or not.
pub(super) async fn taken_event_ids(
    connection: &mut PgConnection,
    batches: &[AppendBatch],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let ids: Vec<Uuid> = batches
        .iter()
        .flat_map(|b| b.events.iter().filter_map(|e| e.event_id.map(|id| id.0)))
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT event_id FROM outbox_event_statuses WHERE event_id = ANY($1)")
        .bind(&ids)
        .fetch_all(connection)
        .await
}

fn status_from_row(row: &PgRow) -> Result<EventStatus, StoreError> {
    let state: i16 = row.try_get("state")?;
    let attempts: i32 = row.try_get("attempts")?;
    Ok(EventStatus {
        event_id: EventId(row.try_get("event_id")?),
        producer: row.try_get("producer")?,
        transaction_id: row.try_get("transaction_id")?,
        sequence: row.try_get::<i64, _>("append_sequence")? as u64,
        topic: row.try_get("topic")?,
        state: EventState::from_stored(state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown event state {state}")))?,
        partition: row.try_get("kafka_partition")?,
        offset: row.try_get("kafka_offset")?,
        attempts: attempts as u32,
        reason: row
            .try_get::<Option<String>, _>("last_error")?
            .unwrap_or_default(),
        updated_at: row.try_get("updated_at")?,
        cursor: row.try_get::<i64, _>("change_seq")? as u64,
    })
}

const STATUS_COLUMNS: &str = include_str!("../sql/postgres/status_columns.sql");

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
        tx.commit().await?;
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
        let result =
            match append::append_new(&mut writer.connection, slot, batches, self.shard_count())
                .await
            {
                Ok(Some(results)) => {
                    writer.released = true;
                    return Ok(results);
                }
                Ok(None) => {
                    self.append_in_transaction(&mut writer.connection, batches)
                        .await
                }
                Err(error) => Err(error.into()),
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
        let sql = if with_dead_letters {
            READ_RELAY_ROWS_WITH_DEAD_LETTERS
        } else {
            READ_RELAY_ROWS
        };
        let rows = sqlx::query(sql)
            .bind(shard as i32)
            .bind(after.writer_xid.to_string())
            .bind(after.seq)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let held_back = match rows.first() {
            Some(row) => row.try_get("held_back")?,
            None => false,
        };
        let rows = rows
            .iter()
            .filter(|row| {
                row.try_get::<Option<i64>, _>("seq")
                    .is_ok_and(|seq| seq.is_some())
            })
            .map(|row| {
                let state: i16 = row.try_get("state")?;
                let headers: Vec<u8> = row.try_get("headers")?;
                Ok(RelayRow {
                    seq: row.try_get("seq")?,
                    writer_xid: row.try_get("writer_xid")?,
                    event_id: EventId(row.try_get("event_id")?),
                    producer: row.try_get("producer")?,
                    transaction_id: row.try_get("transaction_id")?,
                    topic: row.try_get("topic")?,
                    kafka_key: row.try_get("kafka_key")?,
                    payload: row.try_get("payload")?,
                    headers: decode_headers(&headers)
                        .ok_or_else(|| StoreError::Corrupt("undecodable headers".into()))?,
                    aggregate_type: row.try_get("aggregate_type")?,
                    aggregate_id: row.try_get("aggregate_id")?,
                    event_type: row.try_get("event_type")?,
                    state: EventState::from_stored(state)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown state {state}")))?,
                    attempts: row.try_get::<i32, _>("attempts")? as u32,
                    next_attempt_at: row.try_get("next_attempt_at")?,
                    occurred_at: row.try_get("occurred_at")?,
                    appended_at: row.try_get("appended_at")?,
                    traceparent: row.try_get("traceparent")?,
                    tracestate: row.try_get("tracestate")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(RelayPage { rows, held_back })
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
        let seqs: Vec<i64> = failed.iter().map(|f| f.seq).collect();
        let errors: Vec<&str> = failed.iter().map(|f| f.error.as_str()).collect();
        let retry_at: Vec<Option<DateTime<Utc>>> = failed.iter().map(|f| f.retry_at).collect();
        let rows = sqlx::query(RECORD_FAILED)
            .bind(lease.shard as i32)
            .bind(lease.epoch)
            .bind(&seqs)
            .bind(&errors)
            .bind(&retry_at)
            .fetch_all(&self.pool)
            .await?;
        recorder::fenced_statuses(&self.pool, lease, &rows).await
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
        let mut resolved = Resolved::default();
        for (producer, transaction_id) in expired {
            let transaction = TransactionRef {
                producer,
                transaction_id,
            };
            let (txn_state, name, event_state, reason) = EXPIRED;
            resolved.extend(
                Self::finish_transaction(
                    &mut tx,
                    &transaction,
                    txn_state,
                    name,
                    event_state,
                    reason,
                )
                .await?,
            );
        }
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
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(concat!(
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
        Ok(rows
            .into_iter()
            .map(|(producer, transaction_id, xid, system_id)| XidToken {
                transaction: TransactionRef {
                    producer,
                    transaction_id,
                },
                caller_xid: xid as u64,
                system_id: system_id as u64,
            })
            .collect())
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
        let (producers, ids): (Vec<&str>, Vec<&str>) = transactions
            .iter()
            .map(|t| (t.producer.as_str(), t.transaction_id.as_str()))
            .unzip();
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
            let rows = sqlx::query(
                concat!("UPDATE outbox_events AS e SET last_error = u.reason, \
                     change_seq = nextval('outbox_change_seq'), change_xid = pg_current_xact_id(), \
                     updated_at = now() \
                 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(producer, transaction_id, reason) \
                 WHERE e.producer = u.producer AND e.transaction_id = u.transaction_id \
                   AND e.state = ", stored!(event pending), " AND e.last_error IS DISTINCT FROM u.reason \
                 RETURNING e.event_id, e.producer, e.transaction_id, e.append_sequence, e.topic, \
                     e.state, e.kafka_partition, e.kafka_offset, e.attempts, e.last_error, \
                     e.updated_at, e.change_seq"),
            )
            .bind(&producers)
            .bind(&transaction_ids)
            .bind(&reasons)
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                resolved.changed.push(status_from_row(row)?);
            }
        }
        for (transaction, verdict) in verdicts {
            let Some((txn_state, name, event_state, reason)) = xid_step(verdict) else {
                continue;
            };
            // Another instance may have resolved it meanwhile.
            let open: Option<i16> = sqlx::query_scalar(concat!(
                "SELECT state FROM outbox_transactions \
                 WHERE producer = $1 AND transaction_id = $2 AND state = ",
                stored!(transaction open),
                " FOR UPDATE"
            ))
            .bind(&transaction.producer)
            .bind(&transaction.transaction_id)
            .fetch_optional(&mut *tx)
            .await?;
            if open.is_none() {
                continue;
            }
            resolved.extend(
                Self::finish_transaction(
                    &mut tx,
                    transaction,
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
        // Small batches in short transactions: no long locks, no long
        // snapshots holding back vacuum.
        let published = sqlx::query(
            "DELETE FROM outbox_published WHERE event_id IN ( \
                 SELECT event_id FROM outbox_published \
                 WHERE published_at < now() - make_interval(secs => $1::double precision) \
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(older_than.as_secs_f64())
        .bind(limit as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let discarded = sqlx::query(concat!(
            "DELETE FROM outbox_events WHERE seq IN ( \
                 SELECT seq FROM outbox_events \
                 WHERE state IN (",
            stored!(event published),
            ", ",
            stored!(event discarded),
            ") AND updated_at < now() - make_interval(secs => $1::double precision) \
                 ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)"
        ))
        .bind(older_than.as_secs_f64())
        .bind(limit as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let events = published + discarded;
        // An append's record goes only once none of its events waits or is
        // dead-lettered (a redrive may bring it back): until then a retry
        // must still find it, or it would store the events again.
        sqlx::query(
            "DELETE FROM outbox_appends WHERE ctid IN ( \
                 SELECT a.ctid FROM outbox_appends a \
                 WHERE a.created_at < now() - make_interval(secs => $1::double precision) \
                   AND NOT EXISTS ( \
                       SELECT 1 FROM generate_series(0, length(a.event_ids) / 16 - 1) AS i \
                       JOIN outbox_events e ON e.event_id = \
                           encode(substring(a.event_ids FROM i * 16 + 1 FOR 16), 'hex')::uuid \
                       WHERE e.state <> $3) \
                 LIMIT $2)",
        )
        .bind(older_than.as_secs_f64())
        .bind(limit as i64)
        .bind(EventState::Discarded as i16)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            concat!("DELETE FROM outbox_transactions WHERE ctid IN ( \
                 SELECT t.ctid FROM outbox_transactions t WHERE t.state <> ", stored!(transaction open), " \
                   AND coalesce(t.resolved_at, t.created_at) < now() - make_interval(secs => $1::double precision) \
                   AND NOT EXISTS (SELECT 1 FROM outbox_appends a \
                       WHERE a.producer = t.producer AND a.transaction_id = t.transaction_id) \
                 LIMIT $2)"),
        )
        .bind(older_than.as_secs_f64())
        .bind(limit as i64)
        .execute(&self.pool)
        .await?;
        Ok(events)
    }

    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, EventStatus)>, StoreError> {
        let ids: Vec<Uuid> = filter.event_ids.iter().map(|id| id.0).collect();
        let sql = format!(
            "SELECT seq, {STATUS_COLUMNS} FROM outbox_events \
             WHERE state = {dead_lettered} AND seq > $1 \
               AND (cardinality($2::uuid[]) = 0 OR event_id = ANY($2)) \
               AND ($3::text IS NULL OR producer = $3) \
               AND ($4::text IS NULL OR topic = $4) \
               AND ($5::timestamptz IS NULL OR updated_at >= $5) \
             ORDER BY seq LIMIT $6",
            dead_lettered = stored!(event dead_lettered),
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after_seq)
            .bind(&ids)
            .bind(filter.producer.as_deref())
            .bind(filter.topic.as_deref())
            .bind(filter.since)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get::<i64, _>("seq")?, status_from_row(row)?)))
            .collect()
    }

    async fn redrive(&self, filter: &DeadLetterFilter) -> Result<Resolved, StoreError> {
        let ids: Vec<Uuid> = filter.event_ids.iter().map(|id| id.0).collect();
        let rows = sqlx::query(
            concat!("UPDATE outbox_events SET state = ", stored!(event ready), ", attempts = 0, last_error = NULL, \
                 next_attempt_at = NULL, change_seq = nextval('outbox_change_seq'), change_xid = pg_current_xact_id(), updated_at = now() \
             WHERE state = ", stored!(event dead_lettered), " \
               AND (cardinality($1::uuid[]) = 0 OR event_id = ANY($1)) \
               AND ($2::text IS NULL OR producer = $2) \
               AND ($3::text IS NULL OR topic = $3) \
               AND ($4::timestamptz IS NULL OR updated_at >= $4) \
             RETURNING event_id, producer, transaction_id, append_sequence, topic, state, \
                 kafka_partition, kafka_offset, attempts, last_error, updated_at, change_seq, shard"),
        )
        .bind(&ids)
        .bind(filter.producer.as_deref())
        .bind(filter.topic.as_deref())
        .bind(filter.since)
        .fetch_all(&self.pool)
        .await?;
        let mut resolved = Resolved::default();
        for row in &rows {
            resolved.changed.push(status_from_row(row)?);
            resolved.shards.push(row.try_get::<i32, _>("shard")? as u32);
        }
        Ok(resolved)
    }

    async fn backlog(&self) -> Result<Vec<ShardBacklog>, StoreError> {
        let rows: Vec<(i32, i64, Option<DateTime<Utc>>)> = sqlx::query_as(concat!(
            "SELECT shard, count(*), min(appended_at) FROM outbox_events \
             WHERE state < ",
            stored!(event first_final),
            " GROUP BY shard ORDER BY shard"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(shard, depth, oldest)| ShardBacklog {
                shard: shard as u32,
                depth: depth as u64,
                oldest,
            })
            .collect())
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
        let uuids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let sql = format!(
            "SELECT {STATUS_COLUMNS} FROM outbox_event_statuses WHERE event_id = ANY($1) ORDER BY seq"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&uuids)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(status_from_row).collect()
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
        // First the gate, then (in a later snapshot) the page below it:
        // every transaction under the gate had ended when it was read.
        let gate: i64 = sqlx::query_scalar(CHANGE_FEED_GATE)
            .fetch_one(&self.pool)
            .await?;
        let after_xid = (after_cursor / 2) as i64;
        let sql = format!(
            "SELECT {STATUS_COLUMNS}, (change_xid::text)::bigint AS change_xid_value \
             FROM outbox_event_statuses \
             WHERE producer = $1 AND change_xid > ($2::bigint)::text::xid8 \
               AND change_xid < ($3::bigint)::text::xid8 \
             ORDER BY change_xid, change_seq LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(producer)
            .bind(after_xid)
            .bind(gate)
            .bind(limit.max(1) as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut changes = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64, _>("change_xid_value")?,
                    status_from_row(row)?,
                ))
            })
            .collect::<Result<Vec<(i64, EventStatus)>, StoreError>>()?;
        // A page holds whole transactions: a position inside one would
        // otherwise skip the rest of it on resume.
        if changes.len() == limit.max(1) as usize
            && let Some(&(last, _)) = changes.last()
        {
            if changes.first().is_some_and(|(first, _)| *first == last) {
                let sql = format!(
                    "SELECT {STATUS_COLUMNS}, (change_xid::text)::bigint AS change_xid_value \
                     FROM outbox_event_statuses \
                     WHERE producer = $1 AND change_xid = ($2::bigint)::text::xid8 \
                     ORDER BY change_seq"
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(producer)
                    .bind(last)
                    .fetch_all(&self.pool)
                    .await?;
                changes = rows
                    .iter()
                    .map(|row| Ok((last, status_from_row(row)?)))
                    .collect::<Result<_, StoreError>>()?;
            } else {
                changes.retain(|(xid, _)| *xid != last);
            }
        }
        Ok(feed_positions(changes))
    }
}
