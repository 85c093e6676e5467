"""A service process that dies in the middle of a two_phase transaction.

    python dying_service.py TARGET PRODUCER DATABASE_URL TOPIC ORDER WHEN

WHEN is `after-commit` (the business transaction committed, outboxd's Commit
never sent) or `before-commit` (the business transaction never committed).
The process ends with os._exit, as a crash would: no cleanup runs.
"""

from __future__ import annotations

import asyncio
import os
import sys

import psycopg

from outboxd import Event, OutboxClient, two_phase


async def main(target: str, producer: str, url: str, topic: str, order: str, when: str) -> None:
    async with OutboxClient(target, producer=producer) as outbox:
        connection = await psycopg.AsyncConnection.connect(url)
        event = Event(topic=topic, aggregate_type="order", aggregate_id=order,
                      event_type="OrderPlacedV1", payload={"order": order})
        async with two_phase(outbox, [event], transaction_id=f"tx-{order}") as tx:
            await connection.execute(
                "INSERT INTO orders (id, total, outbox_transaction_id) VALUES (%s, 1, %s)",
                (order, tx.transaction_id),
            )
            print(tx.event_ids[0], flush=True)
            if when == "after-commit":
                await connection.commit()
            os._exit(9)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
