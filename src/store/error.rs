//! The one place where database errors become store errors.

/// What went wrong in the store. Messages are for logs; the API layer decides
/// what a client sees (never SQL).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or the connection broke: the caller
    /// must not assume anything was stored.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A relay write was fenced off: another instance owns the shard now.
    #[error("lease of shard {shard} lost (epoch {epoch} is no longer current)")]
    LeaseLost {
        /// The shard written to.
        shard: u32,
        /// The epoch the writer held, now superseded.
        epoch: i64,
    },
    /// A schema migration could not be applied.
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The store's configuration is unusable (a bad or unsupported URL).
    #[error("store configuration: {0}")]
    Config(String),
    /// Stored data that outboxd cannot read back (a bug or manual edits).
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// A statement failed for a reason other than the connection (a
    /// constraint, a row that does not decode, …).
    #[error("store query failed: {0}")]
    Query(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(error),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // Class 08: connection exception; 57P01..03: admin shutdown,
                // crash shutdown, cannot connect now; 53300: too many connections.
                Some(code)
                    if code.starts_with("08")
                        || matches!(code, "57P01" | "57P02" | "57P03" | "53300") =>
                {
                    StoreError::Unavailable(error)
                }
                _ => StoreError::Query(error),
            },
            _ => StoreError::Query(error),
        }
    }
}

/// Whether `error` is a unique-constraint violation (SQLSTATE 23505 in
/// PostgreSQL; SQLite's extended code 2067 / 1555).
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => matches!(db.kind(), sqlx::error::ErrorKind::UniqueViolation),
        _ => false,
    }
}
