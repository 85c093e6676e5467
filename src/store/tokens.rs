//! Transaction-token rules shared by both stores: when an append may join a
//! transaction, and what `Commit` / `Abort` do in each state.

use super::codes::{
    MODE_TWO_PHASE, TRANSACTION_ABORTED, TRANSACTION_COMMITTED, TRANSACTION_OPEN, mode_code,
    mode_name,
};
use super::{AppendRejection, Verdict};
use crate::domain::{AppendBatch, EventState, TokenMode};

/// The stored transaction an append names.
#[derive(Debug, Clone)]
pub(super) struct ExistingTransaction {
    pub mode: i16,
    pub state: i16,
    pub resolution: Option<String>,
    pub caller_xid: Option<i64>,
    pub caller_system_id: Option<i64>,
    pub expired: bool,
}

impl ExistingTransaction {
    /// From a row with the columns `mode`, `state`, `resolution`,
    /// `caller_xid`, `caller_system_id` and `expired`, of either store.
    pub fn from_row<'r, R>(row: &'r R) -> Result<Self, sqlx::Error>
    where
        R: sqlx::Row,
        &'r str: sqlx::ColumnIndex<R>,
        i16: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        Ok(ExistingTransaction {
            mode: row.try_get("mode")?,
            state: row.try_get("state")?,
            resolution: row.try_get("resolution")?,
            caller_xid: row.try_get("caller_xid")?,
            caller_system_id: row.try_get("caller_system_id")?,
            expired: row.try_get("expired")?,
        })
    }

    /// The append's token disagrees with the transaction: always refused,
    /// retry or not.
    pub fn token_conflict(&self, batch: &AppendBatch) -> Option<AppendRejection> {
        let transaction_id = batch.token.transaction_id.clone();
        if self.mode != mode_code(&batch.token.mode) {
            return Some(AppendRejection::ModeMismatch {
                transaction_id,
                existing: mode_name(self.mode),
                requested: batch.token.mode.name(),
            });
        }
        if let TokenMode::PostgresXid {
            caller_xid,
            system_id,
        } = batch.token.mode
            && (self.caller_xid != Some(caller_xid as i64)
                || self.caller_system_id != Some(system_id as i64))
        {
            return Some(AppendRejection::TokenMismatch {
                transaction_id,
                detail: format!(
                    "postgres_xid {caller_xid} / system {system_id} differs from the transaction's first append ({} / {})",
                    self.caller_xid.unwrap_or_default() as u64,
                    self.caller_system_id.unwrap_or_default() as u64
                ),
            });
        }
        None
    }

    /// A new (not retried) append to a transaction that is no longer open.
    pub fn resolved(&self, batch: &AppendBatch) -> Option<AppendRejection> {
        if matches!(batch.token.mode, TokenMode::Immediate) {
            return None;
        }
        let resolution = if self.state != TRANSACTION_OPEN {
            self.resolution.clone().unwrap_or_else(|| "resolved".into())
        } else if self.expired {
            "expired".into()
        } else {
            return None;
        };
        Some(AppendRejection::TransactionResolved {
            transaction_id: batch.token.transaction_id.clone(),
            resolution,
        })
    }
}

/// What a Commit or Abort does to a transaction in a given state.
pub(super) struct TwoPhaseStep {
    pub verdict: Verdict,
    /// (transaction state, resolution, new event state, event reason).
    pub finish: Option<(i16, &'static str, EventState, Option<&'static str>)>,
}

/// What the expiry of an open two_phase transaction does.
pub(super) const EXPIRED: (i16, &str, EventState, Option<&str>) = (
    TRANSACTION_ABORTED,
    "expired",
    EventState::Discarded,
    Some("the transaction expired before it was committed"),
);

pub(super) fn two_phase_step(
    mode: i16,
    state: i16,
    resolution: Option<String>,
    expired: bool,
    commit: bool,
) -> TwoPhaseStep {
    let step = |verdict, finish| TwoPhaseStep { verdict, finish };
    if mode != MODE_TWO_PHASE {
        return step(Verdict::WrongMode(mode_name(mode)), None);
    }
    match (state, commit) {
        (TRANSACTION_OPEN, _) if expired => step(
            if commit {
                Verdict::Refused("expired".into())
            } else {
                Verdict::AlreadyDone
            },
            Some(EXPIRED),
        ),
        (TRANSACTION_OPEN, true) => step(
            Verdict::Done,
            Some((TRANSACTION_COMMITTED, "committed", EventState::Ready, None)),
        ),
        (TRANSACTION_OPEN, false) => step(
            Verdict::Done,
            Some((
                TRANSACTION_ABORTED,
                "aborted",
                EventState::Discarded,
                Some("the transaction was aborted"),
            )),
        ),
        (TRANSACTION_COMMITTED, true) | (TRANSACTION_ABORTED, false) => {
            step(Verdict::AlreadyDone, None)
        }
        (_, _) => step(
            Verdict::Refused(resolution.unwrap_or_else(|| "resolved".into())),
            None,
        ),
    }
}

/// Resolutions of postgres_xid tokens: (transaction state, resolution,
/// event state, event reason); `None` leaves the token open.
pub(super) fn xid_step(
    verdict: &super::XidVerdict,
) -> Option<(i16, &'static str, EventState, Option<String>)> {
    use super::XidVerdict;
    match verdict {
        XidVerdict::Committed => {
            Some((TRANSACTION_COMMITTED, "committed", EventState::Ready, None))
        }
        XidVerdict::Aborted => Some((
            TRANSACTION_ABORTED,
            "rolled back",
            EventState::Discarded,
            Some("the caller's transaction rolled back".into()),
        )),
        XidVerdict::TooOld(reason) => Some((
            TRANSACTION_ABORTED,
            "xid too old",
            EventState::DeadLettered,
            Some(reason.clone()),
        )),
        XidVerdict::Unresolvable(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_PHASE: i16 = 2;

    #[test]
    fn commit_and_abort_are_idempotent_and_exclusive() {
        let v = |state, expired, commit| {
            two_phase_step(TWO_PHASE, state, Some("x".into()), expired, commit).verdict
        };
        assert_eq!(v(TRANSACTION_OPEN, false, true), Verdict::Done);
        assert_eq!(v(TRANSACTION_OPEN, false, false), Verdict::Done);
        assert_eq!(v(TRANSACTION_COMMITTED, false, true), Verdict::AlreadyDone);
        assert_eq!(v(TRANSACTION_ABORTED, false, false), Verdict::AlreadyDone);
        assert_eq!(
            v(TRANSACTION_ABORTED, false, true),
            Verdict::Refused("x".into())
        );
        assert_eq!(
            v(TRANSACTION_COMMITTED, false, false),
            Verdict::Refused("x".into())
        );
        assert_eq!(
            v(TRANSACTION_OPEN, true, true),
            Verdict::Refused("expired".into())
        );
        assert_eq!(v(TRANSACTION_OPEN, true, false), Verdict::AlreadyDone);
        assert_eq!(
            two_phase_step(1, TRANSACTION_COMMITTED, None, false, true).verdict,
            Verdict::WrongMode("immediate")
        );
    }
}
