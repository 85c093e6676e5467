"""Fixtures: one PostgreSQL cluster, one Tansu broker and one `outboxd serve`
(PostgreSQL store) for the session; each test gets its own producer namespace,
topic and client, so tests never see each other's events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import pytest_asyncio

from harness import PgCluster, Serve, Tansu, unique
from outboxd import OutboxClient
from outboxd.testing import KafkaReader

BUSINESS_SCHEMA = """
CREATE TABLE orders (
    id text PRIMARY KEY,
    total integer NOT NULL,
    outbox_transaction_id text
);
"""


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def tansu() -> Iterator[Tansu]:
    broker = Tansu()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def gateway(pg: PgCluster, tansu: Tansu) -> Iterator[Serve]:
    """`outboxd serve` on a PostgreSQL store of the same cluster as the
    business database, so postgres_xid tokens resolve against it."""
    serve = Serve.start(pg.create_database("outboxd"), tansu.bootstrap)
    try:
        yield serve
    finally:
        serve.stop()


@pytest.fixture(scope="session")
def kafka(tansu: Tansu) -> KafkaReader:
    """An independent consumer of the broker outboxd relays to."""
    return KafkaReader(tansu.bootstrap)


@pytest.fixture(scope="session")
def business_db(pg: PgCluster) -> str:
    """A service's own database (an `orders` table) on the cluster."""
    url = pg.create_database("shop")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(BUSINESS_SCHEMA)
    return url


@pytest.fixture
def topic(kafka: KafkaReader) -> str:
    return kafka.create_topic(partitions=3)


@pytest.fixture
def producer() -> str:
    return unique("svc")


@pytest_asyncio.fixture
async def client(gateway: Serve, producer: str) -> AsyncIterator[OutboxClient]:
    async with OutboxClient(gateway.target, producer=producer) as outbox:
        yield outbox
