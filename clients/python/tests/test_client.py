"""The client against the real gateway (PostgreSQL store) and the real broker,
checked with an independent consumer."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest

from harness import PgCluster, Serve, Tansu
from outboxd import (
    AlreadyExists,
    Batch,
    Event,
    EventState,
    InvalidEvent,
    NotFound,
    OutboxClient,
    StatusUpdate,
    TokenMode,
    Transaction,
)
from outboxd.testing import KafkaReader, first_sightings

pytestmark = pytest.mark.asyncio


def order_event(topic: str, order: str, step: str, **extra: object) -> Event:
    return Event(
        topic=topic,
        aggregate_type="order",
        aggregate_id=order,
        event_type=step,
        payload={"order": order, "step": step, **extra},
    )


async def test_append_then_watch_to_published(
    client: OutboxClient, kafka: KafkaReader, topic: str, producer: str
) -> None:
    occurred = datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc)
    events = [
        Event(
            topic=topic,
            key="customer-7",
            payload={"order": "o-1", "total": 42, "note": "café"},
            headers=[("content-type", "application/json"), ("x-tenant", b"\x00acme")],
            aggregate_type="order",
            aggregate_id="o-1",
            event_type="OrderPlacedV1",
            occurred_at=occurred,
        ),
        Event(topic=topic, payload=b"\x01\x02raw", aggregate_type="order", aggregate_id="o-2",
              event_type="OrderPlacedV1"),
    ]
    result = await client.append(events, transaction="tx-published")
    assert len(result.event_ids) == 2 and not result.duplicate

    updates = [update async for update in client.watch(result.event_ids)]
    final = {u.status.event_id: u.status for u in updates if u.status.state.is_final}
    assert set(final) == set(result.event_ids)
    for status in final.values():
        assert status.state is EventState.PUBLISHED
        assert status.partition is not None and status.offset is not None
        assert (status.producer, status.transaction_id, status.topic) == (producer, "tx-published", topic)

    records = {r.event_id: r for r in await kafka.read_async(topic, result.event_ids)}
    first, second = (records[i] for i in result.event_ids)
    # Where the status said, byte for byte as appended.
    for event_id, record in ((result.event_ids[0], first), (result.event_ids[1], second)):
        assert (record.partition, record.offset) == (final[event_id].partition, final[event_id].offset)
    assert first.key == b"customer-7"
    assert json.loads(first.value) == {"order": "o-1", "total": 42, "note": "café"}
    assert first.headers[:2] == [("content-type", b"application/json"), ("x-tenant", b"\x00acme")]
    assert first.header("outbox-event-type") == "OrderPlacedV1"
    assert first.header("outbox-aggregate-id") == "o-1"
    assert first.header("outbox-producer") == producer
    assert first.header("outbox-transaction-id") == "tx-published"
    assert first.timestamp == int(occurred.timestamp() * 1000)
    # No key: the aggregate id is the key.
    assert second.key == b"o-2" and second.value == b"\x01\x02raw"


async def test_a_retried_append_stores_nothing_twice(
    client: OutboxClient, kafka: KafkaReader, topic: str, producer: str
) -> None:
    events = [order_event(topic, "o-9", "placed"), order_event(topic, "o-9", "paid")]
    transaction = Transaction.immediate(producer, "order-9")
    first = await client.append(events, transaction=transaction)
    again = await client.append(events, transaction=transaction)
    assert again.duplicate and again.event_ids == first.event_ids

    # The same key with another body is refused.
    with pytest.raises(AlreadyExists) as refused:
        await client.append([order_event(topic, "o-9", "cancelled")], transaction=transaction)
    assert [v.field for v in refused.value.violations] == ["sequence"]

    statuses = await client.status(transactions=[transaction])
    assert sorted(s.event_id for s in statuses) == sorted(first.event_ids)
    # A watch on the transaction ends once each of its events is final.
    updates = [u async for u in client.watch(transactions=[transaction])]
    assert {u.status.event_id: u.status.state for u in updates if u.status.state.is_final} == {
        event_id: EventState.PUBLISHED for event_id in first.event_ids
    }
    records = first_sightings(await kafka.read_async(topic, first.event_ids))
    assert [r.event_id for r in records] == first.event_ids


async def test_a_bad_event_is_invalid_event_naming_the_field(
    client: OutboxClient, topic: str, producer: str
) -> None:
    events = [
        order_event(topic, "o-1", "placed"),
        Event(topic="not a topic!", payload={"x": 1}, aggregate_id="o-1"),
        Event(topic=topic, payload=b"", headers={"outbox-event-id": "forged"}, aggregate_id="o-1"),
    ]
    with pytest.raises(InvalidEvent) as invalid:
        await client.append(events, transaction="tx-bad")
    assert invalid.value.fields == ["events[1].topic", "events[2].headers[0].key"]
    assert "ASCII letters" in invalid.value.violations[0].description
    # Refused before anything was stored.
    assert await client.status(transactions=[Transaction.immediate(producer, "tx-bad")]) == []

    with pytest.raises(InvalidEvent) as no_timeout:
        await client.append(
            [order_event(topic, "o-1", "placed")],
            transaction=Transaction(producer, "tx-2pc", mode=TokenMode.TWO_PHASE),
        )
    assert no_timeout.value.fields == ["token.timeout"]


async def test_append_stream_keeps_per_key_order_over_10000_events(
    client: OutboxClient, kafka: KafkaReader, topic: str, producer: str
) -> None:
    keys = [f"account-{k}" for k in range(50)]
    sent: dict[str, list[int]] = defaultdict(list)

    def batches() -> list[Batch]:
        out = []
        n = 0
        for b in range(500):
            events = []
            for _ in range(20):
                key = keys[n % len(keys)]
                events.append(Event(topic=topic, key=key, payload={"n": n}, aggregate_id=key))
                sent[key].append(n)
                n += 1
            out.append(Batch(events, Transaction.immediate(producer, f"stream-{b}")))
        return out

    ids: list[str] = []
    async for outcome in client.append_stream(batches(), max_in_flight=64):
        assert outcome.ok, outcome.error
        ids.extend(outcome.event_ids)
    assert len(ids) == 10_000

    records = first_sightings(await kafka.read_async(topic, ids, timeout=180))
    assert {r.event_id for r in records} >= set(ids)
    received: dict[str, list[int]] = defaultdict(list)
    for record in records:  # (partition, offset) order; one key lives on one partition
        assert record.key is not None
        received[record.key.decode()].append(record.json()["n"])
    assert received == sent


async def test_a_failed_batch_of_a_stream_fails_only_itself(
    client: OutboxClient, topic: str, producer: str
) -> None:
    async def batches() -> AsyncIterator[Batch]:
        for b in range(5):
            bad_topic = "bad topic" if b == 2 else topic
            yield Batch([order_event(bad_topic, f"o-{b}", "placed")], Transaction.immediate(producer, f"s-{b}"))

    outcomes = [o async for o in client.append_stream(batches(), max_in_flight=2)]
    assert [o.batch.transaction.transaction_id for o in outcomes] == [f"s-{b}" for b in range(5)]
    assert [o.ok for o in outcomes] == [True, True, False, True, True]
    failed = outcomes[2].error
    assert isinstance(failed, InvalidEvent) and failed.fields == ["events[0].topic"]
    assert all(len(o.event_ids) == 1 for o in outcomes if o.ok)


async def test_trace_context_of_the_current_span_reaches_the_kafka_record(
    client: OutboxClient, kafka: KafkaReader, topic: str
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("checkout")
    with tracer.start_as_current_span("place-order") as span:
        result = await client.append([order_event(topic, "o-1", "placed")])
    context = span.get_span_context()
    [record] = await kafka.read_async(topic, result.event_ids)
    traceparent = record.header("traceparent")
    assert traceparent is not None
    _, trace_id, parent_id, _ = traceparent.split("-")
    assert int(trace_id, 16) == context.trace_id
    assert int(parent_id, 16) == context.span_id


async def test_a_watch_resumes_after_outboxd_restarts(
    pg: PgCluster, tansu: Tansu, kafka: KafkaReader, topic: str
) -> None:
    store = pg.create_database()
    serve = Serve.start(store, tansu.bootstrap)
    try:
        async with OutboxClient(serve.target, producer="restarts") as client:
            by_producer = client.watch(producer="restarts")
            early = await client.append([order_event(topic, "o-0", "placed")])
            await _until_published(by_producer, early.event_ids)
            held = await client.append(
                [order_event(topic, "o-1", "placed")],
                transaction=Transaction.two_phase("restarts", "tx-1", timedelta(minutes=5)),
            )
            by_ids = client.watch(held.event_ids)
            first = await anext(by_ids)
            assert first.snapshot and first.status.state is EventState.PENDING

            serve.kill()
            rest_by_ids = asyncio.ensure_future(_collect(by_ids))
            await asyncio.sleep(0.5)
            serve = Serve.start(store, tansu.bootstrap, port=serve.port)
            await client.wait_ready()
            await client.commit("tx-1")
            later = await client.append([order_event(topic, "o-2", "placed")])

            updates = await asyncio.wait_for(rest_by_ids, 60)
            assert updates[-1].status.state is EventState.PUBLISHED
            assert {u.status.event_id for u in updates} == set(held.event_ids)
            # The producer watch resumed after the last cursor it had seen: the
            # held and the later event reach PUBLISHED, the early one (final
            # before the restart) is not reported again.
            resumed = await asyncio.wait_for(
                _until_published(by_producer, held.event_ids + later.event_ids), 60
            )
            assert early.event_ids[0] not in {u.status.event_id for u in resumed}
            records = await kafka.read_async(topic, early.event_ids + held.event_ids + later.event_ids)
            assert len({r.event_id for r in records}) == 3
    finally:
        serve.stop()


async def _collect(updates: AsyncIterator[StatusUpdate]) -> list[StatusUpdate]:
    return [u async for u in updates]


async def _until_published(updates: AsyncIterator[StatusUpdate], event_ids: list[str]) -> list[StatusUpdate]:
    """Updates of a running watch until each of `event_ids` was PUBLISHED."""
    seen: list[StatusUpdate] = []
    waiting = set(event_ids)
    async for update in updates:
        seen.append(update)
        if update.status.state is EventState.PUBLISHED:
            waiting.discard(update.status.event_id)
            if not waiting:
                break
    return seen


async def test_unknown_event_ids_are_not_found(client: OutboxClient) -> None:
    with pytest.raises(NotFound):
        async for _ in client.watch([str(uuid.uuid4())]):
            pass
