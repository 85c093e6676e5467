"""The async client: `OutboxClient`."""

from __future__ import annotations

import asyncio
import collections
import random
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import grpc.aio

from outboxd import _tracing
from outboxd.errors import (
    FieldViolation,
    OutboxError,
    TlsError,
    error_for,
    from_rpc_error,
    status_code,
)
from outboxd.models import (
    AppendResult,
    Batch,
    Event,
    EventState,
    EventStatus,
    PreparedTransaction,
    StatusUpdate,
    Transaction,
    TransactionRef,
    _duration,
)
from outboxd.v1 import outbox_pb2 as pb
from outboxd.v1 import outbox_pb2_grpc as pb_grpc

T = TypeVar("T")

#: The gRPC codes after which a call that is safe to repeat is repeated.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter between attempts.

    Every call of outboxd's API is safe to repeat: an append retried with the
    same token and sequence stores nothing new and answers with the same event
    ids (`duplicate=True`), Commit and Abort are idempotent, the rest read.
    """

    max_attempts: int = 6
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    retry_on: frozenset[grpc.StatusCode] = RETRYABLE

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempts count from 1)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


#: No retries at all.
NO_RETRY = RetryPolicy(max_attempts=1)
#: How long a watch keeps reconnecting after the connection dropped (about a
#: minute and a half), counted from its last message.
WATCH_RECONNECT = RetryPolicy(max_attempts=20, initial_backoff=0.2, max_backoff=5.0)


@dataclass(frozen=True)
class StreamedAppend:
    """The outcome of one `Batch` of `append_stream`."""

    batch: Batch
    #: The events' ids; empty when `error` is set.
    event_ids: list[str]
    duplicate: bool
    #: Why this batch failed (`InvalidEvent`, `AlreadyExists`…); the others
    #: of the stream are not affected.
    error: OutboxError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _new_transaction_id() -> str:
    return str(uuid.uuid4())


def _channel_options(extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    options: dict[str, Any] = {
        # Reconnect soon after outboxd comes back (gRPC's default waits up to 2 minutes).
        "grpc.initial_reconnect_backoff_ms": 200,
        "grpc.min_reconnect_backoff_ms": 200,
        "grpc.max_reconnect_backoff_ms": 5_000,
        # Retries are this client's: it knows which calls are safe to repeat.
        "grpc.enable_retries": 0,
        "grpc.max_receive_message_length": 64 * 1024 * 1024,
        "grpc.max_send_message_length": 64 * 1024 * 1024,
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
    }
    options.update(dict(extra))
    return list(options.items())


class OutboxClient:
    """An async client of outboxd, on `grpc.aio`.

        async with OutboxClient("127.0.0.1:50051", producer="shop") as outbox:
            result = await outbox.append([Event(topic="orders", payload={"id": 1}, aggregate_id="1")])

    `target` is `host:port` (`http://` and `https://` prefixes are accepted;
    `https://` turns TLS on). `tls` is True for TLS with the system's root
    certificates, or a `grpc.ChannelCredentials` (e.g. from
    `grpc.ssl_channel_credentials(root_certificates, private_key,
    certificate_chain)` for mutual TLS). `token` is a bearer token, sent as
    `authorization: Bearer <token>` with every call. `producer` is the default
    producer namespace of the methods that take one. `timeout` is the deadline
    of each attempt of a unary call, in seconds (None: none). When
    `opentelemetry-api` is installed, the current span's W3C trace context goes
    with every call (`trace_context=False` turns that off).
    """

    def __init__(
        self,
        target: str,
        *,
        producer: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        token: str | None = None,
        timeout: float | None = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        trace_context: bool = True,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if target.startswith("http://"):
            target = target[len("http://") :]
        elif target.startswith("https://"):
            target = target[len("https://") :]
            tls = tls or True
        self.target = target.rstrip("/")
        self.producer = producer
        self.timeout = timeout
        self.retry = retry
        self._trace_context = trace_context
        self._auth: list[tuple[str, str]] = [("authorization", f"Bearer {token}")] if token else []
        options = _channel_options(channel_options)
        if tls is False:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials() if tls is True else tls
            self._channel = grpc.aio.secure_channel(self.target, credentials, options=options)
        self._outbox = pb_grpc.OutboxStub(self._channel)
        self._admin = pb_grpc.OutboxAdminStub(self._channel)

    async def __aenter__(self) -> OutboxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits until the channel is connected; `Unavailable` after `timeout`."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise error_for(
                grpc.StatusCode.UNAVAILABLE, f"outboxd at {self.target} not reachable within {timeout}s"
            ) from None

    # -- plumbing -----------------------------------------------------------

    def _metadata(self) -> list[tuple[str, str]]:
        metadata = list(self._auth)
        if self._trace_context:
            metadata.extend(_tracing.trace_metadata())
        return metadata

    def _producer(self, producer: str | None) -> str:
        chosen = producer or self.producer
        if not chosen:
            raise ValueError("no producer: pass producer=… here or to OutboxClient(…)")
        return chosen

    def _transaction(self, transaction: Transaction | str | None) -> Transaction:
        if isinstance(transaction, Transaction):
            return transaction
        return Transaction.immediate(self._producer(None), transaction or _new_transaction_id())

    async def _unary(
        self,
        call: Callable[..., Awaitable[T]],
        request: Any,
        timeout: float | None,
        retry: RetryPolicy | None,
    ) -> T:
        policy = retry or self.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(
                    request,
                    timeout=timeout if timeout is not None else self.timeout,
                    metadata=self._metadata(),
                )
            except grpc.aio.AioRpcError as error:
                if error.code() in policy.retry_on and attempt < policy.max_attempts:
                    await asyncio.sleep(policy.backoff(attempt))
                    continue
                raise from_rpc_error(error) from None

    # -- Outbox -------------------------------------------------------------

    async def append(
        self,
        events: Iterable[Event],
        *,
        transaction: Transaction | str | None = None,
        sequence: int = 0,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> AppendResult:
        """Stores `events` for one transaction token, atomically; returns once
        they are committed to outboxd's store.

        `transaction` is a `Transaction`, or a transaction id (an immediate
        token of the client's producer), or None for a new immediate
        transaction. Retried on UNAVAILABLE and DEADLINE_EXCEEDED with the same
        token, which stores nothing twice.
        """
        token = self._transaction(transaction)
        request = pb.AppendRequest(
            token=token.to_proto(),
            sequence=sequence,
            events=[event.to_proto() for event in events],
        )
        response: pb.AppendResponse = await self._unary(
            self._outbox.Append, request, timeout, retry
        )
        return AppendResult(list(response.event_ids), response.duplicate)

    async def append_stream(
        self,
        batches: AsyncIterable[Batch] | Iterable[Batch],
        *,
        max_in_flight: int = 256,
        retry: RetryPolicy | None = None,
    ) -> AsyncIterator[StreamedAppend]:
        """Pipelined appends on one stream, for high volume: yields one
        `StreamedAppend` per batch, in order, with at most `max_in_flight`
        batches sent and not yet answered. Batches commit in stream order. A
        failed batch fails only itself (its `error` is set). When the stream
        breaks (UNAVAILABLE), a new one is opened and the unanswered batches are
        sent again, which stores nothing twice.
        """
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        policy = retry or self.retry
        source = _aiter(batches)
        # Sent, not yet answered: (correlation, batch, request), correlations
        # consecutive, in order.
        pending: collections.deque[tuple[int, Batch, pb.AppendRequest]] = collections.deque()
        room = asyncio.Event()
        pulling = asyncio.Lock()
        state = _StreamState()

        async def requests(generation: int) -> AsyncIterator[pb.AppendRequest]:
            # Sends what is pending (after a reconnect), then pulls new batches
            # while fewer than max_in_flight are unanswered. Ends when the
            # stream it feeds was replaced by a newer one.
            next_send = pending[0][0] if pending else state.next_correlation
            while state.generation == generation:
                if pending and next_send <= pending[-1][0]:
                    correlation, _, request = pending[max(0, next_send - pending[0][0])]
                    next_send = correlation + 1
                    yield request
                    continue
                if state.exhausted:
                    return
                if len(pending) >= max_in_flight:
                    room.clear()
                    await room.wait()
                    continue
                async with pulling:
                    if state.exhausted:
                        return
                    try:
                        batch = await source.__anext__()
                    except StopAsyncIteration:
                        state.exhausted = True
                        return
                    except Exception as error:  # the caller's iterator failed
                        state.exhausted = True
                        state.source_error = error
                        return
                    request = pb.AppendRequest(
                        token=batch.transaction.to_proto(),
                        sequence=batch.sequence,
                        events=[event.to_proto() for event in batch.events],
                        correlation=state.next_correlation,
                    )
                    pending.append((state.next_correlation, batch, request))
                    state.next_correlation += 1

        attempt = 0
        while True:
            state.generation += 1
            room.set()  # a generator of an earlier stream, if waiting, ends
            call = self._outbox.AppendStream(requests(state.generation), metadata=self._metadata())
            try:
                async for response in call:
                    if not pending or pending[0][0] != response.correlation:
                        raise error_for(
                            grpc.StatusCode.INTERNAL,
                            f"AppendStream answered correlation {response.correlation} out of order",
                        )
                    _, batch, _ = pending.popleft()
                    room.set()
                    attempt = 0
                    yield _streamed(batch, response)
            except grpc.aio.AioRpcError as error:
                attempt += 1
                if error.code() in policy.retry_on and attempt < policy.max_attempts:
                    await asyncio.sleep(policy.backoff(attempt))
                    continue
                raise from_rpc_error(error) from None
            finally:
                if not call.done():
                    call.cancel()
            if pending or not state.exhausted:
                # The stream ended early (outboxd shutting down): go on on a new one.
                attempt += 1
                if attempt < policy.max_attempts:
                    await asyncio.sleep(policy.backoff(attempt))
                    continue
                raise error_for(
                    grpc.StatusCode.UNAVAILABLE,
                    f"AppendStream ended with {len(pending)} batches unanswered",
                )
            if state.source_error is not None:
                raise state.source_error
            return

    async def commit(
        self,
        transaction_id: str,
        *,
        producer: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Makes a two_phase transaction's events publishable; returns how many.
        Idempotent; `FailedPrecondition` after an abort or expiry."""
        request = pb.CommitRequest(producer=self._producer(producer), transaction_id=transaction_id)
        response: pb.CommitResponse = await self._unary(self._outbox.Commit, request, timeout, None)
        return response.events

    async def abort(
        self,
        transaction_id: str,
        *,
        producer: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Discards a two_phase transaction's events; returns how many.
        Idempotent; `FailedPrecondition` after a commit."""
        request = pb.AbortRequest(producer=self._producer(producer), transaction_id=transaction_id)
        response: pb.AbortResponse = await self._unary(self._outbox.Abort, request, timeout, None)
        return response.events

    async def status(
        self,
        event_ids: Iterable[str] = (),
        *,
        transactions: Iterable[TransactionRef | Transaction] = (),
        timeout: float | None = None,
    ) -> list[EventStatus]:
        """The current state of events, by ids or by transactions (not both)."""
        request = pb.GetStatusRequest(
            event_ids=list(event_ids),
            transactions=[_ref(t).to_proto() for t in transactions],
        )
        response: pb.GetStatusResponse = await self._unary(
            self._outbox.GetStatus, request, timeout, None
        )
        return [EventStatus.from_proto(s) for s in response.events]

    async def watch(
        self,
        event_ids: Iterable[str] = (),
        *,
        transactions: Iterable[TransactionRef | Transaction] = (),
        producer: str | None = None,
        after_cursor: int = 0,
        reconnect: RetryPolicy = WATCH_RECONNECT,
    ) -> AsyncIterator[StatusUpdate]:
        """Status updates: first the current state of every matched event, then
        each change. Give exactly one of `event_ids`, `transactions` or
        `producer`.

        A watch on ids or transactions ends once every event is final; a watch
        on a producer runs until the caller stops iterating, from after
        `after_cursor`. When the connection drops, or outboxd restarts, the
        watch reconnects and resumes: ids and transactions from their current
        state (a final state is never reported twice), a producer from the last
        cursor seen.
        """
        ids = list(event_ids)
        refs = [_ref(t) for t in transactions]
        if sum((bool(ids), bool(refs), producer is not None)) != 1:
            raise ValueError("watch takes exactly one of event_ids, transactions or producer")
        final: set[str] = set()
        seen: set[str] = set()
        cursor = after_cursor
        attempt = 0
        while True:
            if ids:
                request = pb.WatchStatusRequest(event_ids=[i for i in ids if i not in final])
            elif refs:
                request = pb.WatchStatusRequest(transactions=[r.to_proto() for r in refs])
            else:
                request = pb.WatchStatusRequest(producer=producer or "", after_cursor=cursor)
            call = self._outbox.WatchStatus(request, metadata=self._metadata())
            ended_cleanly = False
            tls_failure: TlsError | None = None
            try:
                async for message in call:
                    attempt = 0
                    status = EventStatus.from_proto(message.status)
                    if producer is not None:
                        # Resumes after the cursor: nothing to remember per event.
                        cursor = max(cursor, status.cursor)
                    elif status.event_id in final:
                        continue  # re-sent by the snapshot of a resumed watch
                    else:
                        seen.add(status.event_id)
                        if status.state.is_final:
                            final.add(status.event_id)
                    yield StatusUpdate(status, message.snapshot)
                ended_cleanly = True
            except grpc.aio.AioRpcError as error:
                failure = from_rpc_error(error)
                if error.code() not in reconnect.retry_on:
                    raise failure from None
                tls_failure = failure if isinstance(failure, TlsError) else None
            finally:
                if not call.done():
                    call.cancel()
            # The stream ended (every event final, or outboxd shutting down)
            # or broke: done, or resume.
            if ids and all(i in final for i in ids):
                return
            if refs and ended_cleanly and seen <= final:
                return
            attempt += 1
            if attempt >= reconnect.max_attempts:
                if tls_failure is not None:
                    raise tls_failure
                raise error_for(
                    grpc.StatusCode.UNAVAILABLE,
                    f"watch lost its connection to {self.target} and could not resume",
                )
            await asyncio.sleep(reconnect.backoff(attempt))

    async def wait_final(
        self, event_ids: Iterable[str], *, timeout: float | None = None
    ) -> dict[str, EventStatus]:
        """Watches `event_ids` until each is final (PUBLISHED, DEAD_LETTERED or
        DISCARDED); returns the final statuses. `asyncio.TimeoutError` after
        `timeout` seconds."""
        ids = list(event_ids)
        finals: dict[str, EventStatus] = {}

        async def follow() -> None:
            async for update in self.watch(ids):
                if update.status.state.is_final:
                    finals[update.status.event_id] = update.status

        if ids:
            await asyncio.wait_for(follow(), timeout)
        return finals

    # -- OutboxAdmin --------------------------------------------------------

    async def list_prepared(
        self,
        *,
        producer: str | None = None,
        older_than: timedelta = timedelta(0),
        timeout: float | None = None,
    ) -> list[PreparedTransaction]:
        """two_phase transactions of `producer` appended more than `older_than`
        ago and neither committed nor aborted."""
        request = pb.ListPreparedRequest(
            producer=self._producer(producer), older_than=_duration(older_than)
        )
        response: pb.ListPreparedResponse = await self._unary(
            self._admin.ListPrepared, request, timeout, None
        )
        return [PreparedTransaction.from_proto(t) for t in response.transactions]


@dataclass
class _StreamState:
    generation: int = 0
    next_correlation: int = 0
    exhausted: bool = False
    source_error: Exception | None = None


def _ref(transaction: TransactionRef | Transaction) -> TransactionRef:
    return transaction.ref() if isinstance(transaction, Transaction) else transaction


def _streamed(batch: Batch, response: pb.AppendResponse) -> StreamedAppend:
    if response.HasField("failure"):
        failure = response.failure
        error = error_for(
            status_code(failure.code),
            failure.message,
            [FieldViolation(v.field, v.description) for v in failure.field_violations],
        )
        return StreamedAppend(batch, [], False, error)
    return StreamedAppend(batch, list(response.event_ids), response.duplicate)


def _aiter(items: AsyncIterable[T] | Iterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        return items.__aiter__()

    async def generate() -> AsyncIterator[T]:
        for item in items:
            yield item

    return generate()

