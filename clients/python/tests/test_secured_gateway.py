"""TLS, mutual TLS and bearer tokens against outboxd itself: the real
`outboxd serve` (PostgreSQL store, Tansu broker) with `[tls]`, a client CA
(client certificates optional) and two identities, one named by its client
certificate and one by a token; what reaches Kafka is read by an independent
consumer. Certificates are made here, with `cryptography`."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness import PgCluster, Serve, Tansu, unique
from outboxd import (
    Event,
    EventState,
    OutboxClient,
    PermissionDenied,
    RetryPolicy,
    TlsError,
    Transaction,
    Unauthenticated,
    Unavailable,
)
from outboxd.testing import KafkaReader

pytestmark = pytest.mark.asyncio

#: Few, quick attempts where a call is expected to fail at the transport.
QUICK = RetryPolicy(max_attempts=2, initial_backoff=0.05)


# -- certificates -----------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    certificate: bytes
    key: bytes


class Authority:
    """A certificate authority (EC P-256) that signs server and client
    certificates, valid from a minute ago for an hour."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, common_name: str, *, server: bool = False, names: list[x509.GeneralName] | None = None
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return Issued(
            certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


@dataclass(frozen=True)
class Pki:
    server_ca: Authority
    client_ca: Authority
    #: Signed by client_ca; named only by its subject CN `orders.internal`.
    orders: Issued
    #: Also CN `orders.internal`, signed by a CA outboxd does not know.
    impostor: Issued
    #: A CA that signed none of outboxd's certificates.
    stranger_ca: Authority


# -- the secured gateway ----------------------------------------------------


@dataclass(frozen=True)
class Secured:
    serve: Serve
    pki: Pki
    billing_token: str
    #: Topics the orders identity may append to start with this.
    orders_prefix: str
    #: Topics the billing identity may append to start with this.
    billing_prefix: str

    @property
    def target(self) -> str:
        return self.serve.target

    def client(
        self,
        producer: str,
        *,
        root: bytes | None = None,
        identity: Issued | None = None,
        token: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
    ) -> OutboxClient:
        """A client over TLS trusting `root` (the server's CA by default),
        presenting `identity`'s certificate and `token` when given."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root if root is not None else self.pki.server_ca.pem,
            private_key=identity.key if identity else None,
            certificate_chain=identity.certificate if identity else None,
        )
        return OutboxClient(
            self.target, producer=producer, tls=credentials, token=token, retry=retry, timeout=10
        )


@pytest.fixture(scope="module")
def pki() -> Pki:
    server_ca = Authority("outboxd test server CA")
    client_ca = Authority("outboxd test client CA")
    stranger_ca = Authority("outboxd test stranger CA")
    return Pki(
        server_ca=server_ca,
        client_ca=client_ca,
        orders=client_ca.issue("orders.internal"),
        impostor=stranger_ca.issue("orders.internal"),
        stranger_ca=stranger_ca,
    )


@pytest.fixture(scope="module")
def secured(
    pki: Pki, pg: PgCluster, tansu: Tansu, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    """outboxd serving TLS with client certificates optional, and two
    identities: `orders` by its certificate's CN, `billing` by a token."""
    directory: Path = tmp_path_factory.mktemp("secured-gateway")
    server = pki.server_ca.issue(
        "outboxd",
        server=True,
        names=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    files = {
        "server.pem": server.certificate,
        "server.key": server.key,
        "clients-ca.pem": pki.client_ca.pem,
    }
    for name, contents in files.items():
        (directory / name).write_bytes(contents)
    token = secrets.token_urlsafe(32)
    tag = uuid.uuid4().hex[:10]
    orders_prefix = f"secured-orders-{tag}."
    billing_prefix = f"secured-billing-{tag}."
    extra = f"""
[tls]
cert = "{directory / 'server.pem'}"
key = "{directory / 'server.key'}"
client_ca = "{directory / 'clients-ca.pem'}"
client_certificate_optional = true
reload_interval = "1h"

[[auth.identities]]
name = "orders"
client_certificate = "orders.internal"
producers = ["orders"]
topics = ["{orders_prefix}*"]

[[auth.identities]]
name = "billing"
token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"
producers = ["billing"]
topics = ["{billing_prefix}*"]
"""
    probe = grpc.ssl_channel_credentials(root_certificates=pki.server_ca.pem)
    serve = Serve.start(
        pg.create_database(unique("secured")), tansu.bootstrap, extra_config=extra, probe=probe
    )
    try:
        yield Secured(serve, pki, token, orders_prefix, billing_prefix)
    finally:
        serve.stop()


@pytest.fixture
def orders_topic(secured: Secured, kafka: KafkaReader) -> str:
    return kafka.create_topic(f"{secured.orders_prefix}{uuid.uuid4().hex[:8]}", partitions=3)


@pytest.fixture
def billing_topic(secured: Secured, kafka: KafkaReader) -> str:
    return kafka.create_topic(f"{secured.billing_prefix}{uuid.uuid4().hex[:8]}", partitions=3)


def event(topic: str, name: str) -> Event:
    """An event with an id of our choosing, so that one refused can be looked
    for in Kafka."""
    return Event(
        topic=topic,
        event_id=str(uuid.uuid4()),
        aggregate_type="test",
        aggregate_id=name,
        event_type="SecuredV1",
        payload={"name": name},
    )


def id_of(sent: Event) -> str:
    assert sent.event_id is not None
    return str(sent.event_id)


async def ids_in_kafka(kafka: KafkaReader, topic: str, expected: list[str]) -> list[str]:
    """The event ids of every record of `topic`, read by the independent
    consumer until `expected` arrived and the topic stayed idle a while."""
    records = await kafka.read_async(topic, expected, idle=1.0)
    return [r.event_id or "" for r in records]


async def admitted(client: OutboxClient, topic: str, name: str) -> str:
    """Appends one event and waits until it is PUBLISHED; its id."""
    sent = event(topic, name)
    result = await client.append([sent])
    assert result.event_ids == [sent.event_id]
    finals = await client.wait_final(result.event_ids, timeout=60)
    assert finals[id_of(sent)].state is EventState.PUBLISHED
    return id_of(sent)


# -- the tests --------------------------------------------------------------


async def test_secured_certificate_identity_appends_and_watches_to_published(
    secured: Secured, kafka: KafkaReader, orders_topic: str
) -> None:
    async with secured.client("orders", identity=secured.pki.orders) as orders:
        events = [event(orders_topic, f"order-{n}") for n in range(3)]
        result = await orders.append(events, transaction=Transaction.immediate("orders", unique("tx")))
        assert result.event_ids == [id_of(e) for e in events]
        updates = [u async for u in orders.watch(result.event_ids)]
        finals = {u.status.event_id: u.status for u in updates if u.status.state.is_final}
    assert set(finals) == set(result.event_ids)
    for status in finals.values():
        assert status.state is EventState.PUBLISHED, status
        assert status.producer == "orders" and status.topic == orders_topic
        assert status.partition is not None and status.offset is not None

    records = await kafka.read_async(orders_topic, result.event_ids, idle=1.0)
    assert sorted(r.event_id or "" for r in records) == sorted(result.event_ids)
    # Where outboxd says each went is where the consumer found it.
    for record in records:
        status = finals[record.event_id or ""]
        assert (record.partition, record.offset) == (status.partition, status.offset)


async def test_secured_certificate_identity_is_denied_another_producer_and_topic(
    secured: Secured, kafka: KafkaReader, orders_topic: str, billing_topic: str
) -> None:
    async with secured.client("orders", identity=secured.pki.orders) as orders:
        for_billing = event(orders_topic, "as-billing")
        with pytest.raises(PermissionDenied) as denied:
            await orders.append([for_billing], transaction=Transaction.immediate("billing", unique("tx")))
        assert "billing" in denied.value.message
        assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED

        on_billing_topic = event(billing_topic, "billing-topic")
        with pytest.raises(PermissionDenied) as denied_topic:
            await orders.append([on_billing_topic])
        assert billing_topic in denied_topic.value.message

        # Nothing refused was stored.
        assert await orders.status([id_of(for_billing), id_of(on_billing_topic)]) == []
        orders_own = await admitted(orders, orders_topic, "after-refusals")

    async with secured.client("billing", token=secured.billing_token) as billing:
        billing_own = await admitted(billing, billing_topic, "after-refusals")

    # The independent consumer sees only what was admitted on either topic.
    assert await ids_in_kafka(kafka, orders_topic, [orders_own]) == [orders_own]
    assert await ids_in_kafka(kafka, billing_topic, [billing_own]) == [billing_own]


async def test_secured_token_identity_appends_for_billing(
    secured: Secured, kafka: KafkaReader, orders_topic: str, billing_topic: str
) -> None:
    # TLS with the server's CA, no client certificate: the token names it.
    async with secured.client("billing", token=secured.billing_token) as billing:
        events = [event(billing_topic, f"invoice-{n}") for n in range(2)]
        result = await billing.append(events)
        finals = await billing.wait_final(result.event_ids, timeout=60)
        assert {s.state for s in finals.values()} == {EventState.PUBLISHED}
        assert all(s.producer == "billing" and s.partition is not None for s in finals.values())

        # The token's rights are billing's only.
        as_orders = event(orders_topic, "as-orders")
        with pytest.raises(PermissionDenied) as denied:
            await billing.append([as_orders], transaction=Transaction.immediate("orders", unique("tx")))
        assert "orders" in denied.value.message

    # A token, when sent, decides, even beside the orders certificate.
    async with secured.client(
        "billing", identity=secured.pki.orders, token=secured.billing_token
    ) as both:
        beside = await admitted(both, billing_topic, "token-beside-certificate")

    async with secured.client("orders", identity=secured.pki.orders) as orders:
        orders_own = await admitted(orders, orders_topic, "sentinel")

    assert sorted(await ids_in_kafka(kafka, billing_topic, [*result.event_ids, beside])) == sorted(
        [*result.event_ids, beside]
    )
    assert await ids_in_kafka(kafka, orders_topic, [orders_own]) == [orders_own]


async def test_secured_wrong_or_missing_token_is_unauthenticated(
    secured: Secured, kafka: KafkaReader, billing_topic: str
) -> None:
    refused = []
    async with secured.client("billing", token="not-" + secured.billing_token) as wrong:
        refused.append(event(billing_topic, "wrong-token"))
        with pytest.raises(Unauthenticated) as unauthenticated:
            await wrong.append([refused[-1]])
        assert unauthenticated.value.code is grpc.StatusCode.UNAUTHENTICATED
        # Not retried into something else, and reads are refused alike.
        with pytest.raises(Unauthenticated):
            await wrong.status([id_of(refused[-1])])

    # TLS with the server's CA but neither a certificate nor a token.
    async with secured.client("billing") as anonymous:
        refused.append(event(billing_topic, "anonymous"))
        with pytest.raises(Unauthenticated):
            await anonymous.append([refused[-1]])

    async with secured.client("billing", token=secured.billing_token) as billing:
        billing_own = await admitted(billing, billing_topic, "sentinel")
        assert await billing.status([id_of(e) for e in refused]) == []
    assert await ids_in_kafka(kafka, billing_topic, [billing_own]) == [billing_own]


async def test_secured_untrusted_server_certificate_is_a_tls_error(
    secured: Secured, kafka: KafkaReader, billing_topic: str
) -> None:
    refused = event(billing_topic, "untrusting")
    # The client trusts another CA than the one that signed outboxd's certificate.
    async with secured.client(
        "billing", root=secured.pki.stranger_ca.pem, token=secured.billing_token, retry=QUICK
    ) as untrusting:
        with pytest.raises(TlsError) as failed:
            await untrusting.append([refused])
        # Watches too, once their reconnection attempts are spent.
        with pytest.raises(TlsError):
            async for _ in untrusting.watch([id_of(refused)], reconnect=QUICK):
                pass
    # An Unavailable: nothing was stored, the caller must not commit.
    assert isinstance(failed.value, Unavailable)
    assert failed.value.code is grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in failed.value.message, failed.value.message

    # Plaintext to the TLS listener gets nowhere either (no TLS to fail).
    async with OutboxClient(
        secured.target, producer="billing", token=secured.billing_token, retry=QUICK, timeout=5
    ) as plaintext:
        with pytest.raises(Unavailable) as unavailable:
            await plaintext.append([event(billing_topic, "plaintext")])
        assert not isinstance(unavailable.value, TlsError)

    async with secured.client("billing", token=secured.billing_token) as billing:
        billing_own = await admitted(billing, billing_topic, "sentinel")
        assert await billing.status([id_of(refused)]) == []
    assert await ids_in_kafka(kafka, billing_topic, [billing_own]) == [billing_own]


async def test_secured_client_certificate_of_another_ca_is_refused(
    secured: Secured, kafka: KafkaReader, orders_topic: str
) -> None:
    # Its CN is orders.internal, but outboxd's client CA did not sign it:
    # outboxd ends the connection's TLS, whatever the client trusts.
    refused = event(orders_topic, "impostor")
    async with secured.client("orders", identity=secured.pki.impostor, retry=QUICK) as impostor:
        with pytest.raises(TlsError) as failed:
            await impostor.append([refused])
    assert failed.value.code is grpc.StatusCode.UNAVAILABLE

    async with secured.client("orders", identity=secured.pki.orders) as orders:
        orders_own = await admitted(orders, orders_topic, "sentinel")
        assert await orders.status([id_of(refused)]) == []
    assert await ids_in_kafka(kafka, orders_topic, [orders_own]) == [orders_own]
