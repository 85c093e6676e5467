"""Atomic publishing on any database: the two_phase token.

    async with two_phase(outbox, [event], transaction_id=order.id) as tx:
        await db.commit()          # the caller's own commit
    # no exception: Commit (the events become publishable)
    # an exception: Abort (the events are discarded), and it propagates

The events are appended (PENDING) on entry, before the caller's commit, so a
caller that cannot reach outboxd never commits. If the process dies between its
own commit and `Commit`, `recover_prepared` settles the transaction on the next
start-up; what nobody settles is discarded when the token's timeout passes.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING

from outboxd.errors import OutboxError
from outboxd.models import AppendResult, Event, PreparedTransaction, Transaction

if TYPE_CHECKING:
    from outboxd.client import OutboxClient

log = logging.getLogger("outboxd")

#: How long outboxd keeps unresolved events before discarding them.
DEFAULT_TIMEOUT = timedelta(minutes=5)


class TwoPhase:
    """The async context manager `two_phase` returns."""

    def __init__(
        self,
        client: OutboxClient,
        events: Iterable[Event],
        *,
        transaction_id: str | None,
        producer: str | None,
        timeout: timedelta,
    ) -> None:
        self.client = client
        producer = producer or client.producer
        if not producer:
            raise ValueError("no producer: pass producer=… here or to OutboxClient(…)")
        self.transaction = Transaction.two_phase(
            producer, transaction_id or str(uuid.uuid4()), timeout
        )
        self._first = list(events)
        self._sequence = 0
        #: Ids of every event appended so far, in order.
        self.event_ids: list[str] = []
        #: Events committed (after a normal exit) or discarded (after an exception).
        self.resolved_events: int | None = None

    @property
    def transaction_id(self) -> str:
        return self.transaction.transaction_id

    async def append(self, events: Iterable[Event]) -> AppendResult:
        """Appends more events to this transaction (the next sequence)."""
        result = await self.client.append(
            events, transaction=self.transaction, sequence=self._sequence
        )
        self._sequence += 1
        self.event_ids.extend(result.event_ids)
        return result

    async def __aenter__(self) -> TwoPhase:
        if self._first:
            await self.append(self._first)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._sequence == 0:
            return  # nothing was appended
        if exc is None:
            # An error here (outboxd unreachable after retries) propagates: the
            # caller's commit has happened, recover_prepared settles it later.
            self.resolved_events = await self.client.commit(
                self.transaction_id, producer=self.transaction.producer
            )
            return
        try:
            self.resolved_events = await self.client.abort(
                self.transaction_id, producer=self.transaction.producer
            )
        except OutboxError as error:
            # The caller's exception matters more; the timeout discards the events.
            log.warning(
                "aborting two_phase transaction %s failed (%s); its timeout will discard it",
                self.transaction_id,
                error,
            )


def two_phase(
    client: OutboxClient,
    events: Iterable[Event] = (),
    *,
    transaction_id: str | None = None,
    producer: str | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> TwoPhase:
    """Appends `events` on entry; commits them after the block, in which the
    caller commits its own transaction, ends normally; aborts them when it
    raises. Keep `transaction_id` in the business rows, so that
    `recover_prepared` can tell whether the business transaction committed."""
    return TwoPhase(
        client, events, transaction_id=transaction_id, producer=producer, timeout=timeout
    )


#: Whether the business transaction of a prepared one committed.
Check = Callable[[PreparedTransaction], "Awaitable[bool] | bool"]


@dataclass
class Recovery:
    committed: list[PreparedTransaction] = field(default_factory=list)
    aborted: list[PreparedTransaction] = field(default_factory=list)


async def recover_prepared(
    client: OutboxClient,
    check: Check,
    *,
    producer: str | None = None,
    older_than: timedelta = timedelta(seconds=30),
) -> Recovery:
    """Settles two_phase transactions left by a process that died between its
    own commit and `Commit`: for each prepared transaction of `producer` older
    than `older_than`, commits it when `check(prepared)` says the business
    transaction committed, else aborts it. Run it on start-up.

    `older_than` should exceed the time a live process takes from append to
    Commit, so that transactions still in flight elsewhere are left alone.
    """
    recovery = Recovery()
    for prepared in await client.list_prepared(producer=producer, older_than=older_than):
        verdict = check(prepared)
        committed = await verdict if inspect.isawaitable(verdict) else verdict
        if committed:
            await client.commit(prepared.transaction_id, producer=prepared.producer)
            recovery.committed.append(prepared)
        else:
            await client.abort(prepared.transaction_id, producer=prepared.producer)
            recovery.aborted.append(prepared)
    return recovery
