//! Asking a caller's PostgreSQL cluster about its transactions, for
//! postgres_xid tokens.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

use super::StoreError;

/// What `pg_xact_status` said about one xid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XactStatus {
    /// Still running, or not yet begun: ask again later.
    InProgress,
    /// Committed: the token's events may be published.
    Committed,
    /// Rolled back, or its session died before commit.
    Aborted,
    /// NULL: too old to know (its commit log was truncated).
    Unknown,
}

/// A PostgreSQL cluster whose transactions can be asked about.
#[derive(Clone)]
pub struct XidSource {
    pool: PgPool,
}

impl XidSource {
    /// A cluster reached through an existing pool (the store's own).
    pub fn from_pool(pool: PgPool) -> Self {
        XidSource { pool }
    }

    /// A small pool to the cluster at `url` (connections made on first use).
    pub fn connect_lazy(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("bad postgres url: {e}")))?
            .application_name("outboxd-xid-resolver");
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        Ok(XidSource { pool })
    }

    /// The cluster's `system_identifier`.
    pub async fn system_identifier(&self) -> Result<u64, StoreError> {
        let id: i64 = sqlx::query_scalar("SELECT system_identifier FROM pg_control_system()")
            .fetch_one(&self.pool)
            .await?;
        Ok(id as u64)
    }

    /// The status of each xid, in one round trip.
    pub async fn statuses(&self, xids: &[u64]) -> Result<Vec<(u64, XactStatus)>, StoreError> {
        let as_text: Vec<String> = xids.iter().map(u64::to_string).collect();
        // pg_xact_status raises an error for an xid not yet assigned. An
        // xid at or past the snapshot's xmax has not completed: it is a
        // transaction still running (newer than every completed one) or one
        // not yet begun. Either way it waits; the system identifier, not
        // the xid, tells whether a token belongs to this cluster.
        let rows = sqlx::query(
            "SELECT x, CASE WHEN x::xid8 < pg_snapshot_xmax(pg_current_snapshot()) \
                            THEN coalesce(pg_xact_status(x::xid8), 'unknown') \
                            ELSE 'in progress' END AS status \
             FROM unnest($1::text[]) AS x",
        )
        .bind(&as_text)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let xid: String = row.try_get("x")?;
                let status: String = row.try_get("status")?;
                let status = match status.as_str() {
                    "in progress" => XactStatus::InProgress,
                    "committed" => XactStatus::Committed,
                    "aborted" => XactStatus::Aborted,
                    _ => XactStatus::Unknown,
                };
                Ok((xid.parse().unwrap_or_default(), status))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}
