"""postgres_xid with each driver: events of a business transaction that commits
reach Kafka; those of one that raises (and rolls back) never do."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from harness import unique
from outboxd import Event, EventState, OutboxClient, postgres_xid
from outboxd.postgres_xid import NotInTransaction
from outboxd.testing import KafkaReader

pytestmark = pytest.mark.asyncio

INSERT = "INSERT INTO orders (id, total) VALUES ('{order}', 42)"


class Rollback(Exception):
    """The business logic failed after the append."""


# Each driver's way of running one business transaction: insert an order,
# append its event through postgres_xid, then commit, or raise (rolls back).
Place = Callable[[OutboxClient, str, Event, bool], Awaitable[list[str]]]


def _sqlalchemy_url(url: str, driver: str) -> str:
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


@contextlib.asynccontextmanager
async def sqlalchemy_place(url: str, driver: str) -> AsyncIterator[Place]:
    engine = create_async_engine(_sqlalchemy_url(url, driver))
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def place(outbox: OutboxClient, order: str, event: Event, fail: bool) -> list[str]:
        session: AsyncSession
        async with sessions() as session, session.begin():
            await session.execute(text(INSERT.format(order=order)))
            result = await postgres_xid.append(outbox, session, [event])
            if fail:
                raise Rollback(result.event_ids)
        return result.event_ids

    try:
        yield place
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def asyncpg_place(url: str) -> AsyncIterator[Place]:
    connection = await asyncpg.connect(url)

    async def place(outbox: OutboxClient, order: str, event: Event, fail: bool) -> list[str]:
        async with connection.transaction():
            await connection.execute(INSERT.format(order=order))
            result = await postgres_xid.append(outbox, connection, [event])
            if fail:
                raise Rollback(result.event_ids)
        return result.event_ids

    try:
        yield place
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def psycopg_place(url: str) -> AsyncIterator[Place]:
    connection = await psycopg.AsyncConnection.connect(url)

    async def place(outbox: OutboxClient, order: str, event: Event, fail: bool) -> list[str]:
        async with connection.transaction():
            await connection.execute(INSERT.format(order=order))
            result = await postgres_xid.append(outbox, connection, [event])
            if fail:
                raise Rollback(result.event_ids)
        return result.event_ids

    try:
        yield place
    finally:
        await connection.close()


def driver(name: str, url: str) -> contextlib.AbstractAsyncContextManager[Place]:
    if name == "sqlalchemy+asyncpg":
        return sqlalchemy_place(url, "asyncpg")
    if name == "sqlalchemy+psycopg":
        return sqlalchemy_place(url, "psycopg")
    if name == "asyncpg":
        return asyncpg_place(url)
    return psycopg_place(url)


@pytest.mark.parametrize("name", ["sqlalchemy+asyncpg", "sqlalchemy+psycopg", "asyncpg", "psycopg"])
async def test_events_publish_with_the_commit_and_vanish_with_the_rollback(
    name: str, client: OutboxClient, kafka: KafkaReader, topic: str, business_db: str
) -> None:
    committed: list[str] = []
    rolled_back: list[str] = []
    async with driver(name, business_db) as place:
        for n in range(4):
            order = unique("order")
            event = Event(topic=topic, aggregate_type="order", aggregate_id=order,
                          event_type="OrderPlacedV1", payload={"order": order, "n": n})
            fail = n % 2 == 1
            try:
                committed.extend(await place(client, order, event, fail))
            except Rollback as failure:
                assert fail
                rolled_back.extend(failure.args[0])

    finals = await client.wait_final(committed + rolled_back, timeout=60)
    assert {i: finals[i].state for i in committed} == {i: EventState.PUBLISHED for i in committed}
    assert {i: finals[i].state for i in rolled_back} == {i: EventState.DISCARDED for i in rolled_back}

    # The consumer sees exactly the committed events.
    records = await kafka.read_async(topic, committed)
    assert {r.event_id for r in records} == set(committed)

    # And the business rows agree.
    with psycopg.connect(business_db) as connection:
        orders = {row[0] for row in connection.execute("SELECT id FROM orders")}
    placed = {r.json()["order"] for r in records}
    assert placed <= orders


async def test_a_connection_outside_a_transaction_is_refused(
    client: OutboxClient, topic: str, business_db: str
) -> None:
    event = Event(topic=topic, payload={"x": 1}, aggregate_id="a")
    connection: Any = await asyncpg.connect(business_db)
    try:
        with pytest.raises(NotInTransaction):
            await postgres_xid.append(client, connection, [event])
    finally:
        await connection.close()
    autocommit = await psycopg.AsyncConnection.connect(business_db, autocommit=True)
    try:
        with pytest.raises(NotInTransaction):
            await postgres_xid.append(client, autocommit, [event])
    finally:
        await autocommit.close()
    engine = create_async_engine(_sqlalchemy_url(business_db, "asyncpg"), isolation_level="AUTOCOMMIT")
    try:
        async with AsyncSession(engine) as session:
            with pytest.raises(NotInTransaction):
                await postgres_xid.append(client, session, [event])
    finally:
        await engine.dispose()


async def test_several_appends_in_one_transaction(
    client: OutboxClient, kafka: KafkaReader, topic: str, business_db: str
) -> None:
    connection = await asyncpg.connect(business_db)
    try:
        async with connection.transaction():
            first = await postgres_xid.append(
                client, connection, [Event(topic=topic, payload={"n": 1}, aggregate_id="k")]
            )
            second = await postgres_xid.append(
                client, connection, [Event(topic=topic, payload={"n": 2}, aggregate_id="k")], sequence=1
            )
    finally:
        await connection.close()
    records = await kafka.read_async(topic, first.event_ids + second.event_ids)
    assert [r.json()["n"] for r in records] == [1, 2]
    assert records[0].header("outbox-transaction-id") == records[1].header("outbox-transaction-id")
