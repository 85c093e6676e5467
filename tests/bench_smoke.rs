//! A few seconds of `outboxd bench`, so that it cannot rot. It asserts that
//! the run proves something, never a speed: no append failed, every
//! acknowledged event id was read back from Kafka (the bench fails
//! otherwise, and reports the count), and every baseline published.

mod support;

use support::Tansu;

/// The value column of the report's row named `figure`.
fn figure<'a>(report: &'a str, figure: &str) -> &'a str {
    report
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("| ")?.strip_prefix(figure)?;
            rest.strip_prefix(" | ")?.strip_suffix(" |")
        })
        .unwrap_or_else(|| panic!("no row {figure:?} in the report:\n{report}"))
}

/// The markdown report of an `outboxd bench` run with `args`, on a fresh
/// database and the shared broker.
async fn bench_report(args: &[&str]) -> String {
    let tansu = Tansu::shared();
    let database = support::fresh_database().await;
    let report = std::env::temp_dir().join(format!("{}.md", support::unique("bench-report")));
    let report_path = report.display().to_string();
    let mut command = vec![
        "bench",
        "--database-url",
        &database,
        "--brokers",
        &tansu.bootstrap,
        "--report",
        &report_path,
    ];
    command.extend_from_slice(args);
    support::run_outboxd(&command).await;
    let markdown = std::fs::read_to_string(&report).expect("the report was written");
    let _ = std::fs::remove_file(&report);
    println!("{markdown}");
    markdown
}

/// The number in a report value (before any unit or `;`).
fn number(value: &str) -> f64 {
    value
        .split(|c: char| c == ';' || c == '×' || c.is_whitespace())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number in {value:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_bench_run_completes_with_every_event_delivered() {
    let markdown = bench_report(&[
        "--duration",
        "3s",
        "--connections",
        "2",
        "--concurrency",
        "8",
        "--batch",
        "20",
        "--partitions",
        "3",
        "--backlog",
        "3000",
    ])
    .await;

    assert!(
        number(figure(&markdown, "events acknowledged")) > 0.0,
        "{markdown}"
    );
    assert_eq!(
        number(figure(&markdown, "failed requests")),
        0.0,
        "no append failed:\n{markdown}"
    );
    assert_eq!(
        number(figure(
            &markdown,
            "acknowledged events missing from Kafka (matched by event id)"
        )),
        0.0,
        "{markdown}"
    );
    // Each baseline's rate, and for the relays how many they published.
    for (row, field) in [
        ("direct produce (records/s)", 0),
        (
            "naive outbox relay (events/s; published; offered events/s)",
            1,
        ),
        (
            "careful outbox relay (events/s; published; offered events/s)",
            1,
        ),
    ] {
        let value = figure(&markdown, row);
        let published = value.split("; ").nth(field).map_or(0.0, number);
        assert!(published > 0.0, "{row}: nothing published\n{markdown}");
    }
    for row in [
        "append ack latency p50 / p99 / p99.9 (ms, from the scheduled send)",
        "append service time p50 / p99 / p99.9 (ms, from the actual send)",
        "publish lag p50 / p99 (scheduled send → readable in Kafka, ms)",
        "outboxd / direct produce",
        "outboxd / naive outbox",
        "outboxd / careful outbox",
    ] {
        figure(&markdown, row);
    }
    assert!(
        markdown.contains("| backlog of 3000 built while the broker was unreachable"),
        "{markdown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_given_as_a_fraction_of_direct_produce_is_set_from_its_measure() {
    let markdown = bench_report(&[
        "--duration",
        "2s",
        "--concurrency",
        "4",
        "--batch",
        "10",
        "--rate-fraction",
        "0.01",
        "--skip-baselines",
    ])
    .await;
    let direct = number(figure(&markdown, "direct produce (records/s)"));
    let load = markdown
        .lines()
        .find(|line| line.starts_with("Load:"))
        .expect("the load line");
    let rate = number(
        load.split("rate ")
            .nth(1)
            .expect("the rate in the load line"),
    );
    assert!(
        load.contains("0.01 of the direct-produce rate measured first"),
        "{load}"
    );
    assert_eq!(rate, (direct * 0.01).round().max(1.0), "{markdown}");
    assert_eq!(
        number(figure(
            &markdown,
            "acknowledged events missing from Kafka (matched by event id)"
        )),
        0.0,
        "{markdown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_bench_run_exports_its_spans() {
    let markdown = bench_report(&[
        "--duration",
        "2s",
        "--connections",
        "2",
        "--concurrency",
        "8",
        "--batch",
        "20",
        "--partitions",
        "3",
        "--skip-baselines",
        "--trace",
    ])
    .await;
    assert!(markdown.contains("Tracing on"), "{markdown}");
    assert_eq!(
        number(figure(
            &markdown,
            "acknowledged events missing from Kafka (matched by event id)"
        )),
        0.0,
        "{markdown}"
    );
    let spans = number(figure(
        &markdown,
        "spans received by the OTLP sink (per acknowledged event)",
    ));
    assert!(
        spans > 0.0,
        "the gateway's spans reached the sink:\n{markdown}"
    );
}
