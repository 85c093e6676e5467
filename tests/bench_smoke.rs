//! A few seconds of `outboxd bench`, so that it cannot rot. It asserts that
//! the run completed and every acknowledged event arrived (the bench itself
//! fails otherwise), never a speed.

mod support;

use support::Tansu;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_bench_run_completes_with_every_event_delivered() {
    let tansu = Tansu::shared();
    let database = support::fresh_database().await;
    let report = std::env::temp_dir().join(format!("{}.md", support::unique("bench-report")));
    let report_path = report.display().to_string();
    support::run_outboxd(&[
        "bench",
        "--database-url",
        &database,
        "--brokers",
        &tansu.bootstrap,
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
        "--report",
        &report_path,
    ])
    .await;
    let markdown = std::fs::read_to_string(&report).expect("the report was written");
    for figure in [
        "events acknowledged",
        "append ack latency",
        "publish lag",
        "direct produce",
        "naive outbox",
        "outboxd / direct produce",
        "backlog of 3000",
    ] {
        assert!(
            markdown.contains(figure),
            "{figure} in the report:\n{markdown}"
        );
    }
    let _ = std::fs::remove_file(report);
}
