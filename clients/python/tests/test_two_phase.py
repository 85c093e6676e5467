"""two_phase: publish after the caller's own commit, discard on exception, and
recover what a process that died between its commit and Commit left."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from harness import Serve, unique
from outboxd import (
    Event,
    EventState,
    FailedPrecondition,
    OutboxClient,
    PreparedTransaction,
    recover_prepared,
    two_phase,
)
from outboxd.testing import KafkaReader

pytestmark = pytest.mark.asyncio

HERE = Path(__file__).parent


def order_event(topic: str, order: str) -> Event:
    return Event(topic=topic, aggregate_type="order", aggregate_id=order,
                 event_type="OrderPlacedV1", payload={"order": order})


class OutOfStock(Exception):
    pass


async def test_commits_after_the_callers_commit(
    client: OutboxClient, kafka: KafkaReader, topic: str, business_db: str
) -> None:
    order = unique("order")
    async with await psycopg.AsyncConnection.connect(business_db) as db:
        async with two_phase(client, [order_event(topic, order)], transaction_id=order) as tx:
            [event_id] = tx.event_ids
            # Appended, not publishable until Commit.
            [status] = await client.status([event_id])
            assert status.state is EventState.PENDING
            await db.execute(
                "INSERT INTO orders (id, total, outbox_transaction_id) VALUES (%s, 5, %s)",
                (order, tx.transaction_id),
            )
            await db.commit()
    assert tx.resolved_events == 1
    finals = await client.wait_final([event_id], timeout=60)
    assert finals[event_id].state is EventState.PUBLISHED
    [record] = await kafka.read_async(topic, [event_id])
    assert record.json() == {"order": order}
    # Resolved: Abort now is refused.
    with pytest.raises(FailedPrecondition):
        await client.abort(order)


async def test_aborts_on_exception(
    client: OutboxClient, kafka: KafkaReader, topic: str, business_db: str
) -> None:
    order = unique("order")
    async with await psycopg.AsyncConnection.connect(business_db) as db:
        with pytest.raises(OutOfStock):
            async with two_phase(client, [order_event(topic, order)]) as tx:
                await db.execute("INSERT INTO orders (id, total) VALUES (%s, 5)", (order,))
                raise OutOfStock()
        await db.rollback()
    [discarded] = tx.event_ids
    assert tx.resolved_events == 1
    finals = await client.wait_final([discarded], timeout=60)
    assert finals[discarded].state is EventState.DISCARDED
    # A later event of the same key is not held back, and the discarded one
    # never reaches Kafka.
    later = await client.append([order_event(topic, order)])
    records = await kafka.read_async(topic, later.event_ids)
    assert [r.event_id for r in records] == later.event_ids


async def test_recover_prepared_settles_what_a_dead_process_left(
    gateway: Serve, client: OutboxClient, producer: str, kafka: KafkaReader, topic: str, business_db: str
) -> None:
    committed_order, lost_order = unique("order"), unique("order")
    event_ids = {}
    for order, when in ((committed_order, "after-commit"), (lost_order, "before-commit")):
        died = subprocess.run(
            [sys.executable, str(HERE / "dying_service.py"), gateway.target, producer, business_db,
             topic, order, when],
            capture_output=True, text=True, timeout=60,
        )
        assert died.returncode == 9, died.stderr
        event_ids[order] = died.stdout.strip()

    # Both wait for a decision.
    for status in await client.status(list(event_ids.values())):
        assert status.state is EventState.PENDING

    async with await psycopg.AsyncConnection.connect(business_db) as db:

        async def business_committed(prepared: PreparedTransaction) -> bool:
            cursor = await db.execute(
                "SELECT 1 FROM orders WHERE outbox_transaction_id = %s", (prepared.transaction_id,)
            )
            return await cursor.fetchone() is not None

        recovery = await recover_prepared(client, business_committed, older_than=timedelta(0))

    assert [p.transaction_id for p in recovery.committed] == [f"tx-{committed_order}"]
    assert [p.transaction_id for p in recovery.aborted] == [f"tx-{lost_order}"]
    assert all(p.events == 1 for p in recovery.committed + recovery.aborted)
    finals = await client.wait_final(event_ids.values(), timeout=60)
    assert finals[event_ids[committed_order]].state is EventState.PUBLISHED
    assert finals[event_ids[lost_order]].state is EventState.DISCARDED
    records = await kafka.read_async(topic, [event_ids[committed_order]])
    assert [r.event_id for r in records] == [event_ids[committed_order]]
    # Nothing left to recover.
    assert await client.list_prepared(older_than=timedelta(0)) == []
