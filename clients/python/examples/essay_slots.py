"""A worked example: an essay service that assigns review slots.

Assigning a slot writes a row and emits `EssaySlotAssignedV1` in one PostgreSQL
transaction through outboxd (postgres_xid, SQLAlchemy): the event is published
if and only if the row commits. The same is shown with two_phase, which works
on any database. A consumer (confluent-kafka) receives the events and continues
the service's trace from the record's headers.

    python examples/essay_slots.py --outboxd 127.0.0.1:50051 \\
        --database-url postgresql://app@127.0.0.1/essays \\
        --brokers 127.0.0.1:9092 --topic essay-events

It needs `outboxd serve` with a PostgreSQL store on the same cluster as the
database (postgres_xid tokens are resolved against the store's cluster unless
`tokens.postgres_xid_clusters` names another), the topic, and the package's
extras `sqlalchemy`, `asyncpg`, `otel` plus opentelemetry-sdk and
confluent-kafka. It exits 0 when the consumer received exactly the committed
events, each in the trace of the request that emitted it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outboxd import Event, OutboxClient, PreparedTransaction, postgres_xid, recover_prepared, two_phase

EVENT_TYPE = "EssaySlotAssignedV1"

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("essay-service")


# -- the service ---------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class SlotAssignment(Base):
    __tablename__ = "essay_slot_assignments"

    essay_id: Mapped[str] = mapped_column(primary_key=True)
    slot: Mapped[int] = mapped_column(unique=True)
    # two_phase only: lets recover_prepared tell whether this committed.
    outbox_transaction_id: Mapped[str | None] = mapped_column(default=None)


class EssayWithdrawn(Exception):
    pass


@dataclass(frozen=True)
class Assigned:
    essay_id: str
    slot: int
    event_id: str
    trace_id: int


def slot_assigned(topic: str, essay_id: str, slot: int) -> Event:
    return Event(
        topic=topic,
        aggregate_type="essay",
        aggregate_id=essay_id,  # the Kafka key: one essay's events stay in order
        event_type=EVENT_TYPE,
        payload={"essay_id": essay_id, "slot": slot},
        headers={"content-type": "application/json"},
    )


class EssayService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], outbox: OutboxClient, topic: str) -> None:
        self.sessions = sessions
        self.outbox = outbox
        self.topic = topic

    async def _next_slot(self, session: AsyncSession) -> int:
        highest = await session.scalar(select(func.max(SlotAssignment.slot)))
        return (highest or 0) + 1

    async def assign_slot(self, essay_id: str, *, withdrawn: bool = False) -> Assigned:
        """postgres_xid: the row and the event commit together, or neither."""
        with tracer.start_as_current_span("assign_slot") as span:
            async with self.sessions() as session, session.begin():
                slot = await self._next_slot(session)
                session.add(SlotAssignment(essay_id=essay_id, slot=slot))
                await session.flush()
                result = await postgres_xid.append(
                    self.outbox, session, [slot_assigned(self.topic, essay_id, slot)]
                )
                if withdrawn:  # business logic failing after the append
                    raise EssayWithdrawn(result.event_ids[0])
            return Assigned(essay_id, slot, result.event_ids[0], span.get_span_context().trace_id)

    async def assign_slot_two_phase(self, essay_id: str) -> Assigned:
        """two_phase: append, commit the row, then Commit (any database)."""
        with tracer.start_as_current_span("assign_slot") as span:
            async with self.sessions() as session:
                slot = await self._next_slot(session)
                event = slot_assigned(self.topic, essay_id, slot)
                async with two_phase(self.outbox, [event], transaction_id=f"slot-{essay_id}") as tx:
                    session.add(
                        SlotAssignment(essay_id=essay_id, slot=slot, outbox_transaction_id=tx.transaction_id)
                    )
                    await session.commit()
            return Assigned(essay_id, slot, tx.event_ids[0], span.get_span_context().trace_id)

    async def recover(self) -> None:
        """On start-up: settle two_phase transactions a crash left open."""

        async def committed(prepared: PreparedTransaction) -> bool:
            async with self.sessions() as session:
                found = await session.scalar(
                    select(SlotAssignment.essay_id).where(
                        SlotAssignment.outbox_transaction_id == prepared.transaction_id
                    )
                )
                return found is not None

        await recover_prepared(self.outbox, committed)


# -- the consumer ----------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    event_id: str
    essay_id: str
    slot: int
    trace_id: int


def text_headers(raw: object) -> dict[str, str]:
    pairs = raw.items() if isinstance(raw, dict) else raw if isinstance(raw, list) else []
    return {k: v.decode() if isinstance(v, bytes) else (v or "") for k, v in pairs}


def consume(brokers: str, topic: str, count: int, timeout: float = 60.0) -> list[Received]:
    """Reads the topic from its start until `count` distinct events arrived,
    handling each in a span that continues the producer's trace."""
    consumer = Consumer(
        {"bootstrap.servers": brokers, "group.id": f"essay-reviewers-{uuid.uuid4().hex[:8]}",
         "enable.auto.commit": False}
    )
    handled: dict[str, Received] = {}
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        deadline = time.monotonic() + timeout
        while len(handled) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            headers = text_headers(message.headers())
            if headers.get("outbox-event-type") != EVENT_TYPE:
                continue
            event_id = headers["outbox-event-id"]
            if event_id in handled:
                continue  # at-least-once delivery: drop duplicates by event id
            parent = TraceContextTextMapPropagator().extract(headers)
            with tracer.start_as_current_span(f"handle {EVENT_TYPE}", context=parent) as span:
                body = json.loads(message.value() or b"{}")
                handled[event_id] = Received(
                    event_id, body["essay_id"], body["slot"], span.get_span_context().trace_id
                )
    finally:
        consumer.close()
    return list(handled.values())


# -- the run -------------------------------------------------------------------------


async def run(options: argparse.Namespace) -> bool:
    url = options.database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with OutboxClient(options.outboxd, producer=options.producer) as outbox:
            service = EssayService(sessions, outbox, options.topic)
            await service.recover()
            run_id = uuid.uuid4().hex[:6]
            assigned = [await service.assign_slot(f"essay-{run_id}-{n}") for n in range(3)]
            discarded = ""
            try:
                await service.assign_slot(f"essay-{run_id}-withdrawn", withdrawn=True)
            except EssayWithdrawn as withdrawn:
                discarded = withdrawn.args[0]
            assigned.append(await service.assign_slot_two_phase(f"essay-{run_id}-2pc"))
            for a in assigned:
                print(f"assigned slot {a.slot} to {a.essay_id}: event {a.event_id}")
            print(f"withdrawn essay rolled back: event {discarded} is never published")

            finals = await outbox.wait_final([a.event_id for a in assigned] + [discarded], timeout=60)
            print("states: " + ", ".join(f"{s.event_id[-6:]}={s.state.name}" for s in finals.values()))
    finally:
        await engine.dispose()

    received = await asyncio.to_thread(consume, options.brokers, options.topic, len(assigned))
    ours = {r.event_id: r for r in received if r.event_id in {a.event_id for a in assigned}}
    for r in received:
        print(f"consumer: {r.essay_id} has slot {r.slot} (trace {r.trace_id:032x})")
    ok = (
        set(ours) == {a.event_id for a in assigned}
        and discarded not in {r.event_id for r in received}
        and all(ours[a.event_id].trace_id == a.trace_id for a in assigned)
        and all(ours[a.event_id].slot == a.slot for a in assigned)
    )
    print("example ok: exactly the committed events arrived, each in its request's trace" if ok
          else "example FAILED")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outboxd", default="127.0.0.1:50051", help="outboxd's gRPC address")
    parser.add_argument("--database-url", required=True, help="postgresql://… of the essay database")
    parser.add_argument("--brokers", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--topic", default="essay-events")
    parser.add_argument("--producer", default="essay-service")
    return 0 if asyncio.run(run(parser.parse_args(argv))) else 1


if __name__ == "__main__":
    sys.exit(main())
