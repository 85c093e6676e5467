"""Atomic publishing for services on PostgreSQL: the postgres_xid token.

Inside the caller's open transaction, `append` reads the transaction's id
(`pg_current_xact_id()`) and the cluster's `system_identifier`, and appends the
events with them. outboxd publishes the events once it sees that transaction
committed, and discards them when it rolled back: the events and the business
writes commit or vanish together, with no outbox table and no second call.

    async with session.begin():
        session.add(order)
        await postgres_xid.append(outbox, session, [event])
    # committed: the event is published; an exception above: it never is.

Works with a SQLAlchemy `AsyncSession` or `AsyncConnection` (asyncpg or
psycopg driver), an asyncpg `Connection`, and a psycopg 3 `AsyncConnection`.
The transaction must run on the cluster outboxd resolves the producer's tokens
against (its store's, or the one configured for the producer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from outboxd.models import AppendResult, Event, Transaction

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    from outboxd.client import OutboxClient

    #: What `append` and `read_token` take. (asyncpg's `Connection` is also
    #: taken; it has no type information.)
    Connection = Union[AsyncSession, AsyncConnection, "psycopg.AsyncConnection[Any]", Any]
else:
    Connection = Any

#: One round trip: the caller's transaction id and the cluster's identity.
TOKEN_QUERY = (
    "SELECT pg_current_xact_id()::text, system_identifier::text FROM pg_control_system()"
)


class NotInTransaction(RuntimeError):
    """The connection is in autocommit mode, outside a transaction: its events
    could not be tied to a business transaction."""


@dataclass(frozen=True)
class XidToken:
    """The caller's PostgreSQL transaction id and cluster identity."""

    xid: int
    system_id: int

    def transaction(self, producer: str, transaction_id: str | None = None) -> Transaction:
        """A postgres_xid token; the transaction id defaults to one derived
        from the xid (unique per cluster)."""
        return Transaction.postgres_xid(
            producer,
            transaction_id or f"pg-{self.system_id}-{self.xid}",
            xid=self.xid,
            system_id=self.system_id,
        )


def _kind(connection: object) -> str:
    module = type(connection).__module__
    for kind in ("sqlalchemy", "asyncpg", "psycopg"):
        if module == kind or module.startswith(kind + "."):
            return kind
    raise TypeError(
        "postgres_xid takes a SQLAlchemy AsyncSession/AsyncConnection, an asyncpg "
        f"Connection or a psycopg AsyncConnection, not {type(connection).__name__}"
    )


def _check_driver_in_transaction(driver: object) -> None:
    """After the token query: the driver connection is inside a transaction."""
    kind = _kind(driver)
    if kind == "asyncpg":
        in_transaction = bool(driver.is_in_transaction())  # type: ignore[attr-defined]
    else:
        from psycopg.pq import TransactionStatus

        in_transaction = driver.info.transaction_status == TransactionStatus.INTRANS  # type: ignore[attr-defined]
    if not in_transaction:
        raise NotInTransaction(
            "postgres_xid needs an open transaction on the connection (it is in autocommit "
            "mode): begin one, append inside it, then commit"
        )


async def read_token(connection: Connection) -> XidToken:
    """Reads the open transaction's xid and the cluster's system identifier.
    `NotInTransaction` when the connection is not inside a transaction."""
    kind = _kind(connection)
    row: Any
    conn: Any = connection
    if kind == "sqlalchemy":
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import AsyncSession

        if isinstance(conn, AsyncSession):
            conn = await conn.connection()
        row = (await conn.execute(text(TOKEN_QUERY))).one()
        raw = await conn.get_raw_connection()
        _check_driver_in_transaction(raw.driver_connection)
    elif kind == "asyncpg":
        _check_driver_in_transaction(conn)
        row = await conn.fetchrow(TOKEN_QUERY)
    else:
        cursor = await conn.execute(TOKEN_QUERY)
        row = await cursor.fetchone()
        _check_driver_in_transaction(conn)
    xid, system_id = row[0], row[1]
    return XidToken(int(xid), int(system_id))


async def append(
    client: OutboxClient,
    connection: Connection,
    events: Iterable[Event],
    *,
    producer: str | None = None,
    transaction_id: str | None = None,
    sequence: int = 0,
    timeout: float | None = None,
) -> AppendResult:
    """Appends `events` tied to the connection's open transaction: they are
    published when it commits and discarded when it rolls back.

    Call it inside the transaction, before its commit. Several appends in one
    transaction take sequence 0, 1, 2… (and, when `transaction_id` is given, the
    same one). An `Unavailable` error means nothing was stored: roll back.
    """
    producer = producer or client.producer
    if not producer:
        raise ValueError("no producer: pass producer=… here or to OutboxClient(…)")
    token = await read_token(connection)
    transaction = token.transaction(producer, transaction_id)
    return await client.append(events, transaction=transaction, sequence=sequence, timeout=timeout)
