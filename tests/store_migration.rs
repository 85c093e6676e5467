//! A PostgreSQL store written with the layout before segments (migrations
//! 0001–0011: a row per event) is migrated when outboxd starts: its
//! unpublished events keep their ids, states and per-key order and are
//! published; its published events keep their statuses. Real PostgreSQL,
//! a real broker (Tansu) and an independent consumer.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outboxd::domain::{EventId, EventState, shard_of};
use outboxd::proto;
use outboxd::store::segment::{EventLocation, SegmentBody, SegmentEvent, SegmentTransaction};
use prost::Message;
use sqlx::{Connection, PgConnection};
use support::{Gateway, Tansu, consume_until, first_sightings_by_key, status_of};

const SHARDS: u32 = 8;

/// Applies the migrations of the old layout only, as a store of that
/// version left them (with its shard count and leases).
async fn old_store(url: &str) -> PgConnection {
    store_at(url, 11).await
}

/// Applies the migrations up to `version` only, as a store of that version
/// left them (with its shard count and leases).
async fn store_at(url: &str, version: i64) -> PgConnection {
    let mut migrator = sqlx::migrate!("migrations/postgres");
    migrator.migrations = migrator
        .migrations
        .iter()
        .filter(|migration| migration.version <= version)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    let mut connection = PgConnection::connect(url).await.unwrap();
    migrator.run(&mut connection).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO outbox_meta (key, value) VALUES ('shard_count', '8'); \
         INSERT INTO outbox_leases (shard) SELECT generate_series(0, 7);",
    )
    .execute(&mut connection)
    .await
    .unwrap();
    connection
}

/// One event row as the old store wrote it.
struct OldEvent<'a> {
    id: EventId,
    transaction: &'a str,
    index: i32,
    key: &'a str,
    state: i16,
    attempts: i32,
}

async fn write_old_event(connection: &mut PgConnection, topic: &str, event: &OldEvent<'_>) {
    let shard = shard_of(Some(event.key.as_bytes()), event.id, SHARDS);
    sqlx::query(
        "INSERT INTO outbox_events (event_id, shard, producer, transaction_id, append_sequence, \
             batch_index, topic, kafka_key, payload, headers, aggregate_type, aggregate_id, \
             event_type, occurred_at, state, attempts, next_attempt_at, last_error) \
         VALUES ($1, $2, 'shop', $3, 0, $4, $5, $6, $7, $8, 'order', $9, 'placed', now(), $10, \
                 $11, CASE WHEN $11 > 0 THEN now() - interval '1 second' END, \
                 CASE WHEN $11 > 0 THEN 'broker down' END)",
    )
    .bind(event.id.0)
    .bind(shard as i32)
    .bind(event.transaction)
    .bind(event.index)
    .bind(topic)
    .bind(event.key.as_bytes())
    .bind(format!("payload of {}", event.id).into_bytes())
    // No headers: a count of zero.
    .bind(&[0u8, 0, 0, 0][..])
    .bind(event.key)
    .bind(event.state)
    .bind(event.attempts)
    .execute(&mut *connection)
    .await
    .unwrap();
}

async fn write_old_transaction(
    connection: &mut PgConnection,
    transaction: &str,
    mode: i16,
    state: i16,
    ids: &[EventId],
) {
    sqlx::query(
        "INSERT INTO outbox_transactions (producer, transaction_id, mode, state, expires_at) \
         VALUES ('shop', $1, $2, $3, CASE WHEN $2 = 2 THEN now() + interval '1 hour' END)",
    )
    .bind(transaction)
    .bind(mode)
    .bind(state)
    .execute(&mut *connection)
    .await
    .unwrap();
    let packed: Vec<u8> = ids.iter().flat_map(|id| *id.0.as_bytes()).collect();
    sqlx::query(
        "INSERT INTO outbox_appends (producer, transaction_id, sequence, content_hash, event_ids) \
         VALUES ('shop', $1, 0, $2, $3)",
    )
    .bind(transaction)
    .bind(&[7u8; 32][..])
    .bind(packed)
    .execute(&mut *connection)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_the_old_layout_keeps_and_publishes_its_events() {
    let tansu = Tansu::shared();
    let topic = support::unique("migrated");
    tansu.create_topic(&topic, 3).await;
    let url = support::fresh_database().await;
    let mut old = old_store(&url).await;

    // Written by the old store: two READY events of key "a" and one
    // RETRYING of key "b" (immediate, committed), a PENDING event of key
    // "a" (two_phase, open), and an event published before the migration.
    let ids: Vec<EventId> = (0..5).map(|_| EventId::generate()).collect();
    write_old_transaction(&mut old, "ready", 1, 2, &ids[..3]).await;
    write_old_transaction(&mut old, "pending", 2, 1, &ids[3..4]).await;
    write_old_transaction(&mut old, "published", 1, 2, &ids[4..]).await;
    for event in [
        OldEvent {
            id: ids[0],
            transaction: "ready",
            index: 0,
            key: "a",
            state: 2,
            attempts: 0,
        },
        OldEvent {
            id: ids[1],
            transaction: "ready",
            index: 1,
            key: "a",
            state: 2,
            attempts: 0,
        },
        OldEvent {
            id: ids[2],
            transaction: "ready",
            index: 2,
            key: "b",
            state: 3,
            attempts: 1,
        },
        OldEvent {
            id: ids[3],
            transaction: "pending",
            index: 0,
            key: "a",
            state: 1,
            attempts: 0,
        },
    ] {
        write_old_event(&mut old, &topic, &event).await;
    }
    sqlx::query(
        "INSERT INTO outbox_published (event_id, seq, producer, transaction_id, append_sequence, \
             topic, kafka_partition, kafka_offset, attempts, published_at, change_seq) \
         VALUES ($1, 1000, 'shop', 'published', 0, $2, 2, 42, 0, now(), \
                 nextval('outbox_change_seq'))",
    )
    .bind(ids[4].0)
    .bind(&topic)
    .execute(&mut old)
    .await
    .unwrap();
    old.close().await.unwrap();

    // outboxd of the new layout starts on it: it migrates, then relays.
    let gateway = Gateway::start(support::test_config(&url, &tansu.bootstrap)).await;
    let mut client = gateway.client().await;
    let published = status_of(&mut client, &ids[4].to_string()).await;
    assert_eq!(published.state, proto::EventState::Published as i32);
    assert_eq!((published.partition, published.offset), (Some(2), Some(42)));
    let pending = status_of(&mut client, &ids[3].to_string()).await;
    assert_eq!(pending.state, proto::EventState::Pending as i32);
    assert_eq!(pending.transaction_id, "pending");

    // The PENDING event held its key until its transaction commits.
    let committed = client
        .commit(proto::CommitRequest {
            producer: "shop".into(),
            transaction_id: "pending".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.events, 1);

    let expected: HashSet<String> = ids[..4].iter().map(ToString::to_string).collect();
    let records = consume_until(
        &tansu.bootstrap,
        &topic,
        &expected,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let mut seen = HashSet::new();
    for record in &records {
        let id = record.event_id();
        assert!(expected.contains(&id), "a record nobody appended: {id}");
        assert!(seen.insert(id.clone()), "{id} reached Kafka twice");
        assert_eq!(record.payload, format!("payload of {id}").into_bytes());
    }
    assert_eq!(seen.len(), 4, "every unpublished event reached Kafka");
    let by_key = first_sightings_by_key(&records);
    assert_eq!(
        by_key.get(&b"a"[..]),
        Some(&vec![
            ids[0].to_string(),
            ids[1].to_string(),
            ids[3].to_string()
        ]),
        "key a in its old order, the committed event last"
    );
    for id in &ids[..4] {
        support::eventually(
            "the migrated event to be published",
            Duration::from_secs(30),
            || {
                let mut client = client.clone();
                let id = id.to_string();
                async move {
                    (status_of(&mut client, &id).await.state == proto::EventState::Published as i32)
                        .then_some(())
                }
            },
        )
        .await;
    }
    let retried = status_of(&mut client, &ids[2].to_string()).await;
    assert_eq!(retried.attempts, 1, "attempts survive the migration");

    // The old tables are gone.
    let mut check = PgConnection::connect(&url).await.unwrap();
    let left: Option<String> = sqlx::query_scalar("SELECT to_regclass('outbox_events')::text")
        .fetch_one(&mut check)
        .await
        .unwrap();
    assert_eq!(left, None);
    gateway.stop().await;
}

/// A store of the first segment layout (migration 0012: each body in its
/// segment's row) keeps its unpublished events when the bodies move to a
/// table of their own (0013), and publishes them in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_written_with_their_bodies_inline_are_published_after_the_upgrade() {
    let tansu = Tansu::shared();
    let topic = support::unique("inline-bodies");
    tansu.create_topic(&topic, 3).await;
    let url = support::fresh_database().await;
    let mut old = store_at(&url, 12).await;
    write_old_transaction(&mut old, "inline", 1, 2, &[]).await;
    let number: i64 = sqlx::query_scalar("SELECT nextval('outbox_segment_numbers')")
        .fetch_one(&mut old)
        .await
        .unwrap();
    let millis = chrono::Utc::now().timestamp_millis();
    let ids: Vec<EventId> = (0..3u16)
        .map(|position| {
            EventLocation {
                segment: number as u64,
                position,
            }
            .id(millis as u64)
        })
        .collect();
    let body = SegmentBody {
        transactions: vec![SegmentTransaction {
            producer: "shop".into(),
            transaction_id: "inline".into(),
            append_sequence: 0,
            batch: 0,
        }],
        events: ids
            .iter()
            .enumerate()
            .map(|(index, id)| SegmentEvent {
                transaction: 0,
                topic: topic.clone(),
                key: Some(b"a".to_vec()),
                payload: format!("payload of {id}").into_bytes(),
                aggregate_type: "order".into(),
                aggregate_id: "a".into(),
                event_type: "placed".into(),
                index: index as u32,
                ..Default::default()
            })
            .collect(),
        // Every string inline, as bodies were written then.
        strings: vec![],
    };
    let ready = EventState::Ready as u8;
    sqlx::query(
        "INSERT INTO outbox_segments (number, shard, millis, body, states) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(number)
    .bind(shard_of(Some(b"a"), ids[0], SHARDS) as i32)
    .bind(millis)
    .bind(body.encode_to_vec())
    .bind(vec![ready; ids.len()])
    .execute(&mut old)
    .await
    .unwrap();
    // Change-feed rows as 0012 wrote them: the append's (all the
    // producer's events of the segment) and a change of two of them.
    sqlx::query(
        "INSERT INTO outbox_changes (producer, segment, positions) \
         VALUES ('shop', $1, NULL), ('shop', $1, '{0,2}')",
    )
    .bind(number)
    .execute(&mut old)
    .await
    .unwrap();
    old.close().await.unwrap();

    let gateway = Gateway::start(support::test_config(&url, &tansu.bootstrap)).await;
    let mut client = gateway.client().await;
    let expected: HashSet<String> = ids.iter().map(ToString::to_string).collect();
    let records = consume_until(
        &tansu.bootstrap,
        &topic,
        &expected,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    for record in &records {
        let id = record.event_id();
        assert!(expected.contains(&id), "a record nobody appended: {id}");
        assert_eq!(record.payload, format!("payload of {id}").into_bytes());
    }
    assert_eq!(
        first_sightings_by_key(&records).get(&b"a"[..]),
        Some(&ids.iter().map(ToString::to_string).collect::<Vec<_>>()),
        "every event once, in its order"
    );
    for id in &ids {
        support::eventually(
            "the upgraded segment's events to be published",
            Duration::from_secs(30),
            || {
                let mut client = client.clone();
                let id = id.to_string();
                async move {
                    let status = status_of(&mut client, &id).await;
                    (status.state == proto::EventState::Published as i32).then_some(status)
                }
            },
        )
        .await;
    }
    let status = status_of(&mut client, &ids[1].to_string()).await;
    assert_eq!(status.transaction_id, "inline");
    assert_eq!(status.producer, "shop");

    let mut check = PgConnection::connect(&url).await.unwrap();
    let kept: Vec<(Vec<i64>, Option<Vec<i32>>)> = sqlx::query_as(
        "SELECT segments, positions FROM outbox_changes ORDER BY change_seq LIMIT 2",
    )
    .fetch_all(&mut check)
    .await
    .unwrap();
    assert_eq!(
        kept,
        [
            (vec![number], None),
            (vec![number, number], Some(vec![0, 2]))
        ],
        "the change feed's rows keep what they named"
    );
    // The body moved; the segment row keeps none.
    let moved: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_segment_bodies WHERE number = $1")
            .bind(number)
            .fetch_one(&mut check)
            .await
            .unwrap();
    assert_eq!(moved, 1);
    let inline: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns \
         WHERE table_name = 'outbox_segments' AND column_name = 'body'",
    )
    .fetch_one(&mut check)
    .await
    .unwrap();
    assert_eq!(inline, 0);
    gateway.stop().await;
}
