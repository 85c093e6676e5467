//! Regressions of the request path.

mod support;

use uuid::Uuid;

use support::{Gateway, MockKafka};

// ---------------------------------------------------------------------------
// Regressions found by fuzzing.

/// An identical retry of an append whose events carry caller-chosen ids is
/// answered as a duplicate with the same ids: its own ids are not "taken".
/// (PostgreSQL's batched path once refused it with ALREADY_EXISTS.)
async fn a_retry_with_caller_chosen_ids_is_a_duplicate(store_url: String) {
    let kafka = MockKafka::start(1);
    let gateway = Gateway::start(support::test_config(&store_url, &kafka.bootstrap)).await;
    let mut client = gateway.client().await;
    let mut request = support::append_request(
        support::immediate_token("retrier", "chosen-ids"),
        vec![
            support::keyed_event("retries", "k1", b"one"),
            support::keyed_event("retries", "k2", b"two"),
        ],
    );
    let chosen = [Uuid::now_v7(), Uuid::now_v7()];
    for (event, id) in request.events.iter_mut().zip(chosen) {
        event.event_id = id.to_string();
    }
    let first = client.append(request.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate);
    let retry = client
        .append(request)
        .await
        .expect("an identical retry is accepted")
        .into_inner();
    assert!(retry.duplicate);
    assert_eq!(retry.event_ids, first.event_ids);
    assert_eq!(
        retry.event_ids,
        chosen.map(|id| id.to_string()).to_vec(),
        "the caller's ids"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_caller_chosen_ids_is_a_duplicate_on_postgresql() {
    a_retry_with_caller_chosen_ids_is_a_duplicate(support::fresh_database().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_caller_chosen_ids_is_a_duplicate_on_sqlite() {
    a_retry_with_caller_chosen_ids_is_a_duplicate(support::sqlite_url()).await;
}
