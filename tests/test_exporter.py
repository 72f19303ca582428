"""MPTCP keys from the TLS exporter, checked against the formulas.

The reference code below exists for these tests only: the TLS 1.3
exporter (RFC 8446 section 7.5, with HKDF-Expand-Label from section 7.1)
and the TLS 1.2 PRF exporter (RFC 5705 section 4 over RFC 5246 section 5's
P_hash). It is checked against the known answers in vectors.json first,
then against live OpenSSL handshakes whose secrets are captured with the
key log callback (TLS 1.3) or read from the session (TLS 1.2).
"""

from __future__ import annotations

import contextlib
import hmac
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from OpenSSL import SSL

from mptls.errors import (
    ConfigurationError,
    HandshakeIncompleteError,
    TLSError,
)
from mptls.tls.config import TLSConfig, TLSVersion
from mptls.tls.engine import TLSEngine
from mptls.tls.exporter import export_mptcp_keys
from mptls.tls.keys import EXPORTER_LABEL, KeyMaterial

# SSL_OP_NO_EXTENDED_MASTER_SECRET (OpenSSL 3 ssl.h: SSL_OP_BIT(0))
OP_NO_EXTENDED_MASTER_SECRET = 1
MAX_ROUNDS = 32

HashAlgorithm = hashes.SHA256 | hashes.SHA384


# reference: TLS 1.3 (RFC 8446 sections 7.1 and 7.5)


def hkdf_expand_label(
    algorithm: HashAlgorithm,
    secret: bytes,
    label: bytes,
    context: bytes,
    length: int,
) -> bytes:
    full_label = b"tls13 " + label
    info = (
        struct.pack("!H", length)
        + bytes([len(full_label)])
        + full_label
        + bytes([len(context)])
        + context
    )
    return HKDFExpand(algorithm, length, info).derive(secret)


def transcript_hash(algorithm: HashAlgorithm, data: bytes) -> bytes:
    digest = hashes.Hash(algorithm)
    digest.update(data)
    return digest.finalize()


def tls13_exporter(
    algorithm: HashAlgorithm,
    exporter_master_secret: bytes,
    label: bytes,
    context: bytes | None,
    length: int,
) -> bytes:
    # Derive-Secret(secret, label, "") first; no context hashes as empty
    derived = hkdf_expand_label(
        algorithm,
        exporter_master_secret,
        label,
        transcript_hash(algorithm, b""),
        algorithm.digest_size,
    )
    return hkdf_expand_label(
        algorithm,
        derived,
        b"exporter",
        transcript_hash(algorithm, context or b""),
        length,
    )


# reference: TLS 1.2 (RFC 5246 section 5, RFC 5705 section 4)


def p_hash(digest: str, secret: bytes, seed: bytes, length: int) -> bytes:
    output = b""
    a = seed
    while len(output) < length:
        a = hmac.digest(secret, a, digest)
        output += hmac.digest(secret, a + seed, digest)
    return output[:length]


def tls12_exporter(
    digest: str,
    master_secret: bytes,
    label: bytes,
    client_random: bytes,
    server_random: bytes,
    context: bytes | None,
    length: int,
) -> bytes:
    seed = client_random + server_random
    if context is not None:
        seed += struct.pack("!H", len(context)) + context
    return p_hash(digest, master_secret, label + seed, length)


# known answers


def test_tls13_reference_matches_rfc8448(vectors: dict[str, Any]) -> None:
    case = vectors["tls13_exporter_rfc8448"]
    secret = bytes.fromhex(case["exporter_master_secret"])
    label = case["label"].encode("ascii")

    output = tls13_exporter(hashes.SHA256(), secret, label, None, 16)

    assert label == EXPORTER_LABEL
    assert output.hex() == case["output"]
    keys = KeyMaterial(output)
    assert keys.key_a.hex() == case["key_a"]
    assert keys.key_b.hex() == case["key_b"]
    # in TLS 1.3 no context and an empty one are the same
    assert tls13_exporter(hashes.SHA256(), secret, label, b"", 16) == output


def test_tls12_reference_matches_p_sha256(vectors: dict[str, Any]) -> None:
    case = vectors["tls12_exporter_p_sha256"]
    master = bytes(range(48))
    client_random, server_random = b"\x11" * 32, b"\x22" * 32
    label = case["label"].encode("ascii")

    def export(context: bytes | None) -> str:
        return tls12_exporter(
            "sha256", master, label, client_random, server_random, context, 16
        ).hex()

    assert export(None) == case["no_context"]
    assert export(b"") == case["empty_context"]


# live handshakes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("exporter-pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server.private_key_and_cert_chain_pem.write_to_path(
        str(directory / "server.pem")
    )
    return directory / "ca.pem", directory / "server.pem"


class KeyLog:
    """Key log lines by label, for one context (NSS key log format)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, bytes, bytes]] = []

    def __call__(self, connection: SSL.Connection, line: bytes) -> None:
        label, client_random, secret = line.decode("ascii").split()
        self.lines.append(
            (label, bytes.fromhex(client_random), bytes.fromhex(secret))
        )

    def secret(self, label: str, client_random: bytes) -> bytes:
        found = [
            secret
            for name, random, secret in self.lines
            if name == label and random == client_random
        ]
        assert len(found) == 1, f"{label} logged {len(found)} times"
        return found[0]


def step(connection: SSL.Connection, data: bytes) -> bytes:
    """Feed a bare connection, drive its handshake, return its output."""
    if data:
        connection.bio_write(data)
    with contextlib.suppress(SSL.WantReadError):
        connection.do_handshake()
    try:
        return connection.bio_read(1 << 20)
    except SSL.WantReadError:
        return b""


def connect(
    pki: tuple[Path, Path],
    *,
    client_setup: Any = None,
    server_setup: Any = None,
    minimum: TLSVersion = TLSVersion.TLS1_3,
) -> tuple[SSL.Connection, TLSEngine]:
    """A bare pyOpenSSL client whose secrets can be read, and an engine.

    The client's context is the one mptls builds; the bare connection
    exposes what the test needs to recompute the exporter (randoms,
    master secret), and the engine on the other end shows the
    :class:`KeyMaterial` mptls hands out.
    """
    ca_file, server_file = pki
    client_context = TLSConfig(
        cafile=ca_file, minimum_version=minimum
    ).client_context()
    server_context = TLSConfig(
        certfile=server_file, minimum_version=minimum
    ).server_context()
    if client_setup is not None:
        client_setup(client_context)
    if server_setup is not None:
        server_setup(server_context)
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    server = TLSEngine(server_context, server_side=True)

    flight = step(client, b"")
    for _ in range(MAX_ROUNDS):
        server.receive(flight)
        flight = step(client, server.data_to_send())
        if not flight and server.handshake_complete:
            break
    assert server.handshake_complete
    return client, server


def both_keys(keys: KeyMaterial) -> bytes:
    return keys.key_a + keys.key_b


@pytest.mark.parametrize(
    ("suite", "algorithm"),
    [
        (b"TLS_AES_128_GCM_SHA256", hashes.SHA256()),
        (b"TLS_AES_256_GCM_SHA384", hashes.SHA384()),
    ],
)
def test_tls13_live_exporter_is_the_rfc_formula(
    pki: tuple[Path, Path], suite: bytes, algorithm: HashAlgorithm
) -> None:
    server_log, client_log = KeyLog(), KeyLog()

    def server_setup(context: SSL.Context) -> None:
        context.set_tls13_ciphersuites(suite)
        context.set_keylog_callback(server_log)

    client, server = connect(
        pki,
        server_setup=server_setup,
        client_setup=lambda context: context.set_keylog_callback(client_log),
    )
    assert client.get_cipher_name() == suite.decode()

    # the secret both ends logged for this handshake
    client_random = client.client_random()
    assert client_random is not None
    secret = client_log.secret("EXPORTER_SECRET", client_random)
    assert server_log.secret("EXPORTER_SECRET", client_random) == secret

    expected = tls13_exporter(algorithm, secret, EXPORTER_LABEL, None, 16)
    assert client.export_keying_material(EXPORTER_LABEL, 16) == expected
    assert both_keys(export_mptcp_keys(client)) == expected
    assert both_keys(server.export_keys()) == expected

    # rotated keys: context uint32(n), never the same as no context
    rotated = tls13_exporter(
        algorithm, secret, EXPORTER_LABEL, struct.pack("!I", 1), 16
    )
    assert both_keys(server.export_keys(generation=1)) == rotated
    assert both_keys(export_mptcp_keys(client, generation=1)) == rotated
    zero = tls13_exporter(
        algorithm, secret, EXPORTER_LABEL, struct.pack("!I", 0), 16
    )
    assert zero != expected


def force_tls12(cipher: bytes) -> Any:
    def setup(context: SSL.Context) -> None:
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(cipher)

    return setup


@pytest.mark.parametrize(
    ("cipher", "digest"),
    [
        (b"ECDHE-ECDSA-AES128-GCM-SHA256", "sha256"),
        (b"ECDHE-ECDSA-AES256-GCM-SHA384", "sha384"),
    ],
)
def test_tls12_live_exporter_is_the_rfc_formula(
    pki: tuple[Path, Path], cipher: bytes, digest: str
) -> None:
    client, server = connect(
        pki, server_setup=force_tls12(cipher), minimum=TLSVersion.TLS1_2
    )
    assert client.get_protocol_version_name() == "TLSv1.2"
    assert client.get_cipher_name() == cipher.decode()

    # with EMS the master secret is derived differently (RFC 7627), but
    # the exporter still runs the RFC 5705 formula over it
    master = client.master_key()
    client_random = client.client_random()
    server_random = client.server_random()
    assert master and client_random and server_random

    def reference(context: bytes | None) -> bytes:
        return tls12_exporter(
            digest,
            master,
            EXPORTER_LABEL,
            client_random,
            server_random,
            context,
            16,
        )

    expected = reference(None)
    assert client.export_keying_material(EXPORTER_LABEL, 16) == expected
    assert both_keys(export_mptcp_keys(client)) == expected
    assert both_keys(server.export_keys()) == expected
    assert both_keys(server.export_keys(generation=7)) == (
        reference(struct.pack("!I", 7))
    )
    # in TLS 1.2 no context and an empty one differ (RFC 5705 section 4)
    assert client.export_keying_material(EXPORTER_LABEL, 16, b"") == (
        reference(b"")
    )
    assert reference(b"") != expected


# refusals


@pytest.fixture
def raw_pair(pki: tuple[Path, Path]) -> Any:
    """A function making bare pyOpenSSL connections, client and server."""

    def make(
        *, tls12: bool = False, ems: bool = True
    ) -> tuple[SSL.Connection, SSL.Connection]:
        ca_file, server_file = pki
        server_context = SSL.Context(SSL.TLS_METHOD)
        server_context.use_certificate_chain_file(str(server_file))
        server_context.use_privatekey_file(str(server_file))
        client_context = SSL.Context(SSL.TLS_METHOD)
        client_context.load_verify_locations(str(ca_file))
        if tls12:
            server_context.set_max_proto_version(SSL.TLS1_2_VERSION)
        if not ems:
            server_context.set_options(OP_NO_EXTENDED_MASTER_SECRET)
        client = SSL.Connection(client_context, None)
        client.set_connect_state()
        server = SSL.Connection(server_context, None)
        server.set_accept_state()
        return client, server

    return make


def test_no_keys_before_the_handshake_finishes(raw_pair: Any) -> None:
    client, server = raw_pair()
    with pytest.raises(HandshakeIncompleteError):
        export_mptcp_keys(client)

    client_hello = step(client, b"")
    server_flight = step(server, client_hello)
    # OpenSSL would already export here, before the client's Finished
    early = server.export_keying_material(EXPORTER_LABEL, 16)
    assert len(early) == 16
    with pytest.raises(HandshakeIncompleteError):
        export_mptcp_keys(server)

    client_finished = step(client, server_flight)
    step(server, client_finished)
    assert export_mptcp_keys(server) == export_mptcp_keys(client)


def test_tls12_without_ems_gives_no_keys(raw_pair: Any) -> None:
    client, server = raw_pair(tls12=True, ems=False)
    flight = step(client, b"")
    for _ in range(MAX_ROUNDS):
        flight = step(server, flight)
        flight = step(client, flight)
        if not flight:
            break
    assert client.get_protocol_version_name() == "TLSv1.2"

    for connection in (client, server):
        with pytest.raises(TLSError, match="Extended Master Secret"):
            export_mptcp_keys(connection)


@pytest.mark.parametrize("generation", [-1, 2**32, True, 1.0, "1"])
def test_generation_must_be_a_uint32(raw_pair: Any, generation: Any) -> None:
    client, _ = raw_pair()
    with pytest.raises(ConfigurationError):
        export_mptcp_keys(client, generation=generation)


# KeyMaterial shows nothing


def test_key_material_never_shows_its_bytes() -> None:
    output = bytes.fromhex("89a873a3e2e80ec30b5eba7b3c4541df")
    keys = KeyMaterial(output, generation=3)

    shown = [repr(keys), str(keys), f"{keys}", f"{keys!r}", f"{[keys]}"]
    for text in shown:
        for secret in (output, keys.key_a, keys.key_b):
            assert secret.hex() not in text.lower()
            assert repr(secret) not in text
        assert "generation=3" in text
        assert keys.fingerprint() in text
    with pytest.raises(TypeError):
        pickle.dumps(keys)
    assert not hasattr(keys, "__dict__")


def test_key_material_compares_by_value() -> None:
    output = bytes(range(16))
    assert KeyMaterial(output) == KeyMaterial(bytearray(output))
    assert KeyMaterial(output) != KeyMaterial(output, generation=1)
    assert KeyMaterial(output) != KeyMaterial(bytes(16))
    assert len({KeyMaterial(output), KeyMaterial(output)}) == 1


@pytest.mark.parametrize(
    ("output", "generation"),
    [
        (bytes(15), 0),
        (bytes(17), 0),
        (bytes(16), -1),
        (bytes(16), 2**32),
        # not bytes: len() or bytes() of them failed with a TypeError,
        # or made keys of the items
        (16, 0),
        ("k" * 16, 0),
        ([0] * 16, 0),
    ],
)
def test_key_material_checks_its_input(output: bytes, generation: int) -> None:
    with pytest.raises(ConfigurationError):
        KeyMaterial(output, generation=generation)
