"""Plain data: events, transaction tokens, statuses, and their protobuf forms."""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Union

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from outboxd.v1 import outbox_pb2 as pb

#: A payload: bytes go to Kafka unchanged; a dict or list is encoded as
#: compact UTF-8 JSON.
Payload = Union[bytes, bytearray, memoryview, Mapping[str, Any], Sequence[Any]]
#: Caller headers, in order: a mapping or (key, value) pairs; str values are
#: encoded as UTF-8.
Headers = Union[Mapping[str, Union[bytes, str]], Sequence[tuple[str, Union[bytes, str]]]]


class TokenMode(enum.IntEnum):
    """How the events of a transaction become publishable."""

    #: At append: the caller appends after its own commit.
    IMMEDIATE = pb.TOKEN_MODE_IMMEDIATE
    #: On `commit`; `abort` or the token's timeout discards.
    TWO_PHASE = pb.TOKEN_MODE_TWO_PHASE
    #: When the caller's PostgreSQL transaction is seen committed.
    POSTGRES_XID = pb.TOKEN_MODE_POSTGRES_XID


class EventState(enum.IntEnum):
    UNSPECIFIED = pb.EVENT_STATE_UNSPECIFIED
    #: Awaiting the caller's commit.
    PENDING = pb.EVENT_STATE_PENDING
    #: Publishable, not yet published.
    READY = pb.EVENT_STATE_READY
    #: A delivery failed; waiting for the next attempt.
    RETRYING = pb.EVENT_STATE_RETRYING
    #: Final: acknowledged by Kafka (partition and offset are set).
    PUBLISHED = pb.EVENT_STATE_PUBLISHED
    #: Final: given up, with a reason.
    DEAD_LETTERED = pb.EVENT_STATE_DEAD_LETTERED
    #: Final: its transaction aborted or rolled back.
    DISCARDED = pb.EVENT_STATE_DISCARDED

    @property
    def is_final(self) -> bool:
        return self in (EventState.PUBLISHED, EventState.DEAD_LETTERED, EventState.DISCARDED)

    @classmethod
    def of(cls, value: int) -> EventState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


def _utc(moment: datetime) -> datetime:
    """A naive datetime is taken as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(_utc(moment))
    return stamp


def _datetime(stamp: Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=timezone.utc) if present else None


def _duration(span: timedelta) -> Duration:
    duration = Duration()
    duration.FromTimedelta(span)
    return duration


def encode_payload(payload: Payload) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        raise TypeError("a str payload is ambiguous: pass bytes, or a dict/list to send as JSON")
    if isinstance(payload, (Mapping, Sequence)):
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    raise TypeError(f"payload must be bytes or a dict/list (JSON), not {type(payload).__name__}")


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


@dataclass(frozen=True)
class Event:
    """One event, as a service hands it over.

    The Kafka record gets `key` (else `aggregate_id`) as its key, the payload
    byte for byte, the headers in order, then outboxd's `outbox-*` headers.
    """

    topic: str
    payload: Payload
    key: bytes | str | None = None
    headers: Headers = ()
    aggregate_type: str = ""
    aggregate_id: str = ""
    event_type: str = ""
    #: A UUID of the caller's choosing; outboxd assigns a UUIDv7 when absent.
    event_id: str | uuid.UUID | None = None
    #: When it happened (a naive datetime is UTC); the append time when absent.
    occurred_at: datetime | None = None

    def to_proto(self) -> pb.Event:
        message = pb.Event(
            topic=self.topic,
            payload=encode_payload(self.payload),
            aggregate_type=self.aggregate_type,
            aggregate_id=self.aggregate_id,
            event_type=self.event_type,
            event_id=str(self.event_id) if self.event_id is not None else "",
        )
        if self.key is not None:
            message.key = _as_bytes(self.key)
        pairs = self.headers.items() if isinstance(self.headers, Mapping) else self.headers
        for name, value in pairs:
            message.headers.add(key=name, value=_as_bytes(value))
        if self.occurred_at is not None:
            message.occurred_at.CopyFrom(_timestamp(self.occurred_at))
        return message


@dataclass(frozen=True)
class Transaction:
    """A transaction token: who appends (`producer`), the caller's transaction
    id (its idempotency key, unique per producer), and how its events become
    publishable."""

    producer: str
    transaction_id: str
    mode: TokenMode = TokenMode.IMMEDIATE
    #: two_phase: discard the events when not committed within this time.
    timeout: timedelta | None = None
    #: postgres_xid: the caller's `pg_current_xact_id()`.
    xid: int = 0
    #: postgres_xid: the cluster's `system_identifier`.
    system_id: int = 0

    @classmethod
    def immediate(cls, producer: str, transaction_id: str) -> Transaction:
        return cls(producer, transaction_id)

    @classmethod
    def two_phase(cls, producer: str, transaction_id: str, timeout: timedelta) -> Transaction:
        return cls(producer, transaction_id, TokenMode.TWO_PHASE, timeout=timeout)

    @classmethod
    def postgres_xid(cls, producer: str, transaction_id: str, *, xid: int, system_id: int) -> Transaction:
        return cls(producer, transaction_id, TokenMode.POSTGRES_XID, xid=xid, system_id=system_id)

    def to_proto(self) -> pb.TransactionToken:
        token = pb.TransactionToken(
            producer=self.producer,
            transaction_id=self.transaction_id,
            mode=int(self.mode),  # type: ignore[arg-type]
            postgres_xid=self.xid,
            postgres_system_id=self.system_id,
        )
        if self.timeout is not None:
            token.timeout.CopyFrom(_duration(self.timeout))
        return token

    def ref(self) -> TransactionRef:
        return TransactionRef(self.producer, self.transaction_id)


@dataclass(frozen=True)
class TransactionRef:
    producer: str
    transaction_id: str

    def to_proto(self) -> pb.TransactionRef:
        return pb.TransactionRef(producer=self.producer, transaction_id=self.transaction_id)


@dataclass(frozen=True)
class AppendResult:
    #: The events' ids, in the order they were given.
    event_ids: list[str]
    #: True when this (producer, transaction id, sequence) had been stored
    #: already, with the same content: nothing new was stored.
    duplicate: bool = False


@dataclass(frozen=True)
class Batch:
    """One request of `OutboxClient.append_stream`."""

    events: Sequence[Event]
    transaction: Transaction
    #: Numbers the appends of one transaction: 0, 1, 2…
    sequence: int = 0


@dataclass(frozen=True)
class EventStatus:
    event_id: str
    producer: str
    transaction_id: str
    sequence: int
    topic: str
    state: EventState
    #: Where Kafka stored it, once PUBLISHED.
    partition: int | None
    offset: int | None
    attempts: int
    #: Last error or dead-letter reason.
    reason: str
    updated_at: datetime | None
    #: Position in the producer's change feed.
    cursor: int

    @classmethod
    def from_proto(cls, message: pb.EventStatus) -> EventStatus:
        return cls(
            event_id=message.event_id,
            producer=message.producer,
            transaction_id=message.transaction_id,
            sequence=message.sequence,
            topic=message.topic,
            state=EventState.of(message.state),
            partition=message.partition if message.HasField("partition") else None,
            offset=message.offset if message.HasField("offset") else None,
            attempts=message.attempts,
            reason=message.reason,
            updated_at=_datetime(message.updated_at, message.HasField("updated_at")),
            cursor=message.cursor,
        )


@dataclass(frozen=True)
class StatusUpdate:
    status: EventStatus
    #: True for the initial current-state messages of a watch.
    snapshot: bool


@dataclass(frozen=True)
class PreparedTransaction:
    """A two_phase transaction appended but neither committed nor aborted."""

    producer: str
    transaction_id: str
    created_at: datetime | None
    expires_at: datetime | None
    events: int

    @classmethod
    def from_proto(cls, message: pb.PreparedTransaction) -> PreparedTransaction:
        return cls(
            producer=message.producer,
            transaction_id=message.transaction_id,
            created_at=_datetime(message.created_at, message.HasField("created_at")),
            expires_at=_datetime(message.expires_at, message.HasField("expires_at")),
            events=message.events,
        )

