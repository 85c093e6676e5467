//! Configuration, layered once: defaults < TOML file < `OUTBOXD_*`
//! environment < command-line flags, and validated before any port is bound.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::Limits;
use crate::ingest::IngestConfig;
use crate::relay::{KafkaConfig, RelayConfig, TokenConfig};
use crate::status::WatchSettings;

/// Where events are stored (`[store]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user:pass@host/db` or `sqlite://path/to/file.db`.
    pub url: String,
    /// Connection pool size.
    pub max_connections: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://outboxd.db".into(),
            max_connections: 16,
        }
    }
}

/// Status watch settings (`[watch]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    /// How often a watch re-reads the store for changes made elsewhere.
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
    /// Status changes buffered for slow watchers before they re-sync.
    pub bus_capacity: usize,
    /// Open WatchStatus streams, all callers together; one more is refused
    /// with RESOURCE_EXHAUSTED.
    pub max_open: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            resync_interval: Duration::from_secs(1),
            bus_capacity: 65_536,
            max_open: 10_000,
        }
    }
}

impl WatchConfig {
    /// The settings each watch runs with.
    pub fn settings(&self) -> WatchSettings {
        WatchSettings {
            resync_interval: self.resync_interval,
            ..WatchSettings::default()
        }
    }
}

/// The whole configuration of `outboxd serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus metrics (`/metrics`) listen address; off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// How long shutdown may take before outboxd stops anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// `[store]`: where events are stored.
    pub store: StoreConfig,
    /// `[kafka]`: the brokers and producer properties.
    pub kafka: KafkaConfig,
    /// `[relay]`: shards, leases, retries and housekeeping.
    pub relay: RelayConfig,
    /// `[ingest]`: the coalescing writers.
    pub ingest: IngestConfig,
    /// `[limits]`: sizes and rates a caller may not exceed.
    pub limits: Limits,
    /// `[watch]`: status watches.
    pub watch: WatchConfig,
    /// `[tokens]`: resolving transaction tokens.
    pub tokens: TokenConfig,
    /// `[auth]`: identities and what they may do.
    pub auth: crate::api::AuthConfig,
    /// `[tls]`: the listener's certificate and, for mutual TLS, the client CA.
    pub tls: crate::tls::TlsConfig,
    /// `[telemetry]`: logs and spans.
    pub telemetry: crate::telemetry::TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            shutdown_timeout: Duration::from_secs(30),
            store: StoreConfig::default(),
            kafka: KafkaConfig::default(),
            relay: RelayConfig::default(),
            ingest: IngestConfig::default(),
            limits: Limits::default(),
            watch: WatchConfig::default(),
            tokens: TokenConfig::default(),
            auth: crate::api::AuthConfig::default(),
            tls: crate::tls::TlsConfig::default(),
            telemetry: crate::telemetry::TelemetryConfig::default(),
        }
    }
}

/// Values from the environment and the command line; each set one wins over
/// the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`, `OUTBOXD_LISTEN`: the gRPC listen address.
    pub listen: Option<SocketAddr>,
    /// `--database-url`, `OUTBOXD_DATABASE_URL`: the store's URL.
    pub store_url: Option<String>,
    /// `--brokers`, `OUTBOXD_KAFKA_BROKERS`: the Kafka bootstrap servers.
    pub brokers: Option<String>,
    /// `--shard-count`, `OUTBOXD_SHARD_COUNT`: shards of a new store.
    pub shard_count: Option<u32>,
    /// `--log-format`, `OUTBOXD_LOG_FORMAT`: text or JSON log lines.
    pub log_format: Option<crate::telemetry::LogFormat>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file named.
        path: String,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or names unknown settings.
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        /// The file named.
        path: String,
        /// What the TOML parser refused, with its place in the file.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or settings contradict each other.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Layers the file (if any) and the overrides on the defaults, and validates.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.display().to_string(),
                    source: Box::new(source),
                })?
            }
            None => Config::default(),
        };
        // OpenTelemetry's standard variables, between the file and the flags.
        config
            .telemetry
            .apply_env(|name| std::env::var(name).ok())
            .map_err(ConfigError::Invalid)?;
        if let Some(format) = overrides.log_format {
            config.telemetry.log_format = format;
        }
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(url) = &overrides.store_url {
            config.store.url = url.clone();
        }
        if let Some(brokers) = &overrides.brokers {
            config.kafka.brokers = brokers.clone();
        }
        if let Some(shards) = overrides.shard_count {
            config.relay.shard_count = shards;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every value and the way settings go together, so that no bad
    /// setting is found only after a port is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: &str| Err(ConfigError::Invalid(message.to_owned()));
        if !(self.store.url.starts_with("postgres://")
            || self.store.url.starts_with("postgresql://")
            || self.store.url.starts_with("sqlite:"))
        {
            return invalid("store.url must start with postgres://, postgresql:// or sqlite:");
        }
        if self.store.max_connections < 2 {
            return invalid("store.max_connections must be at least 2");
        }
        self.kafka.validate().map_err(ConfigError::Invalid)?;
        if !(1..=4096).contains(&self.relay.shard_count) {
            return invalid("relay.shard_count must be between 1 and 4096");
        }
        if self.relay.read_batch == 0 || self.relay.max_in_flight_per_shard == 0 {
            return invalid("relay.read_batch and relay.max_in_flight_per_shard must be positive");
        }
        if self.relay.lease_ttl < Duration::from_secs(1) {
            return invalid("relay.lease_ttl must be at least 1s");
        }
        if self.relay.max_attempts == 0 {
            return invalid("relay.max_attempts must be at least 1");
        }
        if let Some(topic) = &self.relay.dead_letter_topic
            && let Some(reason) = crate::domain::validate_topic(topic)
        {
            return Err(ConfigError::Invalid(format!(
                "relay.dead_letter_topic {reason}"
            )));
        }
        if self.relay.breaker_cooldown.is_zero()
            || self.relay.breaker_max_cooldown < self.relay.breaker_cooldown
        {
            return invalid(
                "relay.breaker_cooldown must be positive and at most relay.breaker_max_cooldown",
            );
        }
        if self.relay.retention.is_zero() {
            return invalid("relay.retention must be positive");
        }
        if self.relay.poll_interval.is_zero() {
            return invalid("relay.poll_interval must be positive");
        }
        if self.ingest.writers == 0 || self.ingest.writers > 64 {
            return invalid("ingest.writers must be between 1 and 64");
        }
        if self.ingest.max_coalesced_bytes < self.limits.max_request_bytes
            || self.ingest.max_coalesced_bytes > 512 * 1024 * 1024
        {
            return invalid(
                "ingest.max_coalesced_bytes must be at least limits.max_request_bytes and at most 512 MiB (PostgreSQL refuses messages of 1 GB)",
            );
        }
        if self.ingest.max_queued_bytes < self.limits.max_request_bytes {
            return invalid("ingest.max_queued_bytes must be at least limits.max_request_bytes");
        }
        if self.limits.max_concurrent_requests == 0 {
            return invalid("limits.max_concurrent_requests must be positive");
        }
        if self.limits.max_batch_events == 0 {
            return invalid("limits.max_batch_events must be positive");
        }
        if self.tokens.resolve_interval.is_zero() {
            return invalid("tokens.resolve_interval must be positive");
        }
        for (producer, url) in &self.tokens.postgres_xid_clusters {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::Invalid(format!(
                    "tokens.postgres_xid_clusters.{producer} must be a postgres:// URL"
                )));
            }
        }
        self.auth.validate().map_err(ConfigError::Invalid)?;
        self.tls.validate().map_err(ConfigError::Invalid)?;
        if let Some(identity) = self
            .auth
            .identities
            .iter()
            .find(|identity| !identity.client_certificate.is_empty())
            && !self.tls.mutual()
        {
            return Err(ConfigError::Invalid(format!(
                "auth.identities {:?}: client_certificate needs mutual TLS (tls.client_ca)",
                identity.name
            )));
        }
        if self.watch.max_open == 0 {
            return invalid("watch.max_open must be positive");
        }
        if self.watch.resync_interval.is_zero() {
            return invalid("watch.resync_interval must be positive");
        }
        self.telemetry.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outboxd.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:7000\"\n[store]\nurl = \"postgres://db/outbox\"\n[relay]\npoll_interval = \"250ms\"\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&path),
            &Overrides {
                brokers: Some("k1:9092".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(config.listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(config.store.url, "postgres://db/outbox");
        assert_eq!(config.kafka.brokers, "k1:9092");
        assert_eq!(config.relay.poll_interval, Duration::from_millis(250));
    }

    #[test]
    fn rejects_what_would_break_ordering_or_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outboxd.toml");
        std::fs::write(
            &path,
            "[kafka.producer]\n\"enable.idempotence\" = \"false\"\n",
        )
        .unwrap();
        let error = Config::load(Some(&path), &Overrides::default()).unwrap_err();
        assert!(error.to_string().contains("enable.idempotence"), "{error}");
        std::fs::write(&path, "[relay]\nshards = 3\n").unwrap();
        let error = Config::load(Some(&path), &Overrides::default()).unwrap_err();
        assert!(error.to_string().contains("shards"), "{error}");
    }

    #[test]
    fn telemetry_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outboxd.toml");
        std::fs::write(
            &path,
            "[telemetry]\notlp_endpoint = \"http://collector:4317\"\nsampling_ratio = 0.5\nlog_format = \"json\"\n[telemetry.resource_attributes]\nregion = \"eu\"\n",
        )
        .unwrap();
        let config = Config::load(Some(&path), &Overrides::default()).unwrap();
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        assert_eq!(config.telemetry.sampling_ratio, 0.5);
        assert_eq!(
            config.telemetry.log_format,
            crate::telemetry::LogFormat::Json
        );
        assert_eq!(config.telemetry.resource_attributes["region"], "eu");
        std::fs::write(&path, "[telemetry]\nsampling_ratio = 2.0\n").unwrap();
        let error = Config::load(Some(&path), &Overrides::default()).unwrap_err();
        assert!(error.to_string().contains("sampling_ratio"), "{error}");
    }

    #[test]
    fn refuses_a_zero_retention() {
        let mut config = Config::default();
        config.relay.retention = Duration::ZERO;
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("relay.retention"), "{error}");
    }

    #[test]
    fn certificate_identities_need_mutual_tls() {
        let mut config = Config::default();
        config
            .auth
            .identities
            .push(crate::api::auth::IdentityConfig {
                name: "orders".into(),
                client_certificate: "orders.internal".into(),
                ..Default::default()
            });
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("tls.client_ca"), "{error}");
        config.tls.cert = Some("server.pem".into());
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("tls.key"), "{error}");
        config.tls.key = Some("server.key".into());
        config.tls.client_ca = Some("clients.pem".into());
        config.validate().unwrap();
    }
}
