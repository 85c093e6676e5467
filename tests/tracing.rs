//! OpenTelemetry tracing, request metrics and health probes, seen from
//! outside: spans as an OTLP collector receives them (an in-process
//! `TraceService` receiver), records as an independent Kafka consumer reads
//! them, log lines as `outboxd serve` writes them, and what the metrics port
//! answers.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outboxd::proto;
use outboxd::proto::outbox_client::OutboxClient;
use outboxd::telemetry::sink::{ReceivedSpan, SpanSink, kind};
use support::{
    Gateway, MockKafka, PgCluster, ServeProcess, Tansu, append_request, consume_until, eventually,
    free_port, immediate_token, keyed_event, scrape_metrics, test_config, unique,
};
use tonic::transport::Channel;

/// A caller's W3C trace context: random ids, sampled.
struct CallerSpan {
    trace_id: String,
    span_id: String,
}

impl CallerSpan {
    fn new() -> CallerSpan {
        let hex = |bytes: usize| -> String {
            (0..bytes)
                .map(|_| format!("{:02x}", rand::random::<u8>() | 1))
                .collect()
        };
        CallerSpan {
            trace_id: hex(16),
            span_id: hex(8),
        }
    }

    fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }

    /// `request` as this span would send it.
    fn request<T>(&self, request: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(request);
        request
            .metadata_mut()
            .insert("traceparent", self.traceparent().parse().unwrap());
        request
            .metadata_mut()
            .insert("tracestate", "caller=7".parse().unwrap());
        request
    }
}

/// (trace id, parent span id) of a `traceparent` header.
fn parse_traceparent(header: &str) -> (String, String) {
    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {header:?}");
    assert_eq!(parts[0], "00", "traceparent {header:?}");
    (parts[1].to_owned(), parts[2].to_owned())
}

async fn client_of(process: &ServeProcess) -> OutboxClient<Channel> {
    OutboxClient::connect(process.endpoint()).await.unwrap()
}

/// Waits until the sink holds spans that `found` accepts; returns what it
/// made of them.
async fn spans_when<T>(
    sink: &SpanSink,
    what: &str,
    found: impl Fn(&[ReceivedSpan]) -> Option<T>,
) -> T {
    eventually(what, Duration::from_secs(30), || {
        let spans = sink.spans();
        let result = found(&spans);
        async move { result }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_caller_through_outboxd_to_the_consumer() {
    let sink = SpanSink::start(true).await.unwrap();
    let tansu = Tansu::shared();
    let topic = unique("traced");
    tansu.create_topic(&topic, 3).await;
    let store = support::fresh_database().await;
    let mut config = test_config(&store, &tansu.bootstrap);
    config.telemetry.otlp_endpoint = Some(sink.endpoint());
    config.telemetry.service_name = "outboxd-under-test".into();
    let process = ServeProcess::start(&config).await;
    let mut client = client_of(&process).await;

    let caller = CallerSpan::new();
    let response = client
        .append(caller.request(append_request(
            immediate_token("orders", "t-traced"),
            vec![keyed_event(&topic, "order-1", b"created")],
        )))
        .await
        .unwrap()
        .into_inner();
    let event_id = response.event_ids[0].clone();

    let records = consume_until(
        &tansu.bootstrap,
        &topic,
        &HashSet::from([event_id.clone()]),
        Duration::from_millis(300),
        Duration::from_secs(60),
    )
    .await;
    let record = records
        .iter()
        .find(|record| record.event_id() == event_id)
        .unwrap();
    let header = record.header("traceparent").expect("a traceparent header");
    let (record_trace, record_parent) = parse_traceparent(&header);
    assert_eq!(
        record_trace, caller.trace_id,
        "the record continues the caller's trace"
    );
    assert!(
        record
            .header("tracestate")
            .is_some_and(|state| state.contains("caller=7")),
        "the caller's tracestate travels along: {:?}",
        record.header("tracestate")
    );

    let (server, publish, commit) = spans_when(&sink, "the append's spans", |spans| {
        let server = spans
            .iter()
            .find(|s| s.trace_id == caller.trace_id && s.kind == kind::SERVER)?;
        let publish = spans
            .iter()
            .find(|s| s.trace_id == caller.trace_id && s.kind == kind::PRODUCER)?;
        let commit = spans.iter().find(|s| {
            s.name == "append commit"
                && s.links
                    .iter()
                    .any(|(trace, span)| *trace == server.trace_id && *span == server.span_id)
        })?;
        Some((server.clone(), publish.clone(), commit.clone()))
    })
    .await;

    // The RPC's server span continues the caller's span.
    assert_eq!(server.name, "outboxd.v1.Outbox/Append");
    assert_eq!(server.parent_span_id, caller.span_id);
    assert_eq!(server.service_name, "outboxd-under-test");
    assert_eq!(server.attribute("rpc.system"), Some("grpc"));
    assert_eq!(server.attribute("rpc.service"), Some("outboxd.v1.Outbox"));
    assert_eq!(server.attribute("rpc.method"), Some("Append"));
    assert_eq!(server.attribute("rpc.grpc.status_code"), Some("0"));

    // The publish span sits under the append, and the consumer's record
    // names it as its parent.
    assert_eq!(publish.name, format!("{topic} publish"));
    assert_eq!(publish.parent_span_id, server.span_id);
    assert_eq!(record_parent, publish.span_id);
    assert_eq!(publish.attribute("messaging.system"), Some("kafka"));
    assert_eq!(
        publish.attribute("messaging.destination.name"),
        Some(topic.as_str())
    );
    assert_eq!(
        publish.attribute("messaging.kafka.message.key"),
        Some("order-1")
    );
    assert_eq!(
        publish.attribute("messaging.destination.partition.id"),
        Some(record.partition.to_string().as_str())
    );
    assert_eq!(
        publish.attribute("messaging.kafka.offset"),
        Some(record.offset.to_string().as_str())
    );
    assert_eq!(
        publish.attribute("messaging.message.id"),
        Some(event_id.as_str())
    );

    // The store commit that carried the append is linked to it.
    assert_eq!(commit.attribute("db.system.name"), Some("postgresql"));
    assert_eq!(commit.kind, kind::INTERNAL);
    process.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_collector_costs_no_append_and_no_event() {
    let tansu = Tansu::shared();
    let topic = unique("uncollected");
    tansu.create_topic(&topic, 3).await;
    let store = support::fresh_database().await;
    let mut config = test_config(&store, &tansu.bootstrap);
    // A collector that takes connections and never answers: every export
    // waits for its timeout.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.telemetry.otlp_endpoint = Some(format!("http://{}", black_hole.local_addr().unwrap()));
    let metrics_port = free_port();
    config.metrics_listen = Some(([127, 0, 0, 1], metrics_port).into());
    let log = std::env::temp_dir().join(unique("outboxd-uncollected") + ".log");
    let process = ServeProcess::start_logging(&config, free_port(), &[], "warn", Some(&log)).await;
    let mut client = client_of(&process).await;

    let mut ids = HashSet::new();
    let mut slowest = Duration::ZERO;
    for round in 0..40 {
        let caller = CallerSpan::new();
        let started = Instant::now();
        let response = client
            .append(
                caller.request(append_request(
                    immediate_token("orders", &format!("t-{round}")),
                    (0..5)
                        .map(|i| keyed_event(&topic, &format!("order-{i}"), b"created"))
                        .collect(),
                )),
            )
            .await
            .expect("appends succeed while the collector is away")
            .into_inner();
        slowest = slowest.max(started.elapsed());
        ids.extend(response.event_ids);
        // Spread the appends over several export attempts.
        if round % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    assert!(
        slowest < Duration::from_secs(2),
        "no append waits for span export, which takes 5 s to time out (slowest {slowest:?})"
    );
    let records = consume_until(
        &tansu.bootstrap,
        &topic,
        &ids,
        Duration::from_millis(300),
        Duration::from_secs(60),
    )
    .await;
    let read: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert!(ids.is_subset(&read), "every appended event reached Kafka");

    eventually(
        "dropped spans to be counted",
        Duration::from_secs(20),
        || async {
            let metrics = scrape_metrics(metrics_port).await;
            (support::metric_value(&metrics, "outboxd_spans_dropped_total") > 0.0).then_some(())
        },
    )
    .await;
    let stopping = Instant::now();
    process.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "a hanging collector does not hold up the shutdown ({:?})",
        stopping.elapsed()
    );
    drop(black_hole);
    let logged = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert_eq!(
        logged.matches("cannot export spans").count(),
        1,
        "an unreachable collector is logged once:\n{logged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_trace_and_span_of_a_dead_letter() {
    let sink = SpanSink::start(true).await.unwrap();
    let tansu = Tansu::shared();
    let topic = unique("poison-traced");
    tansu.create_topic(&topic, 1).await;
    let store = support::sqlite_url();
    let mut config = test_config(&store, &tansu.bootstrap);
    config.telemetry.otlp_endpoint = Some(sink.endpoint());
    // Records over 10 kB are refused by the producer: a permanent failure.
    config
        .kafka
        .producer
        .insert("message.max.bytes".into(), "10000".into());
    let log = std::env::temp_dir().join(unique("outboxd-json") + ".log");
    let process = ServeProcess::start_logging(
        &config,
        free_port(),
        &["--log-format", "json"],
        "info",
        Some(&log),
    )
    .await;
    let mut client = client_of(&process).await;
    let caller = CallerSpan::new();
    let mut poison = keyed_event(&topic, "order-9", b"");
    poison.payload = vec![b'p'; 50_000].into();
    let event_id = client
        .append(caller.request(append_request(
            immediate_token("orders", "t-poison"),
            vec![poison],
        )))
        .await
        .unwrap()
        .into_inner()
        .event_ids
        .remove(0);
    support::statuses_when(
        &client,
        std::slice::from_ref(&event_id),
        "the poison event to be dead-lettered",
        Duration::from_secs(30),
        |status| status.state == proto::EventState::DeadLettered as i32,
    )
    .await;

    let publish = spans_when(&sink, "the failed publish span", |spans| {
        spans
            .iter()
            .find(|s| s.trace_id == caller.trace_id && s.kind == kind::PRODUCER)
            .cloned()
    })
    .await;
    assert_eq!(publish.status_code, 2, "a failed publish is an error");
    assert!(
        publish
            .events
            .iter()
            .any(|(name, _)| name == "dead-lettering event"),
        "the dead letter is an event of the publish span: {:?}",
        publish.events
    );

    let line = eventually(
        "a JSON log line about the dead letter",
        Duration::from_secs(10),
        || {
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            async move {
                logged
                    .lines()
                    .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                    .find(|line| line["message"] == "dead-lettering event")
            }
        },
    )
    .await;
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["trace_id"], caller.trace_id.as_str());
    assert_eq!(line["span_id"], publish.span_id.as_str());
    assert!(line["timestamp"].is_string() && line["target"].is_string());
    process.stop();
    let logged = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    for text in logged.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(text).is_ok(),
            "every log line is JSON: {text}"
        );
    }
}

/// Waits until the metrics port takes connections (the gateway binds it
/// once it starts, after the gRPC listener the test bound).
async fn metrics_port_open(port: u16) {
    eventually(
        "the metrics port to open",
        Duration::from_secs(30),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

/// `GET path` on the metrics port: (status code, body).
async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer within 10s")
    .unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("an HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_store_not_kafka() {
    let cluster = PgCluster::start();
    let store = support::fresh_database_on(&cluster.url("postgres")).await;
    let kafka = MockKafka::start(1);
    let topic = unique("ready");
    kafka.create_topic(&topic, 1).await;
    // The broker is down: the relay's breaker opens, appends still succeed.
    kafka.broker_down(1);
    let mut config = test_config(&store, &kafka.bootstrap);
    let metrics_port = free_port();
    config.metrics_listen = Some(([127, 0, 0, 1], metrics_port).into());
    config.relay.breaker_cooldown = Duration::from_millis(200);
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    metrics_port_open(metrics_port).await;

    assert_eq!(
        http_get(metrics_port, "/healthz").await,
        (200, "ok\n".into())
    );
    let body = eventually(
        "ready, with the breaker open",
        Duration::from_secs(30),
        || async {
            let (status, body) = http_get(metrics_port, "/readyz").await;
            (status == 200 && body.contains("breaker: open")).then_some(body)
        },
    )
    .await;
    assert!(body.contains("store: ok"), "{body}");
    client
        .append(append_request(
            immediate_token("orders", "t-ready"),
            vec![keyed_event(&topic, "o-1", b"x")],
        ))
        .await
        .expect("an append while Kafka is away");

    cluster.stop_server();
    let (status, body) = eventually(
        "not ready without the store",
        Duration::from_secs(30),
        || async {
            let (status, body) = http_get(metrics_port, "/readyz").await;
            (status == 503).then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, 503);
    assert!(body.contains("store: unreachable"), "{body}");
    assert!(body.contains("breaker:"), "{body}");
    assert_eq!(
        http_get(metrics_port, "/healthz").await.0,
        200,
        "alive all the same"
    );

    cluster.start_server();
    eventually("ready again", Duration::from_secs(30), || async {
        (http_get(metrics_port, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    // What is in flight is delivered before the gateway stops.
    kafka.broker_up(1);
    gateway.stop().await;
}

/// The value of `name{labels…}` on the line naming every label of `labels`.
fn labelled_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_are_counted_per_method_and_status_code() {
    let store = support::sqlite_url();
    let tansu = Tansu::shared();
    let topic = unique("counted");
    tansu.create_topic(&topic, 1).await;
    let mut config = test_config(&store, &tansu.bootstrap);
    let metrics_port = free_port();
    config.metrics_listen = Some(([127, 0, 0, 1], metrics_port).into());
    let gateway = Gateway::start(config).await;
    let mut client = gateway.client().await;
    metrics_port_open(metrics_port).await;
    // The recorder is the process's: other tests here count too.
    let before = scrape_metrics(metrics_port).await;
    for round in 0..3 {
        client
            .append(append_request(
                immediate_token("orders", &format!("t-{round}")),
                vec![keyed_event(&topic, "o-1", b"x")],
            ))
            .await
            .unwrap();
    }
    let refused = client
        .append(append_request(
            immediate_token("orders", "t-bad"),
            vec![keyed_event("", "o-1", b"x")],
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let after = scrape_metrics(metrics_port).await;
    let appends = |code| {
        let labels = [
            ("service", "outboxd.v1.Outbox"),
            ("method", "Append"),
            ("code", code),
        ];
        labelled_value(&after, "outboxd_grpc_requests_total", &labels)
            - labelled_value(&before, "outboxd_grpc_requests_total", &labels)
    };
    assert_eq!(appends("OK"), 3.0, "{after}");
    assert_eq!(appends("INVALID_ARGUMENT"), 1.0, "{after}");
    let timed = |metrics: &str| {
        labelled_value(
            metrics,
            "outboxd_grpc_request_seconds_count",
            &[("service", "outboxd.v1.Outbox"), ("method", "Append")],
        )
    };
    assert_eq!(timed(&after) - timed(&before), 4.0, "{after}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_phase_commit_is_an_event_of_the_commit_span() {
    let sink = SpanSink::start(true).await.unwrap();
    let tansu = Tansu::shared();
    let topic = unique("committed");
    tansu.create_topic(&topic, 1).await;
    let store = support::sqlite_url();
    let mut config = test_config(&store, &tansu.bootstrap);
    config.telemetry.otlp_endpoint = Some(sink.endpoint());
    let process = ServeProcess::start(&config).await;
    let mut client = client_of(&process).await;
    let token = support::two_phase_token("orders", "t-2pc", Duration::from_secs(60));
    let appender = CallerSpan::new();
    let event_id = client
        .append(appender.request(append_request(
            token,
            vec![keyed_event(&topic, "order-1", b"created")],
        )))
        .await
        .unwrap()
        .into_inner()
        .event_ids
        .remove(0);
    let committer = CallerSpan::new();
    client
        .commit(committer.request(proto::CommitRequest {
            producer: "orders".into(),
            transaction_id: "t-2pc".into(),
        }))
        .await
        .unwrap();
    consume_until(
        &tansu.bootstrap,
        &topic,
        &HashSet::from([event_id]),
        Duration::from_millis(300),
        Duration::from_secs(60),
    )
    .await;

    let commit = spans_when(&sink, "the Commit span", |spans| {
        spans
            .iter()
            .find(|s| s.trace_id == committer.trace_id && s.kind == kind::SERVER)
            .cloned()
    })
    .await;
    assert_eq!(commit.name, "outboxd.v1.Outbox/Commit");
    let (_, resolved) = commit
        .events
        .iter()
        .find(|(name, _)| name == "token resolved")
        .unwrap_or_else(|| panic!("a token resolved event: {:?}", commit.events));
    assert_eq!(
        resolved.get("outboxd.transaction_id").map(String::as_str),
        Some("t-2pc")
    );
    assert_eq!(
        resolved.get("outboxd.event.state").map(String::as_str),
        Some("Ready")
    );
    // The event's publish span is in the appender's trace, under its Append.
    spans_when(&sink, "the publish span", |spans| {
        spans
            .iter()
            .find(|s| s.trace_id == appender.trace_id && s.kind == kind::PRODUCER)
            .map(|_| ())
    })
    .await;
    process.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_finished_while_stopping_are_exported() {
    let sink = SpanSink::start(true).await.unwrap();
    let tansu = Tansu::shared();
    let topic = unique("stopping");
    tansu.create_topic(&topic, 1).await;
    let store = support::sqlite_url();
    let mut config = test_config(&store, &tansu.bootstrap);
    config.telemetry.otlp_endpoint = Some(sink.endpoint());
    let process = ServeProcess::start(&config).await;
    let mut client = client_of(&process).await;
    let caller = CallerSpan::new();
    let event_id = client
        .append(caller.request(append_request(
            immediate_token("orders", "t-last"),
            vec![keyed_event(&topic, "order-1", b"created")],
        )))
        .await
        .unwrap()
        .into_inner()
        .event_ids
        .remove(0);
    // At once: the record goes out while the gateway drains, and its span
    // ends after the gateway stopped taking requests.
    process.stop();
    let records = consume_until(
        &tansu.bootstrap,
        &topic,
        &HashSet::from([event_id]),
        Duration::from_millis(300),
        Duration::from_secs(60),
    )
    .await;
    let (_, parent) = parse_traceparent(&records[0].header("traceparent").unwrap());
    let spans = sink.spans();
    let publish = spans
        .iter()
        .find(|s| s.trace_id == caller.trace_id && s.kind == kind::PRODUCER)
        .unwrap_or_else(|| panic!("the publish span was exported before exit: {spans:#?}"));
    assert_eq!(publish.span_id, parent);
}
