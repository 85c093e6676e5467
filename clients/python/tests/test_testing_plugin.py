"""outboxd.testing, as a service's own tests use it: the fixtures start a real
`outboxd dev` and read what reached its broker."""

from __future__ import annotations

import uuid

import pytest

from outboxd import Event, EventState, OutboxClient
from outboxd.testing import DevServer, KafkaReader

pytestmark = pytest.mark.asyncio


async def test_the_fixtures_append_and_read_back(
    outboxd_dev: DevServer, outboxd_client: OutboxClient, outboxd_kafka: KafkaReader
) -> None:
    topic = outboxd_dev.topic
    events = [
        Event(topic=topic, aggregate_type="essay", aggregate_id="e-1", event_type="Submitted", payload={"n": n})
        for n in range(3)
    ]
    result = await outboxd_client.append(events)
    finals = await outboxd_client.wait_final(result.event_ids, timeout=60)
    assert {s.state for s in finals.values()} == {EventState.PUBLISHED}

    records = await outboxd_kafka.read_async(topic, result.event_ids)
    assert [r.json()["n"] for r in records if r.event_id in result.event_ids] == [0, 1, 2]
    assert {r.header("outbox-producer") for r in records if r.event_id in result.event_ids} == {"tests"}


async def test_a_topic_of_the_tests_own_is_created_on_first_use(
    outboxd_client: OutboxClient, outboxd_kafka: KafkaReader
) -> None:
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    result = await outboxd_client.append([Event(topic=topic, payload=b"hello", aggregate_id="k")])
    [record] = await outboxd_kafka.read_async(topic, result.event_ids)
    assert record.value == b"hello" and record.key == b"k"
