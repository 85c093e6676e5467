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
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args([
            "bench",
            "--database-url",
            &database,
            "--brokers",
            &tansu.bootstrap,
        ])
        .args([
            "--duration",
            "3s",
            "--connections",
            "2",
            "--concurrency",
            "8",
            "--batch",
            "20",
        ])
        .args(["--partitions", "3", "--backlog", "3000"])
        .arg("--report")
        .arg(&report)
        .env("RUST_LOG", "error")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
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
