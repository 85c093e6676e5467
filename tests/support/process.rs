//! `outboxd` as a separate process: `serve` with signals, its metrics, and
//! one-shot commands.

use super::*;

/// How long a graceful stop of `outboxd serve` may take: its shutdown
/// timeout (20 s in [`test_config`]) and a margin.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(45);

/// A real `outboxd serve` process, for tests that kill or pause it.
pub struct ServeProcess {
    pub address: SocketAddr,
    child: Child,
    _config: PathBuf,
}

impl ServeProcess {
    /// Starts `outboxd serve` with `config` (its listen address is set here)
    /// and waits until it accepts gRPC connections.
    pub async fn start(config: &Config) -> ServeProcess {
        Self::start_on(config, free_port()).await
    }

    pub async fn start_on(config: &Config, port: u16) -> ServeProcess {
        Self::start_logging(config, port, &[], "warn", None).await
    }

    /// Like [`ServeProcess::start_on`], with more `serve` flags, `RUST_LOG`
    /// set to `log_filter`, and stderr written to `log` when given.
    pub async fn start_logging(
        config: &Config,
        port: u16,
        flags: &[&str],
        log_filter: &str,
        log: Option<&Path>,
    ) -> ServeProcess {
        let process = Self::spawn_with(config, port, flags, log_filter, log);
        let endpoint = process.endpoint();
        eventually(
            "outboxd serve to accept connections",
            Duration::from_secs(60),
            || {
                let endpoint = endpoint.clone();
                async move { OutboxClient::connect(endpoint).await.ok() }
            },
        )
        .await;
        process
    }

    /// Starts `outboxd serve` without waiting for it to accept connections
    /// (for a listener that plain gRPC cannot probe, such as TLS).
    pub fn spawn_on(config: &Config, port: u16) -> ServeProcess {
        Self::spawn_with(config, port, &[], "warn", None)
    }

    fn spawn_with(
        config: &Config,
        port: u16,
        flags: &[&str],
        log_filter: &str,
        log: Option<&Path>,
    ) -> ServeProcess {
        let mut config = config.clone();
        config.listen = SocketAddr::from(([127, 0, 0, 1], port));
        let path = std::env::temp_dir().join(unique("outboxd-serve") + ".toml");
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        watchdog(&format!("rm -f {}", path.display()));
        let stderr = match log {
            Some(log) => Stdio::from(std::fs::File::create(log).expect("creating the log file")),
            None => Stdio::inherit(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(["serve", "--config"])
            .arg(&path)
            .args(flags)
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting outboxd serve");
        watchdog(&format!("kill -9 {} 2>/dev/null", child.id()));
        ServeProcess {
            address: config.listen,
            child,
            _config: path,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal}");
    }

    /// The most memory the process has had resident (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("reading the process status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in the process status");
        kib * 1024
    }

    /// SIGHUP: read the TLS certificates again.
    pub fn hang_up(&self) {
        self.signal("-HUP");
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// SIGSTOP / SIGCONT: a long pause, as a stalled VM or GC would make.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM and wait for a clean exit; a process still running after
    /// [`STOP_TIMEOUT`] is killed and fails the test.
    pub fn stop(mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("outboxd serve did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "outboxd serve exited with {status}");
    }
}

/// A gateway's Prometheus metrics (`metrics_listen` on `port`), as text.
pub async fn scrape_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("the metrics endpoint answers within 10s")
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of an unlabelled counter or gauge in scraped metrics (0 when
/// it has not been set yet).
pub fn metric_value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs the `outboxd` binary with `args`; fails the test unless it exits 0.
/// Returns what it printed.
pub async fn run_outboxd(args: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .await
        .expect("running outboxd");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "outboxd {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
