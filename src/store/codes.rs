//! The codes and rules both stores share: the numbers states and modes are
//! stored as, how a transaction and its events start, how event ids are
//! packed, and the stored transaction an append meets.

use std::time::Duration;

use uuid::Uuid;

use super::{AppendRejection, XidToken};
use crate::domain::{AppendBatch, EventId, EventState, FieldViolation, TokenMode, TransactionRef};

/// A stored number as SQL text, for queries composed at compile time with
/// `concat!`, so that SQL names states and modes instead of repeating their
/// numbers: `concat!("… WHERE state = ", stored!(event pending))`. Literals
/// (not bind parameters) keep the partial indexes usable whatever plan is
/// cached. `tests::stored_numbers_are_the_codes_they_name` checks each
/// against the constant or enum it stands for.
macro_rules! stored {
    (event pending) => {
        "1"
    };
    (event ready) => {
        "2"
    };
    (event retrying) => {
        "3"
    };
    (event published) => {
        "4"
    };
    (event dead_lettered) => {
        "5"
    };
    (event discarded) => {
        "6"
    };
    // A state as the two hex digits of its byte (segment state bytes).
    (event pending hex) => {
        "01"
    };
    (event ready hex) => {
        "02"
    };
    (event retrying hex) => {
        "03"
    };
    (event dead_lettered hex) => {
        "05"
    };
    // The first final state: the relay's partial index holds the rows below.
    (event first_final) => {
        "4"
    };
    (transaction open) => {
        "1"
    };
    (transaction committed) => {
        "2"
    };
    (transaction aborted) => {
        "3"
    };
    (mode immediate) => {
        "1"
    };
    (mode two_phase) => {
        "2"
    };
    (mode postgres_xid) => {
        "3"
    };
}

/// Transaction states in `outbox_transactions.state`.
pub(super) const TRANSACTION_OPEN: i16 = 1;
pub(super) const TRANSACTION_COMMITTED: i16 = 2;
pub(super) const TRANSACTION_ABORTED: i16 = 3;

/// Token modes in `outbox_transactions.mode`.
pub(super) const MODE_IMMEDIATE: i16 = 1;
pub(super) const MODE_TWO_PHASE: i16 = 2;
pub(super) const MODE_POSTGRES_XID: i16 = 3;

/// The stored number of a token's mode.
pub(super) fn mode_code(mode: &TokenMode) -> i16 {
    match mode {
        TokenMode::Immediate => MODE_IMMEDIATE,
        TokenMode::TwoPhase { .. } => MODE_TWO_PHASE,
        TokenMode::PostgresXid { .. } => MODE_POSTGRES_XID,
    }
}

/// The API's name of a stored mode number.
pub(super) fn mode_name(code: i16) -> &'static str {
    match code {
        MODE_IMMEDIATE => "immediate",
        MODE_TWO_PHASE => "two_phase",
        MODE_POSTGRES_XID => "postgres_xid",
        _ => "unknown",
    }
}

/// How a transaction first seen with a token of some mode is stored.
/// An open postgres_xid transaction as both stores read it back.
#[derive(sqlx::FromRow)]
pub(super) struct XidTokenRow {
    producer: String,
    transaction_id: String,
    caller_xid: i64,
    caller_system_id: i64,
}

impl From<XidTokenRow> for XidToken {
    fn from(row: XidTokenRow) -> XidToken {
        XidToken {
            transaction: TransactionRef {
                producer: row.producer,
                transaction_id: row.transaction_id,
            },
            caller_xid: row.caller_xid as u64,
            system_id: row.caller_system_id as u64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct NewTransaction {
    /// Immediate transactions are committed from the start; the others open.
    pub state: i16,
    /// postgres_xid: the caller's transaction id and cluster.
    pub caller_xid: Option<i64>,
    pub caller_system_id: Option<i64>,
    /// two_phase: how long it may stay open.
    pub expires_in: Option<Duration>,
}

impl NewTransaction {
    pub fn of(mode: &TokenMode) -> NewTransaction {
        let open = NewTransaction {
            state: TRANSACTION_OPEN,
            caller_xid: None,
            caller_system_id: None,
            expires_in: None,
        };
        match *mode {
            TokenMode::Immediate => NewTransaction {
                state: TRANSACTION_COMMITTED,
                ..open
            },
            TokenMode::TwoPhase { timeout } => NewTransaction {
                expires_in: Some(timeout),
                ..open
            },
            TokenMode::PostgresXid {
                caller_xid,
                system_id,
            } => NewTransaction {
                caller_xid: Some(caller_xid as i64),
                caller_system_id: Some(system_id as i64),
                ..open
            },
        }
    }
}

/// The state a batch's events are stored in: READY when nothing is to be
/// decided, PENDING until the token resolves otherwise.
pub(super) fn initial_event_state(batch: &AppendBatch) -> EventState {
    match batch.token.mode {
        TokenMode::Immediate => EventState::Ready,
        _ => EventState::Pending,
    }
}

/// Event ids as stored in `outbox_appends.event_ids`: 16 bytes each.
pub(super) fn pack_ids(ids: &[EventId]) -> Vec<u8> {
    ids.iter().flat_map(|id| *id.0.as_bytes()).collect()
}

pub(super) fn unpack_ids(bytes: &[u8]) -> Vec<EventId> {
    bytes
        .chunks_exact(16)
        .map(|chunk| EventId(Uuid::from_slice(chunk).unwrap_or_default()))
        .collect()
}

/// Names the first caller-chosen event id of `batch` that is already stored.
pub(super) fn event_id_taken(batch: &AppendBatch, taken: &[Uuid]) -> AppendRejection {
    let index = batch
        .events
        .iter()
        .position(|e| e.event_id.is_some_and(|id| taken.contains(&id.0)))
        .unwrap_or(0);
    AppendRejection::EventIdTaken(FieldViolation::new(
        format!("events[{index}].event_id"),
        "an event with this id already exists",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_starts_its_transaction_as_its_rule_says() {
        assert_eq!(
            NewTransaction::of(&TokenMode::Immediate).state,
            TRANSACTION_COMMITTED
        );
        let two_phase = NewTransaction::of(&TokenMode::TwoPhase {
            timeout: Duration::from_secs(30),
        });
        assert_eq!(two_phase.state, TRANSACTION_OPEN);
        assert_eq!(two_phase.expires_in, Some(Duration::from_secs(30)));
        let xid = NewTransaction::of(&TokenMode::PostgresXid {
            caller_xid: u64::MAX,
            system_id: 7,
        });
        assert_eq!(
            (xid.state, xid.caller_xid, xid.caller_system_id),
            (TRANSACTION_OPEN, Some(-1), Some(7))
        );
        for mode in [
            TokenMode::Immediate,
            TokenMode::TwoPhase {
                timeout: Duration::ZERO,
            },
            TokenMode::PostgresXid {
                caller_xid: 1,
                system_id: 1,
            },
        ] {
            assert_eq!(mode_name(mode_code(&mode)), mode.name());
        }
    }

    #[test]
    fn stored_numbers_are_the_codes_they_name() {
        let number = |text: &str| text.parse::<i16>().expect("a number");
        for (text, state) in [
            (stored!(event pending), EventState::Pending),
            (stored!(event ready), EventState::Ready),
            (stored!(event retrying), EventState::Retrying),
            (stored!(event published), EventState::Published),
            (stored!(event dead_lettered), EventState::DeadLettered),
            (stored!(event discarded), EventState::Discarded),
        ] {
            assert_eq!(number(text), state as i16, "{state:?}");
        }
        assert_eq!(number(stored!(event first_final)), EventState::FIRST_FINAL);
        let byte = |hex: &str| i16::from_str_radix(hex, 16).expect("two hex digits");
        for (hex, state) in [
            (stored!(event pending hex), EventState::Pending),
            (stored!(event ready hex), EventState::Ready),
            (stored!(event retrying hex), EventState::Retrying),
            (stored!(event dead_lettered hex), EventState::DeadLettered),
        ] {
            assert_eq!(byte(hex), state as i16, "{state:?}");
        }
        assert_eq!(number(stored!(transaction open)), TRANSACTION_OPEN);
        assert_eq!(
            number(stored!(transaction committed)),
            TRANSACTION_COMMITTED
        );
        assert_eq!(number(stored!(transaction aborted)), TRANSACTION_ABORTED);
        assert_eq!(number(stored!(mode immediate)), MODE_IMMEDIATE);
        assert_eq!(number(stored!(mode two_phase)), MODE_TWO_PHASE);
        assert_eq!(number(stored!(mode postgres_xid)), MODE_POSTGRES_XID);
    }

    #[test]
    fn packed_ids_unpack_to_themselves() {
        let ids: Vec<EventId> = (0..3).map(|_| EventId::generate()).collect();
        let packed = pack_ids(&ids);
        assert_eq!(packed.len(), 48);
        assert_eq!(unpack_ids(&packed), ids);
    }
}
