"""Testing a service against a real outboxd, with no mocks.

A pytest plugin. Enable it in the service's `conftest.py`:

    pytest_plugins = ["outboxd.testing"]

and install the `testing` extra (pytest-asyncio, confluent-kafka). Its fixtures:

- `outboxd_dev` (session): a real `outboxd dev` (SQLite store, in-process
  Kafka-protocol broker) started once for the test session, on a free port;
  `.target` is its gRPC address, `.brokers` the broker's bootstrap address.
- `outboxd_client`: an `OutboxClient` connected to it (producer `"tests"`).
- `outboxd_kafka` (session): a `KafkaReader` on its broker, to read what reached
  Kafka, independently of outboxd.

The binary is taken from `--outboxd-bin`, the `outboxd_bin` ini option, the
`OUTBOXD_BIN` environment variable, or `PATH`, in that order. When none has it,
the fixtures fail (they never skip).

    async def test_order_emits_created(outboxd_client, outboxd_kafka):
        result = await place_order(outboxd_client, topic="orders")   # the service's code
        [record] = await outboxd_kafka.read_async("orders", result.event_ids)
        assert record.json()["total"] == 42

`outboxd dev`'s broker creates a topic on first use (with one partition);
`KafkaReader.create_topic` is for brokers that do not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from outboxd.client import OutboxClient

# -- the binary and `outboxd dev` ---------------------------------------------


class OutboxdNotFound(RuntimeError):
    pass


def find_binary(explicit: str | os.PathLike[str] | None = None) -> str:
    """The outboxd binary: `explicit`, else `$OUTBOXD_BIN`, else `PATH`."""
    candidate = str(explicit) if explicit else os.environ.get("OUTBOXD_BIN") or shutil.which("outboxd")
    if not candidate:
        raise OutboxdNotFound(
            "the outboxd binary was not found: put it on PATH, set OUTBOXD_BIN, "
            "or pass --outboxd-bin"
        )
    path = Path(candidate)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise OutboxdNotFound(f"{candidate} is not an executable outboxd binary")
    return str(path)


@dataclass
class DevServer:
    """A running `outboxd dev` process."""

    #: gRPC address, host:port.
    target: str
    #: Bootstrap address of its in-process Kafka-protocol broker.
    brokers: str
    #: The topic `outboxd dev` creates (with `partitions` partitions); other
    #: topics are created on first use.
    topic: str
    process: subprocess.Popen[str]
    workdir: Path
    log: Path

    @classmethod
    def start(
        cls, binary: str | None = None, *, partitions: int = 3, timeout: float = 60.0
    ) -> DevServer:
        """Starts `outboxd dev` on a free port with a fresh store; returns once
        it accepts calls."""
        workdir = Path(tempfile.mkdtemp(prefix="outboxd-dev-"))
        log = workdir / "outboxd.log"
        command = [
            find_binary(binary),
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(workdir / "outboxd-dev.db"),
            "--partitions",
            str(partitions),
        ]
        with open(log, "w") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            )
        found: dict[str, str] = {}
        banner_read = threading.Event()

        def read_banner() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                if match := re.match(r"\s*gRPC\s+(\S+)", line):
                    found["target"] = match.group(1)
                elif match := re.match(r"\s*brokers\s+(\S+)\s+\(topic (\S+),", line):
                    found["brokers"], found["topic"] = match.group(1), match.group(2)
                if len(found) == 3:
                    banner_read.set()
            banner_read.set()  # stdout closed: the process ended

        threading.Thread(target=read_banner, daemon=True).start()
        if not banner_read.wait(timeout) or len(found) < 3:
            process.kill()
            process.wait()
            raise RuntimeError(f"outboxd dev did not start: {_tail(log)}")
        server = cls(found["target"], found["brokers"], found["topic"], process, workdir, log)
        server.wait_ready(timeout)
        return server

    def wait_ready(self, timeout: float) -> None:
        wait_for_grpc(self.target, timeout, self.process, self.log)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops it gracefully (SIGTERM), then removes its store."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_grpc(
    target: str,
    timeout: float,
    process: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
) -> None:
    """Waits until outboxd at `target` answers a call (probing, not sleeping a
    fixed time); fails early when `process` ends."""
    import grpc

    from outboxd.v1 import outbox_pb2 as pb
    from outboxd.v1 import outbox_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.OutboxStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"outboxd exited with {process.returncode}: {_tail(log) if log else ''}"
                )
            try:
                stub.GetStatus(pb.GetStatusRequest(event_ids=[str(uuid.uuid4())]), timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"outboxd at {target} not ready within {timeout}s") from None
                time.sleep(0.05)


# -- reading Kafka ------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """A record as an independent consumer read it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    #: Milliseconds since the epoch.
    timestamp: int = 0

    def header(self, name: str) -> str | None:
        """The first header called `name`, as text."""
        for key, value in self.headers:
            if key == name:
                return value.decode(errors="replace")
        return None

    @property
    def event_id(self) -> str | None:
        return self.header("outbox-event-id")

    def json(self) -> Any:
        return json.loads(self.value)


class KafkaReader:
    """Reads topics with a consumer of its own (confluent-kafka), from offset 0
    of every partition, until every expected event id was seen."""

    def __init__(self, brokers: str) -> None:
        self.brokers = brokers

    def create_topic(
        self, name: str | None = None, partitions: int = 3, timeout: float = 30.0
    ) -> str:
        """Creates a topic (a unique name when `name` is None) and waits until
        its metadata shows every partition; returns its name."""
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        name = name or f"test-{uuid.uuid4().hex[:12]}"
        admin = AdminClient({"bootstrap.servers": self.brokers})
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=timeout,
        )
        futures[name].result(timeout)
        deadline = time.monotonic() + timeout
        while True:
            metadata = admin.list_topics(name, timeout=5)
            found = metadata.topics.get(name)
            if found is not None and found.error is None and len(found.partitions) == partitions:
                return name
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {name} not ready within {timeout}s")
            time.sleep(0.05)

    def read(
        self,
        topic: str,
        event_ids: Collection[str],
        *,
        timeout: float = 60.0,
        idle: float = 0.5,
    ) -> list[Record]:
        """Every record of `topic` read until each of `event_ids` was seen and
        the topic then stayed idle for `idle` seconds, in (partition, offset)
        order. Fails after `timeout`, naming how many ids are missing."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self.brokers,
                "group.id": f"outboxd-testing-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                metadata = consumer.list_topics(topic, timeout=10)
                found = metadata.topics.get(topic)
                if found is not None and found.error is None and found.partitions:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"topic {topic} does not exist")
                time.sleep(0.05)
            consumer.assign([TopicPartition(topic, p, 0) for p in sorted(found.partitions)])
            missing = set(event_ids)
            records: list[Record] = []
            last_record = time.monotonic()
            while True:
                message = consumer.poll(0.1)
                if message is not None:
                    if message.error() is not None:
                        raise AssertionError(f"consumer error: {message.error()}")
                    last_record = time.monotonic()
                    record = Record(
                        topic=message.topic() or topic,
                        partition=message.partition() or 0,
                        offset=message.offset() or 0,
                        key=message.key(),
                        value=message.value() or b"",
                        headers=_headers(message.headers()),
                        timestamp=message.timestamp()[1],
                    )
                    records.append(record)
                    if record.event_id is not None:
                        missing.discard(record.event_id)
                if not missing and time.monotonic() - last_record >= idle:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{len(missing)} of {len(event_ids)} expected events not in {topic} "
                        f"after {timeout}s ({len(records)} records read)"
                    )
            records.sort(key=lambda r: (r.partition, r.offset))
            return records
        finally:
            consumer.close()

    async def read_async(
        self,
        topic: str,
        event_ids: Collection[str],
        *,
        timeout: float = 60.0,
        idle: float = 0.5,
    ) -> list[Record]:
        """`read`, in a worker thread."""
        return await asyncio.to_thread(self.read, topic, event_ids, timeout=timeout, idle=idle)


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    pairs = raw.items() if isinstance(raw, dict) else raw or []
    return [(k, v.encode() if isinstance(v, str) else (v or b"")) for k, v in pairs]


def first_sightings(records: list[Record]) -> list[Record]:
    """Records without redeliveries (at-least-once): the first of each event id."""
    seen: set[str | None] = set()
    first = []
    for record in records:
        if record.event_id not in seen:
            seen.add(record.event_id)
            first.append(record)
    return first


# -- the pytest plugin ----------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("outboxd")
    group.addoption(
        "--outboxd-bin",
        dest="outboxd_bin",
        default=None,
        help="the outboxd binary for the outboxd_dev fixture (default: $OUTBOXD_BIN, PATH)",
    )
    parser.addini("outboxd_bin", "the outboxd binary for the outboxd_dev fixture", default="")


@pytest.fixture(scope="session")
def outboxd_binary(pytestconfig: pytest.Config) -> str:
    explicit = pytestconfig.getoption("outboxd_bin") or pytestconfig.getini("outboxd_bin") or None
    return find_binary(explicit)


@pytest.fixture(scope="session")
def outboxd_dev(outboxd_binary: str) -> Iterator[DevServer]:
    server = DevServer.start(outboxd_binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def outboxd_kafka(outboxd_dev: DevServer) -> KafkaReader:
    return KafkaReader(outboxd_dev.brokers)


@pytest_asyncio.fixture
async def outboxd_client(outboxd_dev: DevServer) -> AsyncIterator[OutboxClient]:
    async with OutboxClient(outboxd_dev.target, producer="tests") as client:
        yield client
