//! Transaction tokens end to end: events reach Kafka if and only if the
//! caller's transaction committed, in append order per key. Real PostgreSQL
//! (the caller's transactions run on a database of the harness cluster), a
//! real broker, and an independent consumer.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outboxd::proto;
use outboxd::proto::outbox_admin_client::OutboxAdminClient;
use outboxd::proto::outbox_client::OutboxClient;
use sqlx::{Connection, PgConnection};
use support::{
    AppendBuilder, CallerTransaction, Gateway, Tansu, consume_until, first_sightings_by_key,
    immediate_token, keyed_event, postgres_xid_token, two_phase_token,
};
use tonic::Code;
use tonic::transport::Channel;

async fn append(
    client: &mut OutboxClient<Channel>,
    token: Option<proto::TransactionToken>,
    sequence: u64,
    events: Vec<proto::Event>,
) -> Result<proto::AppendResponse, tonic::Status> {
    client
        .append(
            AppendBuilder::with_token(token)
                .sequence(sequence)
                .events(events)
                .build(),
        )
        .await
        .map(|r| r.into_inner())
}

async fn states(client: &mut OutboxClient<Channel>, ids: &[String]) -> Vec<(i32, String)> {
    let statuses = client
        .get_status(proto::GetStatusRequest {
            event_ids: ids.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let by_id: HashMap<String, (i32, String)> = statuses
        .into_iter()
        .map(|s| (s.event_id, (s.state, s.reason)))
        .collect();
    ids.iter().map(|id| by_id[id].clone()).collect()
}

/// Waits until every event of `ids` is in `state`.
async fn wait_for_state(client: &OutboxClient<Channel>, ids: &[String], state: proto::EventState) {
    support::eventually(
        &format!("{ids:?} to be {state:?}"),
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let ids = ids.to_vec();
            async move {
                let now = states(&mut client, &ids).await;
                now.iter().all(|(s, _)| *s == state as i32).then_some(())
            }
        },
    )
    .await;
}

/// Reads the topic and checks it holds exactly `expected`, nothing else.
async fn kafka_holds_exactly(
    bootstrap: &str,
    topic: &str,
    expected: &[String],
) -> Vec<support::Consumed> {
    let wanted: HashSet<String> = expected.iter().cloned().collect();
    let records = consume_until(
        bootstrap,
        topic,
        &wanted,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let found: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(found, wanted, "Kafka holds exactly the committed events");
    records
}

async fn two_phase_lifecycle(store_url: String) {
    let tansu = Tansu::shared();
    let topic = support::unique("two_phase");
    tansu.create_topic(&topic, 3).await;
    let gateway = Gateway::start(support::test_config(&store_url, &tansu.bootstrap)).await;
    let mut client = gateway.client().await;
    let mut admin = OutboxAdminClient::new(gateway.channel().await);
    let p = "checkout";
    let long = Duration::from_secs(600);
    let ids = |r: proto::AppendResponse| r.event_ids;

    // Commit: PENDING until committed, then published.
    let committed = ids(append(
        &mut client,
        two_phase_token(p, "commit", long),
        0,
        vec![
            keyed_event(&topic, "o1", "a"),
            keyed_event(&topic, "o2", "b"),
        ],
    )
    .await
    .unwrap());
    assert!(
        states(&mut client, &committed)
            .await
            .iter()
            .all(|(s, _)| *s == proto::EventState::Pending as i32)
    );
    let commit = |t: &str| proto::CommitRequest {
        producer: p.into(),
        transaction_id: t.into(),
    };
    let abort = |t: &str| proto::AbortRequest {
        producer: p.into(),
        transaction_id: t.into(),
    };
    assert_eq!(
        client
            .commit(commit("commit"))
            .await
            .unwrap()
            .into_inner()
            .events,
        2
    );
    wait_for_state(&client, &committed, proto::EventState::Published).await;
    // Double commit: idempotent.
    assert_eq!(
        client
            .commit(commit("commit"))
            .await
            .unwrap()
            .into_inner()
            .events,
        2
    );
    // Abort after commit: refused.
    assert_eq!(
        client.abort(abort("commit")).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // A retry of the committed append is still a duplicate, not an error…
    let retry = append(
        &mut client,
        two_phase_token(p, "commit", long),
        0,
        vec![
            keyed_event(&topic, "o1", "a"),
            keyed_event(&topic, "o2", "b"),
        ],
    )
    .await
    .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.event_ids, committed);
    // …but a new append to the resolved transaction is refused.
    let late = append(
        &mut client,
        two_phase_token(p, "commit", long),
        1,
        vec![keyed_event(&topic, "o1", "late")],
    )
    .await
    .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");

    // Abort: discarded, idempotent; commit after abort refused.
    let aborted = ids(append(
        &mut client,
        two_phase_token(p, "abort", long),
        0,
        vec![keyed_event(&topic, "o3", "c")],
    )
    .await
    .unwrap());
    assert_eq!(
        client
            .abort(abort("abort"))
            .await
            .unwrap()
            .into_inner()
            .events,
        1
    );
    assert_eq!(
        client
            .abort(abort("abort"))
            .await
            .unwrap()
            .into_inner()
            .events,
        1
    );
    assert_eq!(
        states(&mut client, &aborted).await[0].0,
        proto::EventState::Discarded as i32
    );
    let refused = client.commit(commit("abort")).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("aborted"),
        "{}",
        refused.message()
    );

    // Expiry: discarded by the timeout; a late commit is refused.
    let expired = ids(append(
        &mut client,
        two_phase_token(p, "expire", Duration::from_millis(300)),
        0,
        vec![keyed_event(&topic, "o4", "d")],
    )
    .await
    .unwrap());
    wait_for_state(&client, &expired, proto::EventState::Discarded).await;
    assert!(states(&mut client, &expired).await[0].1.contains("expired"));
    let too_late = client.commit(commit("expire")).await.unwrap_err();
    assert_eq!(too_late.code(), Code::FailedPrecondition);
    assert!(
        too_late.message().contains("expired"),
        "{}",
        too_late.message()
    );

    // Several appends join one transaction; one commit publishes them in order.
    let mut multi = Vec::new();
    for sequence in 0..3u64 {
        multi.extend(ids(append(
            &mut client,
            two_phase_token(p, "multi", long),
            sequence,
            vec![keyed_event(&topic, "o5", format!("m{sequence}"))],
        )
        .await
        .unwrap()));
    }
    assert_eq!(
        client
            .commit(commit("multi"))
            .await
            .unwrap()
            .into_inner()
            .events,
        3
    );

    // A pending event holds back later events of its key.
    let first = ids(append(
        &mut client,
        two_phase_token(p, "held-first", long),
        0,
        vec![keyed_event(&topic, "o6", "first")],
    )
    .await
    .unwrap());
    let second = ids(append(
        &mut client,
        two_phase_token(p, "held-second", long),
        0,
        vec![keyed_event(&topic, "o6", "second")],
    )
    .await
    .unwrap());
    client.commit(commit("held-second")).await.unwrap();
    // The second is committed but must wait behind the first.
    wait_for_state(&client, &second, proto::EventState::Ready).await;
    client.commit(commit("held-first")).await.unwrap();

    // ListPrepared: exactly the open transactions, for recovery after a crash.
    ids(append(
        &mut client,
        two_phase_token(p, "open-a", long),
        0,
        vec![keyed_event(&topic, "o7", "x")],
    )
    .await
    .unwrap());
    ids(append(
        &mut client,
        two_phase_token(p, "open-b", long),
        0,
        vec![keyed_event(&topic, "o8", "y")],
    )
    .await
    .unwrap());
    let prepared = admin
        .list_prepared(proto::ListPreparedRequest {
            producer: p.into(),
            older_than: None,
        })
        .await
        .unwrap()
        .into_inner()
        .transactions;
    let open: Vec<&str> = prepared.iter().map(|t| t.transaction_id.as_str()).collect();
    assert_eq!(open, vec!["open-a", "open-b"]);
    assert!(prepared.iter().all(|t| t.events == 1));
    let none_that_old = admin
        .list_prepared(proto::ListPreparedRequest {
            producer: p.into(),
            older_than: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none_that_old.transactions.is_empty());

    // Errors: unknown transaction, wrong mode, missing field.
    assert_eq!(
        client.commit(commit("nope")).await.unwrap_err().code(),
        Code::NotFound
    );
    let immediate = immediate_token(p, "imm");
    let immediate_ids = ids(append(
        &mut client,
        immediate,
        0,
        vec![keyed_event(&topic, "o9", "i")],
    )
    .await
    .unwrap());
    assert_eq!(
        client.commit(commit("imm")).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        client.commit(commit("")).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let published: Vec<String> = committed
        .iter()
        .chain(&multi)
        .chain(&first)
        .chain(&second)
        .chain(&immediate_ids)
        .cloned()
        .collect();
    let records = kafka_holds_exactly(&tansu.bootstrap, &topic, &published).await;
    let order = first_sightings_by_key(&records);
    assert_eq!(
        order[&b"o5".to_vec()],
        multi,
        "a transaction's appends keep their order"
    );
    assert_eq!(
        order[&b"o6".to_vec()],
        vec![first[0].clone(), second[0].clone()],
        "append order across transactions"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_tokens_publish_exactly_what_was_committed_postgres() {
    two_phase_lifecycle(support::fresh_database().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_tokens_publish_exactly_what_was_committed_sqlite() {
    two_phase_lifecycle(support::sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_xid_tokens_follow_the_callers_transactions() {
    let tansu = Tansu::shared();
    let topic = support::unique("xid");
    tansu.create_topic(&topic, 3).await;
    let store_url = support::fresh_database().await;
    // The caller's own database, on the same cluster as the store.
    let caller_url = support::fresh_database().await;
    let gateway = Gateway::start(support::test_config(&store_url, &tansu.bootstrap)).await;
    let mut client = gateway.client().await;
    let p = "inventory";

    let committing = CallerTransaction::begin(&caller_url).await;
    let rolling_back = CallerTransaction::begin(&caller_url).await;
    let killed = CallerTransaction::begin(&caller_url).await;
    let open = CallerTransaction::begin(&caller_url).await;
    let append_for = |caller: &CallerTransaction, name: &str, key: &str| {
        let mut client = client.clone();
        let token = caller.token(p, name);
        let events = vec![
            keyed_event(&topic, key, name),
            keyed_event(&topic, key, format!("{name}-2")),
        ];
        async move {
            append(&mut client, token, 0, events)
                .await
                .unwrap()
                .event_ids
        }
    };
    let committed_ids = append_for(&committing, "commits", "k1").await;
    let rolled_back_ids = append_for(&rolling_back, "rolls-back", "k2").await;
    let killed_ids = append_for(&killed, "killed", "k3").await;
    let open_ids = append_for(&open, "stays-open", "k4").await;
    assert!(
        states(&mut client, &committed_ids)
            .await
            .iter()
            .all(|(s, _)| *s == proto::EventState::Pending as i32)
    );

    committing.commit().await;
    rolling_back.rollback().await;
    let mut admin_connection = PgConnection::connect(&caller_url).await.unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(killed.pid)
        .fetch_one(&mut admin_connection)
        .await
        .unwrap();
    assert!(terminated);

    wait_for_state(&client, &committed_ids, proto::EventState::Published).await;
    wait_for_state(&client, &rolled_back_ids, proto::EventState::Discarded).await;
    wait_for_state(&client, &killed_ids, proto::EventState::Discarded).await;
    // Several resolver and relay cycles later, the open one is still pending.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        states(&mut client, &open_ids)
            .await
            .iter()
            .all(|(s, _)| *s == proto::EventState::Pending as i32)
    );
    kafka_holds_exactly(&tansu.bootstrap, &topic, &committed_ids).await;
    open.rollback().await;
    wait_for_state(&client, &open_ids, proto::EventState::Discarded).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_later_transaction_of_a_key_waits_for_an_earlier_one() {
    let tansu = Tansu::shared();
    let topic = support::unique("xid_order");
    tansu.create_topic(&topic, 2).await;
    let store_url = support::fresh_database().await;
    let caller_url = support::fresh_database().await;
    let gateway = Gateway::start(support::test_config(&store_url, &tansu.bootstrap)).await;
    let mut client = gateway.client().await;

    let earlier = CallerTransaction::begin(&caller_url).await;
    let first = append(
        &mut client,
        earlier.token("stock", "earlier"),
        0,
        vec![keyed_event(&topic, "sku-1", "first")],
    )
    .await
    .unwrap()
    .event_ids;
    let later = CallerTransaction::begin(&caller_url).await;
    let second = append(
        &mut client,
        later.token("stock", "later"),
        0,
        vec![keyed_event(&topic, "sku-1", "second")],
    )
    .await
    .unwrap()
    .event_ids;
    // The later transaction commits first; its event must still wait.
    later.commit().await;
    wait_for_state(&client, &second, proto::EventState::Ready).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        states(&mut client, &second).await[0].0,
        proto::EventState::Ready as i32,
        "held behind the pending one"
    );
    earlier.commit().await;
    let expected: Vec<String> = first.iter().chain(&second).cloned().collect();
    let records = kafka_holds_exactly(&tansu.bootstrap, &topic, &expected).await;
    assert_eq!(
        first_sightings_by_key(&records)[&b"sku-1".to_vec()],
        expected
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_or_unknowable_xid_never_publishes() {
    let tansu = Tansu::shared();
    let topic = support::unique("xid_foreign");
    tansu.create_topic(&topic, 1).await;
    let store_url = support::fresh_database().await;
    let caller_url = support::fresh_database().await;
    let gateway = Gateway::start(support::test_config(&store_url, &tansu.bootstrap)).await;
    let mut client = gateway.client().await;

    // A committed transaction, but the token names another cluster.
    let caller = CallerTransaction::begin(&caller_url).await;
    let mut token = caller.token("audit", "foreign");
    token.as_mut().unwrap().postgres_system_id = caller.system_id.wrapping_add(1);
    let foreign = append(
        &mut client,
        token,
        0,
        vec![keyed_event(&topic, "a", "foreign")],
    )
    .await
    .unwrap()
    .event_ids;
    caller.commit().await;
    support::eventually(
        "the mismatch to show in the status",
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let foreign = foreign.clone();
            async move {
                let (state, reason) = states(&mut client, &foreign).await.remove(0);
                (state == proto::EventState::Pending as i32
                    && reason.contains("system identifier mismatch"))
                .then_some(())
            }
        },
    )
    .await;

    // An xid too old to resolve (the frozen xid 3): dead-lettered, with why.
    let frozen = postgres_xid_token("audit", "ancient", 3, caller_system_id(&caller_url).await);
    let ancient = append(
        &mut client,
        frozen,
        0,
        vec![keyed_event(&topic, "b", "ancient")],
    )
    .await
    .unwrap()
    .event_ids;
    wait_for_state(&client, &ancient, proto::EventState::DeadLettered).await;
    assert!(states(&mut client, &ancient).await[0].1.contains("too old"));

    // A control event proves the relay ran past both.
    let control = append(
        &mut client,
        immediate_token("audit", "control"),
        0,
        vec![keyed_event(&topic, "c", "control")],
    )
    .await
    .unwrap()
    .event_ids;
    kafka_holds_exactly(&tansu.bootstrap, &topic, &control).await;
    assert_eq!(
        states(&mut client, &foreign).await[0].0,
        proto::EventState::Pending as i32
    );
    gateway.stop().await;
}

async fn caller_system_id(url: &str) -> u64 {
    let mut connection = PgConnection::connect(url).await.unwrap();
    let id: i64 = sqlx::query_scalar("SELECT system_identifier FROM pg_control_system()")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    id as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_xid_needs_a_cluster_to_resolve_against() {
    let kafka = support::MockKafka::start(1);
    let gateway = Gateway::start(support::test_config(
        &support::sqlite_url(),
        &kafka.bootstrap,
    ))
    .await;
    let mut client = gateway.client().await;
    let token = postgres_xid_token("nowhere", "t", 1000, 42);
    let status = append(&mut client, token, 0, vec![keyed_event("t", "k", "x")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("postgres_xid_clusters"),
        "{}",
        status.message()
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_xid_resolves_against_the_cluster_configured_for_the_producer() {
    let tansu = Tansu::shared();
    let topic = support::unique("xid_configured");
    tansu.create_topic(&topic, 2).await;
    // The store is embedded; the producer's own database is elsewhere.
    let caller_url = support::fresh_database().await;
    let mut config = support::test_config(&support::sqlite_url(), &tansu.bootstrap);
    config
        .tokens
        .postgres_xid_clusters
        .insert("billing".into(), caller_url.clone());
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;

    let committing = CallerTransaction::begin(&caller_url).await;
    let committed = append(
        &mut client,
        committing.token("billing", "paid"),
        0,
        vec![keyed_event(&topic, "inv-1", "paid")],
    )
    .await
    .unwrap()
    .event_ids;
    let rolling_back = CallerTransaction::begin(&caller_url).await;
    let rolled_back = append(
        &mut client,
        rolling_back.token("billing", "void"),
        0,
        vec![keyed_event(&topic, "inv-2", "void")],
    )
    .await
    .unwrap()
    .event_ids;
    committing.commit().await;
    rolling_back.rollback().await;
    wait_for_state(&client, &committed, proto::EventState::Published).await;
    wait_for_state(&client, &rolled_back, proto::EventState::Discarded).await;
    kafka_holds_exactly(&tansu.bootstrap, &topic, &committed).await;

    // A producer with no configured cluster cannot use postgres_xid here.
    let stranger = CallerTransaction::begin(&caller_url).await;
    let refused = append(
        &mut client,
        stranger.token("shipping", "t"),
        0,
        vec![keyed_event(&topic, "x", "x")],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    stranger.rollback().await;
    gateway.stop().await;
}

/// A caller's transaction that is still running and newer than every
/// completed one is in progress: it waits, and is never taken for a token of
/// another cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_transaction_newer_than_every_completed_one_is_in_progress() {
    use outboxd::store::xid::{XactStatus, XidSource};
    let caller_url = support::fresh_database().await;
    let source = XidSource::connect_lazy(&caller_url).unwrap();
    // Connected first, so that asking starts no transaction of its own
    // between the caller's and the question.
    source.system_identifier().await.unwrap();
    let caller = CallerTransaction::begin(&caller_url).await;
    let xid = caller.xid;
    assert_eq!(
        source.statuses(&[xid]).await.unwrap(),
        vec![(xid, XactStatus::InProgress)]
    );
    caller.commit().await;
    assert_eq!(
        source.statuses(&[xid]).await.unwrap(),
        vec![(xid, XactStatus::Committed)]
    );
}
