//! The measured side: a real `outboxd serve` process, and what the kernel
//! says about it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use super::{Arrivals, BenchArgs, LoadShape, load};

/// A gateway process started for the bench, stopped with SIGTERM.
pub struct Gateway {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
    access: crate::cli::client::GatewayAccess,
    _config: tempfile_path::TempPath,
}

mod tempfile_path {
    /// A file removed when dropped.
    pub struct TempPath(pub std::path::PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

impl Gateway {
    /// Starts `outboxd serve` on a free port; `brokers` overrides the bench's.
    pub async fn start(args: &BenchArgs, brokers: Option<&str>) -> anyhow::Result<Gateway> {
        let mut table: toml::Table = match &args.gateway_config {
            Some(path) => toml::from_str(&std::fs::read_to_string(path)?)?,
            None => toml::Table::new(),
        };
        let port = free_port()?;
        table.insert("listen".into(), format!("127.0.0.1:{port}").into());
        let section = |table: &mut toml::Table, name: &str| -> anyhow::Result<toml::Table> {
            Ok(match table.remove(name) {
                Some(toml::Value::Table(t)) => t,
                Some(_) => anyhow::bail!("[{name}] must be a table"),
                None => toml::Table::new(),
            })
        };
        let mut store = section(&mut table, "store")?;
        store.insert("url".into(), args.database_url.clone().into());
        table.insert("store".into(), store.into());
        let mut kafka = section(&mut table, "kafka")?;
        kafka.insert("brokers".into(), brokers.unwrap_or(&args.brokers).into());
        table.insert("kafka".into(), kafka.into());
        if brokers.is_some() {
            // A gateway that cannot reach its broker need not wait at shutdown.
            let mut relay = section(&mut table, "relay")?;
            relay.insert("drain_timeout".into(), "1s".into());
            table.insert("relay".into(), relay.into());
        }
        let path = std::env::temp_dir().join(format!(
            "outboxd-bench-{}.toml",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::write(&path, toml::to_string(&table)?)?;
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting outboxd serve")?;
        let pid = child.id().context("the gateway exited at once")?;
        let gateway = Gateway {
            child,
            pid,
            port,
            access: args.access.clone(),
            _config: tempfile_path::TempPath(path),
        };
        // Ready when it accepts a gRPC connection.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if gateway.endpoint().connect().await.is_ok() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the gateway did not accept connections within 60s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(gateway)
    }

    /// Its address, with the bench's TLS and token settings.
    pub fn endpoint(&self) -> crate::cli::client::Target {
        crate::cli::client::Target {
            address: format!("http://127.0.0.1:{}", self.port),
            access: self.access.clone(),
        }
    }

    fn proc_file(&self, name: &str) -> anyhow::Result<String> {
        let path = PathBuf::from(format!("/proc/{}/{name}", self.pid));
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// User plus system CPU time so far.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = self.proc_file("stat")?;
        // Fields after the command name, which is in parentheses.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or_default();
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0)
            + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
        Ok(ticks / clock_ticks_per_second())
    }

    fn status_kb(&self, field: &str) -> anyhow::Result<f64> {
        let status = self.proc_file("status")?;
        let kb = status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .with_context(|| format!("no {field} in /proc/{}/status", self.pid))?;
        Ok(kb)
    }

    /// Its resident memory now (MB).
    pub fn rss_mb(&self) -> anyhow::Result<f64> {
        Ok(self.status_kb("VmRSS:")? / 1024.0)
    }

    /// Its peak resident memory (MB).
    pub fn peak_rss_mb(&self) -> anyhow::Result<f64> {
        Ok(self.status_kb("VmHWM:")? / 1024.0)
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()?;
        ensure!(status.success(), "could not signal the gateway");
        let exit = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("the gateway did not stop within 60s")??;
        ensure!(exit.success(), "the gateway exited with {exit}");
        Ok(())
    }
}

/// The size of the database at `url`, in bytes.
pub async fn database_size(url: &str) -> anyhow::Result<u64> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await?;
    let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(&mut connection)
        .await?;
    Ok(size as u64)
}

/// Builds a backlog of `events` while the relay cannot reach any broker,
/// then starts a gateway that can and times the drain. Returns (events, s).
pub async fn backlog_drain(
    args: &BenchArgs,
    events: u64,
    run_id: &str,
) -> anyhow::Result<(u64, f64)> {
    let topic = format!("bench-backlog-{run_id}");
    super::create_topics(&args.brokers, std::slice::from_ref(&topic), args.partitions).await?;
    // A port nobody listens on: the broker is "down".
    let nowhere = format!("127.0.0.1:{}", free_port()?);
    let offline = Gateway::start(args, Some(&nowhere)).await?;
    println!("backlog: appending {events} events while the broker is unreachable");
    let batch = 500usize;
    let shape = LoadShape {
        connections: 2,
        concurrency: 16,
        batch,
        stream: false,
        keys: args.keys,
        payload_bytes: args.payload_bytes,
        rate: 0,
        duration: Duration::from_secs(3600),
    };
    let appended = load::fill(offline.endpoint(), topic.clone(), shape, events).await?;
    offline.stop().await?;
    println!(
        "backlog: {} events stored; starting a gateway that reaches the broker",
        appended.len()
    );
    let arrivals = Arrivals::start(&args.brokers, &topic)?;
    let started = Instant::now();
    let online = Gateway::start(args, None).await?;
    let missing = arrivals.wait_for_ids(&appended, Duration::from_secs(1800));
    let seconds = started.elapsed().as_secs_f64();
    online.stop().await?;
    arrivals.finish()?;
    ensure!(
        missing.is_empty(),
        "{} of the backlog's {} events did not reach Kafka",
        missing.len(),
        appended.len()
    );
    Ok((appended.len() as u64, seconds))
}
