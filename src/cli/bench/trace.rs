//! `outboxd bench --trace`: the measured gateway records every trace
//! (sampling ratio 1.0) and exports its spans over OTLP to a span sink in
//! the bench process, which counts them. The sink costs the machine some
//! CPU but not the gateway process, whose CPU the bench reports.

use anyhow::Context;

use super::BenchArgs;
use crate::telemetry::sink::SpanSink;

/// A running sink, and the bench arguments whose gateway configuration
/// exports to it.
pub struct TracedRun {
    /// Where the gateway's spans go; it counts them.
    pub sink: SpanSink,
    /// The bench's arguments with the traced gateway configuration.
    pub args: BenchArgs,
    /// The gateway configuration written for the run; removed on drop.
    config: std::path::PathBuf,
}

impl Drop for TracedRun {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

impl TracedRun {
    /// Starts the sink and writes `args`' gateway configuration with
    /// `[telemetry]` pointing at it.
    pub async fn start(args: &BenchArgs) -> anyhow::Result<TracedRun> {
        let sink = SpanSink::start(false)
            .await
            .context("starting the span sink")?;
        let mut table: toml::Table = match &args.gateway_config {
            Some(path) => toml::from_str(&std::fs::read_to_string(path)?)?,
            None => toml::Table::new(),
        };
        let mut telemetry = match table.remove("telemetry") {
            Some(toml::Value::Table(telemetry)) => telemetry,
            Some(_) => anyhow::bail!("[telemetry] must be a table"),
            None => toml::Table::new(),
        };
        telemetry.insert("otlp_endpoint".into(), sink.endpoint().into());
        telemetry.insert("sampling_ratio".into(), 1.0.into());
        table.insert("telemetry".into(), telemetry.into());
        let config = std::env::temp_dir().join(format!(
            "outboxd-bench-traced-{}.toml",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::write(&config, toml::to_string(&table)?)?;
        let mut traced_args = args.clone();
        traced_args.gateway_config = Some(config.clone());
        Ok(TracedRun {
            sink,
            args: traced_args,
            config,
        })
    }
}
