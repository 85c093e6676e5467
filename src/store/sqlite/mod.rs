//! The embedded store: one SQLite file through sqlx. Serves `outboxd dev`,
//! single-node sidecars and first runs.
//!
//! SQLite serialises writers, so rows become visible in `seq` order and the
//! relay needs no visibility gate; `writer_xid` is always 0 here. Every write
//! transaction starts with `BEGIN IMMEDIATE`: it takes the write lock up
//! front (waiting under the busy timeout) instead of failing with "database
//! is locked" when a read transaction tries to upgrade.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

mod append;

use super::codes::{XidTokenRow, event_id_taken};
use super::error::is_unique_violation;
use super::tokens::{EXPIRED, two_phase_step, xid_step};
use super::{
    AppendRejection, DeadLetterFilter, Delivered, DeliveryFailed, Lease, PreparedTransaction,
    RelayCursor, RelayPage, RelayRow, Resolution, Resolved, ShardBacklog, Store, StoreError,
    Verdict, XidToken, XidVerdict,
};
use crate::domain::{
    AppendBatch, AppendOutcome, EventId, EventState, EventStatus, TransactionRef, decode_headers,
};

/// The columns `status_from_row` reads, as a literal for `concat!`.
macro_rules! status_columns {
    () => {
        "event_id, producer, transaction_id, append_sequence, topic, state, \
         kafka_partition, kafka_offset, attempts, last_error, updated_at, change_seq"
    };
}

const STATUS_COLUMNS: &str = status_columns!();

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    pool: SqlitePool,
    shard_count: AtomicU32,
}

fn micros(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

fn from_micros(value: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(value).unwrap_or_default()
}

impl SqliteStore {
    /// Opens (creating when missing) the database file named by `url`
    /// (`sqlite://path` or `sqlite::memory:`).
    pub async fn connect(
        url: &str,
        max_connections: u32,
        shard_count: u32,
    ) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("bad sqlite url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Durable ack: a commit is on disk before Append returns.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await?;
        Ok(SqliteStore {
            pool,
            shard_count: AtomicU32::new(shard_count),
        })
    }

    /// Sets the transaction's state and moves its PENDING events.
    async fn finish_transaction(
        tx: &mut Transaction<'_, Sqlite>,
        transaction: &TransactionRef,
        transaction_state: i16,
        resolution: &str,
        event_state: EventState,
        reason: Option<&str>,
    ) -> Result<Resolved, StoreError> {
        sqlx::query(
            "UPDATE outbox_transactions SET state = ?3, resolution = ?4, resolved_at = ?5 \
             WHERE producer = ?1 AND transaction_id = ?2",
        )
        .bind(&transaction.producer)
        .bind(&transaction.transaction_id)
        .bind(transaction_state)
        .bind(resolution)
        .bind(micros(Utc::now()))
        .execute(&mut **tx)
        .await?;
        Self::transition_pending(tx, transaction, Some(event_state), reason).await
    }

    /// Moves (or, with `event_state` None, only annotates) the PENDING
    /// events of a transaction.
    async fn transition_pending(
        tx: &mut Transaction<'_, Sqlite>,
        transaction: &TransactionRef,
        event_state: Option<EventState>,
        reason: Option<&str>,
    ) -> Result<Resolved, StoreError> {
        let seqs: Vec<(i64, i64)> = sqlx::query_as(concat!(
            "SELECT seq, shard FROM outbox_events \
             WHERE producer = ?1 AND transaction_id = ?2 AND state = ",
            stored!(event pending),
            " \
               AND (?3 IS NOT NULL OR last_error IS NOT ?4) \
             ORDER BY seq"
        ))
        .bind(&transaction.producer)
        .bind(&transaction.transaction_id)
        .bind(event_state.map(|s| s as i16))
        .bind(reason)
        .fetch_all(&mut **tx)
        .await?;
        let mut resolved = Resolved::default();
        if seqs.is_empty() {
            return Ok(resolved);
        }
        let first_change = Self::next_changes(tx, seqs.len()).await?;
        let now = micros(Utc::now());
        for (index, (seq, shard)) in seqs.iter().enumerate() {
            let row = sqlx::query(concat!(
                "UPDATE outbox_events SET state = coalesce(?1, state), last_error = ?2, \
                     change_seq = ?3, updated_at = ?4 WHERE seq = ?5 RETURNING ",
                status_columns!()
            ))
            .bind(event_state.map(|s| s as i16))
            .bind(reason)
            .bind(first_change + index as i64)
            .bind(now)
            .bind(seq)
            .fetch_one(&mut **tx)
            .await?;
            resolved.changed.push(status_from_row(&row)?);
            resolved.shards.push(*shard as u32);
        }
        Ok(resolved)
    }

    async fn resolve_two_phase(
        &self,
        transaction: &TransactionRef,
        commit: bool,
    ) -> Result<Resolution, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(
            "SELECT mode, state, resolution, coalesce(expires_at < ?3, 0) AS expired \
             FROM outbox_transactions WHERE producer = ?1 AND transaction_id = ?2",
        )
        .bind(&transaction.producer)
        .bind(&transaction.transaction_id)
        .bind(micros(Utc::now()))
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
        let events: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_events WHERE producer = ?1 AND transaction_id = ?2",
        )
        .bind(&transaction.producer)
        .bind(&transaction.transaction_id)
        .fetch_one(&mut *tx)
        .await?;
        let step = two_phase_step(
            row.try_get("mode")?,
            row.try_get("state")?,
            row.try_get("resolution")?,
            row.try_get::<i64, _>("expired")? != 0,
            commit,
        );
        let resolved = match step.finish {
            Some((txn_state, name, event_state, reason)) => {
                Self::finish_transaction(&mut tx, transaction, txn_state, name, event_state, reason)
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

    /// Runs `update` (an UPDATE … RETURNING the status columns) for each row
    /// of a relay outcome batch inside one transaction fenced by the lease
    /// epoch.
    async fn record<T>(
        &self,
        lease: &Lease,
        items: &[T],
        update: impl for<'q> Fn(
            &'q T,
            i64,
            i64,
        )
            -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> Result<Vec<EventStatus>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let epoch: Option<i64> =
            sqlx::query_scalar("SELECT epoch FROM outbox_leases WHERE shard = ?1")
                .bind(lease.shard as i64)
                .fetch_optional(&mut *tx)
                .await?;
        if epoch != Some(lease.epoch) {
            return Err(StoreError::LeaseLost {
                shard: lease.shard,
                epoch: lease.epoch,
            });
        }
        let first_change = Self::next_changes(&mut tx, items.len()).await?;
        let now = micros(Utc::now());
        let mut statuses = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            // Each update returns the new status: no second query per event.
            if let Some(row) = update(item, first_change + index as i64, now)
                .fetch_optional(&mut *tx)
                .await?
            {
                statuses.push(status_from_row(&row)?);
            }
        }
        tx.commit().await?;
        Ok(statuses)
    }

    async fn fetch_statuses(
        &self,
        sql: String,
        binds: Vec<String>,
    ) -> Result<Vec<EventStatus>, StoreError> {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for value in binds {
            query = query.bind(value);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(status_from_row).collect()
    }
}

fn status_from_row(row: &SqliteRow) -> Result<EventStatus, StoreError> {
    let state: i16 = row.try_get("state")?;
    let id: Vec<u8> = row.try_get("event_id")?;
    Ok(EventStatus {
        event_id: EventId(
            Uuid::from_slice(&id).map_err(|_| StoreError::Corrupt("event id".into()))?,
        ),
        producer: row.try_get("producer")?,
        transaction_id: row.try_get("transaction_id")?,
        sequence: row.try_get::<i64, _>("append_sequence")? as u64,
        topic: row.try_get("topic")?,
        state: EventState::from_stored(state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown event state {state}")))?,
        partition: row
            .try_get::<Option<i64>, _>("kafka_partition")?
            .map(|p| p as i32),
        offset: row.try_get("kafka_offset")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        reason: row
            .try_get::<Option<String>, _>("last_error")?
            .unwrap_or_default(),
        updated_at: from_micros(row.try_get("updated_at")?),
        cursor: row.try_get::<i64, _>("change_seq")? as u64,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite").run(&self.pool).await?;
        let wanted = self.shard_count();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT value FROM outbox_meta WHERE key = 'shard_count'")
                .fetch_optional(&mut *tx)
                .await?;
        let shard_count = match stored {
            Some(value) => value
                .parse::<u32>()
                .map_err(|_| StoreError::Corrupt(format!("stored shard_count {value:?}")))?,
            None => {
                sqlx::query("INSERT INTO outbox_meta (key, value) VALUES ('shard_count', ?1)")
                    .bind(wanted.to_string())
                    .execute(&mut *tx)
                    .await?;
                for shard in 0..wanted {
                    sqlx::query("INSERT OR IGNORE INTO outbox_leases (shard) VALUES (?1)")
                        .bind(shard as i64)
                        .execute(&mut *tx)
                        .await?;
                }
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
        self.shard_count.store(shard_count, Ordering::Relaxed);
        Ok(())
    }

    fn shard_count(&self) -> u32 {
        self.shard_count.load(Ordering::Relaxed)
    }

    fn db_system(&self) -> &'static str {
        "sqlite"
    }

    async fn append(
        &self,
        batches: &[AppendBatch],
    ) -> Result<Vec<Result<AppendOutcome, AppendRejection>>, StoreError> {
        let shard_count = self.shard_count();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            sqlx::query("SAVEPOINT append").execute(&mut *tx).await?;
            let result = match Self::append_one(&mut tx, batch, shard_count).await {
                Ok(result) => result,
                Err(error) if is_unique_violation(&error) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT append")
                        .execute(&mut *tx)
                        .await?;
                    let mut taken = Vec::new();
                    for id in batch.events.iter().filter_map(|e| e.event_id) {
                        let exists: Option<i64> =
                            sqlx::query_scalar("SELECT 1 FROM outbox_events WHERE event_id = ?1")
                                .bind(&id.0.as_bytes()[..])
                                .fetch_optional(&mut *tx)
                                .await?;
                        if exists.is_some() {
                            taken.push(id.0);
                        }
                    }
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

    async fn acquire_leases(
        &self,
        owner: &str,
        ttl: Duration,
        max_shards: u32,
    ) -> Result<Vec<Lease>, StoreError> {
        let now = micros(Utc::now());
        let expires_at = now + ttl.as_micros() as i64;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let candidates: Vec<(i64, Option<String>, i64)> = sqlx::query_as(
            "SELECT shard, owner, epoch FROM outbox_leases \
             WHERE owner = ?1 OR owner IS NULL OR expires_at < ?2 \
             ORDER BY (owner IS ?1) DESC, shard LIMIT ?3",
        )
        .bind(owner)
        .bind(now)
        .bind(max_shards as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut leases = Vec::with_capacity(candidates.len());
        for (shard, current_owner, epoch) in candidates {
            let epoch = if current_owner.as_deref() == Some(owner) {
                epoch
            } else {
                epoch + 1
            };
            sqlx::query(
                "UPDATE outbox_leases SET owner = ?1, epoch = ?2, expires_at = ?3 WHERE shard = ?4",
            )
            .bind(owner)
            .bind(epoch)
            .bind(expires_at)
            .bind(shard)
            .execute(&mut *tx)
            .await?;
            leases.push(Lease {
                shard: shard as u32,
                owner: owner.to_owned(),
                epoch,
                expires_at: from_micros(expires_at),
            });
        }
        tx.commit().await?;
        Ok(leases)
    }

    async fn release_leases(&self, owner: &str) -> Result<(), StoreError> {
        self.release_leases_except(owner, &[]).await?;
        sqlx::query("DELETE FROM outbox_instances WHERE owner = ?1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_leases_except(&self, owner: &str, keep: &[u32]) -> Result<(), StoreError> {
        let held: Vec<i64> = sqlx::query_scalar("SELECT shard FROM outbox_leases WHERE owner = ?1")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        for shard in held {
            if !keep.contains(&(shard as u32)) {
                sqlx::query(
                    "UPDATE outbox_leases SET owner = NULL, expires_at = 0 WHERE owner = ?1 AND shard = ?2",
                )
                .bind(owner)
                .bind(shard)
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    async fn heartbeat(&self, owner: &str, ttl: Duration) -> Result<u32, StoreError> {
        let now = micros(Utc::now());
        let ttl = ttl.as_micros() as i64;
        sqlx::query(
            "INSERT INTO outbox_instances (owner, heartbeat_at) VALUES (?1, ?2) \
             ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(owner)
        .bind(now)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM outbox_instances WHERE heartbeat_at < ?1")
            .bind(now - ttl * 10)
            .execute(&self.pool)
            .await?;
        let live: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox_instances WHERE heartbeat_at >= ?1")
                .bind(now - ttl)
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
        let rows = sqlx::query(concat!(
            "SELECT seq, event_id, producer, transaction_id, topic, kafka_key, payload, headers, \
                 aggregate_type, aggregate_id, event_type, state, attempts, next_attempt_at, \
                 occurred_at, appended_at, traceparent, tracestate \
             FROM outbox_events WHERE shard = ?1 AND (state < ",
            stored!(event first_final),
            " OR (?4 AND state = ",
            stored!(event dead_lettered),
            ")) \
               AND seq > ?2 ORDER BY seq LIMIT ?3"
        ))
        .bind(shard as i64)
        .bind(after.seq)
        .bind(limit as i64)
        .bind(with_dead_letters)
        .fetch_all(&self.pool)
        .await?;
        let rows = rows
            .iter()
            .map(|row| {
                let state: i16 = row.try_get("state")?;
                let headers: Vec<u8> = row.try_get("headers")?;
                let id: Vec<u8> = row.try_get("event_id")?;
                Ok(RelayRow {
                    seq: row.try_get("seq")?,
                    writer_xid: 0,
                    event_id: EventId(
                        Uuid::from_slice(&id)
                            .map_err(|_| StoreError::Corrupt("event id".into()))?,
                    ),
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
                    attempts: row.try_get::<i64, _>("attempts")? as u32,
                    next_attempt_at: row
                        .try_get::<Option<i64>, _>("next_attempt_at")?
                        .map(from_micros),
                    occurred_at: from_micros(row.try_get("occurred_at")?),
                    appended_at: from_micros(row.try_get("appended_at")?),
                    traceparent: row.try_get("traceparent")?,
                    tracestate: row.try_get("tracestate")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // One writer at a time, nothing in flight to wait for.
        Ok(RelayPage {
            rows,
            held_back: false,
        })
    }

    async fn record_delivered(
        &self,
        lease: &Lease,
        delivered: &[Delivered],
    ) -> Result<Vec<EventStatus>, StoreError> {
        self.record(lease, delivered, |d, change, now| {
            sqlx::query(concat!(
                "UPDATE outbox_events SET state = ",
                stored!(event published),
                concat!(
                    ", kafka_partition = ?1, kafka_offset = ?2, \
                         published_at = ?3, last_error = NULL, next_attempt_at = NULL, \
                         change_seq = ?4, updated_at = ?3 \
                     WHERE seq = ?5 AND state < ",
                    stored!(event first_final),
                    " RETURNING "
                ),
                status_columns!()
            ))
            .bind(d.partition as i64)
            .bind(d.offset)
            .bind(now)
            .bind(change)
            .bind(d.seq)
        })
        .await
    }

    async fn record_failed(
        &self,
        lease: &Lease,
        failed: &[DeliveryFailed],
    ) -> Result<Vec<EventStatus>, StoreError> {
        self.record(lease, failed, |f, change, now| {
            sqlx::query(concat!(
                "UPDATE outbox_events SET state = CASE WHEN ?1 IS NULL THEN ",
                stored!(event dead_lettered),
                " ELSE ",
                stored!(event retrying),
                concat!(
                    " END, \
                         attempts = attempts + 1, last_error = ?2, next_attempt_at = ?1, \
                         change_seq = ?3, updated_at = ?4 \
                     WHERE seq = ?5 AND state < ",
                    stored!(event first_final),
                    " RETURNING "
                ),
                status_columns!()
            ))
            .bind(f.retry_at.map(micros))
            .bind(&f.error)
            .bind(change)
            .bind(now)
            .bind(f.seq)
        })
        .await
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let expired: Vec<(String, String)> = sqlx::query_as(concat!(
            "SELECT producer, transaction_id FROM outbox_transactions \
             WHERE state = ",
            stored!(transaction open),
            " AND mode = ",
            stored!(mode two_phase),
            " AND expires_at < ?1 ORDER BY expires_at LIMIT ?2"
        ))
        .bind(micros(Utc::now()))
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
        let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(concat!(
            "SELECT t.producer, t.transaction_id, t.created_at, t.expires_at, \
                    (SELECT count(*) FROM outbox_events AS e \
                     WHERE e.producer = t.producer AND e.transaction_id = t.transaction_id) \
             FROM outbox_transactions AS t \
             WHERE t.producer = ?1 AND t.mode = ",
            stored!(mode two_phase),
            " AND t.state = ",
            stored!(transaction open),
            " AND t.created_at <= ?2 \
             ORDER BY t.created_at LIMIT ?3"
        ))
        .bind(producer)
        .bind(micros(Utc::now()) - older_than.as_micros() as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(producer, transaction_id, created, expires, events)| PreparedTransaction {
                    producer,
                    transaction_id,
                    created_at: from_micros(created),
                    expires_at: from_micros(expires),
                    events: events as u64,
                },
            )
            .collect())
    }

    async fn open_xid_tokens(&self, limit: u32) -> Result<Vec<XidToken>, StoreError> {
        let rows: Vec<XidTokenRow> = sqlx::query_as(concat!(
            "SELECT * FROM (SELECT producer, transaction_id, caller_xid, caller_system_id \
                 FROM outbox_transactions \
                 WHERE state = ",
            stored!(transaction open),
            " AND mode = ",
            stored!(mode postgres_xid),
            " AND coalesce(resolve_after, created_at) <= ?2 \
                 ORDER BY coalesce(resolve_after, created_at) DESC LIMIT ?1) \
             UNION \
             SELECT * FROM (SELECT producer, transaction_id, caller_xid, caller_system_id \
                 FROM outbox_transactions \
                 WHERE state = ",
            stored!(transaction open),
            " AND mode = ",
            stored!(mode postgres_xid),
            " AND coalesce(resolve_after, created_at) <= ?2 \
                 ORDER BY coalesce(resolve_after, created_at) LIMIT ?1)",
        ))
        .bind(limit.div_ceil(2) as i64)
        .bind(micros(Utc::now()))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(XidToken::from).collect())
    }

    async fn defer_xid_tokens(
        &self,
        transactions: &[TransactionRef],
        delay: Duration,
    ) -> Result<(), StoreError> {
        let until = micros(Utc::now()) + delay.as_micros() as i64;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for transaction in transactions {
            sqlx::query(concat!(
                "UPDATE outbox_transactions SET resolve_after = ?3 \
                 WHERE producer = ?1 AND transaction_id = ?2 AND state = ",
                stored!(transaction open),
                ""
            ))
            .bind(&transaction.producer)
            .bind(&transaction.transaction_id)
            .bind(until)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn resolve_xid_tokens(
        &self,
        verdicts: &[(TransactionRef, XidVerdict)],
    ) -> Result<Resolved, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut resolved = Resolved::default();
        for (transaction, verdict) in verdicts {
            let open: Option<i64> = sqlx::query_scalar(concat!(
                "SELECT state FROM outbox_transactions \
                 WHERE producer = ?1 AND transaction_id = ?2 AND state = ",
                stored!(transaction open),
                ""
            ))
            .bind(&transaction.producer)
            .bind(&transaction.transaction_id)
            .fetch_optional(&mut *tx)
            .await?;
            if open.is_none() {
                continue;
            }
            match (xid_step(verdict), verdict) {
                (Some((txn_state, name, event_state, reason)), _) => resolved.extend(
                    Self::finish_transaction(
                        &mut tx,
                        transaction,
                        txn_state,
                        name,
                        event_state,
                        reason.as_deref(),
                    )
                    .await?,
                ),
                (None, XidVerdict::Unresolvable(reason)) => {
                    let annotated =
                        Self::transition_pending(&mut tx, transaction, None, Some(reason)).await?;
                    resolved.changed.extend(annotated.changed);
                }
                (None, _) => {}
            }
        }
        tx.commit().await?;
        Ok(resolved)
    }

    async fn purge_finished(&self, older_than: Duration, limit: u32) -> Result<u64, StoreError> {
        let cutoff = micros(Utc::now()) - older_than.as_micros() as i64;
        let events = sqlx::query(concat!(
            "DELETE FROM outbox_events WHERE seq IN ( \
                 SELECT seq FROM outbox_events WHERE state IN (",
            stored!(event published),
            ", ",
            stored!(event discarded),
            ") AND updated_at < ?1 \
                 ORDER BY seq LIMIT ?2)"
        ))
        .bind(cutoff)
        .bind(limit as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        sqlx::query(
            "DELETE FROM outbox_appends WHERE rowid IN ( \
                 SELECT a.rowid FROM outbox_appends a WHERE a.created_at < ?1 \
                   AND NOT EXISTS (SELECT 1 FROM outbox_events e \
                       WHERE e.producer = a.producer AND e.transaction_id = a.transaction_id \
                         AND e.append_sequence = a.sequence AND e.state <> ?3) \
                 LIMIT ?2)",
        )
        .bind(cutoff)
        .bind(limit as i64)
        .bind(EventState::Discarded as i64)
        .execute(&self.pool)
        .await?;
        sqlx::query(concat!(
            "DELETE FROM outbox_transactions WHERE rowid IN ( \
                 SELECT t.rowid FROM outbox_transactions t \
                 WHERE t.state <> ",
            stored!(transaction open),
            " AND coalesce(t.resolved_at, t.created_at) < ?1 \
                   AND NOT EXISTS (SELECT 1 FROM outbox_appends a \
                       WHERE a.producer = t.producer AND a.transaction_id = t.transaction_id) \
                 LIMIT ?2)"
        ))
        .bind(cutoff)
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
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT seq, {STATUS_COLUMNS} FROM outbox_events \
             WHERE state = {dead_lettered} AND seq > ?1 \
               AND (?2 IS NULL OR producer = ?2) AND (?3 IS NULL OR topic = ?3) \
               AND (?4 IS NULL OR updated_at >= ?4) \
             ORDER BY seq",
            dead_lettered = stored!(event dead_lettered),
        )))
        .bind(after_seq)
        .bind(filter.producer.as_deref())
        .bind(filter.topic.as_deref())
        .bind(filter.since.map(micros))
        .fetch_all(&self.pool)
        .await?;
        let mut found = Vec::new();
        for row in &rows {
            let status = status_from_row(row)?;
            if filter.event_ids.is_empty() || filter.event_ids.contains(&status.event_id) {
                found.push((row.try_get::<i64, _>("seq")?, status));
                if found.len() as u32 >= limit {
                    break;
                }
            }
        }
        Ok(found)
    }

    async fn redrive(&self, filter: &DeadLetterFilter) -> Result<Resolved, StoreError> {
        let matching = self.list_dead_letters(filter, 0, u32::MAX).await?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut resolved = Resolved::default();
        if matching.is_empty() {
            return Ok(resolved);
        }
        let first_change = Self::next_changes(&mut tx, matching.len()).await?;
        let now = micros(Utc::now());
        for (index, (seq, _)) in matching.iter().enumerate() {
            let row = sqlx::query(concat!(
                "UPDATE outbox_events SET state = ",
                stored!(event ready),
                concat!(
                    ", attempts = 0, last_error = NULL, \
                     next_attempt_at = NULL, change_seq = ?1, updated_at = ?2 \
                 WHERE seq = ?3 AND state = ",
                    stored!(event dead_lettered),
                    " RETURNING shard, "
                ),
                status_columns!()
            ))
            .bind(first_change + index as i64)
            .bind(now)
            .bind(seq)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = row {
                resolved.changed.push(status_from_row(&row)?);
                resolved.shards.push(row.try_get::<i64, _>("shard")? as u32);
            }
        }
        tx.commit().await?;
        Ok(resolved)
    }

    async fn backlog(&self) -> Result<Vec<ShardBacklog>, StoreError> {
        let rows: Vec<(i64, i64, Option<i64>)> = sqlx::query_as(concat!(
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
                oldest: oldest.map(from_micros),
            })
            .collect())
    }

    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let rows: Vec<(i64, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT shard, owner, epoch, expires_at FROM outbox_leases ORDER BY shard",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(shard, owner, epoch, expires_at)| Lease {
                shard: shard as u32,
                owner: owner.unwrap_or_default(),
                epoch,
                expires_at: from_micros(expires_at),
            })
            .collect())
    }

    async fn set_relay_paused(&self, paused: bool) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox_meta (key, value) VALUES ('relay_paused', ?1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
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

    async fn status_by_ids(&self, ids: &[EventId]) -> Result<Vec<EventStatus>, StoreError> {
        let mut statuses = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {STATUS_COLUMNS} FROM outbox_events WHERE event_id = ?1"
            )))
            .bind(&id.0.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = row {
                statuses.push(status_from_row(&row)?);
            }
        }
        Ok(statuses)
    }

    async fn status_by_transactions(
        &self,
        transactions: &[TransactionRef],
    ) -> Result<Vec<EventStatus>, StoreError> {
        let mut statuses = Vec::new();
        for transaction in transactions {
            statuses.extend(
                self.fetch_statuses(
                    format!(
                        "SELECT {STATUS_COLUMNS} FROM outbox_events \
                         WHERE producer = ?1 AND transaction_id = ?2 \
                         ORDER BY append_sequence, batch_index"
                    ),
                    vec![
                        transaction.producer.clone(),
                        transaction.transaction_id.clone(),
                    ],
                )
                .await?,
            );
        }
        Ok(statuses)
    }

    async fn status_changes(
        &self,
        producer: &str,
        after_cursor: u64,
        limit: u32,
    ) -> Result<Vec<EventStatus>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {STATUS_COLUMNS} FROM outbox_events \
             WHERE producer = ?1 AND change_seq > ?2 ORDER BY change_seq LIMIT ?3"
        )))
        .bind(producer)
        .bind(after_cursor as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(status_from_row).collect()
    }
}
