//! # outboxd
//!
//! A gRPC outbox ingestion gateway. Services hand it the events of their
//! business transactions; it stores them durably, decides when each may be
//! published, relays them to Kafka in per-key order and streams their
//! delivery status back.
//!
//! # Layout
//!
//! - [`domain`]: events, transaction tokens, states, validation, shard hashing; no I/O.
//! - [`store`]: the `Store` trait and its PostgreSQL and SQLite implementations; all SQL.
//! - [`ingest`]: the coalescing writer that commits concurrent appends together.
//! - [`relay`]: shard leases, shard workers and the Kafka publisher.
//! - [`status`]: the status bus and `WatchStatus` fan-out.
//! - [`api`]: gRPC adapters only: proto ↔ domain, and errors → status codes.
//! - [`config`]: layered configuration, validated before anything starts.
//! - [`tls`]: the listener's transport: TLS, mutual TLS, certificate reloads.
//! - [`server`]: wiring of one instance and its orderly shutdown.
//! - [`telemetry`]: logs (text or JSON), OpenTelemetry spans over OTLP, metrics,
//!   request metrics, `/healthz` and `/readyz`.
//! - [`proto`]: the generated `outboxd.v1` messages, clients and servers.
//! - [`cli`]: apart from the server's rooms above, the operator tools that
//!   drive a gateway: `admin`, `bench`, `dev`, `tail`, and the `client` they
//!   connect with.
//!
//! How each guarantee is kept: `docs/architecture.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod cli;
pub mod config;
pub mod domain;
pub mod ingest;
pub mod relay;
pub mod server;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;

/// The generated `outboxd.v1` API.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("outboxd.v1");

    /// Encoded descriptors of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("outboxd_descriptor");
}
