//! End to end through the public gRPC API: real PostgreSQL or SQLite, a real
//! broker (Tansu) or librdkafka's mock cluster, and an independent consumer
//! that checks what reached Kafka.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use outboxd::domain::murmur2::kafka_partition;
use outboxd::proto;
use support::{
    AppendBuilder, Consumed, EventBuilder, Gateway, MockKafka, Tansu, consume_until,
    first_sightings_by_key,
};
use tonic::Code;
use tonic_types::StatusExt;

/// One appended event and everything the consumer must find in its record.
#[derive(Debug, Clone)]
struct Appended {
    id: String,
    kafka_key: Vec<u8>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    event_type: String,
    aggregate_id: String,
    producer: String,
    transaction_id: String,
    traceparent: Option<String>,
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The `index`-th event of key `key`: half the keys give a Kafka key, the
/// other half only an aggregate id (which then becomes the Kafka key).
fn account_event(topic: &str, key: usize, index: usize) -> EventBuilder {
    // Not valid UTF-8 on purpose: payloads are bytes.
    let payload: Vec<u8> = [0xff, 0x00, key as u8]
        .into_iter()
        .chain(format!("event {index} of {key}").into_bytes())
        .collect();
    EventBuilder::new(topic)
        .maybe_key((key % 2 == 0).then(|| format!("key-{key}")))
        .payload(payload)
        .header("content-type", b"application/octet-stream")
        .header("sequence-in-key", index.to_string())
        .aggregate("account", format!("aggregate-{key}"))
        .event_type(format!("step-{}", index % 7))
}

fn appended(
    event: &proto::Event,
    id: String,
    producer: &str,
    transaction_id: &str,
    traceparent: Option<&str>,
) -> Appended {
    Appended {
        id,
        kafka_key: event
            .key
            .clone()
            .map(|k| k.to_vec())
            .unwrap_or_else(|| event.aggregate_id.clone().into_bytes()),
        payload: event.payload.to_vec(),
        headers: event
            .headers
            .iter()
            .map(|h| (h.key.clone(), h.value.to_vec()))
            .collect(),
        event_type: event.event_type.clone(),
        aggregate_id: event.aggregate_id.clone(),
        producer: producer.to_owned(),
        transaction_id: transaction_id.to_owned(),
        traceparent: traceparent.map(str::to_owned),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AppendMode {
    /// Concurrent unary `Append` calls.
    Unary,
    /// Pipelined `AppendStream`s.
    Stream,
}

/// Appends `total` events over `keys` keys from 10 concurrent producers, each
/// owning a fifth of... every tenth key, so each key's append order is
/// defined; returns the events in append order.
async fn append_load(
    gateway: &Gateway,
    topic: &str,
    total: usize,
    keys: usize,
    batch: usize,
    mode: AppendMode,
) -> Vec<Appended> {
    const PRODUCERS: usize = 10;
    let mut tasks = Vec::new();
    for producer_index in 0..PRODUCERS {
        let mut client = gateway.client().await;
        let topic = topic.to_owned();
        let producer = format!("producer-{producer_index}");
        let my_keys: Vec<usize> = (0..keys)
            .filter(|k| k % PRODUCERS == producer_index)
            .collect();
        let my_total = total / PRODUCERS;
        tasks.push(tokio::spawn(async move {
            let mut sent: Vec<Appended> = Vec::with_capacity(my_total);
            let mut per_key = vec![0usize; keys];
            let mut requests = Vec::new();
            let mut pending_events = Vec::new();
            for n in 0..my_total {
                let key = my_keys[n % my_keys.len()];
                pending_events.push(account_event(&topic, key, per_key[key]).build());
                per_key[key] += 1;
                if pending_events.len() == batch || n + 1 == my_total {
                    let transaction_id = format!("tx-{}", requests.len());
                    requests.push(
                        AppendBuilder::new(&producer, &transaction_id)
                            .correlation(requests.len() as u64)
                            .events(std::mem::take(&mut pending_events))
                            .build(),
                    );
                }
            }
            match mode {
                AppendMode::Unary => {
                    for request in requests {
                        let traced = request.correlation % 2 == 0;
                        let mut call = tonic::Request::new(request.clone());
                        if traced {
                            call.metadata_mut()
                                .insert("traceparent", TRACEPARENT.parse().unwrap());
                        }
                        let response = client.append(call).await.expect("append").into_inner();
                        assert!(!response.duplicate);
                        let token = request.token.as_ref().unwrap();
                        for (event, id) in request.events.iter().zip(response.event_ids) {
                            sent.push(appended(
                                event,
                                id,
                                &token.producer,
                                &token.transaction_id,
                                traced.then_some(TRACEPARENT),
                            ));
                        }
                    }
                }
                AppendMode::Stream => {
                    let outbound = futures::stream::iter(requests.clone());
                    let mut call = tonic::Request::new(outbound);
                    call.metadata_mut()
                        .insert("traceparent", TRACEPARENT.parse().unwrap());
                    let mut responses = client.append_stream(call).await.unwrap().into_inner();
                    let mut expected_correlation = 0;
                    while let Some(response) = responses.next().await {
                        let response = response.expect("stream response");
                        assert_eq!(
                            response.correlation, expected_correlation,
                            "responses in request order"
                        );
                        assert!(response.failure.is_none(), "{:?}", response.failure);
                        let request = &requests[expected_correlation as usize];
                        let token = request.token.as_ref().unwrap();
                        for (event, id) in request.events.iter().zip(response.event_ids) {
                            sent.push(appended(
                                event,
                                id,
                                &token.producer,
                                &token.transaction_id,
                                Some(TRACEPARENT),
                            ));
                        }
                        expected_correlation += 1;
                    }
                    assert_eq!(
                        expected_correlation as usize,
                        requests.len(),
                        "one response per request"
                    );
                }
            }
            sent
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// Checks every record against what was appended: nothing lost, nothing
/// twice, bytes and headers as appended, murmur2 partitions, per-key order.
fn verify(appended: &[Appended], records: &[Consumed], partitions: i32) {
    let by_id: HashMap<&str, &Appended> = appended.iter().map(|a| (a.id.as_str(), a)).collect();
    assert_eq!(by_id.len(), appended.len(), "event ids are unique");
    let mut seen = HashSet::new();
    for record in records {
        let id = record.event_id();
        let Some(expected) = by_id.get(id.as_str()) else {
            panic!("a record for an event nobody appended: {id}");
        };
        assert!(seen.insert(id.clone()), "event {id} reached Kafka twice");
        assert_eq!(
            record.key.as_deref(),
            Some(&expected.kafka_key[..]),
            "key of {id}"
        );
        assert_eq!(record.payload, expected.payload, "payload of {id}");
        let caller_headers = &record.headers[..expected.headers.len()];
        assert_eq!(
            caller_headers,
            &expected.headers[..],
            "caller headers of {id} come first, unchanged"
        );
        assert_eq!(
            record.header("outbox-event-type").as_deref(),
            Some(expected.event_type.as_str())
        );
        assert_eq!(
            record.header("outbox-aggregate-type").as_deref(),
            Some("account")
        );
        assert_eq!(
            record.header("outbox-aggregate-id").as_deref(),
            Some(expected.aggregate_id.as_str())
        );
        assert_eq!(
            record.header("outbox-producer").as_deref(),
            Some(expected.producer.as_str())
        );
        assert_eq!(
            record.header("outbox-transaction-id").as_deref(),
            Some(expected.transaction_id.as_str())
        );
        assert_eq!(
            record.header("traceparent"),
            expected.traceparent,
            "traceparent of {id}"
        );
        assert_eq!(
            record.partition as u32,
            kafka_partition(&expected.kafka_key, partitions as u32),
            "partition of {id} is murmur2(key) mod {partitions}"
        );
    }
    assert_eq!(
        seen.len(),
        appended.len(),
        "every appended event reached Kafka"
    );

    let mut appended_by_key: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
    for event in appended {
        appended_by_key
            .entry(event.kafka_key.clone())
            .or_default()
            .push(event.id.clone());
    }
    let kafka_by_key = first_sightings_by_key(records);
    assert_eq!(kafka_by_key.len(), appended_by_key.len());
    for (key, ids) in &appended_by_key {
        assert_eq!(
            kafka_by_key.get(key),
            Some(ids),
            "order of key {:?} in Kafka equals append order",
            String::from_utf8_lossy(key)
        );
    }
}

async fn round_trip(
    store_url: String,
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    mode: AppendMode,
) {
    let gateway = Gateway::start(support::test_config(&store_url, bootstrap)).await;
    let sent = append_load(&gateway, topic, 10_000, 50, 25, mode).await;
    assert_eq!(sent.len(), 10_000);
    let expected: HashSet<String> = sent.iter().map(|a| a.id.clone()).collect();
    let records = consume_until(
        bootstrap,
        topic,
        &expected,
        Duration::from_secs(2),
        Duration::from_secs(180),
    )
    .await;
    verify(&sent, &records, partitions);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_events_reach_tansu_exactly_and_in_order_postgres() {
    let tansu = Tansu::shared();
    let topic = support::unique("orders");
    tansu.create_topic(&topic, 6).await;
    let url = support::fresh_database().await;
    round_trip(url, &tansu.bootstrap, &topic, 6, AppendMode::Unary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_events_reach_tansu_exactly_and_in_order_sqlite() {
    let tansu = Tansu::shared();
    let topic = support::unique("orders");
    tansu.create_topic(&topic, 5).await;
    round_trip(
        support::sqlite_url(),
        &tansu.bootstrap,
        &topic,
        5,
        AppendMode::Unary,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_streamed_events_reach_the_mock_cluster_in_order_postgres() {
    let kafka = MockKafka::start(3);
    let topic = support::unique("orders");
    kafka.create_topic(&topic, 4).await;
    let url = support::fresh_database().await;
    round_trip(url, &kafka.bootstrap, &topic, 4, AppendMode::Stream).await;
}

async fn retries_store_nothing_twice(store_url: String) {
    let kafka = MockKafka::start(1);
    let topic = support::unique("payments");
    kafka.create_topic(&topic, 2).await;
    let gateway = Gateway::start(support::test_config(&store_url, &kafka.bootstrap)).await;
    let mut client = gateway.client().await;
    let request = AppendBuilder::new("billing", "invoice-7")
        .events((0..3).map(|i| account_event(&topic, i, 0)))
        .build();
    let first = client.append(request.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate);
    assert_eq!(first.event_ids.len(), 3);
    for _ in 0..3 {
        let retry = client.append(request.clone()).await.unwrap().into_inner();
        assert!(retry.duplicate, "a retry is reported as a duplicate");
        assert_eq!(
            retry.event_ids, first.event_ids,
            "a retry returns the same ids"
        );
    }
    // A second append of the same transaction is not a retry.
    let mut second = request.clone();
    second.sequence = 1;
    second.events.truncate(1);
    let second = client.append(second).await.unwrap().into_inner();
    assert!(!second.duplicate);

    let mut conflicting = request.clone();
    conflicting.events[1].payload = b"another body".to_vec().into();
    let status = client.append(conflicting).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let violations = status
        .get_details_bad_request()
        .expect("BadRequest details");
    assert_eq!(violations.field_violations[0].field, "sequence");

    let stored = client
        .get_status(proto::GetStatusRequest {
            transactions: vec![proto::TransactionRef {
                producer: "billing".into(),
                transaction_id: "invoice-7".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stored.events.len(),
        4,
        "three events of append 0, one of append 1"
    );

    let expected: HashSet<String> = first
        .event_ids
        .iter()
        .chain(&second.event_ids)
        .cloned()
        .collect();
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &expected,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), 4, "each event reached Kafka once");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_appends_store_nothing_twice_postgres() {
    retries_store_nothing_twice(support::fresh_database().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_appends_store_nothing_twice_sqlite() {
    retries_store_nothing_twice(support::sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_watcher_learns_every_final_state() {
    let tansu = Tansu::shared();
    let topic = support::unique("shipments");
    tansu.create_topic(&topic, 3).await;
    let url = support::fresh_database().await;
    let gateway = Gateway::start(support::test_config(&url, &tansu.bootstrap)).await;
    let mut client = gateway.client().await;
    let mut ids = Vec::new();
    for transaction in 0..4 {
        let response = client
            .append(
                AppendBuilder::new("shipping", &format!("tx-{transaction}"))
                    .events((0..5).map(|i| account_event(&topic, i, transaction)))
                    .build(),
            )
            .await
            .unwrap()
            .into_inner();
        ids.extend(response.event_ids);
    }
    let expected: HashSet<String> = ids.iter().cloned().collect();
    let records = consume_until(
        &tansu.bootstrap,
        &topic,
        &expected,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await;
    let in_kafka: HashMap<String, (i32, i64)> = records
        .iter()
        .map(|r| (r.event_id(), (r.partition, r.offset)))
        .collect();

    // Some events are surely recorded PUBLISHED by now; others may not be.
    // The watch starts late and must still end with every final state.
    let mut watch = client
        .watch_status(proto::WatchStatusRequest {
            event_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut final_states = HashMap::new();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(update) = watch.message().await.unwrap() {
            let status = update.status.unwrap();
            if status.state == proto::EventState::Published as i32 {
                final_states.insert(
                    status.event_id.clone(),
                    (status.partition.unwrap(), status.offset.unwrap()),
                );
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch ends once every event is final");
    assert_eq!(
        final_states.len(),
        ids.len(),
        "a final state for every watched event"
    );
    for (id, place) in &final_states {
        assert_eq!(
            in_kafka.get(id),
            Some(place),
            "partition and offset of {id} match the consumer's"
        );
    }

    // A producer watch from cursor 0 replays the same final states.
    let mut producer_watch = client
        .watch_status(proto::WatchStatusRequest {
            producer: "shipping".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut published = HashSet::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while published.len() < ids.len() {
            let update = producer_watch.message().await.unwrap().unwrap();
            let status = update.status.unwrap();
            if status.state == proto::EventState::Published as i32 {
                published.insert(status.event_id);
            }
        }
    })
    .await
    .expect("the producer watch reports every published event");
    drop(producer_watch);
    gateway.stop().await;
}

/// Each bad request: its code, the field named in BadRequest, nothing stored.
async fn bad_input_is_rejected(store_url: String) {
    let kafka = MockKafka::start(1);
    let mut config = support::test_config(&store_url, &kafka.bootstrap);
    config.limits.max_payload_bytes = 1_000;
    config.limits.max_headers_bytes = 100;
    config.limits.max_batch_events = 10;
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    let valid = || account_event("valid-topic", 0, 0);
    let good =
        |transaction_id: &str| AppendBuilder::new("bad-input", transaction_id).event(valid());
    // Each case breaks one thing of a good request.
    let with_event = |event: EventBuilder| AppendBuilder::new("bad-input", "tx-1").event(event);
    let cases: Vec<(&str, proto::AppendRequest, &str)> = vec![
        (
            "empty batch",
            AppendBuilder::new("bad-input", "tx-1").build(),
            "events",
        ),
        (
            "missing producer",
            AppendBuilder::new("", "tx-1").event(valid()).build(),
            "token.producer",
        ),
        (
            "missing transaction id",
            AppendBuilder::new("bad-input", "").event(valid()).build(),
            "token.transaction_id",
        ),
        (
            "missing token",
            AppendBuilder::with_token(None).event(valid()).build(),
            "token.producer",
        ),
        (
            "illegal topic character",
            with_event(account_event("orders/eu", 0, 0)).build(),
            "events[0].topic",
        ),
        (
            "topic too long",
            good("tx-1")
                .event(account_event(&"t".repeat(250), 1, 0))
                .build(),
            "events[1].topic",
        ),
        (
            "oversize payload",
            with_event(valid().payload(vec![7u8; 1_001])).build(),
            "events[0].payload",
        ),
        (
            "oversize headers",
            with_event(valid().header("big", vec![1u8; 101])).build(),
            "events[0].headers",
        ),
        (
            "oversize batch",
            AppendBuilder::new("bad-input", "tx-1")
                .events((0..11).map(|i| account_event("valid-topic", i, 0)))
                .build(),
            "events",
        ),
        (
            "event id not a uuid",
            with_event(valid().id("order-1")).build(),
            "events[0].event_id",
        ),
        (
            "reserved header",
            with_event(valid().header("outbox-event-id", b"")).build(),
            "events[0].headers[2].key",
        ),
    ];
    for (name, request, field) in cases {
        let status = client.append(request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        let details = status
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("{name}: no BadRequest"));
        assert!(
            details.field_violations.iter().any(|v| v.field == field),
            "{name}: {field} named in {:?}",
            details.field_violations
        );
        assert!(
            status.message().contains(field),
            "{name}: the message names {field}: {}",
            status.message()
        );
    }

    // Nothing of any of them was stored.
    let store = outboxd::store::connect(&store_url, 2, 8).await.unwrap();
    assert!(
        store
            .status_changes("bad-input", 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.status_changes("", 0, 100).await.unwrap().is_empty());

    // An in-stream failure fails only its own request.
    let requests = vec![
        good("s-1").correlation(1).build(),
        AppendBuilder::new("bad-input", "s-2")
            .correlation(2)
            .build(),
        good("s-3").correlation(3).build(),
    ];
    let responses: Vec<proto::AppendResponse> = client
        .append_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(
        responses.iter().map(|r| r.correlation).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(responses[0].failure.is_none() && responses[2].failure.is_none());
    let failure = responses[1]
        .failure
        .as_ref()
        .expect("the empty batch failed");
    assert_eq!(failure.code, Code::InvalidArgument as i32);
    assert_eq!(failure.field_violations[0].field, "events");
    assert_eq!(
        store
            .status_changes("bad-input", 0, 100)
            .await
            .unwrap()
            .len(),
        2
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_naming_the_field_postgres() {
    bad_input_is_rejected(support::fresh_database().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_naming_the_field_sqlite() {
    bad_input_is_rejected(support::sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_answers_unavailable() {
    let cluster = support::PgCluster::start();
    let url = support::fresh_database_on(&cluster.url("postgres")).await;
    let kafka = MockKafka::start(1);
    let topic = support::unique("ledger");
    kafka.create_topic(&topic, 1).await;
    let gateway = Gateway::start(support::test_config(&url, &kafka.bootstrap)).await;
    let mut client = gateway.client().await;
    let append = |transaction: &str| {
        AppendBuilder::new("ledger", transaction)
            .event(account_event(&topic, 0, 0))
            .build()
    };
    let before = client.append(append("before")).await.unwrap().into_inner();

    cluster.stop_server();
    let status = client.append(append("during")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        !status.message().contains("SQL"),
        "no database internals: {}",
        status.message()
    );

    cluster.start_server();
    let after = support::eventually("appends to succeed again", Duration::from_secs(30), || {
        let mut client = client.clone();
        let request = append("after");
        async move { client.append(request).await.ok() }
    })
    .await
    .into_inner();
    let expected: HashSet<String> = before
        .event_ids
        .into_iter()
        .chain(after.event_ids)
        .collect();
    let records = consume_until(
        &kafka.bootstrap,
        &topic,
        &expected,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), 2, "the failed append stored nothing");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_and_health_are_served() {
    let kafka = MockKafka::start(1);
    let gateway = Gateway::start(support::test_config(
        &support::sqlite_url(),
        &kafka.bootstrap,
    ))
    .await;
    let _ = gateway.client().await;
    let channel = gateway.channel().await;

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "outboxd.v1.Outbox",
        "outboxd.v1.OutboxAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(service), "{service} listed in {names:?}");
    }

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let mut health = HealthClient::new(channel);
    for service in ["outboxd.v1.Outbox", outboxd::server::RELAY_HEALTH_SERVICE] {
        let mut health = health.clone();
        support::eventually(
            &format!("{service} SERVING"),
            Duration::from_secs(20),
            || {
                let mut health = health.clone();
                async move {
                    let status = health
                        .check(HealthCheckRequest {
                            service: service.into(),
                        })
                        .await
                        .ok()?
                        .into_inner()
                        .status;
                    (status == ServingStatus::Serving as i32).then_some(())
                }
            },
        )
        .await;
        let _ = &mut health;
    }
    let _ = &mut health;
    gateway.stop().await;
}

#[tokio::test]
async fn dev_demo_round_trips_without_outside_services() {
    let stdout = support::run_outboxd(&["dev", "--demo"]).await;
    assert!(stdout.contains("demo ok"), "{stdout}");
    assert!(stdout.contains("watched all 12 to PUBLISHED"), "{stdout}");
}
