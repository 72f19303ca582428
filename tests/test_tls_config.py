"""TLS settings: TLSConfig, and every form ``ssl=`` takes.

Each context is judged by what it does in a real in-memory handshake
against an engine on the other end, not by reading its internals.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import errno
import os
import pickle
import ssl
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from mptls.errors import CertificateError, ConfigurationError, TLSError
from mptls.tls.config import (
    POLICY_OPTIONS,
    TLSConfig,
    TLSVersion,
    to_openssl_context,
)
from mptls.tls.engine import AlertDescription, TLSEngine

MAX_ROUNDS = 32


@dataclasses.dataclass(frozen=True)
class Files:
    directory: Path
    ca: trustme.CA
    ca_file: Path
    chain_file: Path
    cert_only_file: Path
    key_file: Path
    client_file: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    directory = tmp_path_factory.mktemp("config-pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.mptls.test")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server.private_key_and_cert_chain_pem.write_to_path(
        str(directory / "chain.pem")
    )
    server.private_key_pem.write_to_path(str(directory / "key.pem"))
    with open(directory / "cert.pem", "wb") as handle:
        for blob in server.cert_chain_pems:
            handle.write(blob.bytes())
    client.private_key_and_cert_chain_pem.write_to_path(
        str(directory / "client.pem")
    )
    return Files(
        directory,
        ca,
        directory / "ca.pem",
        directory / "chain.pem",
        directory / "cert.pem",
        directory / "key.pem",
        directory / "client.pem",
    )


def handshake(
    client_context: SSL.Context,
    server_context: SSL.Context,
    *,
    server_hostname: str = "localhost",
    check_hostname: bool = True,
) -> tuple[TLSEngine, TLSEngine]:
    client = TLSEngine(
        client_context,
        server_side=False,
        server_hostname=server_hostname,
        check_hostname=check_hostname,
    )
    server = TLSEngine(server_context, server_side=True)
    client.start()
    for _ in range(MAX_ROUNDS):
        from_client = client.data_to_send()
        from_server = server.data_to_send()
        if not from_client and not from_server:
            break
        server.receive(from_client)
        client.receive(from_server)
    assert client.handshake_complete and server.handshake_complete
    return client, server


def server_context(files: Files, **settings: Any) -> SSL.Context:
    return TLSConfig(certfile=files.chain_file, **settings).server_context()


def tls12_server(files: Files) -> SSL.Context:
    context = server_context(files, minimum_version=TLSVersion.TLS1_2)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    return context


def refusal(context: object, *, server_side: bool) -> str:
    """The message of the ConfigurationError ``to_openssl_context``
    raises for ``context``: what these tests read to see that the
    refusal says why."""
    with pytest.raises(ConfigurationError) as raised:
        to_openssl_context(context, server_side=server_side)
    return str(raised.value)


def options(context: SSL.Context) -> int:
    # set_options answers with the options now in force
    return int(context.set_options(0))


# TLSConfig values


def test_defaults() -> None:
    config = TLSConfig()

    assert config.minimum_version is TLSVersion.TLS1_3
    assert config.maximum_version is None
    assert config.verify and config.check_hostname
    assert not config.require_client_cert
    assert config.alpn_protocols == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.verify = False  # type: ignore[misc]


@pytest.mark.parametrize(
    "value", [TLSVersion.TLS1_2, ssl.TLSVersion.TLSv1_2, 0x0303]
)
def test_minimum_version_forms(value: Any) -> None:
    assert TLSConfig(minimum_version=value).minimum_version is (
        TLSVersion.TLS1_2
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TLSVersion.TLS1_2, TLSVersion.TLS1_2),
        (ssl.TLSVersion.TLSv1_2, TLSVersion.TLS1_2),
        (0x0303, TLSVersion.TLS1_2),
        (ssl.TLSVersion.TLSv1_3, TLSVersion.TLS1_3),
        # asyncio's "no ceiling", as SSLContext.maximum_version has it
        (ssl.TLSVersion.MAXIMUM_SUPPORTED, None),
        (None, None),
    ],
)
def test_maximum_version_forms(value: Any, expected: Any) -> None:
    config = TLSConfig(
        minimum_version=TLSVersion.TLS1_2, maximum_version=value
    )
    assert config.maximum_version is expected


@pytest.mark.parametrize(
    "value", [ssl.TLSVersion.TLSv1_1, 0x0302, "1.2", True, 0x0305]
)
def test_maximum_version_outside_what_mptls_runs_is_refused(
    value: Any,
) -> None:
    with pytest.raises(ConfigurationError, match="maximum_version"):
        TLSConfig(minimum_version=TLSVersion.TLS1_2, maximum_version=value)


def test_maximum_version_below_the_minimum_is_refused() -> None:
    # the floor is TLS 1.3 unless lowered: a ceiling of TLS 1.2 alone
    # would leave no version
    with pytest.raises(ConfigurationError) as raised:
        TLSConfig(maximum_version=ssl.TLSVersion.TLSv1_2)

    message = str(raised.value)
    assert "below minimum_version TLS1_3" in message
    assert "minimum_version=TLSVersion.TLS1_2" in message


def test_maximum_version_caps_both_sides(files: Files) -> None:
    capped = TLSConfig(
        cafile=files.ca_file,
        certfile=files.chain_file,
        minimum_version=TLSVersion.TLS1_2,
        maximum_version=TLSVersion.TLS1_2,
    )
    open_ended = TLSConfig(
        cafile=files.ca_file,
        certfile=files.chain_file,
        minimum_version=TLSVersion.TLS1_2,
    )

    for client_config, server_config in (
        (capped, open_ended),
        (open_ended, capped),
    ):
        client, _ = handshake(
            to_openssl_context(client_config, server_side=False)[0],
            to_openssl_context(server_config, server_side=True)[0],
        )
        assert client.version() == "TLSv1.2"


@pytest.mark.parametrize(
    "server_side", [True, False], ids=["server", "client"]
)
def test_a_config_capped_at_tls12_with_no_cipher_is_refused(
    files: Files, server_side: bool
) -> None:
    # its contexts built, and each handshake failed as it began
    config = TLSConfig(
        certfile=files.chain_file,
        minimum_version=TLSVersion.TLS1_2,
        maximum_version=TLSVersion.TLS1_2,
        ciphers="PSK",
    )

    with pytest.raises(ConfigurationError, match="no cipher to offer"):
        to_openssl_context(config, server_side=server_side)


@pytest.mark.parametrize(
    "value", [ssl.TLSVersion.TLSv1_1, 0x0302, "1.2", None, 0x0305]
)
def test_minimum_version_below_tls12_is_refused(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="minimum_version"):
        TLSConfig(minimum_version=value)


def test_alpn_protocols_become_a_tuple() -> None:
    protocols: Any = ["h2", "http/1.1"]
    config = TLSConfig(alpn_protocols=protocols)
    assert config.alpn_protocols == ("h2", "http/1.1")


@pytest.mark.parametrize(
    "protocols", ["h2", ("",), ("x" * 256,), ("\u00e9t\u00e9",), (b"h2",)]
)
def test_bad_alpn_protocols_are_refused(protocols: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"(?i)alpn"):
        TLSConfig(alpn_protocols=protocols)


@pytest.mark.parametrize(
    ("protocols", "match"),
    [
        # not iterable: tuple() of it raised a bare TypeError
        (None, "sequence of strings, got None"),
        (5, "sequence of strings, got 5"),
        # read byte by byte, it was "ALPN protocol 104"
        (b"h2", "not bytes"),
        # the message repeated it: a bare ValueError past 4300 digits
        ([10**5000], "an int of 16610 bits"),
    ],
    ids=["none", "int", "bytes", "huge"],
)
def test_alpn_protocols_that_are_no_list_of_str_are_named(
    protocols: Any, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        TLSConfig(alpn_protocols=protocols)


def test_inconsistent_settings_are_refused(files: Files) -> None:
    with pytest.raises(ConfigurationError, match="keyfile"):
        TLSConfig(keyfile=files.key_file)
    with pytest.raises(ConfigurationError, match="require_client_cert"):
        TLSConfig(certfile=files.chain_file, require_client_cert=True)
    with pytest.raises(ConfigurationError, match="certfile"):
        TLSConfig().server_context()


@pytest.mark.parametrize("name", ["certfile", "keyfile", "cafile"])
def test_a_path_with_a_nul_is_refused(files: Files, name: str) -> None:
    # OpenSSL would open the file named by what comes before the NUL
    settings: dict[str, Any] = {"certfile": files.chain_file}
    settings[name] = str(files.chain_file) + "\0other"
    with pytest.raises(ConfigurationError, match=f"{name} contains a NUL"):
        TLSConfig(**settings)


# contexts


def test_contexts_refuse_renegotiation_and_compression(files: Files) -> None:
    for context in (
        TLSConfig(cafile=files.ca_file).client_context(),
        server_context(files),
    ):
        assert options(context) & POLICY_OPTIONS == POLICY_OPTIONS
    assert POLICY_OPTIONS & SSL.OP_NO_RENEGOTIATION
    assert POLICY_OPTIONS & SSL.OP_NO_COMPRESSION


def test_tls13_is_the_floor_by_default(files: Files) -> None:
    client = TLSEngine(
        TLSConfig(cafile=files.ca_file).client_context(),
        server_side=False,
        server_hostname="localhost",
    )
    server = TLSEngine(tls12_server(files), server_side=True)
    client.start()

    with pytest.raises(TLSError) as refused:
        server.receive(client.data_to_send())
    with pytest.raises(TLSError) as told:
        client.receive(server.data_to_send())

    assert refused.value.alert == AlertDescription.PROTOCOL_VERSION
    assert told.value.alert == AlertDescription.PROTOCOL_VERSION


def test_tls12_when_asked_for(files: Files) -> None:
    config = TLSConfig(cafile=files.ca_file, minimum_version=TLSVersion.TLS1_2)
    client, _ = handshake(config.client_context(), tls12_server(files))
    assert client.version() == "TLSv1.2"

    # allowing TLS 1.2 does not stop TLS 1.3 being chosen when possible
    client, _ = handshake(config.client_context(), server_context(files))
    assert client.version() == "TLSv1.3"


def test_separate_key_file(files: Files) -> None:
    config = TLSConfig(certfile=files.cert_only_file, keyfile=files.key_file)
    client_context = TLSConfig(cafile=files.ca_file).client_context()

    handshake(client_context, config.server_context())


def test_encrypted_key_is_an_error_not_a_prompt(files: Files) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    locked = files.directory / "locked.pem"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    config = TLSConfig(certfile=files.cert_only_file, keyfile=locked)

    with pytest.raises(ConfigurationError, match="unencrypted"):
        config.server_context()


def test_key_must_match_the_certificate(files: Files) -> None:
    other = files.ca.issue_cert("other.mptls.test")
    other_key = files.directory / "other-key.pem"
    other.private_key_pem.write_to_path(str(other_key))
    config = TLSConfig(certfile=files.cert_only_file, keyfile=other_key)

    with pytest.raises(ConfigurationError, match="does not match"):
        config.server_context()


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"certfile": "missing-chain.pem"}, "certificate chain.*No such file"),
        ({"cafile": "missing-ca.pem"}, "CA file.*No such file"),
        ({"certfile": "."}, "certificate chain.*Is a directory"),
        ({"cafile": "."}, "CA file.*Is a directory"),
        ({"cadata": b"not a certificate"}, "cadata"),
        ({"ciphers": "NOT-A-CIPHER"}, "cipher"),
    ],
)
def test_unusable_files_and_strings(
    files: Files, settings: dict[str, Any], words: str
) -> None:
    for name in ("certfile", "cafile"):
        if name in settings:
            settings = {**settings, name: files.directory / settings[name]}
    config = TLSConfig(**settings)

    with pytest.raises(ConfigurationError, match=words):
        if "certfile" in settings:
            config.server_context()
        else:
            config.client_context()


def test_a_chain_that_cannot_be_opened_says_why(
    files: Files, tmp_path: Path
) -> None:
    # OpenSSL's own reason is a library code; the system's is wanted, and
    # a loop of links is no missing file
    loop = tmp_path / "loop.pem"
    loop.symlink_to(loop)
    config = TLSConfig(certfile=loop, keyfile=files.key_file)

    with pytest.raises(ConfigurationError) as raised:
        config.server_context()
    reason = os.strerror(errno.ELOOP)
    assert str(raised.value) == (
        f"cannot load the certificate chain from {str(loop)!r}: {reason}"
    )


def _build_reading(config: TLSConfig, field: str) -> SSL.Context:
    # a client reads its CA file; a server its chain and key
    if field == "cafile":
        return config.client_context()
    return config.server_context()


@pytest.mark.parametrize(
    ("field", "words"),
    [
        ("certfile", "cannot load the certificate chain from"),
        ("keyfile", "cannot read the key file"),
        ("cafile", "cannot read the CA file"),
    ],
)
def test_a_device_is_no_file_to_load(
    files: Files, field: str, words: str
) -> None:
    # /dev/zero and /dev/urandom never end; /dev/null stands for them
    # here, read to its end it was "no certificate" or "no key"
    settings: dict[str, Any] = {
        "certfile": files.chain_file,
        "keyfile": files.key_file,
        field: "/dev/null",
    }
    config = TLSConfig(**settings)

    with pytest.raises(ConfigurationError) as raised:
        _build_reading(config, field)
    assert str(raised.value) == (
        f"{words} '/dev/null': not a regular file (a pipe or a device)"
    )


@pytest.mark.timeout(10)
@pytest.mark.parametrize("field", ["certfile", "keyfile", "cafile"])
def test_a_fifo_is_refused_not_waited_on(
    files: Files, tmp_path: Path, field: str
) -> None:
    # opening a FIFO waits for a writer: the loop's thread hung there
    fifo = tmp_path / "pipe.pem"
    os.mkfifo(fifo)
    settings: dict[str, Any] = {
        "certfile": files.chain_file,
        "keyfile": files.key_file,
        field: fifo,
    }
    config = TLSConfig(**settings)

    with pytest.raises(ConfigurationError, match="not a regular file"):
        _build_reading(config, field)


def test_a_config_used_once_still_pickles_and_copies(files: Files) -> None:
    # a worker pool sends its config to each process: one that served a
    # start_server before (its built context kept) must still go
    config = TLSConfig(
        certfile=files.chain_file,
        cafile=files.ca_file,
        minimum_version=TLSVersion.TLS1_2,
        maximum_version=TLSVersion.TLS1_2,
    )
    built, _ = to_openssl_context(config, server_side=True)

    for copied in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert copied == config
        # the copy builds a context of its own, from the same settings
        again, _ = to_openssl_context(copied, server_side=True)
        assert again is not built
        client, _ = handshake(
            TLSConfig(
                cafile=files.ca_file, minimum_version=TLSVersion.TLS1_2
            ).client_context(),
            again,
        )
        assert client.version() == "TLSv1.2"


def test_a_long_cipher_string_is_named_short() -> None:
    # the message repeated it whole, 100,000 characters on one line
    config = TLSConfig(ciphers="NOT-A-CIPHER:" * 10_000)
    with pytest.raises(ConfigurationError, match="no cipher") as raised:
        config.client_context()
    assert len(str(raised.value)) < 100


@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_cadata(files: Files, encoding: str) -> None:
    pem = files.ca.cert_pem.bytes()
    if encoding == "pem":
        cadata = pem
    else:
        cadata = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    config = TLSConfig(cadata=cadata)

    handshake(config.client_context(), server_context(files))


def test_tls12_cipher_string(files: Files) -> None:
    cipher = "ECDHE-ECDSA-AES128-GCM-SHA256"
    config = TLSConfig(
        cafile=files.ca_file,
        minimum_version=TLSVersion.TLS1_2,
        ciphers=cipher,
    )

    client, _ = handshake(config.client_context(), tls12_server(files))

    negotiated = client.cipher()
    assert negotiated is not None
    assert negotiated[0] == cipher


def test_server_asks_for_client_certificates_only_when_told(
    files: Files,
) -> None:
    with_cert = TLSConfig(cafile=files.ca_file, certfile=files.client_file)

    _, server = handshake(with_cert.client_context(), server_context(files))
    assert server.peer_certificate() is None

    demanding = server_context(
        files, cafile=files.ca_file, require_client_cert=True
    )
    _, server = handshake(with_cert.client_context(), demanding)
    assert server.peer_certificate() not in (None, {})


# to_openssl_context: TLSConfig, OpenSSL contexts, True


def test_tls_config_forms(files: Files) -> None:
    config = TLSConfig(certfile=files.chain_file, cafile=files.ca_file)

    _, check = to_openssl_context(config, server_side=False)
    assert check is True
    _, check = to_openssl_context(config, server_side=True)
    assert check is False
    unverified = TLSConfig(verify=False)
    _, check = to_openssl_context(unverified, server_side=False)
    assert check is False


def test_openssl_context_gets_the_policy_options(files: Files) -> None:
    context = SSL.Context(SSL.TLS_METHOD)
    context.load_verify_locations(str(files.ca_file))
    context.set_verify(SSL.VERIFY_PEER)
    assert not options(context) & SSL.OP_NO_RENEGOTIATION

    converted, check = to_openssl_context(context, server_side=False)

    assert converted is context
    assert options(context) & POLICY_OPTIONS == POLICY_OPTIONS
    assert check is True
    handshake(converted, server_context(files))

    lenient = SSL.Context(SSL.TLS_METHOD)
    assert to_openssl_context(lenient, server_side=False)[1] is False


def test_openssl_context_serves_several_connections(files: Files) -> None:
    context = SSL.Context(SSL.TLS_METHOD)
    context.load_verify_locations(str(files.ca_file))
    context.set_verify(SSL.VERIFY_PEER)
    server = server_context(files)

    for _ in range(3):
        converted, check = to_openssl_context(context, server_side=False)
        assert converted is context and check is True
        handshake(converted, server)


def test_openssl_context_used_elsewhere_first(files: Files) -> None:
    # pyOpenSSL refuses set_options once a context made a connection;
    # the engine's per-connection options must be enough then
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_verify(SSL.VERIFY_NONE)
    SSL.Connection(context, None)

    converted, check = to_openssl_context(context, server_side=False)

    assert converted is context and check is False
    client, _ = handshake(
        converted, server_context(files), check_hostname=check
    )
    connection_options = client._connection.set_options(0)
    assert connection_options & POLICY_OPTIONS == POLICY_OPTIONS


# OpenSSL contexts that allow no TLS version


def without_versions(context: SSL.Context, how: str) -> SSL.Context:
    """``context`` made to allow no TLS version, the way ``how`` names."""
    if how == "floor above ceiling":
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
    elif how == "both versions switched off":
        context.set_options(SSL.OP_NO_TLSv1_2 | SSL.OP_NO_TLSv1_3)
    else:
        # OpenSSL's default security level refuses TLS 1.1 and below
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
    return context


NO_VERSION = [
    "floor above ceiling",
    "both versions switched off",
    "ceiling below TLS 1.2",
]


@pytest.mark.parametrize("how", NO_VERSION)
def test_a_client_context_that_allows_no_version_is_refused(
    files: Files, how: str
) -> None:
    # its handshake failed as it began, once a TCP connection existed
    context = without_versions(SSL.Context(SSL.TLS_METHOD), how)

    message = refusal(context, server_side=False)
    assert "allows no TLS version" in message
    assert "set_max_proto_version" in message


@pytest.mark.parametrize("how", NO_VERSION)
def test_a_client_only_context_that_allows_no_version_is_refused(
    files: Files, how: str
) -> None:
    # TLS_CLIENT_METHOD has no server handshake to start: the check
    # found no reason of OpenSSL's to refuse it, and the handshake then
    # failed as it began, once the TCP connection was up
    context = without_versions(SSL.Context(SSL.TLS_CLIENT_METHOD), how)

    with pytest.raises(ConfigurationError, match="allows no TLS version"):
        to_openssl_context(context, server_side=False)


def test_a_client_only_context_is_taken(files: Files) -> None:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.load_verify_locations(str(files.ca_file))
    context.set_verify(SSL.VERIFY_PEER)

    converted, check = to_openssl_context(context, server_side=False)

    client, _ = handshake(converted, server_context(files))
    assert check is True and client.version() == "TLSv1.3"


def test_a_refused_context_can_still_be_fixed(files: Files) -> None:
    # the check must not mark the context used: pyOpenSSL refuses every
    # setter on a context that has made a connection
    context = SSL.Context(SSL.TLS_METHOD)
    context.load_verify_locations(str(files.ca_file))
    context.set_verify(SSL.VERIFY_PEER)
    without_versions(context, "floor above ceiling")
    with pytest.raises(ConfigurationError):
        to_openssl_context(context, server_side=False)

    context.set_max_proto_version(0)
    converted, check = to_openssl_context(context, server_side=False)

    client, _ = handshake(converted, server_context(files))
    assert check is True and client.version() == "TLSv1.3"


def below_tls12(context: SSL.Context) -> SSL.Context:
    """``context`` capped at TLS 1.1, with the security level lowered so
    that OpenSSL offers it."""
    context.set_max_proto_version(SSL.TLS1_1_VERSION)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    return context


@pytest.mark.parametrize("method", [SSL.TLS_METHOD, SSL.TLS_CLIENT_METHOD])
def test_a_client_context_capped_below_tls12_is_refused(
    files: Files, method: int
) -> None:
    # OpenSSL sent its TLS 1.1 ClientHello, and the handshake failed
    # once the TCP connection was up
    context = below_tls12(SSL.Context(method))

    message = refusal(context, server_side=False)
    assert "nothing newer than TLS 1.1" in message
    assert "set_max_proto_version" in message


def test_a_server_context_capped_below_tls12_is_refused(files: Files) -> None:
    # every client's handshake failed against it
    context = below_tls12(
        server_context(files, minimum_version=TLSVersion.TLS1_2)
    )
    context.set_min_proto_version(SSL.TLS1_VERSION)

    with pytest.raises(ConfigurationError, match=r"newer than TLS 1\.1"):
        to_openssl_context(context, server_side=True)


def test_a_context_with_a_lowered_security_level_is_taken(
    files: Files,
) -> None:
    # only the ceiling is refused, not the security level
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    context.load_verify_locations(str(files.ca_file))
    context.set_verify(SSL.VERIFY_PEER)

    converted, _ = to_openssl_context(context, server_side=False)

    client, _ = handshake(converted, server_context(files))
    assert client.version() == "TLSv1.3"


@pytest.mark.parametrize("how", NO_VERSION)
def test_a_server_context_that_allows_no_version_is_refused(
    files: Files, how: str
) -> None:
    # every client's handshake would fail against it, found out only
    # once the first one came
    context = without_versions(server_context(files), how)

    with pytest.raises(ConfigurationError, match="allows no TLS version"):
        to_openssl_context(context, server_side=True)


def test_a_context_with_one_version_is_taken(files: Files) -> None:
    for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
        context = server_context(files, minimum_version=TLSVersion.TLS1_2)
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        assert to_openssl_context(context, server_side=True)[0] is context


@pytest.mark.parametrize(
    "server_side", [True, False], ids=["server", "client"]
)
def test_the_version_check_shows_the_context_no_handshake(
    files: Files, monkeypatch: pytest.MonkeyPatch, server_side: bool
) -> None:
    # the check runs OpenSSL's own start of a handshake; a callback the
    # application set on its context must not see one that never was.
    # pyOpenSSL's wrapper of it knows no SSL object the check makes, and
    # fails in the callback, where Python can only print the error
    context = (
        server_context(files)
        if server_side
        else SSL.Context(SSL.TLS_CLIENT_METHOD)
    )
    seen: list[int] = []
    context.set_info_callback(lambda _, where, __: seen.append(where))
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    to_openssl_context(context, server_side=server_side)
    without_versions(context, "floor above ceiling")
    with pytest.raises(ConfigurationError):
        to_openssl_context(context, server_side=server_side)

    assert seen == []
    assert unraisable == []


# OpenSSL contexts that leave no cipher to offer, and server contexts
# with no certificate


def without_ciphers(context: SSL.Context, how: str) -> SSL.Context:
    """``context`` made to leave no cipher to offer, the way ``how``
    names."""
    if how in ("TLS 1.2 alone, PSK ciphers", "both lists empty"):
        # a client without a PSK offers no PSK cipher
        context.set_cipher_list(b"PSK")
    if how == "TLS 1.2 alone, PSK ciphers":
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
    if how in ("TLS 1.3 alone, no suites", "both lists empty"):
        context.set_tls13_ciphersuites(b"")
    if how == "TLS 1.3 alone, no suites":
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
    if how == "TLS 1.2 alone, none at its security level":
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(b"AES128-SHA:@SECLEVEL=4")
    return context


NO_CIPHER = [
    "TLS 1.2 alone, PSK ciphers",
    "TLS 1.3 alone, no suites",
    "both lists empty",
    "TLS 1.2 alone, none at its security level",
]


@pytest.mark.parametrize("method", [SSL.TLS_METHOD, SSL.TLS_CLIENT_METHOD])
@pytest.mark.parametrize("how", NO_CIPHER)
def test_a_client_context_with_no_cipher_to_offer_is_refused(
    how: str, method: int
) -> None:
    # OpenSSL could build no ClientHello from it: the handshake failed
    # as it began, once the TCP connection was up ("TLS could not start")
    context = without_ciphers(SSL.Context(method), how)

    message = refusal(context, server_side=False)
    assert "leaves no cipher to offer" in message
    assert "no ciphers available" in message
    assert "set_cipher_list" in message


def test_a_security_level_that_leaves_no_key_share_is_refused() -> None:
    # at level 5 no group OpenSSL would offer a key share of is strong
    # enough: "TLS could not start: no suitable key share"
    config = TLSConfig(ciphers="DEFAULT:@SECLEVEL=5")

    message = refusal(config, server_side=False)
    assert "OpenSSL can start no handshake on the client's" in message
    assert "security level" in message


def test_a_context_refused_for_its_ciphers_can_still_be_fixed(
    files: Files,
) -> None:
    context = without_ciphers(
        SSL.Context(SSL.TLS_METHOD), "TLS 1.2 alone, PSK ciphers"
    )
    context.set_verify(SSL.VERIFY_NONE)
    with pytest.raises(ConfigurationError):
        to_openssl_context(context, server_side=False)

    context.set_cipher_list(b"ECDHE+AESGCM")
    converted, _ = to_openssl_context(context, server_side=False)

    client, _ = handshake(converted, tls12_server(files), check_hostname=False)
    assert client.version() == "TLSv1.2"


def test_a_stdlib_context_with_no_cipher_to_offer_is_refused() -> None:
    source = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    source.maximum_version = ssl.TLSVersion.TLSv1_2
    source.set_ciphers("PSK")

    with pytest.raises(ConfigurationError, match="no cipher to offer"):
        to_openssl_context(source, server_side=False)


@pytest.mark.parametrize("how", NO_CIPHER)
def test_a_server_context_with_no_cipher_is_refused(
    files: Files, how: str
) -> None:
    # every client's handshake failed against it
    context = without_ciphers(
        server_context(files, minimum_version=TLSVersion.TLS1_2), how
    )

    with pytest.raises(ConfigurationError, match="no cipher to offer"):
        to_openssl_context(context, server_side=True)


def bare_server_context(files: Files, what: str) -> SSL.Context:
    """A server context holding only ``what`` of its identity."""
    context = SSL.Context(SSL.TLS_METHOD)
    if what == "a certificate":
        context.use_certificate_file(str(files.cert_only_file))
    elif what == "a key":
        context.use_privatekey_file(str(files.key_file))
    return context


@pytest.mark.parametrize("what", ["nothing", "a certificate", "a key"])
def test_a_server_context_without_certificate_and_key_is_refused(
    files: Files, what: str
) -> None:
    # each client's handshake failed, with a handshake_failure alert
    context = bare_server_context(files, what)

    message = refusal(context, server_side=True)
    assert "holds no certificate with its private key" in message
    assert "use_certificate_chain_file()" in message


def test_a_server_context_that_picks_its_certificate_by_name_is_taken(
    files: Files,
) -> None:
    # its servername callback hands each connection a context with one
    with_identity = server_context(files)
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_tlsext_servername_callback(
        lambda connection: connection.set_context(with_identity)
    )

    converted, _ = to_openssl_context(context, server_side=True)

    client_context = TLSConfig(cafile=files.ca_file).client_context()
    client, _ = handshake(client_context, converted)
    assert client.version() == "TLSv1.3"


# a server key that can sign in none of the versions and ciphers its
# context allows


@dataclasses.dataclass(frozen=True)
class KeyPair:
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="module")
def dsa_pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A self-signed certificate for localhost with a DSA key."""
    directory = tmp_path_factory.mktemp("dsa")
    key = dsa.generate_private_key(key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost")]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = KeyPair(directory / "dsa.pem", directory / "dsa.key")
    pair.cert_file.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
    )
    pair.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair


@pytest.mark.parametrize(
    ("minimum", "reason"),
    [
        # TLS 1.3 has no DSA signature scheme: a protocol_version alert
        (TLSVersion.TLS1_3, "unsupported protocol"),
        # and OpenSSL's default TLS 1.2 ciphers use no DSS: a
        # handshake_failure alert
        (TLSVersion.TLS1_2, "no shared cipher"),
    ],
)
def test_a_server_key_that_can_sign_in_nothing_allowed_is_refused(
    dsa_pair: KeyPair, minimum: TLSVersion, reason: str
) -> None:
    # each client's handshake failed, and start_server had taken it
    config = TLSConfig(
        certfile=dsa_pair.cert_file,
        keyfile=dsa_pair.key_file,
        minimum_version=minimum,
    )

    message = refusal(config, server_side=True)
    assert "private key can sign in none of the TLS versions" in message
    assert f"OpenSSL: {reason}" in message
    assert "RSA, ECDSA or Ed25519 key" in message


def test_a_dsa_key_with_a_cipher_for_it_is_taken(dsa_pair: KeyPair) -> None:
    # TLS 1.2 with a DSS cipher can still use it
    config = TLSConfig(
        certfile=dsa_pair.cert_file,
        keyfile=dsa_pair.key_file,
        minimum_version=TLSVersion.TLS1_2,
        ciphers="DHE-DSS-AES128-GCM-SHA256",
    )
    server, _ = to_openssl_context(config, server_side=True)

    client_context = TLSConfig(
        cafile=dsa_pair.cert_file,
        minimum_version=TLSVersion.TLS1_2,
        ciphers="DHE-DSS-AES128-GCM-SHA256",
    ).client_context()
    client, _ = handshake(client_context, server)
    assert client.version() == "TLSv1.2"


def test_a_dsa_context_that_picks_its_certificate_by_name_is_taken(
    files: Files, dsa_pair: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    # its servername callback may hand each connection another context;
    # the check answers no ClientHello for it, so the callback never
    # runs on an SSL object pyOpenSSL does not know (pyOpenSSL hands
    # the KeyError that makes to sys.excepthook)
    with_rsa = server_context(files)
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate_chain_file(str(dsa_pair.cert_file))
    context.use_privatekey_file(str(dsa_pair.key_file))
    named: list[SSL.Connection] = []

    def pick(connection: SSL.Connection) -> None:
        named.append(connection)
        connection.set_context(with_rsa)

    context.set_tlsext_servername_callback(pick)
    raised: list[Any] = []
    monkeypatch.setattr(sys, "excepthook", lambda *info: raised.append(info))

    assert to_openssl_context(context, server_side=True)[0] is context
    assert named == []
    assert raised == []


def test_the_signing_check_shows_no_callback_a_handshake(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the check's server signs a first flight and derives TLS 1.3
    # secrets: none of the application's callbacks hear of it, and the
    # context can still be changed
    context = server_context(files)
    heard: list[str] = []
    context.set_info_callback(lambda *_: heard.append("info"))
    context.set_keylog_callback(lambda *_: heard.append("keylog"))
    context.set_alpn_protos([b"x"])
    context.set_alpn_select_callback(lambda *_: heard.append("alpn") or b"x")
    context.set_verify(
        SSL.VERIFY_PEER, lambda *_: heard.append("verify") or True
    )
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    to_openssl_context(context, server_side=True)

    assert heard == []
    assert unraisable == []
    context.set_verify(SSL.VERIFY_NONE)
    # the key log callback is the application's again: a real
    # handshake's secrets reach it
    client_context = TLSConfig(cafile=files.ca_file).client_context()
    handshake(client_context, context)
    assert "keylog" in heard


@pytest.mark.parametrize(
    ("method", "server_side", "made_for"),
    [
        (SSL.TLS_CLIENT_METHOD, True, "clients"),
        (SSL.TLS_SERVER_METHOD, False, "servers"),
    ],
    ids=["client-only as server", "server-only as client"],
)
def test_a_context_made_for_the_other_side_is_refused(
    files: Files, method: int, server_side: bool, made_for: str
) -> None:
    # a handshake of the side it was not made for could not start
    context = SSL.Context(method)
    if method == SSL.TLS_SERVER_METHOD:
        context.use_certificate_chain_file(str(files.chain_file))
        context.use_privatekey_file(str(files.key_file))

    with pytest.raises(ConfigurationError) as raised:
        to_openssl_context(context, server_side=server_side)

    assert f"made for {made_for} alone" in str(raised.value)
    assert "TLS_METHOD" in str(raised.value)


def test_a_server_only_context_is_taken(files: Files) -> None:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate_chain_file(str(files.chain_file))
    context.use_privatekey_file(str(files.key_file))

    converted, _ = to_openssl_context(context, server_side=True)

    client_context = TLSConfig(cafile=files.ca_file).client_context()
    client, _ = handshake(client_context, converted)
    assert client.version() == "TLSv1.3"


def test_tls_config_builds_each_side_once(files: Files) -> None:
    config = TLSConfig(certfile=files.chain_file, cafile=files.ca_file)

    clients = {
        id(to_openssl_context(config, server_side=False)[0]) for _ in range(3)
    }
    servers = {
        id(to_openssl_context(config, server_side=True)[0]) for _ in range(3)
    }

    assert len(clients) == 1 and len(servers) == 1
    assert clients != servers
    client_context = to_openssl_context(config, server_side=False)[0]
    server = to_openssl_context(config, server_side=True)[0]
    for _ in range(3):
        handshake(client_context, server)
    # the cache is no setting: equal configs stay equal and hash alike
    assert config == TLSConfig(certfile=files.chain_file, cafile=files.ca_file)
    assert hash(config) == hash(
        TLSConfig(certfile=files.chain_file, cafile=files.ca_file)
    )
    assert "_contexts" not in repr(config)


def test_true_builds_its_context_once() -> None:
    first, _ = to_openssl_context(True, server_side=False)
    second, _ = to_openssl_context(True, server_side=False)
    assert first is second


def test_true_means_system_trust_for_clients(files: Files) -> None:
    context, check = to_openssl_context(True, server_side=False)
    assert check is True

    # the test CA is not a system CA
    with pytest.raises(CertificateError):
        handshake(context, server_context(files))
    with pytest.raises(ConfigurationError, match="certificate"):
        to_openssl_context(True, server_side=True)


@pytest.mark.parametrize("value", [None, False, "yes", 1, object()])
def test_other_values_are_refused(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="ssl must be"):
        to_openssl_context(value, server_side=False)


# to_openssl_context: a stdlib ssl.SSLContext


def stdlib_context(files: Files | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if files is not None:
        context.load_verify_locations(cafile=str(files.ca_file))
    return context


def test_stdlib_context_carries_trust_and_name_check(files: Files) -> None:
    context, check = to_openssl_context(
        stdlib_context(files), server_side=False
    )
    assert check is True

    client, _ = handshake(context, server_context(files))
    assert client.version() == "TLSv1.3"
    with pytest.raises(CertificateError, match="hostname mismatch"):
        handshake(
            context,
            server_context(files),
            server_hostname="elsewhere.mptls.test",
        )


def test_stdlib_context_without_cas_uses_system_trust(files: Files) -> None:
    context, _ = to_openssl_context(stdlib_context(), server_side=False)

    with pytest.raises(CertificateError):
        handshake(context, server_context(files))


def test_stdlib_context_without_verification(files: Files) -> None:
    source = stdlib_context()
    source.check_hostname = False
    source.verify_mode = ssl.CERT_NONE

    context, check = to_openssl_context(source, server_side=False)

    assert check is False
    handshake(
        context,
        server_context(files),
        server_hostname="elsewhere.mptls.test",
        check_hostname=check,
    )


def test_stdlib_versions(files: Files) -> None:
    # the stdlib's own default floor, TLS 1.2, is carried over
    source = stdlib_context(files)
    source.minimum_version = ssl.TLSVersion.TLSv1_2
    context, _ = to_openssl_context(source, server_side=False)
    client, _ = handshake(context, tls12_server(files))
    assert client.version() == "TLSv1.2"

    # a ceiling of TLS 1.2 is kept
    source = stdlib_context(files)
    source.maximum_version = ssl.TLSVersion.TLSv1_2
    context, _ = to_openssl_context(source, server_side=False)
    client, _ = handshake(
        context, server_context(files, minimum_version=0x0303)
    )
    assert client.version() == "TLSv1.2"


def test_stdlib_floor_below_tls12_is_raised(files: Files) -> None:
    source = stdlib_context(files)
    with pytest.warns(DeprecationWarning):
        source.minimum_version = ssl.TLSVersion.TLSv1

    context, _ = to_openssl_context(source, server_side=False)
    # OpenSSL's security level would refuse TLS 1.1 on its own; lower it
    # on both ends so that only the carried-over floor is left to say no
    permissive = b"DEFAULT:@SECLEVEL=0"
    context.set_cipher_list(permissive)
    legacy_server = server_context(files, minimum_version=0x0303)
    legacy_server.set_min_proto_version(SSL.TLS1_VERSION)
    legacy_server.set_max_proto_version(SSL.TLS1_1_VERSION)
    legacy_server.set_cipher_list(permissive)

    with pytest.raises(TLSError) as raised:
        handshake(context, legacy_server)

    assert raised.value.alert == AlertDescription.PROTOCOL_VERSION


def test_stdlib_ciphers_are_carried(files: Files) -> None:
    source = stdlib_context(files)
    source.maximum_version = ssl.TLSVersion.TLSv1_2
    source.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")

    context, _ = to_openssl_context(source, server_side=False)
    client, _ = handshake(context, tls12_server(files))

    cipher = client.cipher()
    assert cipher is not None
    assert cipher[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"


def test_a_stdlib_context_is_carried_over_once_while_unchanged(
    files: Files,
) -> None:
    # each open_connection loaded its CA certificates into a new store
    # again: about 9 ms a connect with a system's 140
    source = stdlib_context(files)

    first, _ = to_openssl_context(source, server_side=False)
    again, _ = to_openssl_context(source, server_side=False)

    assert again is first
    assert (
        to_openssl_context(stdlib_context(files), server_side=False)[0]
        is not first
    )


def server_of_another_ca(
    files: Files, name: str
) -> tuple[trustme.CA, SSL.Context]:
    """A new CA, and a server context (TLS 1.2 allowed) it vouches for."""
    ca = trustme.CA()
    chain = files.directory / f"{name}.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        str(chain)
    )
    config = TLSConfig(certfile=chain, minimum_version=TLSVersion.TLS1_2)
    return ca, config.server_context()


def test_a_stdlib_context_changed_between_connects_is_carried_again(
    files: Files,
) -> None:
    other, other_server = server_of_another_ca(files, "other")
    _, stranger = server_of_another_ca(files, "stranger")
    source = stdlib_context(files)
    before, _ = to_openssl_context(source, server_side=False)
    with pytest.raises(CertificateError):
        handshake(before, other_server)

    # a CA added to the same context is trusted from the next connect
    source.load_verify_locations(cadata=other.cert_pem.bytes().decode())
    trusting, _ = to_openssl_context(source, server_side=False)
    handshake(trusting, other_server)

    # and so is every other setting it carries
    source.maximum_version = ssl.TLSVersion.TLSv1_2
    capped, _ = to_openssl_context(source, server_side=False)
    client, _ = handshake(
        capped, server_context(files, minimum_version=TLSVersion.TLS1_2)
    )
    assert client.version() == "TLSv1.2"

    # capped at TLS 1.2, OP_NO_TLSv1_2 leaves no version; cleared, the
    # settings are those of the context carried over last
    with pytest.warns(DeprecationWarning):
        source.options |= ssl.OP_NO_TLSv1_2
    with pytest.raises(ConfigurationError, match="above its ceiling"):
        to_openssl_context(source, server_side=False)
    source.options &= ~ssl.OP_NO_TLSv1_2

    source.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")
    narrowed, _ = to_openssl_context(source, server_side=False)
    client, _ = handshake(narrowed, tls12_server(files))
    cipher = client.cipher()
    assert cipher is not None
    assert cipher[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"

    # a CRL asked for that no one loaded fails every verification
    source.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    crl_checked, _ = to_openssl_context(source, server_side=False)
    with pytest.raises(CertificateError):
        handshake(crl_checked, tls12_server(files))

    source.check_hostname = False
    unnamed, check = to_openssl_context(source, server_side=False)
    assert check is False
    with pytest.raises(CertificateError):
        handshake(unnamed, stranger, check_hostname=False)

    source.verify_mode = ssl.CERT_NONE
    unverified, _ = to_openssl_context(source, server_side=False)
    handshake(unverified, stranger, check_hostname=False)


def test_stdlib_forms_that_cannot_be_carried(files: Files) -> None:
    with pytest.raises(ConfigurationError, match="server-side"):
        to_openssl_context(stdlib_context(files), server_side=True)

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ConfigurationError, match="PROTOCOL_TLS_SERVER"):
        to_openssl_context(server, server_side=False)

    low = stdlib_context(files)
    with pytest.warns(DeprecationWarning):
        low.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ConfigurationError, match=r"below TLS 1\.2"):
        to_openssl_context(low, server_side=False)

    crossed = stdlib_context(files)
    crossed.minimum_version = ssl.TLSVersion.TLSv1_3
    crossed.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigurationError, match="above"):
        to_openssl_context(crossed, server_side=False)


def test_stdlib_version_options_are_carried(files: Files) -> None:
    # OP_NO_TLSv1_2 is how older code asks for TLS 1.3 only: the stdlib
    # refuses a TLS 1.2 server then, and so must the carried context
    no_tls12 = stdlib_context(files)
    with pytest.warns(DeprecationWarning):
        no_tls12.options |= ssl.OP_NO_TLSv1_2
    context, _ = to_openssl_context(no_tls12, server_side=False)
    with pytest.raises(TLSError) as raised:
        handshake(context, tls12_server(files))
    assert raised.value.alert == AlertDescription.PROTOCOL_VERSION

    no_tls13 = stdlib_context(files)
    with pytest.warns(DeprecationWarning):
        no_tls13.options |= ssl.OP_NO_TLSv1_3
    context, _ = to_openssl_context(no_tls13, server_side=False)
    client, _ = handshake(
        context, server_context(files, minimum_version=TLSVersion.TLS1_2)
    )
    assert client.version() == "TLSv1.2"

    neither = stdlib_context(files)
    with pytest.warns(DeprecationWarning):
        neither.options |= ssl.OP_NO_TLSv1_2 | ssl.OP_NO_TLSv1_3
    with pytest.raises(ConfigurationError, match="above"):
        to_openssl_context(neither, server_side=False)


def _ca_with_serial_zero() -> tuple[bytes, x509.Certificate]:
    """A self-signed CA whose serial number is 0, as DER, and a leaf.

    RFC 5280 wants it positive, yet system stores still hold such roots;
    ``cryptography`` builds none, so serial 1 is rewritten to 0 in the
    encoding (a trust anchor's own signature is not checked).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serial 0")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    # [0] version 3, then INTEGER 1: the serial
    version_and_serial = bytes.fromhex("a003020102020101")
    assert der.count(version_and_serial) == 1
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
        )
        .issuer_name(name)
        .public_key(leaf_key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    zero = version_and_serial[:-1] + b"\0"
    return der.replace(version_and_serial, zero), leaf


def test_stdlib_trust_is_read_as_openssl_reads_it() -> None:
    # a stdlib context loads what OpenSSL loads; carrying its CAs over
    # must neither warn about nor refuse a root that cryptography's
    # stricter parse flags (a serial of 0 in a system store)
    root, leaf = _ca_with_serial_zero()
    source = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    source.load_verify_locations(cadata=root)
    assert len(source.get_ca_certs()) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        context, _ = to_openssl_context(source, server_side=False)
    store = context.get_cert_store()
    assert store is not None
    # the root is trusted: a certificate it issued verifies
    crypto.X509StoreContext(
        store, crypto.X509.from_cryptography(leaf)
    ).verify_certificate()


def test_a_ca_file_is_read_as_openssl_reads_it(
    files: Files, tmp_path: Path
) -> None:
    # a system bundle given as cafile holds such a root among the others
    # (Debian's did); cryptography's parse warned for it, and its later
    # releases refuse it, which would refuse the whole bundle
    root, leaf = _ca_with_serial_zero()
    pem = ssl.DER_cert_to_PEM_cert(root).encode()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        b"# a comment, as bundles have\n" + pem + files.ca_file.read_bytes()
    )
    for config in (
        TLSConfig(cafile=bundle),
        TLSConfig(cadata=root),
        TLSConfig(cadata=pem),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            context = config.client_context()
        store = context.get_cert_store()
        assert store is not None
        crypto.X509StoreContext(
            store, crypto.X509.from_cryptography(leaf)
        ).verify_certificate()
    # the other CA of the bundle is trusted too
    client, _ = handshake(
        TLSConfig(cafile=bundle).client_context(), server_context(files)
    )
    assert client.handshake_complete
