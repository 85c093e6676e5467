//! `Commit` and `Abort` of two_phase transactions.

use std::sync::Arc;

use crate::domain::TransactionRef;
use crate::relay::StateChanges;
use crate::store::{Resolved, Store, StoreError, Verdict};

/// Why a Commit or Abort was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No such transaction of the producer (the id it names).
    #[error("transaction {0:?} not found")]
    NotFound(String),
    /// The transaction's token is not two_phase.
    #[error(
        "transaction {transaction_id:?} is a {mode} transaction; only two_phase transactions are committed or aborted"
    )]
    WrongMode {
        /// The transaction.
        transaction_id: String,
        /// Its token mode.
        mode: &'static str,
    },
    /// The transaction was resolved the other way (or expired).
    #[error("transaction {transaction_id:?} is already {resolution}")]
    Refused {
        /// The transaction.
        transaction_id: String,
        /// How it was resolved: "committed", "aborted", "expired".
        resolution: String,
    },
    /// The store failed; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Resolves two_phase transactions and tells the relay and watchers.
#[derive(Clone)]
pub struct Transactions {
    /// Where transactions are resolved.
    pub store: Arc<dyn Store>,
    /// Where the events' state changes are announced.
    pub changes: StateChanges,
}

impl Transactions {
    /// Makes the transaction's events publishable; idempotent. Returns the
    /// number of events in the transaction.
    pub async fn commit(&self, transaction: &TransactionRef) -> Result<u64, ResolveError> {
        let resolution = self.store.commit_transaction(transaction).await?;
        self.finish(transaction, resolution)
    }

    /// Discards the transaction's events; idempotent.
    pub async fn abort(&self, transaction: &TransactionRef) -> Result<u64, ResolveError> {
        let resolution = self.store.abort_transaction(transaction).await?;
        self.finish(transaction, resolution)
    }

    fn finish(
        &self,
        transaction: &TransactionRef,
        resolution: crate::store::Resolution,
    ) -> Result<u64, ResolveError> {
        // Changes are announced even when the request is refused: an expired
        // transaction is discarded by the Commit that finds it expired.
        if let Some(status) = resolution.changed.first() {
            crate::telemetry::span_event(
                "token resolved",
                crate::telemetry::resolution_attributes(status),
            );
        }
        self.changes.announce(Resolved {
            changed: resolution.changed,
            shards: resolution.shards,
        });
        let transaction_id = transaction.transaction_id.clone();
        match resolution.verdict {
            Verdict::Done | Verdict::AlreadyDone => Ok(resolution.events),
            Verdict::NotFound => Err(ResolveError::NotFound(transaction_id)),
            Verdict::WrongMode(mode) => Err(ResolveError::WrongMode {
                transaction_id,
                mode,
            }),
            Verdict::Refused(resolution) => Err(ResolveError::Refused {
                transaction_id,
                resolution,
            }),
        }
    }
}
