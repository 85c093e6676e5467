"""The suite's real services: a private PostgreSQL cluster, a Tansu broker and
`outboxd serve` processes, each stopped when the test session ends however it
ends (a watchdog process per service outlives a killed pytest)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg

from outboxd.testing import find_binary, wait_for_grpc
from outboxd.v1 import outbox_pb2 as pb
from outboxd.v1 import outbox_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def watchdog(cleanup: str) -> None:
    """Runs the shell command `cleanup` once this process has exited."""
    subprocess.Popen(
        ["sh", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 0.5; done; {cleanup}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def pg_bin_dir() -> Path:
    """The newest PostgreSQL server binaries (Debian's layout)."""
    versions = []
    for entry in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        try:
            versions.append((int(entry.parent.parent.name), entry.parent))
        except ValueError:
            continue
    if not versions:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    return max(versions)[1]


class PgCluster:
    """A throwaway cluster in a temporary directory, on a free port. PostgreSQL
    refuses to run as root: then its tools run as `postgres`."""

    def __init__(self) -> None:
        self.bin = pg_bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="outboxd-pyclient-pg-"))
        self.run_as = "postgres" if os.geteuid() == 0 else None
        if self.run_as:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.dir)], check=True)
        self.port = free_port()
        data = self.dir / "data"
        watchdog(f"{self._shell(f'{self.bin}/pg_ctl -D {data} stop -m immediate')}; rm -rf {self.dir}")
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200 -c shared_buffers=64MB"
        )
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(self.dir / "server.log"), "-o", options, "-w", "-t", "60", "start"
        )

    def _shell(self, command: str) -> str:
        return f"runuser -u {self.run_as} -- {command}" if self.run_as else command

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(command, cwd=self.dir, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database: its URL."""
        name = name or unique("pyclient")
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Tansu:
    """A Tansu broker process with in-memory storage on a free port. It has no
    automatic topic creation: tests create their topics."""

    def __init__(self) -> None:
        binary = os.environ.get("TANSU_BIN") or str(Path.home() / ".cargo/bin/tansu")
        if not os.access(binary, os.X_OK):
            raise RuntimeError(f"tansu not found at {binary} (set TANSU_BIN)")
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        self.bootstrap = f"127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix="outboxd-pyclient-tansu-", suffix=".log")[1])
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        watchdog(f"kill -9 {self.process.pid} 2>/dev/null; rm -f {self.log}")
        self._wait_ready(30.0)

    def _wait_ready(self, timeout: float) -> None:
        """Ready when it answers a metadata request."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited: {self.log.read_text()[-2000:]}")
            try:
                admin.list_topics(timeout=0.5)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tansu did not answer within {timeout}s") from None

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.unlink(missing_ok=True)


def wait_for_tls_grpc(
    target: str,
    credentials: grpc.ChannelCredentials,
    timeout: float,
    process: subprocess.Popen[bytes],
    log: Path,
) -> None:
    """Waits until outboxd at `target` completes a TLS handshake and answers
    a call with anything but UNAVAILABLE: a gateway with identities refuses a
    probe without credentials (UNAUTHENTICATED), and that is an answer."""
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(target, credentials) as channel:
        stub = pb_grpc.OutboxStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"outboxd exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                stub.GetStatus(pb.GetStatusRequest(event_ids=[str(uuid.uuid4())]), timeout=2)
                return
            except grpc.RpcError as error:
                if isinstance(error, grpc.Call) and error.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"outboxd at {target} not ready within {timeout}s: {error}") from None
                time.sleep(0.05)


@dataclass
class Serve:
    """A real `outboxd serve` process."""

    target: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls,
        store_url: str,
        brokers: str,
        port: int | None = None,
        *,
        extra_config: str = "",
        probe: grpc.ChannelCredentials | None = None,
    ) -> Serve:
        """Starts it on `port` (a free one by default). `extra_config` is TOML
        appended to the configuration (whole tables: `[tls]`,
        `[[auth.identities]]`…). `probe`, for a TLS listener, is the channel
        credentials of the readiness probe, which then counts any answer of
        the gateway (UNAUTHENTICATED included) as ready."""
        port = port or free_port()
        config = Path(tempfile.mkstemp(prefix="outboxd-pyclient-", suffix=".toml")[1])
        config.write_text(
            f"""
listen = "127.0.0.1:{port}"
shutdown_timeout = "10s"

[store]
url = "{store_url}"
max_connections = 8

[kafka]
brokers = "{brokers}"

[relay]
shard_count = 8
poll_interval = "200ms"
lease_ttl = "5s"

[watch]
resync_interval = "500ms"
{extra_config}"""
        )
        log = config.with_suffix(".log")
        with open(log, "a") as log_file:
            process = subprocess.Popen(
                [find_binary(), "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "RUST_LOG": "warn"},
            )
        watchdog(f"kill -9 {process.pid} 2>/dev/null; rm -f {config} {log}")
        serve = cls(f"127.0.0.1:{port}", config, log, process)
        if probe is None:
            wait_for_grpc(serve.target, 60.0, process, log)
        else:
            wait_for_tls_grpc(serve.target, probe, 60.0, process, log)
        return serve

    @property
    def port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.config.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)
