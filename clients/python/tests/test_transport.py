"""What the client puts on the wire and how it reads failures: bearer token,
TLS, retries of calls safe to repeat, typed exceptions. Served by a small
in-process gRPC server that records what it receives (these are properties of
the client, not of outboxd's store or relay)."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc import code_pb2, error_details_pb2, status_pb2

from outboxd import (
    Batch,
    Event,
    InvalidEvent,
    OutboxClient,
    PermissionDenied,
    RetryPolicy,
    Transaction,
    Unauthenticated,
    Unavailable,
)
from outboxd.v1 import outbox_pb2 as pb

pytestmark = pytest.mark.asyncio

EVENT = Event(topic="orders", payload={"n": 1}, aggregate_id="o-1")


@dataclass
class Recorder:
    """Answers Append as `behaviour` says; records every request and its metadata."""

    behaviour: Callable[[int, dict[str, str]], tuple[grpc.StatusCode, str, bytes | None] | None]
    requests: list[tuple[pb.AppendRequest, dict[str, str]]] = field(default_factory=list)
    streams: int = 0
    streamed: list[tuple[int, str, int]] = field(default_factory=list)
    #: When given, AppendStream reads every request as it comes and answers
    #: none until this is set.
    hold: asyncio.Event | None = None

    async def Append(self, request: pb.AppendRequest, context: Any) -> pb.AppendResponse:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.requests.append((request, metadata))
        outcome = self.behaviour(len(self.requests), metadata)
        if outcome is not None:
            code, message, details = outcome
            if details is not None:
                context.set_trailing_metadata((("grpc-status-details-bin", details),))
            await context.abort(code, message)
        return pb.AppendResponse(event_ids=["0192f0c4-0000-7000-8000-000000000001"])

    async def AppendStream(
        self, requests: AsyncIterator[pb.AppendRequest], context: Any
    ) -> AsyncIterator[pb.AppendResponse]:
        """The first stream answers two requests, reads four more (as many as
        the client has in flight), then breaks (UNAVAILABLE); later streams
        answer everything."""
        self.streams += 1
        stream = self.streams
        if self.hold is not None:
            async for response in self._held(stream, requests):
                yield response
            return
        async for request in requests:
            self.streamed.append((stream, request.token.transaction_id, request.correlation))
            if stream == 1 and len(self.streamed) > 2:
                if len(self.streamed) == 6:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
                continue
            yield pb.AppendResponse(
                event_ids=[f"id-{request.token.transaction_id}"], correlation=request.correlation
            )


    async def _held(
        self, stream: int, requests: AsyncIterator[pb.AppendRequest]
    ) -> AsyncIterator[pb.AppendResponse]:
        received: asyncio.Queue[pb.AppendRequest | None] = asyncio.Queue()

        async def read() -> None:
            async for request in requests:
                self.streamed.append((stream, request.token.transaction_id, request.correlation))
                await received.put(request)
            await received.put(None)

        reader = asyncio.ensure_future(read())
        assert self.hold is not None
        await self.hold.wait()
        while (request := await received.get()) is not None:
            yield pb.AppendResponse(
                event_ids=[f"id-{request.token.transaction_id}"], correlation=request.correlation
            )
        await reader


@dataclass
class Server:
    recorder: Recorder
    target: str


def tls_material() -> tuple[bytes, bytes]:
    """A self-signed certificate for localhost, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


async def serve(recorder: Recorder, tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    append = grpc.unary_unary_rpc_method_handler(
        recorder.Append,
        request_deserializer=pb.AppendRequest.FromString,
        response_serializer=pb.AppendResponse.SerializeToString,
    )
    stream = grpc.stream_stream_rpc_method_handler(
        recorder.AppendStream,
        request_deserializer=pb.AppendRequest.FromString,
        response_serializer=pb.AppendResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(
            "outboxd.v1.Outbox", {"Append": append, "AppendStream": stream}
        ),)
    )
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        certificate, key = tls
        port = server.add_secure_port(
            "127.0.0.1:0", grpc.ssl_server_credentials([(key, certificate)])
        )
    await server.start()
    return server, f"localhost:{port}"


def bearer_only(token: str) -> Callable[[int, dict[str, str]], tuple[grpc.StatusCode, str, None] | None]:
    def check(_: int, metadata: dict[str, str]) -> tuple[grpc.StatusCode, str, None] | None:
        given = metadata.get("authorization")
        if given is None:
            return grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required", None
        if given != f"Bearer {token}":
            return grpc.StatusCode.PERMISSION_DENIED, "producer shop is not yours", None
        return None

    return check


@pytest_asyncio.fixture
async def secured() -> AsyncIterator[Server]:
    recorder = Recorder(bearer_only("s3cret"))
    server, target = await serve(recorder)
    try:
        yield Server(recorder, target)
    finally:
        await server.stop(None)


async def test_the_token_goes_as_bearer_authorization(secured: Server) -> None:
    async with OutboxClient(secured.target, producer="shop", token="s3cret") as client:
        result = await client.append([EVENT], transaction="tx-1")
    assert len(result.event_ids) == 1
    [(request, metadata)] = secured.recorder.requests
    assert metadata["authorization"] == "Bearer s3cret"
    assert request.token.producer == "shop" and request.token.transaction_id == "tx-1"


async def test_refusals_are_typed(secured: Server) -> None:
    async with OutboxClient(secured.target, producer="shop") as anonymous:
        with pytest.raises(Unauthenticated) as unauthenticated:
            await anonymous.append([EVENT])
    assert "bearer token" in unauthenticated.value.message
    async with OutboxClient(secured.target, producer="shop", token="someone-else") as other:
        with pytest.raises(PermissionDenied):
            await other.append([EVENT])
    # Neither is retried.
    assert len(secured.recorder.requests) == 2


async def test_tls_with_a_private_root_certificate() -> None:
    certificate, key = tls_material()
    recorder = Recorder(bearer_only("s3cret"))
    server, target = await serve(recorder, (certificate, key))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
        async with OutboxClient(target, producer="shop", tls=credentials, token="s3cret") as client:
            await client.append([EVENT])
        assert recorder.requests[0][1]["authorization"] == "Bearer s3cret"
        # Plaintext to a TLS port gets nowhere.
        quick = RetryPolicy(max_attempts=2, initial_backoff=0.01)
        async with OutboxClient(target, producer="shop", retry=quick, timeout=5) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.append([EVENT])
    finally:
        await server.stop(None)


async def test_an_unavailable_append_is_retried_with_the_same_token() -> None:
    recorder = Recorder(
        lambda n, _: (grpc.StatusCode.UNAVAILABLE, "store unavailable", None) if n <= 2 else None
    )
    server, target = await serve(recorder)
    try:
        async with OutboxClient(target, producer="shop") as client:
            result = await client.append([EVENT], transaction=Transaction.immediate("shop", "tx-7"), sequence=3)
        assert len(result.event_ids) == 1
        assert len(recorder.requests) == 3
        tokens = {(r.token.producer, r.token.transaction_id, r.sequence) for r, _ in recorder.requests}
        assert tokens == {("shop", "tx-7", 3)}
        assert len({r.SerializeToString() for r, _ in recorder.requests}) == 1

        # When the attempts run out, Unavailable: the caller must not commit.
        recorder.requests.clear()
        recorder.behaviour = lambda n, _: (grpc.StatusCode.UNAVAILABLE, "store unavailable", None)
        async with OutboxClient(target, producer="shop", retry=RetryPolicy(max_attempts=3, initial_backoff=0.01)) as client:
            with pytest.raises(Unavailable):
                await client.append([EVENT])
        assert len(recorder.requests) == 3
    finally:
        await server.stop(None)


async def test_field_violations_are_read_from_the_status_details() -> None:
    bad_request = error_details_pb2.BadRequest()
    bad_request.field_violations.add(field="events[0].topic", description="must not be empty")
    detail = AnyProto()
    detail.Pack(bad_request)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="invalid events[0].topic", details=[detail])
    recorder = Recorder(lambda n, _: (grpc.StatusCode.INVALID_ARGUMENT, "invalid events[0].topic",
                                      status.SerializeToString()))
    server, target = await serve(recorder)
    try:
        async with OutboxClient(target, producer="shop") as client:
            with pytest.raises(InvalidEvent) as invalid:
                await client.append([EVENT])
        assert invalid.value.fields == ["events[0].topic"]
        assert invalid.value.violations[0].description == "must not be empty"
        assert len(recorder.requests) == 1
    finally:
        await server.stop(None)


async def test_no_trace_context_without_a_span(secured: Server) -> None:
    async with OutboxClient(secured.target, producer="shop", token="s3cret") as client:
        await client.append([EVENT])
    assert "traceparent" not in secured.recorder.requests[0][1]


async def test_a_broken_append_stream_resends_what_was_unanswered() -> None:
    recorder = Recorder(lambda n, _: None)
    server, target = await serve(recorder)
    try:
        batches = [Batch([EVENT], Transaction.immediate("shop", f"tx-{n}")) for n in range(10)]
        async with OutboxClient(target, producer="shop") as client:
            outcomes = [o async for o in client.append_stream(batches, max_in_flight=4)]
        # Each batch answered once, in order.
        assert [o.event_ids for o in outcomes] == [[f"id-tx-{n}"] for n in range(10)]
        assert recorder.streams == 2
        first = [t for s, t, _ in recorder.streamed if s == 1]
        second = [(t, c) for s, t, c in recorder.streamed if s == 2]
        assert first == ["tx-0", "tx-1", "tx-2", "tx-3", "tx-4", "tx-5"]
        # The new stream starts with the first unanswered batch, same
        # correlation, and goes on in order.
        assert second == [(f"tx-{n}", n) for n in range(2, 10)]
    finally:
        await server.stop(None)


async def test_append_stream_keeps_at_most_max_in_flight_unanswered() -> None:
    recorder = Recorder(lambda n, _: None, hold=asyncio.Event())
    server, target = await serve(recorder)
    try:
        batches = [Batch([EVENT], Transaction.immediate("shop", f"tx-{n}")) for n in range(20)]
        async with OutboxClient(target, producer="shop") as client:

            async def collect() -> list[str]:
                return [o.batch.transaction.transaction_id
                        async for o in client.append_stream(batches, max_in_flight=3)]

            outcomes = asyncio.ensure_future(collect())
            for _ in range(200):
                if len(recorder.streamed) >= 3:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            # Three sent, none answered: the client waits.
            assert [t for _, t, _ in recorder.streamed] == ["tx-0", "tx-1", "tx-2"]
            assert recorder.hold is not None
            recorder.hold.set()
            assert await asyncio.wait_for(outcomes, 10) == [f"tx-{n}" for n in range(20)]
        assert [c for _, _, c in recorder.streamed] == list(range(20))
    finally:
        await server.stop(None)
