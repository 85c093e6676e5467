"""The worked example runs end to end against the real gateway, PostgreSQL and
the broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import PgCluster, Serve, Tansu, unique
from outboxd.testing import KafkaReader

EXAMPLE = Path(__file__).resolve().parent.parent / "examples/essay_slots.py"


def test_the_essay_slots_example_runs(
    gateway: Serve, pg: PgCluster, tansu: Tansu, kafka: KafkaReader
) -> None:
    topic = kafka.create_topic(partitions=3)
    database = pg.create_database()
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--outboxd", gateway.target, "--database-url", database,
         "--brokers", tansu.bootstrap, "--topic", topic, "--producer", unique("essays")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "example ok: exactly the committed events arrived" in result.stdout
    assert result.stdout.count("consumer: essay-") == 4
