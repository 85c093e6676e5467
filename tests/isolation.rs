//! Isolation between callers: one caller's bad request or misconfigured
//! tokens never hurt another's, and memory has bounds.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use outboxd::proto;
use support::{Gateway, MockKafka, append_request, immediate_token, keyed_event};
use tonic::Code;
use tonic_types::StatusExt;

/// A text field holding a NUL character, which PostgreSQL's `text` cannot
/// store, fails only its own append: every valid append coalesced into the
/// same store transaction succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nul_character_fails_only_its_own_append() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("nul");
    kafka.create_topic(&topic, 1).await;
    let store_url = support::fresh_database().await;
    let gateway = Gateway::start(support::test_config(&store_url, &kafka.bootstrap)).await;
    let channel = gateway.channel().await;

    for field in ["aggregate_type", "aggregate_id", "event_type"] {
        // Every append is in flight at once, so that the writers coalesce
        // the bad one with valid ones.
        let start = Arc::new(tokio::sync::Barrier::new(41));
        let mut valid = Vec::new();
        for n in 0..40 {
            let mut client = proto::outbox_client::OutboxClient::new(channel.clone());
            let start = start.clone();
            let topic = topic.clone();
            valid.push(tokio::spawn(async move {
                let request = append_request(
                    immediate_token("isolation", &format!("{field}-valid-{n}")),
                    vec![keyed_event(&topic, &format!("k{n}"), b"valid")],
                );
                start.wait().await;
                client.append(request).await
            }));
        }
        let mut bad_event = keyed_event(&topic, "bad", b"bad");
        match field {
            "aggregate_type" => bad_event.aggregate_type = "ord\0er".into(),
            "aggregate_id" => bad_event.aggregate_id = "ord\0er-1".into(),
            _ => bad_event.event_type = "cre\0ated".into(),
        }
        let bad_transaction = format!("{field}-bad");
        let mut client = proto::outbox_client::OutboxClient::new(channel.clone());
        let bad_request = append_request(
            immediate_token("isolation", &bad_transaction),
            vec![keyed_event(&topic, "ok", b"ok"), bad_event],
        );
        start.wait().await;
        let bad = client
            .append(bad_request)
            .await
            .expect_err("a NUL character is refused");
        assert_eq!(bad.code(), Code::InvalidArgument, "{field}: {bad:?}");
        let violations: Vec<String> = bad
            .get_details_bad_request()
            .expect("BadRequest details")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(violations, vec![format!("events[1].{field}")]);
        for (n, append) in valid.into_iter().enumerate() {
            let response = append.await.unwrap().unwrap_or_else(|status| {
                panic!("valid append {n} beside a bad {field} failed: {status:?}")
            });
            assert_eq!(response.into_inner().event_ids.len(), 1);
        }
        // Nothing of the bad append was stored.
        let stored = client
            .get_status(proto::GetStatusRequest {
                transactions: vec![proto::TransactionRef {
                    producer: "isolation".into(),
                    transaction_id: bad_transaction,
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        assert!(stored.is_empty(), "{field}: {stored:?}");
    }
    gateway.stop().await;
}

/// Tokens that can never be resolved (here: 5,001 naming another cluster)
/// hold back no other producer's tokens: a committed token behind them is
/// published at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unresolvable_tokens_hold_back_no_other_token() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("xid_window");
    kafka.create_topic(&topic, 1).await;
    let store_url = support::fresh_database().await;
    let caller_url = support::fresh_database().await;
    let gateway = Gateway::start(support::test_config(&store_url, &kafka.bootstrap)).await;
    let channel = gateway.channel().await;

    let probe = support::CallerTransaction::begin(&caller_url).await;
    let (xid, foreign_system_id) = (probe.xid, probe.system_id.wrapping_add(1));
    probe.commit().await;
    let misconfigured = futures::stream::iter(0..5_001).map(|n| {
        let mut client = proto::outbox_client::OutboxClient::new(channel.clone());
        let topic = topic.clone();
        async move {
            let token = support::postgres_xid_token(
                "misconfigured",
                &format!("foreign-{n}"),
                xid,
                foreign_system_id,
            );
            client
                .append(append_request(
                    token,
                    vec![keyed_event(&topic, &format!("m{n}"), b"never")],
                ))
                .await
                .expect("append of a misconfigured token")
        }
    });
    let stored = misconfigured.buffer_unordered(32).count().await;
    assert_eq!(stored, 5_001);

    let caller = support::CallerTransaction::begin(&caller_url).await;
    let mut client = proto::outbox_client::OutboxClient::new(channel.clone());
    let ids = client
        .append(append_request(
            caller.token("healthy", "order-1"),
            vec![keyed_event(&topic, "h", b"published")],
        ))
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    caller.commit().await;
    support::eventually(
        "the healthy producer's event to be published",
        Duration::from_secs(2),
        || {
            let mut client = client.clone();
            let id = ids[0].clone();
            async move {
                (support::status_of(&mut client, &id).await.state
                    == proto::EventState::Published as i32)
                    .then_some(())
            }
        },
    )
    .await;
    gateway.stop().await;
}

/// Open watches are capped (`watch.max_open`): one more is refused with
/// RESOURCE_EXHAUSTED and a retry delay, and a closed watch frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_watches_are_capped() {
    let kafka = MockKafka::start(1);
    let mut config = support::test_config(&support::sqlite_url(), &kafka.bootstrap);
    config.watch.max_open = 2;
    let gateway = Gateway::start(config).await;
    let channel = gateway.channel().await;
    let watch = |producer: &str| {
        let mut client = proto::outbox_client::OutboxClient::new(channel.clone());
        let request = proto::WatchStatusRequest {
            producer: producer.into(),
            ..Default::default()
        };
        async move { client.watch_status(request).await }
    };
    let first = watch("a").await.expect("the first watch");
    let _second = watch("b").await.expect("the second watch");
    let refused = watch("c").await.expect_err("a third watch is one too many");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.get_details_retry_info().is_some(), "{refused:?}");
    drop(first);
    support::eventually(
        "a closed watch to free its place",
        Duration::from_secs(10),
        || {
            let attempt = watch("c");
            async move { attempt.await.ok() }
        },
    )
    .await;
    gateway.stop().await;
}

/// Past `limits.max_concurrent_requests` requests being served, the next is
/// refused at once with RESOURCE_EXHAUSTED, and the gateway serves again as
/// soon as requests finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_past_the_server_wide_limit_are_shed() {
    let kafka = MockKafka::start(1);
    let store_url = support::fresh_database().await;
    let mut config = support::test_config(&store_url, &kafka.bootstrap);
    config.limits.max_concurrent_requests = 4;
    let gateway = Gateway::start(config).await;
    let channel = gateway.channel().await;
    // Appends wait for the writer, held up here, so that they stay in flight.
    let mut blocker = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&store_url).await.unwrap()
    };
    let mut client = proto::outbox_client::OutboxClient::new(channel.clone());
    client
        .get_status(proto::GetStatusRequest::default())
        .await
        .ok();
    sqlx::raw_sql("BEGIN; LOCK TABLE outbox_writer_slots IN ACCESS EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let held_append = |n: usize| {
        let mut client = proto::outbox_client::OutboxClient::new(channel.clone());
        tokio::spawn(async move {
            client
                .append(append_request(
                    immediate_token("shed", &format!("held-{n}")),
                    vec![keyed_event("shed", "k", b"held")],
                ))
                .await
        })
    };
    let mut appends: Vec<_> = (0..4).map(held_append).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let shed = loop {
        // An append that came in while a probe below was being served was
        // shed itself: it goes again, until all four are held.
        for (n, append) in appends.iter_mut().enumerate() {
            if append.is_finished() {
                match (&mut *append).await.unwrap() {
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        *append = held_append(n)
                    }
                    other => panic!("an append ended while the store was locked: {other:?}"),
                }
            }
        }
        match client.get_status(proto::GetStatusRequest::default()).await {
            Err(status) if status.code() == Code::ResourceExhausted => break status,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request past the limit was shed within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(shed.message().contains("Too many"), "{shed:?}");
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();
    for append in appends {
        append
            .await
            .unwrap()
            .expect("an append admitted before the limit");
    }
    client
        .get_status(proto::GetStatusRequest::default())
        .await
        .map(|_| ())
        .or_else(|status| {
            (status.code() == Code::InvalidArgument)
                .then_some(())
                .ok_or(status)
        })
        .expect("served again once requests finished");
    gateway.stop().await;
}
