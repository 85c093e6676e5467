//! Authentication and authorization: identities × RPCs × own and other
//! producers × allowed and forbidden topics. Each refusal is checked for its
//! status code, and, through the store and an independent consumer, for
//! nothing stored, published or streamed across producers.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use outboxd::api::auth::{AuthConfig, IdentityConfig};
use outboxd::cli::client::BearerToken;
use outboxd::proto;
use outboxd::proto::outbox_admin_client::OutboxAdminClient;
use outboxd::proto::outbox_client::OutboxClient;
use sha2::{Digest, Sha256};
use support::{
    Gateway, MockKafka, append_request, consume_until, immediate_token, keyed_event,
    two_phase_token,
};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = OutboxClient<InterceptedService<Channel, BearerToken>>;
type Admin = OutboxAdminClient<InterceptedService<Channel, BearerToken>>;

fn identity(name: &str, producers: &[&str], topics: &[&str], admin: bool) -> IdentityConfig {
    IdentityConfig {
        name: name.into(),
        token_sha256: Sha256::digest(format!("{name}-token").as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        producers: producers.iter().map(|p| p.to_string()).collect(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        admin,
        ..IdentityConfig::default()
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_keeps_each_identity_to_its_producers_and_topics() {
    let kafka = MockKafka::start(1);
    let orders = support::unique("orders");
    let invoices = support::unique("invoices");
    kafka.create_topic(&orders, 1).await;
    kafka.create_topic(&invoices, 1).await;
    let store_url = support::fresh_database().await;
    let mut config = support::test_config(&store_url, &kafka.bootstrap);
    config.auth = AuthConfig {
        identities: vec![
            identity("shop", &["shop"], &["orders_*"], false),
            identity("billing", &["billing"], &["invoices_*"], false),
            identity("ops", &[], &[], true),
        ],
    };
    let gateway = Gateway::start(config).await;
    let channel = gateway.channel().await;
    let client = |token: Option<&str>| -> Client {
        OutboxClient::with_interceptor(channel.clone(), BearerToken::new(token).unwrap())
    };
    let admin = |token: Option<&str>| -> Admin {
        OutboxAdminClient::with_interceptor(channel.clone(), BearerToken::new(token).unwrap())
    };
    let (mut shop, mut billing) = (client(Some("shop-token")), client(Some("billing-token")));

    // No credentials, or unknown ones: UNAUTHENTICATED everywhere.
    for token in [None, Some("guess")] {
        let mut anonymous = client(token);
        let request = append_request(
            immediate_token("shop", "anonymous"),
            vec![keyed_event(&orders, "k", b"anonymous")],
        );
        assert_eq!(code(anonymous.append(request).await), Code::Unauthenticated);
        assert_eq!(
            code(
                anonymous
                    .get_status(proto::GetStatusRequest::default())
                    .await
            ),
            Code::Unauthenticated
        );
        let watch = proto::WatchStatusRequest {
            producer: "shop".into(),
            ..Default::default()
        };
        assert_eq!(
            code(anonymous.watch_status(watch).await),
            Code::Unauthenticated
        );
        let commit = proto::CommitRequest {
            producer: "shop".into(),
            transaction_id: "x".into(),
        };
        assert_eq!(code(anonymous.commit(commit).await), Code::Unauthenticated);
        assert_eq!(
            code(admin(token).list_leases(proto::ListLeasesRequest {}).await),
            Code::Unauthenticated
        );
    }

    // Own producer and allowed topics: stored.
    let own = shop
        .append(append_request(
            immediate_token("shop", "own"),
            vec![keyed_event(&orders, "k", b"own")],
        ))
        .await
        .unwrap()
        .into_inner()
        .event_ids;
    let two_phase = two_phase_token("billing", "inv-1", Duration::from_secs(300));
    let theirs = billing
        .append(append_request(
            two_phase,
            vec![keyed_event(&invoices, "i", b"theirs")],
        ))
        .await
        .unwrap()
        .into_inner()
        .event_ids;

    // Another producer, or a forbidden topic: PERMISSION_DENIED naming it.
    let as_billing = shop
        .append(append_request(
            immediate_token("billing", "forged"),
            vec![keyed_event(&invoices, "i", b"forged")],
        ))
        .await
        .unwrap_err();
    assert_eq!(as_billing.code(), Code::PermissionDenied);
    assert!(
        as_billing.message().contains("\"billing\""),
        "{as_billing:?}"
    );
    let wrong_topic = shop
        .append(append_request(
            immediate_token("shop", "wrong-topic"),
            vec![
                keyed_event(&orders, "k", b"fine"),
                keyed_event(&invoices, "k", b"forbidden"),
            ],
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong_topic.code(), Code::PermissionDenied);
    assert!(wrong_topic.message().contains(&invoices), "{wrong_topic:?}");

    // Resolving, reading and watching another producer's transactions.
    let of_billing = || proto::CommitRequest {
        producer: "billing".into(),
        transaction_id: "inv-1".into(),
    };
    assert_eq!(
        code(shop.commit(of_billing()).await),
        Code::PermissionDenied
    );
    let abort = proto::AbortRequest {
        producer: "billing".into(),
        transaction_id: "inv-1".into(),
    };
    assert_eq!(code(shop.abort(abort).await), Code::PermissionDenied);
    let by_transaction = proto::GetStatusRequest {
        transactions: vec![proto::TransactionRef {
            producer: "billing".into(),
            transaction_id: "inv-1".into(),
        }],
        ..Default::default()
    };
    assert_eq!(
        code(shop.get_status(by_transaction.clone()).await),
        Code::PermissionDenied
    );
    // By id, another producer's event is simply not there.
    let by_ids = shop
        .get_status(proto::GetStatusRequest {
            event_ids: vec![own[0].clone(), theirs[0].clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        by_ids
            .iter()
            .map(|s| s.event_id.clone())
            .collect::<Vec<_>>(),
        own
    );
    let watch_ids = proto::WatchStatusRequest {
        event_ids: vec![theirs[0].clone()],
        ..Default::default()
    };
    assert_eq!(code(shop.watch_status(watch_ids).await), Code::NotFound);
    let watch_theirs = proto::WatchStatusRequest {
        producer: "billing".into(),
        ..Default::default()
    };
    assert_eq!(
        code(shop.watch_status(watch_theirs).await),
        Code::PermissionDenied
    );
    let watch_transactions = proto::WatchStatusRequest {
        transactions: by_transaction.transactions.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(shop.watch_status(watch_transactions).await),
        Code::PermissionDenied
    );
    billing.commit(of_billing()).await.unwrap();

    // A watch of its own producer streams only its own events.
    let mut own_watch = shop
        .watch_status(proto::WatchStatusRequest {
            producer: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = own_watch.next().await.unwrap().unwrap().status.unwrap();
    assert_eq!(first.producer, "shop");

    // AppendStream: each message is checked on its own.
    let messages = vec![
        append_request(
            immediate_token("shop", "stream-1"),
            vec![keyed_event(&orders, "k", b"stream-1")],
        ),
        append_request(
            immediate_token("billing", "stream-forged"),
            vec![keyed_event(&invoices, "i", b"stream-forged")],
        ),
        append_request(
            immediate_token("shop", "stream-2"),
            vec![keyed_event(&orders, "k", b"stream-2")],
        ),
    ];
    let responses: Vec<proto::AppendResponse> = shop
        .append_stream(futures::stream::iter(messages))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(responses.len(), 3);
    assert!(responses[0].failure.is_none() && responses[2].failure.is_none());
    assert_eq!(
        responses[1].failure.as_ref().map(|f| f.code),
        Some(Code::PermissionDenied as i32)
    );

    // OutboxAdmin needs the admin role; ListPrepared the producer's right.
    let mut shop_admin = admin(Some("shop-token"));
    assert_eq!(
        code(shop_admin.list_leases(proto::ListLeasesRequest {}).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(shop_admin.pause_relay(proto::PauseRelayRequest {}).await),
        Code::PermissionDenied
    );
    let redrive = proto::RedriveRequest {
        producer: "billing".into(),
        ..Default::default()
    };
    assert_eq!(
        code(shop_admin.redrive(redrive.clone()).await),
        Code::PermissionDenied
    );
    let prepared = |producer: &str| proto::ListPreparedRequest {
        producer: producer.into(),
        older_than: None,
    };
    assert_eq!(
        code(shop_admin.list_prepared(prepared("billing")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            admin(Some("billing-token"))
                .list_prepared(prepared("billing"))
                .await
        ),
        Code::Ok
    );
    let mut ops = admin(Some("ops-token"));
    assert_eq!(
        code(ops.list_leases(proto::ListLeasesRequest {}).await),
        Code::Ok
    );
    assert_eq!(code(ops.redrive(redrive).await), Code::Ok);

    // What reached the store and Kafka: only what was allowed.
    let stored: Vec<String> = {
        use sqlx::Connection;
        let mut store = sqlx::PgConnection::connect(&store_url).await.unwrap();
        sqlx::query_scalar(
            // One row per stored event.
            "SELECT transaction_id FROM outbox_appends, \
                 generate_series(1, length(event_ids) / 16) ORDER BY transaction_id",
        )
        .fetch_all(&mut store)
        .await
        .unwrap()
    };
    assert_eq!(stored, vec!["inv-1", "own", "stream-1", "stream-2"]);
    let published = consume_until(
        &kafka.bootstrap,
        &orders,
        &own.iter().cloned().collect::<HashSet<_>>(),
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    let payloads: HashSet<Vec<u8>> = published.iter().map(|r| r.payload.clone()).collect();
    let expected: HashSet<Vec<u8>> = [b"own".to_vec(), b"stream-1".to_vec(), b"stream-2".to_vec()]
        .into_iter()
        .collect();
    assert!(payloads.is_subset(&expected), "{payloads:?}");
    let invoiced = consume_until(
        &kafka.bootstrap,
        &invoices,
        &theirs.iter().cloned().collect::<HashSet<_>>(),
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        invoiced
            .iter()
            .map(|r| r.payload.clone())
            .collect::<Vec<_>>(),
        vec![b"theirs".to_vec()]
    );
    drop(own_watch);
    gateway.stop().await;
}

/// Per-identity limits: an identity over its request rate or its open
/// streams is told to come back (RESOURCE_EXHAUSTED with a retry delay),
/// and another identity is served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_over_its_limits_leaves_the_others_alone() {
    use tonic_types::StatusExt;
    let kafka = MockKafka::start(1);
    let mut config = support::test_config(&support::sqlite_url(), &kafka.bootstrap);
    config.auth = AuthConfig {
        identities: vec![
            identity("shop", &["shop"], &["orders_*"], false),
            identity("billing", &["billing"], &["invoices_*"], false),
        ],
    };
    config.limits.requests_per_second_per_identity = 50;
    config.limits.max_streams_per_identity = 2;
    let gateway = Gateway::start(config).await;
    let channel = gateway.channel().await;
    let client = |token: &str| -> Client {
        OutboxClient::with_interceptor(channel.clone(), BearerToken::new(Some(token)).unwrap())
    };
    let (mut shop, mut billing) = (client("shop-token"), client("billing-token"));
    let watch = |producer: &str| proto::WatchStatusRequest {
        producer: producer.into(),
        ..Default::default()
    };

    // Streams: two open, the third refused; the other identity still opens.
    let _first = shop.watch_status(watch("shop")).await.unwrap();
    let _second = shop.watch_status(watch("shop")).await.unwrap();
    let third = shop.watch_status(watch("shop")).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    assert!(third.get_details_retry_info().is_some());
    billing
        .watch_status(watch("billing"))
        .await
        .expect("another identity's stream");

    // Rate: a burst past one second's worth is refused, with when to retry.
    let lookup = || proto::GetStatusRequest {
        event_ids: vec![uuid::Uuid::now_v7().to_string()],
        ..Default::default()
    };
    let mut refused = None;
    for _ in 0..200 {
        if let Err(status) = shop.get_status(lookup()).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("a burst past the rate is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let retry = refused
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a retry delay");
    assert!(retry <= Duration::from_millis(20), "{retry:?}");
    billing
        .get_status(lookup())
        .await
        .expect("another identity is served");
    tokio::time::sleep(retry).await;
    shop.get_status(lookup())
        .await
        .expect("served again after the delay it was given");
    gateway.stop().await;
}
