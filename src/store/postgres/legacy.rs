//! Packs the events of the layout before segments (migrations 0001–0011:
//! a row per event in outbox_events, published events in outbox_published)
//! into segments, then drops the old tables. Runs once, when a store
//! migrated to 0012 still has them.
//!
//! Unpublished events keep their ids (as caller-chosen ones: they name no
//! location), their states, attempts and errors, and their relay order: a
//! shard's events go into segments in (writer_xid, seq) order, numbered in
//! that order by the migrating transaction. Published events keep their
//! status (topic, partition, offset) in final segments, without payloads,
//! until retention removes them.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::append::SegmentNumbers;
use super::segments::insert_changes;
use crate::domain::{EventState, NewEvent, decode_headers};
use crate::store::StoreError;
use crate::store::segment::{AppendPlace, MAX_SEGMENT_EVENTS, SegmentBuilder};

/// Old rows read at a time.
const PAGE: i64 = 10_000;

/// One old event, as packed.
struct Old {
    shard: i32,
    event_id: Uuid,
    producer: String,
    transaction_id: String,
    sequence: i64,
    index: i32,
    event: NewEvent,
    traceparent: Option<String>,
    tracestate: Option<String>,
    appended_at: DateTime<Utc>,
    state: i16,
    attempts: i32,
    last_error: Option<String>,
    next_attempt_at: Option<DateTime<Utc>>,
    placement: Option<(i32, i64)>,
}

/// A segment of old events being filled.
struct Filling {
    shard: i32,
    builder: SegmentBuilder,
    olds: Vec<Old>,
}

/// Packs the old layout's rows into segments and drops its tables; returns
/// how many events were packed (0 when there was no old layout).
pub(super) async fn pack_old_rows(
    tx: &mut PgConnection,
    numbers: &SegmentNumbers,
) -> Result<u64, StoreError> {
    let old: Option<String> = sqlx::query_scalar("SELECT to_regclass('outbox_events')::text")
        .fetch_one(&mut *tx)
        .await?;
    if old.is_none() {
        return Ok(0);
    }
    let mut packed = 0;
    let mut after: (i32, i64, i64) = (-1, 0, 0);
    loop {
        let rows = sqlx::query(
            "SELECT seq, (writer_xid::text)::bigint AS writer_xid, event_id, shard, producer, \
                    transaction_id, append_sequence, batch_index, topic, kafka_key, payload, \
                    headers, aggregate_type, aggregate_id, event_type, occurred_at, appended_at, \
                    state, attempts, next_attempt_at, last_error, traceparent, tracestate \
             FROM outbox_events \
             WHERE (shard, writer_xid, seq) > ($1, $2::text::xid8, $3) \
             ORDER BY shard, writer_xid, seq LIMIT $4",
        )
        .bind(after.0)
        .bind(after.1.to_string())
        .bind(after.2)
        .bind(PAGE)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = (
            last.try_get("shard")?,
            last.try_get("writer_xid")?,
            last.try_get("seq")?,
        );
        let mut olds = Vec::with_capacity(rows.len());
        for row in &rows {
            let headers: Vec<u8> = row.try_get("headers")?;
            olds.push(Old {
                shard: row.try_get("shard")?,
                event_id: row.try_get("event_id")?,
                producer: row.try_get("producer")?,
                transaction_id: row.try_get("transaction_id")?,
                sequence: row.try_get("append_sequence")?,
                index: row.try_get("batch_index")?,
                event: NewEvent {
                    event_id: Some(crate::domain::EventId(row.try_get("event_id")?)),
                    topic: row.try_get("topic")?,
                    // The ordering key as stored: the Kafka key.
                    key: row.try_get("kafka_key")?,
                    payload: row.try_get("payload")?,
                    headers: decode_headers(&headers)
                        .ok_or_else(|| StoreError::Corrupt("undecodable headers".into()))?,
                    aggregate_type: row.try_get("aggregate_type")?,
                    aggregate_id: row.try_get("aggregate_id")?,
                    event_type: row.try_get("event_type")?,
                    occurred_at: Some(row.try_get("occurred_at")?),
                },
                traceparent: row.try_get("traceparent")?,
                tracestate: row.try_get("tracestate")?,
                appended_at: row.try_get("appended_at")?,
                state: row.try_get("state")?,
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
                next_attempt_at: row.try_get("next_attempt_at")?,
                placement: None,
            });
        }
        packed += write(tx, numbers, olds).await?;
    }
    // Published events: their status only.
    let mut after = 0i64;
    loop {
        let rows = sqlx::query(
            "SELECT seq, event_id, producer, transaction_id, append_sequence, topic, \
                    kafka_partition, kafka_offset, attempts, published_at \
             FROM outbox_published WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(PAGE)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.try_get("seq")?;
        let mut olds = Vec::with_capacity(rows.len());
        for row in &rows {
            olds.push(Old {
                shard: 0,
                event_id: row.try_get("event_id")?,
                producer: row.try_get("producer")?,
                transaction_id: row.try_get("transaction_id")?,
                sequence: row.try_get("append_sequence")?,
                index: 0,
                event: NewEvent {
                    event_id: Some(crate::domain::EventId(row.try_get("event_id")?)),
                    topic: row.try_get("topic")?,
                    key: None,
                    payload: Vec::new(),
                    headers: Vec::new(),
                    aggregate_type: String::new(),
                    aggregate_id: String::new(),
                    event_type: String::new(),
                    occurred_at: None,
                },
                traceparent: None,
                tracestate: None,
                appended_at: row.try_get("published_at")?,
                state: EventState::Published as i16,
                attempts: row.try_get("attempts")?,
                last_error: None,
                next_attempt_at: None,
                placement: Some((
                    row.try_get("kafka_partition")?,
                    row.try_get("kafka_offset")?,
                )),
            });
        }
        packed += write(tx, numbers, olds).await?;
    }
    // Why old PENDING or DISCARDED events are held or were discarded.
    sqlx::query(concat!(
        "UPDATE outbox_transactions AS t SET reason = e.last_error \
         FROM (SELECT DISTINCT ON (producer, transaction_id) producer, transaction_id, last_error \
               FROM outbox_events WHERE last_error IS NOT NULL AND state IN (",
        stored!(event pending),
        ", ",
        stored!(event discarded),
        ")) AS e \
         WHERE t.producer = e.producer AND t.transaction_id = e.transaction_id"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query("DROP VIEW outbox_event_statuses")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DROP TABLE outbox_events, outbox_published")
        .execute(&mut *tx)
        .await?;
    Ok(packed)
}

/// Packs `olds` (in relay order) into segments per shard and writes them.
async fn write(
    tx: &mut PgConnection,
    numbers: &SegmentNumbers,
    olds: Vec<Old>,
) -> Result<u64, StoreError> {
    let count = olds.len() as u64;
    let mut filling: Vec<Filling> = Vec::new();
    for old in olds {
        match filling.last_mut() {
            Some(last) if last.shard == old.shard && last.olds.len() < MAX_SEGMENT_EVENTS => {
                last.olds.push(old)
            }
            _ => filling.push(Filling {
                shard: old.shard,
                builder: SegmentBuilder::default(),
                olds: vec![old],
            }),
        }
    }
    let taken = numbers.take(tx, filling.len()).await?;
    let (mut segment_numbers, mut shards, mut bodies, mut states, mut placements, mut appended) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut finals, mut ids, mut id_segments, mut id_positions) = (vec![], vec![], vec![], vec![]);
    let mut faults = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut changes: HashMap<(String, i64), ()> = HashMap::new();
    for (mut segment, number) in filling.into_iter().zip(taken) {
        let mut segment_states = Vec::with_capacity(segment.olds.len());
        let mut segment_placements: Option<Vec<u8>> = None;
        for old in &segment.olds {
            let position = segment.builder.push(
                AppendPlace {
                    producer: &old.producer,
                    transaction_id: &old.transaction_id,
                    sequence: old.sequence as u64,
                    batch: 0,
                    index: old.index as u32,
                    traceparent: old.traceparent.as_deref(),
                    tracestate: old.tracestate.as_deref(),
                },
                &old.event,
            );
            segment_states.push(old.state as u8);
            if let Some((partition, offset)) = old.placement {
                let bytes =
                    segment_placements.get_or_insert_with(|| vec![0; segment.olds.len() * 12]);
                let at = position as usize * 12;
                bytes[at..at + 4].copy_from_slice(&partition.to_be_bytes());
                bytes[at + 4..at + 12].copy_from_slice(&offset.to_be_bytes());
            }
            ids.push(old.event_id);
            id_segments.push(number);
            id_positions.push(i32::from(position));
            if old.attempts > 0 || old.last_error.is_some() {
                faults.0.push(number);
                faults.1.push(i32::from(position));
                faults.2.push(old.attempts);
                faults.3.push(old.last_error.clone());
                faults.4.push(old.next_attempt_at);
                faults.5.push(old.state == EventState::DeadLettered as i16);
            }
            changes.insert((old.producer.clone(), number), ());
        }
        let appended_at = segment
            .olds
            .iter()
            .map(|old| old.appended_at)
            .min()
            .unwrap_or_else(Utc::now);
        finals.push(segment_states.iter().all(|&code| {
            code == EventState::Published as u8 || code == EventState::Discarded as u8
        }));
        segment_numbers.push(number);
        shards.push(segment.shard);
        bodies.push(segment.builder.encode());
        states.push(segment_states);
        placements.push(segment_placements);
        appended.push(appended_at);
    }
    sqlx::query(
        "WITH bodies AS ( \
             INSERT INTO outbox_segment_bodies (number, body) \
             SELECT * FROM UNNEST($1::bigint[], $4::bytea[])) \
         INSERT INTO outbox_segments \
             (number, shard, millis, appended_at, states, placements, final) \
         SELECT u.number, u.shard, 0, u.appended_at, u.states, u.placements, u.final \
         FROM UNNEST($1::bigint[], $2::integer[], $3::timestamptz[], $4::bytea[], $5::bytea[], \
                     $6::bytea[], $7::boolean[]) \
             AS u(number, shard, appended_at, body, states, placements, final)",
    )
    .bind(&segment_numbers)
    .bind(&shards)
    .bind(&appended)
    .bind(&bodies)
    .bind(&states)
    .bind(&placements)
    .bind(&finals)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO outbox_caller_ids (event_id, segment, position) \
         SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::integer[])",
    )
    .bind(&ids)
    .bind(&id_segments)
    .bind(&id_positions)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO outbox_event_faults \
             (segment, position, attempts, last_error, next_attempt_at, dead) \
         SELECT * FROM UNNEST($1::bigint[], $2::integer[], $3::integer[], $4::text[], \
                              $5::timestamptz[], $6::boolean[])",
    )
    .bind(&faults.0)
    .bind(&faults.1)
    .bind(&faults.2)
    .bind(&faults.3)
    .bind(&faults.4)
    .bind(&faults.5)
    .execute(&mut *tx)
    .await?;
    let (producers, segments): (Vec<String>, Vec<i64>) = changes.into_keys().unzip();
    let producers: Vec<&str> = producers.iter().map(String::as_str).collect();
    insert_changes(tx, &producers, &segments, None).await?;
    Ok(count)
}
