//! How long a postgres_xid token takes to resolve: from the caller's COMMIT
//! to its event being READY, and to being PUBLISHED.

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use sqlx::Connection;

use super::{histogram, quantile_ms};
use crate::proto;
use crate::proto::outbox_client::OutboxClient;

/// How long postgres_xid tokens took to resolve, from the caller's COMMIT.
pub struct XidLatency {
    /// Transactions timed.
    pub samples: usize,
    /// Until READY (µs).
    pub ready: Histogram<u64>,
    /// Until PUBLISHED (µs).
    pub published: Histogram<u64>,
}

impl XidLatency {
    /// One line of p50 and p99 for the report.
    pub fn summary(&self) -> String {
        format!(
            "{} samples: READY p50 {:.1} ms, p99 {:.1} ms; PUBLISHED p50 {:.1} ms, p99 {:.1} ms",
            self.samples,
            quantile_ms(&self.ready, 0.5),
            quantile_ms(&self.ready, 0.99),
            quantile_ms(&self.published, 0.5),
            quantile_ms(&self.published, 0.99)
        )
    }
}

/// `samples` caller transactions on `caller_url`, one after another: each
/// appends one event with its xid token, commits, and is watched to the end.
pub async fn measure(
    gateway: &crate::cli::client::Target,
    caller_url: &str,
    topic: &str,
    samples: usize,
) -> anyhow::Result<XidLatency> {
    let mut client = OutboxClient::new(gateway.connect().await?);
    let mut caller = sqlx::PgConnection::connect(caller_url).await?;
    let (mut ready, mut published) = (histogram(), histogram());
    let run = uuid::Uuid::now_v7().simple().to_string();
    for n in 0..samples {
        sqlx::query("BEGIN").execute(&mut caller).await?;
        let (xid, system_id): (String, i64) = sqlx::query_as(
            "SELECT pg_current_xact_id()::text, (SELECT system_identifier FROM pg_control_system())",
        )
        .fetch_one(&mut caller)
        .await?;
        let response = client
            .append(proto::AppendRequest {
                token: Some(proto::TransactionToken {
                    producer: format!("xid-probe-{run}"),
                    transaction_id: format!("t{n}"),
                    mode: proto::TokenMode::PostgresXid as i32,
                    postgres_xid: xid.parse()?,
                    postgres_system_id: system_id as u64,
                    ..Default::default()
                }),
                sequence: 0,
                events: vec![proto::Event {
                    topic: topic.to_owned(),
                    key: Some(format!("probe-{n}").into_bytes().into()),
                    payload: b"probe".to_vec().into(),
                    ..Default::default()
                }],
                correlation: 0,
            })
            .await?
            .into_inner();
        let mut watch = client
            .watch_status(proto::WatchStatusRequest {
                event_ids: response.event_ids.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        // The snapshot comes first: PENDING.
        watch.message().await?.context("the watch ended early")?;
        sqlx::query("COMMIT").execute(&mut caller).await?;
        let committed = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(update) = watch.message().await? {
                let state = update.status.map(|s| s.state).unwrap_or_default();
                let micros = committed.elapsed().as_micros().max(1) as u64;
                if state == proto::EventState::Ready as i32 {
                    let _ = ready.record(micros);
                } else if state == proto::EventState::Published as i32 {
                    if ready.len() < published.len() + 1 {
                        // READY and PUBLISHED in one step: both at once.
                        let _ = ready.record(micros);
                    }
                    let _ = published.record(micros);
                }
            }
            anyhow::Ok(())
        })
        .await
        .context("a postgres_xid token did not resolve within 30s")??;
    }
    Ok(XidLatency {
        samples,
        ready,
        published,
    })
}
