//! One behavioural suite, run against every `Store` implementation: a real
//! PostgreSQL database of the harness cluster and a SQLite file.

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use outboxd::domain::{EventId, EventState, TransactionRef};
use outboxd::store::{AppendRejection, Delivered, DeliveryFailed, RelayRow, Store, StoreError};
use support::{AppendBuilder, EventBuilder, keyed_event};

const SHARDS: u32 = 4;

async fn postgres_store() -> Arc<dyn Store> {
    let store = outboxd::store::connect(&support::fresh_database().await, 4, SHARDS)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
}

async fn sqlite_store() -> Arc<dyn Store> {
    let store = outboxd::store::connect(&support::sqlite_url(), 4, SHARDS)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
}

/// Every not-final row of every shard, as the relay would read them, once
/// all of `expected` are readable (the visibility gate may hold rows back
/// while other transactions of the cluster run).
async fn relay_rows(store: &Arc<dyn Store>, expected: usize) -> Vec<RelayRow> {
    support::eventually(
        "rows to pass the visibility gate",
        Duration::from_secs(30),
        || {
            let store = store.clone();
            async move {
                let mut rows = Vec::new();
                for shard in 0..store.shard_count() {
                    rows.extend(
                        store
                            .read_relay_rows(shard, Default::default(), 10_000)
                            .await
                            .unwrap(),
                    );
                }
                (rows.len() >= expected).then_some(rows)
            }
        },
    )
    .await
}

/// The ids of `batch`'s events, appended alone; the append must succeed.
async fn append_ids(store: &Arc<dyn Store>, batch: outboxd::domain::AppendBatch) -> Vec<EventId> {
    store
        .append(&[batch])
        .await
        .unwrap()
        .remove(0)
        .unwrap()
        .event_ids
}

async fn append_is_atomic_and_idempotent(store: Arc<dyn Store>) {
    let first = AppendBuilder::new("ledger", "t1")
        .events([
            keyed_event("accounts", "a", "1"),
            keyed_event("accounts", "b", "2"),
            keyed_event("accounts", "a", "3"),
        ])
        .batch();
    let outcome = store
        .append(std::slice::from_ref(&first))
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(!outcome.duplicate);
    assert_eq!(outcome.event_ids.len(), 3);
    assert!(
        outcome
            .statuses
            .iter()
            .all(|s| s.state == EventState::Ready)
    );

    let retry = store
        .append(std::slice::from_ref(&first))
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.event_ids, outcome.event_ids);
    assert!(retry.statuses.is_empty(), "a duplicate announces nothing");

    let stored = store
        .status_by_transactions(&[TransactionRef {
            producer: "ledger".into(),
            transaction_id: "t1".into(),
        }])
        .await
        .unwrap();
    let ids: Vec<EventId> = stored.iter().map(|s| s.event_id).collect();
    assert_eq!(ids, outcome.event_ids, "stored once, in append order");
}

async fn one_bad_append_fails_only_itself(store: Arc<dyn Store>) {
    let taken = EventId::generate();
    let with_id = EventBuilder::keyed("accounts", "k")
        .payload("original")
        .id(taken)
        .build();
    store
        .append(&[AppendBuilder::new("ledger", "t0").event(with_id).batch()])
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap();

    let reuses_id = EventBuilder::keyed("accounts", "k")
        .payload("other")
        .id(taken)
        .build();
    let results = store
        .append(&[
            AppendBuilder::new("ledger", "t1")
                .event(keyed_event("accounts", "a", "1"))
                .batch(),
            AppendBuilder::new("ledger", "t0")
                .event(keyed_event("accounts", "k", "changed body"))
                .batch(),
            AppendBuilder::new("ledger", "t2")
                .events([keyed_event("accounts", "b", "2"), reuses_id])
                .batch(),
            AppendBuilder::new("ledger", "t3")
                .event(keyed_event("accounts", "c", "3"))
                .batch(),
        ])
        .await
        .unwrap();
    assert!(results[0].is_ok());
    assert!(matches!(
        results[1],
        Err(AppendRejection::ConflictingRetry { sequence: 0, .. })
    ));
    match &results[2] {
        Err(AppendRejection::EventIdTaken(violation)) => {
            assert_eq!(violation.field, "events[1].event_id")
        }
        other => panic!("expected EventIdTaken, got {other:?}"),
    }
    assert!(results[3].is_ok());
    let refs: Vec<TransactionRef> = ["t0", "t1", "t2", "t3"]
        .iter()
        .map(|t| TransactionRef {
            producer: "ledger".into(),
            transaction_id: (*t).into(),
        })
        .collect();
    let stored = store.status_by_transactions(&refs).await.unwrap();
    let transactions: Vec<&str> = stored.iter().map(|s| s.transaction_id.as_str()).collect();
    assert_eq!(
        transactions,
        vec!["t0", "t1", "t3"],
        "t2 stored nothing, not even its good event"
    );
}

async fn a_retry_within_one_coalesced_batch_is_a_duplicate(store: Arc<dyn Store>) {
    let first = AppendBuilder::new("ledger", "t1")
        .events([
            keyed_event("accounts", "a", "1"),
            keyed_event("accounts", "b", "2"),
        ])
        .batch();
    let mut changed = first.clone();
    changed.events[1].payload = b"other".to_vec();
    let results = store
        .append(&[first.clone(), first.clone(), changed])
        .await
        .unwrap();
    let original = results[0].as_ref().unwrap();
    assert!(!original.duplicate);
    let retry = results[1].as_ref().unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.event_ids, original.event_ids);
    assert!(matches!(
        results[2],
        Err(AppendRejection::ConflictingRetry { .. })
    ));
    let stored = store.status_changes("ledger", 0, 100).await.unwrap();
    assert_eq!(stored.len(), 2, "stored once");
}

/// Two writers racing: the same append (one stores it, the other gets the
/// same ids back as a duplicate), and one caller-chosen event id in two
/// transactions (one wins, the other is told which field is at fault).
async fn racing_writers_store_once(store: Arc<dyn Store>) {
    for round in 0..30 {
        let same = AppendBuilder::new("ledger", &format!("race-{round}"))
            .events([
                keyed_event("accounts", "a", "1"),
                keyed_event("accounts", "b", "2"),
            ])
            .batch();
        let (first, second) = tokio::join!(
            store.append(std::slice::from_ref(&same)),
            store.append(std::slice::from_ref(&same))
        );
        let first = first.unwrap().remove(0).unwrap();
        let second = second.unwrap().remove(0).unwrap();
        assert_eq!(first.event_ids, second.event_ids, "round {round}");
        assert!(
            first.duplicate != second.duplicate,
            "round {round}: exactly one stored it"
        );

        let id = EventId::generate();
        let mine = EventBuilder::keyed("accounts", "c")
            .payload("3")
            .id(id)
            .build();
        let left = AppendBuilder::new("ledger", &format!("left-{round}"))
            .events([keyed_event("accounts", "d", "4"), mine.clone()])
            .batch();
        let right = AppendBuilder::new("ledger", &format!("right-{round}"))
            .event(mine)
            .batch();
        let (left, right) = tokio::join!(
            store.append(std::slice::from_ref(&left)),
            store.append(std::slice::from_ref(&right))
        );
        let outcomes = [left.unwrap().remove(0), right.unwrap().remove(0)];
        assert_eq!(
            outcomes.iter().filter(|o| o.is_ok()).count(),
            1,
            "round {round}: one wins"
        );
        for outcome in &outcomes {
            if let Err(rejection) = outcome {
                assert!(
                    matches!(rejection, AppendRejection::EventIdTaken(v) if v.field.ends_with("event_id"))
                );
            }
        }
    }
}

async fn a_transaction_keeps_its_mode(store: Arc<dyn Store>) {
    store
        .append(&[AppendBuilder::new("ledger", "t1")
            .event(keyed_event("accounts", "a", "1"))
            .batch()])
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap();
    let two_phase = AppendBuilder::new("ledger", "t1")
        .sequence(1)
        .two_phase(Duration::from_secs(30))
        .event(keyed_event("accounts", "a", "2"))
        .batch();
    let result = store.append(&[two_phase]).await.unwrap().remove(0);
    assert!(
        matches!(result, Err(AppendRejection::ModeMismatch { .. })),
        "{result:?}"
    );
}

async fn relay_reads_each_shard_in_append_order(store: Arc<dyn Store>) {
    let mut appended = Vec::new();
    for n in 0..20 {
        let events = (0..5).map(|k| keyed_event("accounts", &format!("key-{k}"), n.to_string()));
        let outcome = store
            .append(&[AppendBuilder::new("ledger", &format!("t{n}"))
                .events(events)
                .batch()])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        appended.extend(outcome.event_ids);
    }
    let rows = relay_rows(&store, 100).await;
    assert_eq!(rows.len(), 100);
    for shard in 0..SHARDS {
        let shard_rows: Vec<&RelayRow> = rows
            .iter()
            .filter(|r| {
                outboxd::domain::shard_of(r.kafka_key.as_deref(), r.event_id, SHARDS) == shard
            })
            .collect();
        let order: Vec<usize> = shard_rows
            .iter()
            .map(|r| appended.iter().position(|id| *id == r.event_id).unwrap())
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "shard {shard} reads in append order");
    }
    // Paging: after a cursor, only later rows.
    let shard = outboxd::domain::shard_of(Some(b"key-0"), appended[0], SHARDS);
    let all = store
        .read_relay_rows(shard, Default::default(), 1_000)
        .await
        .unwrap();
    let first_page = store
        .read_relay_rows(shard, Default::default(), 3)
        .await
        .unwrap();
    let rest = store
        .read_relay_rows(shard, first_page[2].cursor(), 1_000)
        .await
        .unwrap();
    let paged: Vec<EventId> = first_page.iter().chain(&rest).map(|r| r.event_id).collect();
    assert_eq!(paged, all.iter().map(|r| r.event_id).collect::<Vec<_>>());

    // Every shard read at the same moment, each twice from different
    // cursors (as a relay instance's shards do, which one statement may
    // serve): each read gets its own shard's rows after its own cursor.
    let mut expected = Vec::new();
    for shard in 0..SHARDS {
        let all = store
            .read_relay_rows(shard, Default::default(), 1_000)
            .await
            .unwrap();
        let cursor = all.get(2).map(RelayRow::cursor).unwrap_or_default();
        let rest = store.read_relay_rows(shard, cursor, 1_000).await.unwrap();
        expected.push((shard, Default::default(), all));
        expected.push((shard, cursor, rest));
    }
    let reads = expected.iter().map(|(shard, cursor, _)| {
        let store = store.clone();
        let (shard, cursor) = (*shard, *cursor);
        async move { store.read_relay_rows(shard, cursor, 1_000).await.unwrap() }
    });
    let together = futures::future::join_all(reads).await;
    for ((shard, _, alone), together) in expected.iter().zip(together) {
        let ids = |rows: &[RelayRow]| rows.iter().map(|r| r.event_id).collect::<Vec<_>>();
        assert_eq!(ids(&together), ids(alone), "shard {shard}");
    }
}

/// Deliveries of every shard recorded at the same moment (as a relay
/// instance's shards do) each keep their own fence: a shard whose lease
/// moved on is refused and keeps its rows, the others are published.
async fn deliveries_of_many_shards_recorded_at_once_keep_their_own_fences(store: Arc<dyn Store>) {
    let events: Vec<_> = (0..40)
        .map(|n| keyed_event("accounts", &format!("key-{n}"), format!("{n}")))
        .collect();
    store
        .append(&[AppendBuilder::new("ledger", "t1").events(events).batch()])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let rows = relay_rows(&store, 40).await;
    let shard_of =
        |row: &RelayRow| outboxd::domain::shard_of(row.kafka_key.as_deref(), row.event_id, SHARDS);
    let ttl = Duration::from_secs(60);
    let leases = store
        .acquire_leases("instance-a", ttl, SHARDS)
        .await
        .unwrap();
    assert_eq!(leases.len(), SHARDS as usize);
    // Shard 0 goes to instance-b.
    let others: Vec<u32> = (1..SHARDS).collect();
    store
        .release_leases_except("instance-a", &others)
        .await
        .unwrap();
    let taken = store.acquire_leases("instance-b", ttl, 1).await.unwrap();
    assert_eq!(taken.iter().map(|l| l.shard).collect::<Vec<_>>(), [0]);

    let records = leases.iter().map(|lease| {
        let store = store.clone();
        let delivered: Vec<Delivered> = rows
            .iter()
            .filter(|row| shard_of(row) == lease.shard)
            .enumerate()
            .map(|(offset, row)| Delivered {
                seq: row.seq,
                partition: 0,
                offset: offset as i64,
            })
            .collect();
        let lease = lease.clone();
        async move {
            let outcome = store.record_delivered(&lease, &delivered).await;
            (lease.shard, delivered.len(), outcome)
        }
    });
    for (shard, count, outcome) in futures::future::join_all(records).await {
        match (shard, outcome) {
            (0, Err(StoreError::LeaseLost { shard: lost, .. })) => assert_eq!(lost, 0),
            (0, other) => panic!("shard 0's old owner recorded deliveries: {other:?}"),
            (_, Ok(statuses)) => {
                assert_eq!(statuses.len(), count, "shard {shard}");
                assert!(
                    statuses.iter().all(|s| s.state == EventState::Published),
                    "shard {shard}: {statuses:?}"
                );
            }
            (_, Err(error)) => panic!("shard {shard} was refused: {error}"),
        }
    }
    let left = store
        .read_relay_rows(0, Default::default(), 1_000)
        .await
        .unwrap();
    assert_eq!(
        left.len(),
        rows.iter().filter(|row| shard_of(row) == 0).count(),
        "shard 0 keeps its rows for its new owner"
    );
    for shard in 1..SHARDS {
        assert!(
            store
                .read_relay_rows(shard, Default::default(), 1_000)
                .await
                .unwrap()
                .is_empty(),
            "shard {shard} has nothing left"
        );
    }
}

async fn relay_writes_are_fenced_by_the_lease_epoch(store: Arc<dyn Store>) {
    let outcome = store
        .append(&[AppendBuilder::new("ledger", "t1")
            .event(keyed_event("accounts", "a", "1"))
            .batch()])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let row = relay_rows(&store, 1).await.remove(0);
    let shard = outboxd::domain::shard_of(row.kafka_key.as_deref(), row.event_id, SHARDS);

    let ttl = Duration::from_secs(60);
    let old = store
        .acquire_leases("instance-a", ttl, SHARDS)
        .await
        .unwrap();
    assert_eq!(old.len(), SHARDS as usize);
    assert!(
        store
            .acquire_leases("instance-b", ttl, SHARDS)
            .await
            .unwrap()
            .is_empty(),
        "a held lease is not taken"
    );
    let renewed = store
        .acquire_leases("instance-a", ttl, SHARDS)
        .await
        .unwrap();
    let by_shard = |leases: &[outboxd::store::Lease]| {
        leases
            .iter()
            .map(|l| (l.shard, l.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (old_by_shard, renewed_by_shard) = (by_shard(&old), by_shard(&renewed));
    assert_eq!(
        renewed.len(),
        SHARDS as usize,
        "a renewal returns every lease the owner holds, once each: {renewed:?}"
    );
    assert_eq!(
        renewed_by_shard.keys().collect::<Vec<_>>(),
        old_by_shard.keys().collect::<Vec<_>>(),
        "the renewed leases are the shards held before"
    );
    for (shard, lease) in &renewed_by_shard {
        let before = &old_by_shard[shard];
        assert_eq!(lease.owner, "instance-a", "shard {shard} keeps its owner");
        assert_eq!(
            lease.epoch, before.epoch,
            "renewal keeps the epoch of shard {shard}"
        );
        assert!(
            lease.expires_at >= before.expires_at,
            "renewal does not shorten the lease of shard {shard}"
        );
    }
    let old_lease = old.iter().find(|l| l.shard == shard).unwrap().clone();

    // instance-a pauses; its lease goes to instance-b.
    store.release_leases("instance-a").await.unwrap();
    let new = store
        .acquire_leases("instance-b", ttl, SHARDS)
        .await
        .unwrap();
    let new_lease = new.iter().find(|l| l.shard == shard).unwrap().clone();
    assert!(
        new_lease.epoch > old_lease.epoch,
        "a new owner gets a new epoch"
    );

    let delivered = [Delivered {
        seq: row.seq,
        partition: 2,
        offset: 41,
    }];
    match store.record_delivered(&old_lease, &delivered).await {
        Err(StoreError::LeaseLost { shard: lost, .. }) => assert_eq!(lost, shard),
        other => panic!("a zombie's write must be refused, got {other:?}"),
    }
    let failed = [DeliveryFailed {
        seq: row.seq,
        error: "zombie".into(),
        retry_at: None,
    }];
    assert!(matches!(
        store.record_failed(&old_lease, &failed).await,
        Err(StoreError::LeaseLost { .. })
    ));
    let status = store
        .status_by_ids(&outcome.event_ids)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        status.state,
        EventState::Ready,
        "the zombie changed nothing"
    );

    let published = store
        .record_delivered(&new_lease, &delivered)
        .await
        .unwrap();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].state, EventState::Published);
    assert_eq!(
        (published[0].partition, published[0].offset),
        (Some(2), Some(41))
    );
    assert!(
        published[0].cursor > outcome.statuses[0].cursor,
        "the change feed moves on"
    );
    assert!(
        store
            .read_relay_rows(shard, Default::default(), 100)
            .await
            .unwrap()
            .is_empty(),
        "a published row leaves the relay's view"
    );
}

async fn failed_deliveries_retry_then_dead_letter(store: Arc<dyn Store>) {
    let outcome = store
        .append(&[AppendBuilder::new("ledger", "t1")
            .event(keyed_event("accounts", "a", "1"))
            .batch()])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let row = relay_rows(&store, 1).await.remove(0);
    let leases = store
        .acquire_leases("me", Duration::from_secs(60), SHARDS)
        .await
        .unwrap();
    let shard = outboxd::domain::shard_of(row.kafka_key.as_deref(), row.event_id, SHARDS);
    let lease = leases.iter().find(|l| l.shard == shard).unwrap();
    let retry_at = Utc::now() + chrono::Duration::seconds(30);
    let retrying = store
        .record_failed(
            lease,
            &[DeliveryFailed {
                seq: row.seq,
                error: "broker said no".into(),
                retry_at: Some(retry_at),
            }],
        )
        .await
        .unwrap()
        .remove(0);
    assert_eq!(retrying.state, EventState::Retrying);
    assert_eq!(retrying.attempts, 1);
    assert_eq!(retrying.reason, "broker said no");
    let again = store
        .read_relay_rows(shard, Default::default(), 10)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(again.state, EventState::Retrying);
    let due = again.next_attempt_at.unwrap();
    assert!(
        (due - retry_at).num_milliseconds().abs() < 5,
        "retry time kept: {due} vs {retry_at}"
    );

    let dead = store
        .record_failed(
            lease,
            &[DeliveryFailed {
                seq: row.seq,
                error: "record too large".into(),
                retry_at: None,
            }],
        )
        .await
        .unwrap()
        .remove(0);
    assert_eq!(dead.state, EventState::DeadLettered);
    assert_eq!(dead.attempts, 2);
    assert_eq!(
        store.status_by_ids(&outcome.event_ids).await.unwrap()[0].state,
        EventState::DeadLettered
    );
}

async fn retention_removes_finished_events_but_keeps_dead_letters(store: Arc<dyn Store>) {
    let ids = append_ids(
        &store,
        AppendBuilder::new("ledger", "t1")
            .events([
                keyed_event("accounts", "a", "1"),
                keyed_event("accounts", "b", "2"),
                keyed_event("accounts", "c", "3"),
            ])
            .batch(),
    )
    .await;
    let rows = relay_rows(&store, 3).await;
    let leases = store
        .acquire_leases("me", Duration::from_secs(60), SHARDS)
        .await
        .unwrap();
    let lease_of = |row: &RelayRow| {
        let shard = outboxd::domain::shard_of(row.kafka_key.as_deref(), row.event_id, SHARDS);
        leases.iter().find(|l| l.shard == shard).unwrap().clone()
    };
    let by_id = |id: EventId| rows.iter().find(|r| r.event_id == id).unwrap();
    let published = by_id(ids[0]);
    store
        .record_delivered(
            &lease_of(published),
            &[Delivered {
                seq: published.seq,
                partition: 0,
                offset: 0,
            }],
        )
        .await
        .unwrap();
    let dead = by_id(ids[1]);
    store
        .record_failed(
            &lease_of(dead),
            &[DeliveryFailed {
                seq: dead.seq,
                error: "x".into(),
                retry_at: None,
            }],
        )
        .await
        .unwrap();
    // Kept while younger than the retention.
    assert_eq!(
        store
            .purge_finished(Duration::from_secs(3600), 100)
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store
            .purge_finished(Duration::from_millis(1), 100)
            .await
            .unwrap(),
        1
    );
    let left: Vec<EventId> = store
        .status_by_ids(&ids)
        .await
        .unwrap()
        .iter()
        .map(|s| s.event_id)
        .collect();
    assert_eq!(
        left,
        vec![ids[1], ids[2]],
        "the dead letter and the unpublished event stay"
    );
}

async fn the_change_feed_resumes_after_a_cursor(store: Arc<dyn Store>) {
    let mut ids = Vec::new();
    for n in 0..3 {
        let outcome = store
            .append(&[AppendBuilder::new("ledger", &format!("t{n}"))
                .events([
                    keyed_event("accounts", "a", "x"),
                    keyed_event("accounts", "b", "y"),
                ])
                .batch()])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        ids.extend(outcome.event_ids);
    }
    let all = store.status_changes("ledger", 0, 100).await.unwrap();
    assert_eq!(all.iter().map(|s| s.event_id).collect::<Vec<_>>(), ids);
    assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
    let after = store
        .status_changes("ledger", all[3].cursor, 100)
        .await
        .unwrap();
    assert_eq!(
        after.iter().map(|s| s.event_id).collect::<Vec<_>>(),
        ids[4..]
    );
    let page = store.status_changes("ledger", 0, 2).await.unwrap();
    assert_eq!(page.len(), 2);
    assert!(
        store
            .status_changes("someone-else", 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_published_event_keeps_its_status_and_its_id(store: Arc<dyn Store>) {
    let id = EventId(uuid::Uuid::now_v7());
    let chosen = EventBuilder::keyed("accounts", "a")
        .payload("1")
        .id(id)
        .build();
    store
        .append(&[AppendBuilder::new("ledger", "t1")
            .event(chosen.clone())
            .batch()])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let row = relay_rows(&store, 1).await.remove(0);
    let shard = outboxd::domain::shard_of(row.kafka_key.as_deref(), row.event_id, SHARDS);
    let leases = store
        .acquire_leases("instance-a", Duration::from_secs(60), SHARDS)
        .await
        .unwrap();
    let lease = leases.iter().find(|l| l.shard == shard).unwrap();
    let delivered = [Delivered {
        seq: row.seq,
        partition: 3,
        offset: 7,
    }];
    let changed = store.record_delivered(lease, &delivered).await.unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].state, EventState::Published);

    let status = store.status_by_ids(&[id]).await.unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].state, EventState::Published);
    assert_eq!((status[0].partition, status[0].offset), (Some(3), Some(7)));
    assert_eq!(status[0].transaction_id, "t1");
    let feed = store.status_changes("ledger", 0, 100).await.unwrap();
    assert_eq!(
        feed.last().map(|s| (s.event_id, s.state)),
        Some((id, EventState::Published)),
        "the change feed ends with the publication"
    );
    assert!(
        store
            .read_relay_rows(shard, Default::default(), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The id stays taken: alone, and next to a good append in one batch.
    let results = store
        .append(&[
            AppendBuilder::new("ledger", "t2")
                .event(keyed_event("accounts", "b", "2"))
                .batch(),
            AppendBuilder::new("ledger", "t3")
                .event(chosen.clone())
                .batch(),
        ])
        .await
        .unwrap();
    assert!(results[0].is_ok(), "the good append is stored");
    match &results[1] {
        Err(AppendRejection::EventIdTaken(violation)) => {
            assert_eq!(violation.field, "events[0].event_id")
        }
        other => panic!("expected EventIdTaken, got {other:?}"),
    }
    match store
        .append(&[AppendBuilder::new("ledger", "t4").event(chosen).batch()])
        .await
        .unwrap()
        .remove(0)
    {
        Err(AppendRejection::EventIdTaken(_)) => {}
        other => panic!("expected EventIdTaken, got {other:?}"),
    }
    assert_eq!(relay_rows(&store, 1).await.len(), 1, "only t2 was stored");
}

/// A status's state and its cursor come from one moment. Read again and
/// again while deliveries are recorded one by one, no status may carry the
/// cursor of a change newer than its state: a watch would take that
/// change's own status for old news and wait for it for ever.
async fn a_status_never_carries_the_cursor_of_a_newer_change(store: Arc<dyn Store>) {
    const EVENTS: usize = 200;
    let ids = append_ids(
        &store,
        AppendBuilder::new("ledger", "t1")
            .events((0..EVENTS).map(|i| keyed_event("accounts", &format!("k{i}"), "x")))
            .batch(),
    )
    .await;
    let rows = relay_rows(&store, EVENTS).await;
    let leases = store
        .acquire_leases("instance-a", Duration::from_secs(60), SHARDS)
        .await
        .unwrap();
    let recorder = {
        let store = store.clone();
        tokio::spawn(async move {
            for (offset, row) in rows.iter().enumerate() {
                let shard =
                    outboxd::domain::shard_of(row.kafka_key.as_deref(), row.event_id, SHARDS);
                let lease = leases.iter().find(|l| l.shard == shard).unwrap();
                let delivered = Delivered {
                    seq: row.seq,
                    partition: 0,
                    offset: offset as i64,
                };
                store.record_delivered(lease, &[delivered]).await.unwrap();
            }
        })
    };
    // The state each (event, cursor) was shown with.
    let mut shown: std::collections::HashMap<(EventId, u64), EventState> = Default::default();
    let mut reads = 0;
    while !recorder.is_finished() || reads == 0 {
        for status in store.status_by_ids(&ids).await.unwrap() {
            let first = *shown
                .entry((status.event_id, status.cursor))
                .or_insert(status.state);
            assert_eq!(
                first, status.state,
                "{}: cursor {} was shown with {first:?}, now with {:?}",
                status.event_id, status.cursor, status.state
            );
        }
        reads += 1;
    }
    recorder.await.unwrap();
    let statuses = store.status_by_ids(&ids).await.unwrap();
    assert!(
        statuses.iter().all(|s| s.state == EventState::Published),
        "every event is published in the end"
    );
}

/// Retention never removes what is not final: while any event of an append
/// is unpublished or dead-lettered, a retry of that append is still a
/// duplicate with the same ids, and status by transaction still finds them.
async fn retention_keeps_what_a_retry_needs(store: Arc<dyn Store>) {
    let waiting = AppendBuilder::new("ledger", "outage")
        .events([
            keyed_event("accounts", "a", "1"),
            keyed_event("accounts", "b", "2"),
        ])
        .batch();
    let ids = store
        .append(std::slice::from_ref(&waiting))
        .await
        .unwrap()
        .remove(0)
        .unwrap()
        .event_ids;
    let rows = relay_rows(&store, 2).await;
    let leases = store
        .acquire_leases("me", Duration::from_secs(60), SHARDS)
        .await
        .unwrap();
    // One event is dead-lettered, the other stays READY (a long outage).
    let dead = rows.iter().find(|r| r.event_id == ids[1]).unwrap();
    let shard = outboxd::domain::shard_of(dead.kafka_key.as_deref(), dead.event_id, SHARDS);
    store
        .record_failed(
            leases.iter().find(|l| l.shard == shard).unwrap(),
            &[DeliveryFailed {
                seq: dead.seq,
                error: "refused".into(),
                retry_at: None,
            }],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    while store
        .purge_finished(Duration::from_millis(1), 100)
        .await
        .unwrap()
        > 0
    {}
    let retry = store
        .append(std::slice::from_ref(&waiting))
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(retry.duplicate, "the retry stored its events again");
    assert_eq!(retry.event_ids, ids);
    let found: Vec<EventId> = store
        .status_by_transactions(&[TransactionRef {
            producer: "ledger".into(),
            transaction_id: "outage".into(),
        }])
        .await
        .unwrap()
        .iter()
        .map(|s| s.event_id)
        .collect();
    assert_eq!(found, ids);
}

/// A writer whose visibility-gate slot cannot be removed does not freeze
/// the gate: its connection is closed, and a slot whose backend is gone no
/// longer counts. (PostgreSQL only: SQLite has no gate.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_failed_slot_release_does_not_freeze_the_gate() {
    use sqlx::Connection;
    let url = support::fresh_database().await;
    let store = outboxd::store::connect(&url, 4, SHARDS).await.unwrap();
    store.migrate().await.unwrap();
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_slot_release() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'slot release refused'; END $$; \
         CREATE TRIGGER refuse_slot_release BEFORE DELETE ON outbox_writer_slots \
             FOR EACH ROW EXECUTE FUNCTION refuse_slot_release();",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    // The append itself fails (its statement removes the slot too); what
    // matters is what its slot does to every later append.
    let _ = store
        .append(&[AppendBuilder::new("ledger", "refused")
            .event(keyed_event("accounts", "a", "1"))
            .batch()])
        .await;
    sqlx::raw_sql("DROP TRIGGER refuse_slot_release ON outbox_writer_slots")
        .execute(&mut admin)
        .await
        .unwrap();
    let ids = append_ids(
        &store,
        AppendBuilder::new("ledger", "after")
            .event(keyed_event("accounts", "b", "2"))
            .batch(),
    )
    .await;
    support::eventually(
        "the later append to pass the visibility gate",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            let id = ids[0];
            async move {
                for shard in 0..SHARDS {
                    let rows = store
                        .read_relay_rows(shard, Default::default(), 100)
                        .await
                        .unwrap();
                    if rows.iter().any(|r| r.event_id == id) {
                        return Some(());
                    }
                }
                None
            }
        },
    )
    .await;
}

/// Returns once a session of the database waits for a lock (or `done`).
async fn lock_wait(watcher: &sqlx::PgPool, what: &str, done: impl Fn() -> bool) {
    support::eventually(what, Duration::from_secs(10), || {
        let finished = done();
        let watcher = watcher.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&watcher)
            .await
            .unwrap();
            (finished || waiting > 0).then_some(())
        }
    })
    .await;
}

/// A caller-chosen event id cannot be stored twice, not even while its
/// first event is being published by a concurrent delivery record that
/// holds its segment. (PostgreSQL only: SQLite has one writer at a time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_event_id_being_published_cannot_be_taken_again() {
    use sqlx::Connection;
    let url = support::fresh_database().await;
    let store = outboxd::store::connect(&url, 4, SHARDS).await.unwrap();
    store.migrate().await.unwrap();
    let id = EventId::generate();
    let chosen = EventBuilder::keyed("accounts", "a")
        .payload("first")
        .id(id)
        .build();
    store
        .append(&[AppendBuilder::new("ledger", "first")
            .event(chosen.clone())
            .batch()])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    // A delivery record publishing it, not yet committed.
    let mut mover = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut mover).await.unwrap();
    sqlx::query(
        "UPDATE outbox_segments SET states = '\\x04', final = true, updated_at = now() \
         WHERE number = (SELECT segment FROM outbox_caller_ids WHERE event_id = $1)",
    )
    .bind(id.0)
    .execute(&mut mover)
    .await
    .unwrap();
    let again = tokio::spawn({
        let store = store.clone();
        let reused = EventBuilder::keyed("accounts", "b")
            .payload("second")
            .id(id)
            .build();
        async move {
            store
                .append(&[AppendBuilder::new("ledger", "second").event(reused).batch()])
                .await
        }
    });
    // Commit the move once the append waits for it (or has finished).
    let watcher = sqlx::PgPool::connect(&url).await.unwrap();
    lock_wait(&watcher, "the append to wait for the move", || {
        again.is_finished()
    })
    .await;
    sqlx::raw_sql("COMMIT").execute(&mut mover).await.unwrap();
    match again.await.unwrap().unwrap().remove(0) {
        Err(AppendRejection::EventIdTaken(violation)) => {
            assert_eq!(violation.field, "events[0].event_id")
        }
        other => panic!("the id was taken twice: {other:?}"),
    }
}

/// A delivery record never undoes a change another writer made to the same
/// segment between the record's read and its write: the segment is read
/// and decided again. (PostgreSQL only: SQLite has one writer at a time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_delivery_record_keeps_a_concurrent_change_of_its_segment() {
    use sqlx::Connection;
    let url = support::fresh_database().await;
    let store = outboxd::store::connect(&url, 4, SHARDS).await.unwrap();
    store.migrate().await.unwrap();
    store
        .append(&[AppendBuilder::new("ledger", "t1")
            .events(vec![
                keyed_event("accounts", "a", "first"),
                keyed_event("accounts", "a", "second"),
            ])
            .batch()])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let rows = relay_rows(&store, 2).await;
    let shard = outboxd::domain::shard_of(rows[0].kafka_key.as_deref(), rows[0].event_id, SHARDS);
    let lease = store
        .acquire_leases("instance-a", Duration::from_secs(60), SHARDS)
        .await
        .unwrap()
        .into_iter()
        .find(|lease| lease.shard == shard)
        .unwrap();
    // Another writer holds the segment while the record of the first
    // event's delivery comes.
    let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut other).await.unwrap();
    let number: i64 = sqlx::query_scalar("SELECT number FROM outbox_segments FOR UPDATE")
        .fetch_one(&mut other)
        .await
        .unwrap();
    let record = tokio::spawn({
        let store = store.clone();
        let delivered = vec![Delivered {
            seq: rows[0].seq,
            partition: 3,
            offset: 7,
        }];
        async move { store.record_delivered(&lease, &delivered).await }
    });
    let watcher = sqlx::PgPool::connect(&url).await.unwrap();
    lock_wait(&watcher, "the record to wait for the other writer", || {
        false
    })
    .await;
    // The other writer dead-letters the second event, then lets go.
    sqlx::query("UPDATE outbox_segments SET states = set_byte(states, 1, $2) WHERE number = $1")
        .bind(number)
        .bind(EventState::DeadLettered as i32)
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
    let statuses = record.await.unwrap().unwrap();
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(statuses[0].event_id, rows[0].event_id);
    assert_eq!(statuses[0].state, EventState::Published);
    assert_eq!(
        (statuses[0].partition, statuses[0].offset),
        (Some(3), Some(7))
    );
    let states: Vec<u8> =
        sqlx::query_scalar("SELECT states FROM outbox_segments WHERE number = $1")
            .bind(number)
            .fetch_one(&watcher)
            .await
            .unwrap();
    assert_eq!(
        states,
        [EventState::Published as u8, EventState::DeadLettered as u8],
        "the record kept its own change and the other writer's"
    );
}

/// The change feed never passes a change while an older outboxd
/// transaction that may still add one before it is running, also while a
/// newer outboxd transaction runs whose xid no completed transaction has
/// passed yet (at or above the snapshot's xmax). (PostgreSQL only: SQLite
/// commits one writer at a time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_change_feed_waits_for_an_older_running_writer_behind_a_newer_one() {
    use sqlx::ConnectOptions;
    let url = support::fresh_database().await;
    let store = outboxd::store::connect(&url, 4, SHARDS).await.unwrap();
    store.migrate().await.unwrap();
    let append = |transaction: &'static str| {
        let store = store.clone();
        async move {
            store
                .append(&[AppendBuilder::new("ledger", transaction)
                    .event(keyed_event("accounts", "a", transaction))
                    .batch()])
                .await
                .unwrap()
                .remove(0)
                .unwrap()
                .event_ids[0]
        }
    };
    let first = append("first").await;
    let outboxd_connection = || async {
        url.parse::<sqlx::postgres::PgConnectOptions>()
            .unwrap()
            .application_name("outboxd")
            .connect()
            .await
            .unwrap()
    };
    // An older writer changes the first event and is still running.
    let mut older = outboxd_connection().await;
    sqlx::raw_sql("BEGIN").execute(&mut older).await.unwrap();
    sqlx::query(
        "INSERT INTO outbox_changes (producer, segments) \
         SELECT producer, segments FROM outbox_changes WHERE producer = 'ledger' \
         ORDER BY change_seq LIMIT 1",
    )
    .execute(&mut older)
    .await
    .unwrap();
    // A later change commits.
    let second = append("second").await;
    // Two newer writers take xids and are still running: the newest is
    // above the snapshot's xmax, one past the latest completed xid.
    let mut newer = outboxd_connection().await;
    let mut newest = outboxd_connection().await;
    for writer in [&mut newer, &mut newest] {
        sqlx::raw_sql("BEGIN; SELECT pg_current_xact_id()")
            .execute(writer)
            .await
            .unwrap();
    }

    let changes = store.status_changes("ledger", 0, 100).await.unwrap();
    assert!(
        changes.iter().all(|change| change.event_id != second),
        "the feed passed the second append's change while an older writer ran: {changes:?}"
    );
    let cursor = changes
        .iter()
        .map(|change| change.cursor)
        .max()
        .unwrap_or(0);
    sqlx::raw_sql("COMMIT").execute(&mut older).await.unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut newer).await.unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut newest).await.unwrap();
    // Resumed from where it stood, the feed has both changes.
    let later: Vec<EventId> = store
        .status_changes("ledger", cursor, 100)
        .await
        .unwrap()
        .iter()
        .map(|change| change.event_id)
        .collect();
    assert!(
        later.contains(&first) && later.contains(&second),
        "resumed after {cursor}: {later:?}"
    );
}

macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::postgres_store().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::sqlite_store().await).await;
                }
            )*
        }
    };
}

store_suite!(
    append_is_atomic_and_idempotent,
    one_bad_append_fails_only_itself,
    a_retry_within_one_coalesced_batch_is_a_duplicate,
    racing_writers_store_once,
    a_transaction_keeps_its_mode,
    relay_reads_each_shard_in_append_order,
    relay_writes_are_fenced_by_the_lease_epoch,
    deliveries_of_many_shards_recorded_at_once_keep_their_own_fences,
    failed_deliveries_retry_then_dead_letter,
    retention_removes_finished_events_but_keeps_dead_letters,
    the_change_feed_resumes_after_a_cursor,
    a_published_event_keeps_its_status_and_its_id,
    retention_keeps_what_a_retry_needs,
    a_status_never_carries_the_cursor_of_a_newer_change,
);
