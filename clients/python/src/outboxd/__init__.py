"""outboxd: the async Python client of the outboxd outbox ingestion gateway.

    from outboxd import Event, OutboxClient

    async with OutboxClient("127.0.0.1:50051", producer="shop") as outbox:
        result = await outbox.append([Event(topic="orders", aggregate_id="o-1", payload={"total": 42})])

Atomic publishing: `outboxd.postgres_xid` (PostgreSQL) and `outboxd.two_phase`
(any database). Testing against a real gateway: `outboxd.testing`.
"""

from outboxd.client import NO_RETRY, WATCH_RECONNECT, OutboxClient, RetryPolicy, StreamedAppend
from outboxd.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidEvent,
    NotFound,
    OutboxError,
    PermissionDenied,
    ResourceExhausted,
    TlsError,
    Unauthenticated,
    Unavailable,
)
from outboxd.models import (
    AppendResult,
    Batch,
    Event,
    EventState,
    EventStatus,
    PreparedTransaction,
    StatusUpdate,
    TokenMode,
    Transaction,
    TransactionRef,
)
from outboxd.two_phase import Recovery, recover_prepared, two_phase

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists",
    "AppendResult",
    "Batch",
    "Cancelled",
    "DeadlineExceeded",
    "Event",
    "EventState",
    "EventStatus",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidEvent",
    "NO_RETRY",
    "NotFound",
    "OutboxClient",
    "OutboxError",
    "PermissionDenied",
    "PreparedTransaction",
    "Recovery",
    "ResourceExhausted",
    "RetryPolicy",
    "StatusUpdate",
    "StreamedAppend",
    "TlsError",
    "TokenMode",
    "Transaction",
    "TransactionRef",
    "Unauthenticated",
    "Unavailable",
    "WATCH_RECONNECT",
    "recover_prepared",
    "two_phase",
]
