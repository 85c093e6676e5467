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
                // crash shutdown, cannot connect now; 53300: too many
                // connections. Class 40: the transaction was rolled back as
                // a deadlock or serialization victim; done again, it can
                // succeed.
                Some(code)
                    if code.starts_with("08")
                        || code.starts_with("40")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A database error with only a SQLSTATE.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }

        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn of(code: &'static str) -> StoreError {
        StoreError::from(sqlx::Error::Database(Box::new(Coded(code))))
    }

    #[test]
    fn a_deadlock_or_serialization_victim_may_be_tried_again() {
        // Writers lock segment rows; a victim of a deadlock between them
        // must be retried, not taken for a bad row (which the relay would
        // dead-letter).
        assert!(matches!(of("40P01"), StoreError::Unavailable(_)));
        assert!(matches!(of("40001"), StoreError::Unavailable(_)));
        assert!(matches!(of("08006"), StoreError::Unavailable(_)));
        assert!(matches!(of("23505"), StoreError::Query(_)));
    }
}
