"""The sans-I/O TLS engine, driven over in-memory pairs.

Every test wires two ends together in memory: two engines, or an engine
and a bare pyOpenSSL connection or a stdlib ``ssl.SSLObject`` where the
test needs a peer that misbehaves or a second opinion. No sockets.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import random
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from OpenSSL import SSL
from OpenSSL._util import lib as openssl_lib

from mptls.errors import (
    CertificateError,
    ConfigurationError,
    HandshakeIncompleteError,
    TLSError,
)
from mptls.tls.config import TLSConfig, TLSVersion
from mptls.tls.engine import AlertDescription, TLSEngine
from mptls.tls.exporter import ssl_pointer

# SSL_OP_NO_EXTENDED_MASTER_SECRET (OpenSSL 3 ssl.h: SSL_OP_BIT(0)); the
# binding does not export it
OP_NO_EXTENDED_MASTER_SECRET = getattr(
    openssl_lib, "SSL_OP_NO_EXTENDED_MASTER_SECRET", 1
)

# SSL_OP_ALLOW_CLIENT_RENEGOTIATION (OpenSSL 3 ssl.h: SSL_OP_BIT(8)): a
# server with it would renegotiate when a client asks
OP_ALLOW_CLIENT_RENEGOTIATION = getattr(
    openssl_lib, "SSL_OP_ALLOW_CLIENT_RENEGOTIATION", 1 << 8
)

# a pair settles within a handful of flights; more means a livelock
MAX_ROUNDS = 32


# PKI


@dataclass(frozen=True)
class Pki:
    ca: trustme.CA
    ca_file: Path
    server_file: Path
    client_file: Path
    other_ca_file: Path

    def server(self, **settings: Any) -> TLSConfig:
        return TLSConfig(certfile=self.server_file, **settings)

    def client(self, **settings: Any) -> TLSConfig:
        return TLSConfig(cafile=self.ca_file, **settings)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = ca.issue_cert("client.mptls.test")
    other = trustme.CA()
    files = {
        "ca.pem": ca.cert_pem,
        "server.pem": server.private_key_and_cert_chain_pem,
        "client.pem": client.private_key_and_cert_chain_pem,
        "other-ca.pem": other.cert_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(directory / name))
    return Pki(
        ca,
        directory / "ca.pem",
        directory / "server.pem",
        directory / "client.pem",
        directory / "other-ca.pem",
    )


# in-memory wiring


class End(Protocol):
    def receive(self, data: bytes) -> None: ...

    def data_to_send(self) -> bytes: ...


class RawPeer:
    """A bare pyOpenSSL connection with the engine's pull interface.

    It records the alerts it receives, so tests can see what the engine
    told its peer.
    """

    def __init__(self, context: SSL.Context, *, server_side: bool) -> None:
        self.connection = SSL.Connection(context, None)
        self.alerts_received: list[tuple[int, int]] = []
        self.failure: SSL.Error | None = None
        self.received: list[bytes] = []
        self.connection.set_info_callback(self._on_info)
        if server_side:
            self.connection.set_accept_state()
        else:
            self.connection.set_connect_state()
            self.handshake()

    def _on_info(
        self, connection: SSL.Connection, where: int, ret: int
    ) -> None:
        if (
            where & openssl_lib.SSL_CB_ALERT
            and where & openssl_lib.SSL_CB_READ
        ):
            self.alerts_received.append((ret >> 8, ret & 0xFF))

    def handshake(self) -> None:
        try:
            self.connection.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            # the peer giving up is what some tests expect; they look here
            self.failure = exc

    def receive(self, data: bytes) -> None:
        self.connection.bio_write(data)
        self.handshake()
        if self.failure is not None:
            return
        try:
            while True:
                self.received.append(self.connection.recv(1 << 16))
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            self.failure = exc

    def data_to_send(self) -> bytes:
        try:
            return self.connection.bio_read(1 << 20)
        except SSL.WantReadError:
            return b""


def exchange(a: End, b: End) -> None:
    """Move bytes both ways until neither end has anything to send."""
    for _ in range(MAX_ROUNDS):
        from_a = a.data_to_send()
        from_b = b.data_to_send()
        if not from_a and not from_b:
            return
        if from_a:
            b.receive(from_a)
        if from_b:
            a.receive(from_b)
    raise AssertionError("the pair did not settle")


def engines(
    client_context: SSL.Context,
    server_context: SSL.Context,
    *,
    server_hostname: str | None = "localhost",
    check_hostname: bool = True,
) -> tuple[TLSEngine, TLSEngine]:
    client = TLSEngine(
        client_context,
        server_side=False,
        server_hostname=server_hostname,
        check_hostname=check_hostname,
    )
    server = TLSEngine(server_context, server_side=True)
    return client, server


def connected(pki: Pki, *, tls12: bool = False) -> tuple[TLSEngine, TLSEngine]:
    """A client and a server engine with the handshake done."""
    if tls12:
        minimum = TLSVersion.TLS1_2
        server_context = pki.server(minimum_version=minimum).server_context()
        server_context.set_max_proto_version(SSL.TLS1_2_VERSION)
        client_context = pki.client(minimum_version=minimum).client_context()
    else:
        server_context = pki.server().server_context()
        client_context = pki.client().client_context()
    client, server = engines(client_context, server_context)
    client.start()
    exchange(client, server)
    assert client.handshake_complete and server.handshake_complete
    return client, server


def key_bytes(engine: TLSEngine) -> bytes:
    keys = engine.export_keys()
    return keys.key_a + keys.key_b


# handshake


def test_tls13_handshake_agrees_on_keys(pki: Pki) -> None:
    client, server = connected(pki)

    assert client.version() == server.version() == "TLSv1.3"
    assert client.cipher() == server.cipher()
    name, protocol, bits = client.cipher() or ("", "", 0)
    assert name.startswith("TLS_") and protocol == "TLSv1.3" and bits >= 128
    assert client.export_keys() == server.export_keys()
    assert client.export_keys().generation == 0
    assert not client.session_reused()


def test_tls12_with_extended_master_secret_is_accepted(pki: Pki) -> None:
    client, server = connected(pki, tls12=True)

    assert client.version() == server.version() == "TLSv1.2"
    assert key_bytes(client) == key_bytes(server)


def test_tls12_needs_to_be_configured(pki: Pki) -> None:
    server_context = pki.server(minimum_version=TLSVersion.TLS1_2)
    context = server_context.server_context()
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    client, server = engines(pki.client().client_context(), context)
    client.start()

    with pytest.raises(TLSError) as raised:
        exchange(client, server)

    assert raised.value.alert == AlertDescription.PROTOCOL_VERSION
    assert not client.handshake_complete


def unstartable_client(pki: Pki, why: str) -> SSL.Context:
    """A client context on which OpenSSL can build no ClientHello."""
    context = pki.client(minimum_version=TLSVersion.TLS1_2).client_context()
    if why == "no protocols available":
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
    else:
        # TLS 1.2 alone, with ciphers a client without a PSK cannot offer
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(b"PSK")
    return context


@pytest.mark.parametrize("why", ["no protocols available", "no ciphers"])
def test_a_handshake_that_cannot_start_claims_no_alert(
    pki: Pki, why: str
) -> None:
    # OpenSSL queues an alert for a server that has heard nothing yet,
    # and the message said it was sent; nothing is, so it says neither
    client, _ = engines(
        unstartable_client(pki, why), pki.server().server_context()
    )

    with pytest.raises(TLSError) as raised:
        client.start()

    message = str(raised.value)
    assert message.startswith("TLS could not start: ")
    assert why in message and "alert" not in message
    assert raised.value.alert is None
    assert client.data_to_send() == b""
    with pytest.raises(TLSError, match="could not start"):
        client.receive(b"")


def raw_tls12_context(pki: Pki, *, server_side: bool) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(OP_NO_EXTENDED_MASTER_SECRET)
    if server_side:
        context.use_certificate_chain_file(str(pki.server_file))
        context.use_privatekey_file(str(pki.server_file))
    return context


def test_client_refuses_tls12_without_extended_master_secret(
    pki: Pki,
) -> None:
    peer = RawPeer(raw_tls12_context(pki, server_side=True), server_side=True)
    context = pki.client(minimum_version=TLSVersion.TLS1_2).client_context()
    client = TLSEngine(context, server_side=False, server_hostname="localhost")
    client.start()

    with pytest.raises(TLSError, match="Extended Master Secret"):
        exchange(client, peer)

    # OpenSSL itself finished the handshake; only mptls said no
    assert openssl_lib.SSL_get_extms_support(ssl_pointer(peer.connection)) == 0
    assert not client.handshake_complete
    with pytest.raises(TLSError):
        client.export_keys()


def test_server_refuses_tls12_without_extended_master_secret(
    pki: Pki,
) -> None:
    context = pki.server(minimum_version=TLSVersion.TLS1_2).server_context()
    server = TLSEngine(context, server_side=True)
    peer = RawPeer(
        raw_tls12_context(pki, server_side=False), server_side=False
    )

    with pytest.raises(TLSError, match="Extended Master Secret"):
        exchange(peer, server)

    assert not server.handshake_complete
    # the refused server's Finished never went out
    assert server.data_to_send() == b""


# certificates and names


def test_an_absolute_host_name_is_the_same_host(pki: Pki) -> None:
    # "localhost." is "localhost": SNI without the dot (RFC 6066 section
    # 3), checked against the certificate's "localhost"
    client, server = engines(
        pki.client().client_context(),
        pki.server().server_context(),
        server_hostname="localhost.",
    )
    client.start()
    exchange(client, server)
    assert client.handshake_complete
    assert server._connection.get_servername() == b"localhost"


@pytest.mark.parametrize("name", [".", ""])
def test_a_host_name_of_nothing_is_refused(pki: Pki, name: str) -> None:
    with pytest.raises(ConfigurationError, match="not a valid host name"):
        TLSEngine(
            pki.client().client_context(),
            server_side=False,
            server_hostname=name,
        )


def test_wrong_host_name_is_refused(pki: Pki) -> None:
    client, server = engines(
        pki.client().client_context(),
        pki.server().server_context(),
        server_hostname="elsewhere.mptls.test",
    )
    client.start()

    with pytest.raises(CertificateError) as raised:
        exchange(client, server)

    assert "hostname mismatch" in str(raised.value)
    assert "elsewhere.mptls.test" in str(raised.value)
    assert raised.value.alert == AlertDescription.BAD_CERTIFICATE
    assert isinstance(raised.value.__cause__, SSL.Error)
    assert not client.handshake_complete
    # the alert still goes out, and the server learns why
    with pytest.raises(TLSError) as told:
        server.receive(client.data_to_send())
    assert told.value.alert == AlertDescription.BAD_CERTIFICATE


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_ip_address_matches_its_san(pki: Pki, address: str) -> None:
    client, server = engines(
        pki.client().client_context(),
        pki.server().server_context(),
        server_hostname=address,
    )
    client.start()
    exchange(client, server)

    assert client.handshake_complete


def test_wrong_ip_address_is_refused(pki: Pki) -> None:
    client, server = engines(
        pki.client().client_context(),
        pki.server().server_context(),
        server_hostname="127.0.0.9",
    )
    client.start()

    with pytest.raises(CertificateError, match="IP address mismatch"):
        exchange(client, server)


def test_unknown_ca_is_refused(pki: Pki) -> None:
    client_context = TLSConfig(cafile=pki.other_ca_file).client_context()
    client, server = engines(client_context, pki.server().server_context())
    client.start()

    with pytest.raises(CertificateError) as raised:
        exchange(client, server)

    assert raised.value.alert == AlertDescription.UNKNOWN_CA
    assert "unable to get local issuer certificate" in str(raised.value)


def test_unverified_client_accepts_any_name(pki: Pki) -> None:
    config = TLSConfig(cafile=pki.other_ca_file, verify=False)
    client, server = engines(
        config.client_context(),
        pki.server().server_context(),
        server_hostname="elsewhere.mptls.test",
        check_hostname=False,
    )
    client.start()
    exchange(client, server)

    assert client.handshake_complete
    # like getpeercert(): an unverified certificate shows as {}
    assert client.peer_certificate() == {}
    der = client.peer_certificate(binary=True)
    assert isinstance(der, bytes)
    assert x509.load_der_x509_certificate(der).subject


def test_client_certificate_is_verified(pki: Pki) -> None:
    server_config = pki.server(cafile=pki.ca_file, require_client_cert=True)
    client_config = TLSConfig(cafile=pki.ca_file, certfile=pki.client_file)
    client, server = engines(
        client_config.client_context(), server_config.server_context()
    )
    client.start()
    exchange(client, server)

    described = server.peer_certificate()
    assert isinstance(described, dict)
    assert ("DNS", "client.mptls.test") in described["subjectAltName"]


def test_missing_client_certificate_is_refused(pki: Pki) -> None:
    server_config = pki.server(cafile=pki.ca_file, require_client_cert=True)
    client, server = engines(
        pki.client().client_context(), server_config.server_context()
    )
    client.start()

    with pytest.raises(TLSError) as raised:
        exchange(client, server)

    # TLS 1.3: the client is done before the server judges it, so the
    # failure shows on whichever end the alert reaches first
    assert raised.value.alert == AlertDescription.CERTIFICATE_REQUIRED
    assert not server.handshake_complete


def test_hostname_check_needs_a_name_and_verification(pki: Pki) -> None:
    verifying = pki.client().client_context()
    with pytest.raises(ConfigurationError, match="server_hostname"):
        TLSEngine(verifying, server_side=False, server_hostname=None)

    trusting = pki.client(verify=False).client_context()
    with pytest.raises(ConfigurationError, match="VERIFY_PEER"):
        TLSEngine(trusting, server_side=False, server_hostname="localhost")

    server_context = pki.server().server_context()
    with pytest.raises(ConfigurationError, match="clients only"):
        TLSEngine(server_context, server_side=True, server_hostname="x")


# a certificate with every field getpeercert() shows


RICH_NOT_BEFORE = datetime.datetime(2025, 1, 5, 9, 4, 3, tzinfo=datetime.UTC)


def rich_extensions() -> list[x509.ExtensionType]:
    """Every extension getpeercert() reports, with documentation names."""
    uri = x509.UniformResourceIdentifier
    return [
        x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
                x509.RFC822Name("ops@mptls.test"),
                uri("https://mptls.test/"),
            ]
        ),
        x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP,
                    uri("http://ocsp.mptls.test/"),
                ),
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS,
                    uri("http://ca.mptls.test/ca.der"),
                ),
            ]
        ),
        x509.CRLDistributionPoints(
            [
                x509.DistributionPoint(
                    [uri("http://crl.mptls.test/ca.crl")], None, None, None
                )
            ]
        ),
    ]


def rich_certificate(directory: Path) -> tuple[Path, Path]:
    """A CA file and a server chain+key file with many extensions."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "NL"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mptls test CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(0x0A)
        .not_valid_before(RICH_NOT_BEFORE)
        .not_valid_after(RICH_NOT_BEFORE + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@mptls.test"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(0x1234567890ABCDEF)
        .not_valid_before(RICH_NOT_BEFORE)
        .not_valid_after(RICH_NOT_BEFORE + datetime.timedelta(days=3000))
    )
    for extension in rich_extensions():
        builder = builder.add_extension(extension, False)
    leaf = builder.sign(ca_key, hashes.SHA256())

    ca_file = directory / "rich-ca.pem"
    chain_file = directory / "rich-server.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain_file.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, chain_file


@dataclass
class StdlibClient:
    """A stdlib ``ssl.SSLObject`` client over memory BIOs."""

    sslobj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO

    def receive(self, data: bytes) -> None:
        self.incoming.write(data)

    def data_to_send(self) -> bytes:
        return self.outgoing.read()

    def handshake(self) -> bool:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def read(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self.sslobj.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def stdlib_client(ca_file: Path, server: TLSEngine) -> StdlibClient:
    """A stdlib client that has completed a handshake with ``server``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    client = StdlibClient(sslobj, incoming, outgoing)
    for _ in range(MAX_ROUNDS):
        done = client.handshake()
        exchange(client, server)
        if done and server.handshake_complete:
            return client
    raise AssertionError("the stdlib handshake did not finish")


def test_peer_certificate_matches_the_stdlib(tmp_path: Path) -> None:
    ca_file, chain_file = rich_certificate(tmp_path)
    server_context = TLSConfig(certfile=chain_file).server_context()
    reference = stdlib_client(
        ca_file, TLSEngine(server_context, server_side=True)
    )
    client, server = engines(
        TLSConfig(cafile=ca_file).client_context(),
        TLSConfig(certfile=chain_file).server_context(),
    )
    client.start()
    exchange(client, server)

    expected = reference.sslobj.getpeercert()
    assert isinstance(expected, dict)
    assert expected["serialNumber"] == "1234567890ABCDEF"
    assert expected["notBefore"] == "Jan  5 09:04:03 2025 GMT"
    assert ("IP Address", "2001:DB8:0:0:0:0:0:1") in expected["subjectAltName"]
    assert client.peer_certificate() == expected
    assert client.peer_certificate(binary=True) == (
        reference.sslobj.getpeercert(binary_form=True)
    )


def test_stdlib_client_interoperates(pki: Pki) -> None:
    server = TLSEngine(pki.server().server_context(), server_side=True)
    client = stdlib_client(pki.ca_file, server)

    client.sslobj.write(b"ping")
    exchange(client, server)
    assert server.read() == b"ping"
    server.send(b"pong")
    exchange(client, server)
    assert client.read() == b"pong"
    assert server.cipher() == client.sslobj.cipher()
    assert server.version() == client.sslobj.version()


# ALPN and resumption


@pytest.mark.parametrize(
    ("offered", "served", "agreed"),
    [
        (("h2", "http/1.1"), ("http/1.1", "h2"), "http/1.1"),
        (("h2",), ("h2",), "h2"),
        (("h2",), ("smtp",), None),
        ((), ("h2",), None),
    ],
)
def test_alpn(
    pki: Pki,
    offered: tuple[str, ...],
    served: tuple[str, ...],
    agreed: str | None,
) -> None:
    client, server = engines(
        pki.client(alpn_protocols=offered).client_context(),
        pki.server(alpn_protocols=served).server_context(),
    )
    client.start()
    exchange(client, server)

    assert client.alpn_protocol() == server.alpn_protocol() == agreed


def test_resumed_session_has_its_own_keys(pki: Pki) -> None:
    server_context = pki.server().server_context()
    client_context = pki.client().client_context()
    first, first_server = engines(client_context, server_context)
    first.start()
    exchange(first, first_server)
    session = first.session()
    assert session is not None

    second = TLSEngine(
        client_context,
        server_side=False,
        server_hostname="localhost",
        session=session,
    )
    second_server = TLSEngine(server_context, server_side=True)
    second.start()
    exchange(second, second_server)

    assert second.session_reused() and second_server.session_reused()
    assert key_bytes(second) == key_bytes(second_server)
    assert key_bytes(second) != key_bytes(first)


# application data and closing


def test_sends_before_completion_are_buffered_in_order(pki: Pki) -> None:
    client, server = engines(
        pki.client().client_context(), pki.server().server_context()
    )
    client.send(b"one ")
    client.send(b"two")
    client.start()
    exchange(client, server)
    server.send(b"three")

    exchange(client, server)

    assert server.read() == b"one two"
    assert client.read() == b"three"


@pytest.mark.parametrize("handshake_done", [False, True])
@pytest.mark.parametrize("data", [5, "text", [104, 105]])
def test_send_takes_only_bytes_like_data(
    pki: Pki, data: object, handshake_done: bool
) -> None:
    # before the handshake, bytes() of an int buffered that many zero
    # bytes for the peer; after it, memoryview() raised a bare TypeError
    if handshake_done:
        client, server = connected(pki)
    else:
        client, server = engines(
            pki.client().client_context(), pki.server().server_context()
        )
    with pytest.raises(ConfigurationError, match="bytes-like"):
        client.send(data)  # type: ignore[arg-type]
    client.send(b"ok")
    client.start()
    exchange(client, server)
    assert server.read() == b"ok"


def test_pieces_received_at_once_read_as_one(pki: Pki) -> None:
    client, server = connected(pki)
    # more than one receive buffer of plaintext, in many records
    message = bytes(range(256)) * 1500
    client.send(message)
    client.close()
    wire = client.data_to_send()
    pieces = [wire[i : i + 5000] for i in range(0, len(wire), 5000)]

    server.receive_all(pieces)

    assert server.read() == message
    assert server.read() == b""
    assert server.eof_received
    # after close_notify nothing more is taken (RFC 8446 section 6.1)
    server.receive_all([b"ignored", b"too"])
    assert server.read() == b""


def test_records_cut_anywhere_are_all_read(pki: Pki) -> None:
    client, server = connected(pki)
    client.send(b"a" * 40_000)
    wire = client.data_to_send()

    server.receive_all([wire[:7], wire[7:20_001]])
    first = server.read()
    server.receive_all([wire[20_001:]])

    assert first + server.read() == b"a" * 40_000


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_half_close_keeps_the_other_direction(pki: Pki, tls12: bool) -> None:
    client, server = connected(pki, tls12=tls12)

    # the client closes its direction; the server still talks
    client.close()
    exchange(client, server)
    assert client.closed and not server.closed
    assert server.eof_received and not client.eof_received
    server.send(b"after your close_notify")
    exchange(client, server)
    assert client.read() == b"after your close_notify"

    with pytest.raises(TLSError, match="after close"):
        client.send(b"too late")

    # then the server closes too
    server.close()
    exchange(client, server)
    assert client.eof_received
    assert client.read() == b""


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_server_closes_first_and_client_still_writes(
    pki: Pki, tls12: bool
) -> None:
    client, server = connected(pki, tls12=tls12)

    server.close()
    exchange(client, server)
    assert client.eof_received
    client.send(b"reply after eof")
    exchange(client, server)

    assert server.read() == b"reply after eof"


def test_close_before_completion_waits_for_the_handshake(pki: Pki) -> None:
    client, server = engines(
        pki.client().client_context(), pki.server().server_context()
    )
    client.send(b"last words")
    client.close()
    assert client.closed
    client.start()

    exchange(client, server)

    assert server.read() == b"last words"
    assert server.eof_received


def test_session_tickets_do_not_show_as_data(pki: Pki) -> None:
    client, server = engines(
        pki.client().client_context(), pki.server().server_context()
    )
    client.start()
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())
    assert client.handshake_complete and server.handshake_complete

    # the server's NewSessionTickets, alone and then followed by data
    tickets = server.data_to_send()
    assert tickets
    client.receive(tickets)
    assert client.read() == b""
    assert not client.eof_received
    server.send(b"data")
    client.receive(server.data_to_send())
    assert client.read() == b"data"


def test_handshake_fed_one_byte_at_a_time(pki: Pki) -> None:
    client, server = engines(
        pki.client().client_context(), pki.server().server_context()
    )
    client.start()

    for _ in range(MAX_ROUNDS):
        flights = (client.data_to_send(), server.data_to_send())
        if not any(flights):
            break
        for byte in flights[0]:
            server.receive(bytes([byte]))
        for byte in flights[1]:
            client.receive(bytes([byte]))

    assert client.handshake_complete and server.handshake_complete
    assert key_bytes(client) == key_bytes(server)


def test_large_transfer_both_ways(pki: Pki) -> None:
    client, server = connected(pki)
    block = random.Random(20240611).randbytes(1 << 20)
    sent = hashlib.sha256()
    received = hashlib.sha256()

    for index in range(16):
        chunk = block[index:] + block[:index]
        sent.update(chunk)
        client.send(chunk)
        server.receive(client.data_to_send())
        received.update(server.read())
        server.send(chunk)
        client.receive(server.data_to_send())
        assert client.read() == chunk

    assert received.digest() == sent.digest()


def test_a_plaintext_sink_takes_views_in_order(pki: Pki) -> None:
    client, server = connected(pki)
    message = random.Random(7).randbytes(200_000)
    taken: list[bytes] = []
    views: list[memoryview] = []

    def sink(view: memoryview) -> None:
        taken.append(bytes(view))
        views.append(view)

    server.set_plaintext_sink(sink)
    client.send(message)
    server.receive(client.data_to_send())

    assert b"".join(taken) == message
    # more than one receive buffer, each handed over as it filled
    assert len(taken) > 1
    assert server.read() == b""
    assert not server.unread
    # a view lives only for its call: a sink that kept one cannot read
    # bytes that were since overwritten
    with pytest.raises(ValueError):
        bytes(views[0])


def test_a_sink_that_withdraws_leaves_the_rest_to_read(pki: Pki) -> None:
    client, server = connected(pki)
    message = random.Random(8).randbytes(300_000)
    taken: list[bytes] = []

    def sink(view: memoryview) -> None:
        # as a stream reader pausing its transport from within its call
        taken.append(bytes(view))
        server.set_plaintext_sink(None)

    server.set_plaintext_sink(sink)
    client.send(message)
    server.receive(client.data_to_send())

    assert len(taken) == 1
    assert taken[0] + server.read() == message


def test_a_sink_never_overtakes_what_waits_to_be_read(pki: Pki) -> None:
    client, server = connected(pki)
    client.send(b"first ")
    server.receive(client.data_to_send())
    taken: list[bytes] = []
    server.set_plaintext_sink(lambda view: taken.append(bytes(view)))

    client.send(b"second")
    server.receive(client.data_to_send())

    # "first " waited for read(): "second" waits behind it
    assert taken == []
    assert server.read() == b"first second"
    client.send(b" third")
    server.receive(client.data_to_send())
    assert taken == [b" third"]


def test_big_write_comes_out_in_one_pull(pki: Pki) -> None:
    client, server = connected(pki)
    payload = bytes(4 << 20)

    client.send(payload)
    ciphertext = client.data_to_send()
    assert client.data_to_send() == b""
    server.receive(ciphertext)

    assert server.read() == payload
    assert server.read() == b""


# keys


def test_no_keys_before_completion(pki: Pki) -> None:
    client, server = engines(
        pki.client().client_context(), pki.server().server_context()
    )
    with pytest.raises(HandshakeIncompleteError):
        client.export_keys()

    client.start()
    server.receive(client.data_to_send())
    # the server has sent its Finished but not verified the client's
    with pytest.raises(HandshakeIncompleteError):
        server.export_keys()
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())

    assert key_bytes(server) == key_bytes(client)


def test_generations_differ_and_agree(pki: Pki) -> None:
    client, server = connected(pki)

    first = client.export_keys(generation=1)
    assert first == server.export_keys(generation=1)
    assert first.generation == 1
    assert first.key_a + first.key_b != key_bytes(client)
    with pytest.raises(ConfigurationError):
        client.export_keys(generation=-1)


# failure


def test_failed_engine_stays_failed(pki: Pki) -> None:
    client, server = engines(
        pki.client().client_context(),
        pki.server().server_context(),
        server_hostname="elsewhere.mptls.test",
    )
    client.start()
    with pytest.raises(CertificateError):
        exchange(client, server)

    assert client.closed
    assert client.data_to_send()  # the alert
    with pytest.raises(CertificateError, match="already failed"):
        client.receive(b"")
    with pytest.raises(CertificateError, match="already failed"):
        client.send(b"x")
    with pytest.raises(CertificateError, match="already failed"):
        client.export_keys()
    client.close()


def test_garbage_becomes_a_tls_error(pki: Pki) -> None:
    server = TLSEngine(pki.server().server_context(), server_side=True)

    with pytest.raises(TLSError) as raised:
        server.receive(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")

    assert isinstance(raised.value.__cause__, SSL.Error)
    assert not isinstance(raised.value, CertificateError)


# renegotiation (TLS 1.2 only; RFC 5746 attacks, refused outright)


def tls12_context_without_policy(
    pki: Pki, *, server_side: bool
) -> SSL.Context:
    """A context that would renegotiate if the engine let it."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    if server_side:
        context.set_options(OP_ALLOW_CLIENT_RENEGOTIATION)
        context.use_certificate_chain_file(str(pki.server_file))
        context.use_privatekey_file(str(pki.server_file))
    else:
        context.set_verify(SSL.VERIFY_PEER)
        context.load_verify_locations(str(pki.ca_file))
    return context


def assert_renegotiation_refused(engine: TLSEngine, peer: RawPeer) -> None:
    """The peer asks to renegotiate; the engine says no_renegotiation."""
    keys = key_bytes(engine)
    assert keys == peer.connection.export_keying_material(
        b"EXPORTER-MPTCP", 16
    )

    assert peer.connection.renegotiate()
    peer.handshake()
    with pytest.raises(TLSError) as raised:
        exchange(engine, peer)

    # the engine declined (a warning); the OpenSSL peer then gave up
    # rather than carry on unrenegotiated (a fatal handshake_failure)
    assert (1, AlertDescription.NO_RENEGOTIATION) in peer.alerts_received
    assert "no renegotiation" in str(peer.failure)
    assert raised.value.alert == AlertDescription.HANDSHAKE_FAILURE


def test_server_engine_refuses_client_renegotiation(pki: Pki) -> None:
    server = TLSEngine(
        tls12_context_without_policy(pki, server_side=True), server_side=True
    )
    peer = RawPeer(
        tls12_context_without_policy(pki, server_side=False),
        server_side=False,
    )
    exchange(peer, server)

    assert_renegotiation_refused(server, peer)


def test_client_engine_refuses_server_renegotiation(pki: Pki) -> None:
    client = TLSEngine(
        tls12_context_without_policy(pki, server_side=False),
        server_side=False,
        server_hostname="localhost",
    )
    peer = RawPeer(
        tls12_context_without_policy(pki, server_side=True), server_side=True
    )
    client.start()
    exchange(client, peer)

    assert_renegotiation_refused(client, peer)


# secrets stay secret


def test_logs_and_reprs_carry_no_key_material(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mptls")
    client, server = connected(pki)
    keys = client.export_keys()
    client.send(b"hello")
    exchange(client, server)
    client.close()
    exchange(client, server)

    secrets = [
        keys.key_a.hex(),
        keys.key_b.hex(),
        (keys.key_a + keys.key_b).hex(),
    ]
    shown = caplog.text + repr(client) + repr(server) + repr(keys) + str(keys)
    assert "established" in caplog.text
    for secret in secrets:
        assert secret not in shown.lower()
    assert keys.key_a not in shown.encode("latin-1", "replace")
