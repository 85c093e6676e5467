//! The one place where outboxd's errors become gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::FieldViolation;
use crate::ingest::{IngestError, ResolveError};
use crate::status::WatchError;
use crate::store::{AppendRejection, StoreError};

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: INVALID_ARGUMENT with a `BadRequest` detail.
    #[error("{message}")]
    InvalidArgument {
        /// What is wrong, for people.
        message: String,
        /// Every field at fault.
        violations: Vec<FieldViolation>,
    },
    /// It clashes with what is stored (a retry with other content, a taken
    /// event id): ALREADY_EXISTS with a `BadRequest` detail.
    #[error("{message}")]
    AlreadyExists {
        /// What clashes, for people.
        message: String,
        /// The fields at fault.
        violations: Vec<FieldViolation>,
    },
    /// The request does not fit what is stored or configured: the
    /// transaction is resolved or of another mode, or no cluster can resolve
    /// its postgres_xid token.
    #[error("{0}")]
    FailedPrecondition(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The store cannot be reached: the caller must not commit.
    #[error("{0}")]
    Unavailable(String),
    /// Over a limit for now; nothing was done. Retry after `retry_after`.
    #[error("{message}")]
    ResourceExhausted {
        /// Which limit, for people.
        message: String,
        /// When a retry may succeed; sent as a `RetryInfo` detail.
        retry_after: std::time::Duration,
    },
    /// An operation outboxd does not offer (UNIMPLEMENTED).
    #[error("{0}")]
    Unimplemented(&'static str),
    /// Credentials are needed and missing or unknown.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not act for this producer, topic or operation.
    #[error("{0}")]
    PermissionDenied(String),
    /// Details go to the log, never to the client.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// A bad request, naming every field at fault.
    pub fn invalid(violations: Vec<FieldViolation>) -> Self {
        let message = match violations.as_slice() {
            [only] => format!("invalid {}: {}", only.field, only.description),
            many => format!(
                "invalid request: {}",
                many.iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
        ApiError::InvalidArgument {
            message,
            violations,
        }
    }

    /// The gRPC status code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::AlreadyExists { .. } => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::ResourceExhausted { .. } => Code::ResourceExhausted,
            ApiError::Unimplemented(_) => Code::Unimplemented,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// The fields at fault; empty for errors not about fields.
    pub fn violations(&self) -> &[FieldViolation] {
        match self {
            ApiError::InvalidArgument { violations, .. }
            | ApiError::AlreadyExists { violations, .. } => violations,
            _ => &[],
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        if let ApiError::Internal(detail) = &error {
            tracing::error!(%detail, "request failed");
        }
        if let ApiError::ResourceExhausted { retry_after, .. } = &error {
            let details = ErrorDetails::with_retry_info(Some(*retry_after));
            return Status::with_error_details(error.code(), error.to_string(), details);
        }
        let violations = error.violations();
        if violations.is_empty() {
            return Status::new(error.code(), error.to_string());
        }
        let mut details = ErrorDetails::new();
        for violation in violations {
            details.add_bad_request_violation(&violation.field, &violation.description);
        }
        Status::with_error_details(error.code(), error.to_string(), details)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => ApiError::Unavailable(
                "the store is unavailable; nothing was stored, retry later".into(),
            ),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Rejected(AppendRejection::ConflictingRetry {
                transaction_id,
                sequence,
            }) => ApiError::AlreadyExists {
                message: format!(
                    "append {sequence} of transaction {transaction_id:?} was stored with different content"
                ),
                violations: vec![FieldViolation::new(
                    "sequence",
                    "this (producer, transaction id, sequence) exists with another body",
                )],
            },
            IngestError::Rejected(AppendRejection::EventIdTaken(violation)) => {
                ApiError::AlreadyExists {
                    message: format!("{}: {}", violation.field, violation.description),
                    violations: vec![violation],
                }
            }
            IngestError::Rejected(AppendRejection::ModeMismatch {
                transaction_id,
                existing,
                requested,
            }) => ApiError::FailedPrecondition(format!(
                "transaction {transaction_id:?} is a {existing} transaction; this append asked for {requested}"
            )),
            IngestError::Rejected(
                rejection @ (AppendRejection::TransactionResolved { .. }
                | AppendRejection::TokenMismatch { .. }),
            ) => ApiError::FailedPrecondition(rejection.to_string()),
            IngestError::Unavailable(error) => {
                tracing::warn!(%error, "append failed: store unavailable");
                ApiError::Unavailable(
                    "the store is unavailable; nothing was stored, retry later".into(),
                )
            }
            IngestError::Store(error) => ApiError::Internal(error.to_string()),
            error @ IngestError::Unresolvable { .. } => {
                ApiError::FailedPrecondition(error.to_string())
            }
            IngestError::ShuttingDown => {
                ApiError::Unavailable("outboxd is shutting down; retry on another instance".into())
            }
            IngestError::Overloaded { queued_limit } => ApiError::ResourceExhausted {
                message: format!(
                    "outboxd has {queued_limit} bytes of appends queued (ingest.max_queued_bytes); nothing was stored, retry shortly"
                ),
                retry_after: std::time::Duration::from_millis(100),
            },
        }
    }
}

impl From<ResolveError> for ApiError {
    fn from(error: ResolveError) -> Self {
        match error {
            ResolveError::NotFound(_) => ApiError::NotFound(error.to_string()),
            ResolveError::WrongMode { .. } | ResolveError::Refused { .. } => {
                ApiError::FailedPrecondition(error.to_string())
            }
            ResolveError::Store(store) => store.into(),
        }
    }
}

impl From<WatchError> for ApiError {
    fn from(error: WatchError) -> Self {
        match error {
            WatchError::UnknownEvents(_) | WatchError::UnknownTransactions(_) => {
                ApiError::NotFound(error.to_string())
            }
            WatchError::Store(store) => store.into(),
        }
    }
}
