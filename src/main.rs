//! The `outboxd` command: parses, sets up telemetry, runs.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use outboxd::config::{Config, Overrides};
use outboxd::telemetry::TelemetryConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "outboxd",
    version,
    about = "gRPC outbox ingestion gateway: durable appends, ordered relay to Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: gRPC API, store, relay to Kafka.
    Serve(ServeArgs),
    /// Apply the store's schema migrations and exit.
    Migrate(ServeArgs),
    /// Run on the embedded default: SQLite store plus an in-process broker.
    Dev(outboxd::cli::dev::DevArgs),
    /// Print the records of a topic with their headers.
    Tail(outboxd::cli::tail::TailArgs),
    /// Dead letters, redrive, pause/resume, backlog, leases, prepared transactions.
    Admin(outboxd::cli::admin::AdminArgs),
    /// Measure outboxd against a direct producer and a naive outbox.
    Bench(outboxd::cli::bench::BenchArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "OUTBOXD_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "OUTBOXD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Store URL: postgres://… or sqlite://path.
    #[arg(long, env = "OUTBOXD_DATABASE_URL")]
    database_url: Option<String>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "OUTBOXD_KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Shard count, used when the store is first migrated.
    #[arg(long, env = "OUTBOXD_SHARD_COUNT")]
    shard_count: Option<u32>,
    /// Log lines as text or as JSON objects (with trace and span ids).
    #[arg(long, value_enum, env = "OUTBOXD_LOG_FORMAT")]
    log_format: Option<outboxd::telemetry::LogFormat>,
}

impl ServeArgs {
    fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(
            self.config.as_deref(),
            &Overrides {
                listen: self.listen,
                store_url: self.database_url.clone(),
                brokers: self.brokers.clone(),
                shard_count: self.shard_count,
                log_format: self.log_format,
            },
        )?)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = args.load()?;
            let telemetry = outboxd::telemetry::init(&config.telemetry)?;
            let listener = tokio::net::TcpListener::bind(config.listen).await?;
            let served = outboxd::server::run(config, listener, shutdown_on_signal()).await;
            telemetry.shutdown().await;
            Ok(served?)
        }
        Command::Migrate(args) => {
            let config = args.load()?;
            let _telemetry = outboxd::telemetry::init(&TelemetryConfig {
                otlp_endpoint: None,
                ..config.telemetry.clone()
            })?;
            let store = outboxd::store::connect(
                &config.store.url,
                config.store.max_connections,
                config.relay.shard_count,
            )
            .await?;
            store.migrate().await?;
            println!(
                "store migrated: {} ({} shards)",
                outboxd::server::redact(&config.store.url),
                store.shard_count()
            );
            Ok(())
        }
        Command::Dev(args) => {
            let mut config = TelemetryConfig::default();
            config
                .apply_env(|name| std::env::var(name).ok())
                .map_err(anyhow::Error::msg)?;
            config.log_format = args.log_format;
            let telemetry = outboxd::telemetry::init(&config)?;
            let ran = outboxd::cli::dev::run(args, shutdown_on_signal()).await;
            telemetry.shutdown().await;
            ran
        }
        Command::Tail(args) => {
            let _telemetry = outboxd::telemetry::init(&TelemetryConfig::default())?;
            outboxd::cli::tail::run(args, shutdown_on_signal()).await
        }
        Command::Admin(args) => {
            let _telemetry = outboxd::telemetry::init(&TelemetryConfig::default())?;
            outboxd::cli::admin::run(args).await
        }
        Command::Bench(args) => {
            let _telemetry = outboxd::telemetry::init(&TelemetryConfig::default())?;
            outboxd::cli::bench::run(args).await.map(|_| ())
        }
    }
}

/// A token cancelled on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}
