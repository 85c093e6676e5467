//! The SQLite append path: one append at a time inside the writer's
//! transaction (SQLite has one writer), with the same rules as PostgreSQL's.

use chrono::Utc;
use sqlx::{Row, Sqlite, Transaction};

use super::{SqliteStore, from_micros, micros};
use crate::domain::{AppendBatch, AppendOutcome, EventId, EventStatus, encode_headers, shard_of};
use crate::store::AppendRejection;
use crate::store::codes::{NewTransaction, initial_event_state, mode_code, pack_ids, unpack_ids};
use crate::store::tokens::ExistingTransaction;

impl SqliteStore {
    /// Takes `count` values of the change feed counter; returns the first.
    pub(super) async fn next_changes(
        tx: &mut Transaction<'_, Sqlite>,
        count: usize,
    ) -> Result<i64, sqlx::Error> {
        let last: i64 = sqlx::query_scalar(
            "UPDATE outbox_counters SET value = value + ?1 WHERE name = 'change_seq' RETURNING value",
        )
        .bind(count as i64)
        .fetch_one(&mut **tx)
        .await?;
        Ok(last - count as i64 + 1)
    }

    pub(super) async fn append_one(
        tx: &mut Transaction<'_, Sqlite>,
        batch: &AppendBatch,
        shard_count: u32,
    ) -> Result<Result<AppendOutcome, AppendRejection>, sqlx::Error> {
        let token = &batch.token;
        let now = Utc::now();
        let new = NewTransaction::of(&token.mode);
        sqlx::query(
            "INSERT INTO outbox_transactions \
                 (producer, transaction_id, mode, state, caller_xid, caller_system_id, expires_at, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
        )
        .bind(&token.producer)
        .bind(&token.transaction_id)
        .bind(mode_code(&token.mode))
        .bind(new.state)
        .bind(new.caller_xid)
        .bind(new.caller_system_id)
        .bind(new.expires_in.map(|d| micros(now) + d.as_micros() as i64))
        .bind(micros(now))
        .execute(&mut **tx)
        .await?;
        let row = sqlx::query(
            "SELECT mode, state, resolution, caller_xid, caller_system_id, \
                    coalesce(expires_at < ?3, 0) AS expired \
             FROM outbox_transactions WHERE producer = ?1 AND transaction_id = ?2",
        )
        .bind(&token.producer)
        .bind(&token.transaction_id)
        .bind(micros(now))
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
        let packed_ids = pack_ids(&event_ids);
        let inserted = sqlx::query(
            "INSERT INTO outbox_appends (producer, transaction_id, sequence, content_hash, event_ids, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        )
        .bind(&token.producer)
        .bind(&token.transaction_id)
        .bind(batch.sequence as i64)
        .bind(&content_hash[..])
        .bind(&packed_ids)
        .bind(micros(now))
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            let stored = sqlx::query(
                "SELECT content_hash, event_ids FROM outbox_appends \
                 WHERE producer = ?1 AND transaction_id = ?2 AND sequence = ?3",
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
            let event_ids = unpack_ids(&stored_ids);
            return Ok(Ok(AppendOutcome {
                event_ids,
                duplicate: true,
                statuses: Vec::new(),
                shards: Vec::new(),
            }));
        }

        if let Some(rejection) = existing.resolved(batch) {
            return Ok(Err(rejection));
        }
        let state = initial_event_state(batch);
        let first_change = Self::next_changes(tx, batch.events.len()).await?;
        let mut statuses = Vec::with_capacity(batch.events.len());
        let mut shards = Vec::with_capacity(batch.events.len());
        for (index, (event, id)) in batch.events.iter().zip(&event_ids).enumerate() {
            let ordering_key = event.ordering_key();
            let shard = shard_of(ordering_key, *id, shard_count);
            shards.push(shard);
            let change = first_change + index as i64;
            sqlx::query(
                "INSERT INTO outbox_events (event_id, shard, producer, transaction_id, append_sequence, \
                     batch_index, topic, kafka_key, payload, headers, aggregate_type, aggregate_id, \
                     event_type, occurred_at, appended_at, state, traceparent, tracestate, change_seq, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?15)",
            )
            .bind(&id.0.as_bytes()[..])
            .bind(shard as i64)
            .bind(&token.producer)
            .bind(&token.transaction_id)
            .bind(batch.sequence as i64)
            .bind(index as i64)
            .bind(&event.topic)
            .bind(ordering_key)
            .bind(&event.payload)
            .bind(encode_headers(&event.headers))
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(&event.event_type)
            .bind(micros(event.occurred_at.unwrap_or(now)))
            .bind(micros(now))
            .bind(state as i16)
            .bind(batch.trace.traceparent.as_deref())
            .bind(batch.trace.tracestate.as_deref())
            .bind(change)
            .execute(&mut **tx)
            .await?;
            statuses.push(EventStatus::appended(
                batch,
                event,
                *id,
                state,
                change as u64,
                from_micros(micros(now)),
            ));
        }
        Ok(Ok(AppendOutcome {
            event_ids,
            duplicate: false,
            statuses,
            shards,
        }))
    }
}
