//! Memory bounds under load: a gigabyte of concurrent appends, in a test
//! binary of its own so that its load slows no other test.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use outboxd::proto;
use support::{append_request, immediate_token, keyed_event};
use tonic::Code;
use tonic_types::StatusExt;

/// 1,100 concurrent appends of 1 MiB each (over a GB together, past
/// PostgreSQL's message limit were they one statement): each store
/// transaction is bounded in bytes and queued bytes have a budget, so every
/// append either commits or is told to come back (RESOURCE_EXHAUSTED, with
/// a retry delay), retried ones commit, each is stored once, and the
/// gateway's memory stays bounded: requests being read by
/// `limits.max_concurrent_requests`, queued ones by
/// `ingest.max_queued_bytes`, each store transaction by
/// `ingest.max_coalesced_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gigabyte_of_concurrent_appends_is_bounded_in_bytes() {
    const APPENDS: usize = 1_100;
    const RSS_CEILING: u64 = 1280 * 1024 * 1024;
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
        // Every event of the store is one of 'large''s.
        sqlx::query_scalar("SELECT coalesce(sum(length(states)), 0)::bigint FROM outbox_segments")
            .fetch_one(&mut store)
            .await
            .unwrap()
    };
    assert_eq!(stored, APPENDS as i64, "each append stored once");
    gateway.stop();
}
