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
            let token = proto::TransactionToken {
                producer: "misconfigured".into(),
                transaction_id: format!("foreign-{n}"),
                mode: proto::TokenMode::PostgresXid as i32,
                postgres_xid: xid,
                postgres_system_id: foreign_system_id,
                ..Default::default()
            };
            client
                .append(append_request(
                    Some(token),
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

/// 1,100 concurrent appends of 1 MiB each (over a GB together, past
/// PostgreSQL's message limit were they one statement): each store
/// transaction is bounded in bytes and queued bytes have a budget, so every
/// append either commits or is told to come back (RESOURCE_EXHAUSTED, with
/// a retry delay), retried ones commit, each is stored once, and the
/// gateway's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gigabyte_of_concurrent_appends_is_bounded_in_bytes() {
    const APPENDS: usize = 1_100;
    const RSS_CEILING: u64 = 2 * 1024 * 1024 * 1024;
    let store_url = support::fresh_database().await;
    // No broker: the events stay in the store; only ingest is measured.
    // One writer, held up below, so that every append queues for it.
    let mut config = support::test_config(&store_url, "127.0.0.1:9");
    config.ingest.writers = 1;
    let gateway = support::ServeProcess::start(&config).await;
    // Serving (so migrated), not only listening.
    support::eventually("the gateway to answer", Duration::from_secs(60), || {
        let endpoint = gateway.endpoint();
        async move {
            let mut client = proto::outbox_client::OutboxClient::connect(endpoint)
                .await
                .ok()?;
            let answer = client.get_status(proto::GetStatusRequest::default()).await;
            (!matches!(answer, Err(ref status) if status.code() == Code::Unavailable)).then_some(())
        }
    })
    .await;
    let mut blocker = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&store_url).await.unwrap()
    };
    sqlx::raw_sql("BEGIN; LOCK TABLE outbox_writer_slots IN ACCESS EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let refusals = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let channel = tonic::transport::Endpoint::from_shared(gateway.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let payload = prost::bytes::Bytes::from(vec![7u8; 1024 * 1024]);
    let appends = futures::stream::iter(0..APPENDS).map({
        let (channel, payload, refusals) = (channel.clone(), payload.clone(), refusals.clone());
        move |n| {
            let mut client = proto::outbox_client::OutboxClient::new(channel.clone())
                .max_encoding_message_size(16 * 1024 * 1024);
            let mut event = keyed_event("large", &format!("k{n}"), b"");
            event.payload = payload.clone();
            let request = append_request(immediate_token("large", &format!("t{n}")), vec![event]);
            let refused = refusals.clone();
            async move {
                let mut refusals = 0u32;
                loop {
                    match client.append(request.clone()).await {
                        Ok(_) => return Ok(refusals),
                        Err(status) if status.code() == Code::ResourceExhausted => {
                            refusals += 1;
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let wait = status
                                .get_details_retry_info()
                                .and_then(|info| info.retry_delay)
                                .unwrap_or(Duration::from_millis(100));
                            tokio::time::sleep(wait).await;
                        }
                        Err(status) => return Err(status),
                    }
                }
            }
        }
    });
    let results = tokio::spawn(appends.buffer_unordered(APPENDS).collect::<Vec<_>>());
    // The writer is let go once the queue is full: the gateway refuses
    // appends over its budget (or, were there none, all of them queued).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while refusals.load(std::sync::atomic::Ordering::Relaxed) == 0
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();
    let results: Vec<Result<u32, tonic::Status>> = results.await.unwrap();
    let failed: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {APPENDS} appends failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let peak = gateway.peak_rss_bytes();
    assert!(
        peak < RSS_CEILING,
        "the gateway peaked at {} MiB",
        peak / 1024 / 1024
    );
    let stored: i64 = {
        use sqlx::Connection;
        let mut store = sqlx::PgConnection::connect(&store_url).await.unwrap();
        sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE producer = 'large'")
            .fetch_one(&mut store)
            .await
            .unwrap()
    };
    assert_eq!(stored, APPENDS as i64, "each append stored once");
    gateway.stop();
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
