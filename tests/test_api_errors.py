"""Bad arguments to the public API fail at once, with typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pickle
import select
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from OpenSSL import SSL
from pki import Pki
from support import open_fds, skip_without_ipv6, still_echoes, usable_backend

import mptls
from mptls.aio.keywords import take_local_addr
from mptls.aio.protocol import _in_mptls_tree
from mptls.backends.base import (
    Backend,
    Server,
    connect_any,
    numeric_address,
)
from mptls.backends.kernel import sockets as kernel_sockets
from mptls.errors import (
    BackendError,
    ConfigurationError,
    ConnectError,
    HostLookupError,
    PeerResetError,
    SocketInUseError,
)
from mptls.mptcp.config import ConnectionConfig
from mptls.mptcp.tokens import E_TOKEN_LAYOUT, TokenLayout
from mptls.tls.engine import check_server_name

# OpenSSL's verify result for a certificate of another address
X509_V_ERR_IP_ADDRESS_MISMATCH = 64


async def noop(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.close()


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def start_on_loopback(pki: Pki, **options: Any) -> Server:
    """``start_server`` with a handler that only closes, on a free
    loopback port under the test PKI's identity: most server tests here
    differ in one option alone, and this keeps that option in view."""
    return await mptls.start_server(
        noop, "127.0.0.1", 0, ssl=pki.server(), **options
    )


# start_server(announce_addrs=...)


@pytest.mark.parametrize(
    "announce",
    [
        ["x"],
        "127.0.0.2",
        [("notanip", 4473)],
        [("127.0.0.2", -1)],
        [("127.0.0.2", 70000)],
        [("127.0.0.2", "4473")],
        [("127.0.0.2", 4473, 1)],
        [(None, 4473)],
        [(4473, 4473)],
        [("127.0.0.2", 4473), ("127.0.0.2", 4473)],
        # addresses a client would try to join: it reached no peer, or
        # (0.0.0.0, ::) its own host
        [("224.0.0.1", 0)],
        [("ff02::1", 4473)],
        [("::ffff:239.1.1.1", 0)],
        [("255.255.255.255", 0)],
        [("0.0.0.0", 4473)],
        [("::", 0)],
    ],
)
async def test_bad_announce_addrs_fail_start_server(
    pki: Pki, announce: object
) -> None:
    with pytest.raises(ConfigurationError, match="announce_addrs"):
        await start_on_loopback(pki, announce_addrs=announce)


async def test_good_announce_addrs_are_kept(pki: Pki) -> None:
    server = await start_on_loopback(
        pki, announce_addrs=[("127.0.0.2", 4473), ("::1", 0)]
    )
    async with server:
        listener = server.mptls_listener  # type: ignore[attr-defined]
        assert listener._announce == [("127.0.0.2", 4473), ("::1", 0)]


# start_server(mode= / modes=)


async def _accepted_modes(pki: Pki, **kw: object) -> frozenset[str]:
    server = await start_on_loopback(pki, **kw)
    async with server:
        listener = server.mptls_listener  # type: ignore[attr-defined]
        return frozenset(
            m.value for m in listener._endpoint.config.accept_modes
        )


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, {"G"}),
        ({"mode": "rfc8684"}, {"rfc8684"}),
        ({"mode": "g"}, {"G"}),
        ({"modes": "rfc8684"}, {"rfc8684"}),
        ({"modes": ["G", "rfc8684"]}, {"G", "rfc8684"}),
        ({"mode": "e"}, {"E"}),
        ({"modes": ["G", "E"]}, {"G", "E"}),
    ],
)
async def test_server_mode_keywords(
    pki: Pki, kw: dict[str, object], expected: set[str]
) -> None:
    assert await _accepted_modes(pki, **kw) == expected


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "X"}, "unknown MPTCP mode 'X'"),
        ({"modes": "X"}, "unknown MPTCP mode 'X'"),
        ({"modes": ["G", "tcp"]}, "unknown MPTCP mode 'tcp'"),
        ({"modes": []}, "at least one mode"),
        ({"mode": "G", "modes": ["G"]}, "not both"),
        # bytes are a sequence of ints: b"E" read as the mode 69
        (
            {"modes": b"E"},
            r"modes must be a mode or a list of modes, got b'E'",
        ),
        ({"modes": bytearray(b"GE")}, "modes must be a mode or a list"),
    ],
)
async def test_bad_server_modes(
    pki: Pki, kw: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        await _accepted_modes(pki, **kw)


async def test_rfc8684_server_serves_an_rfc8684_client(pki: Pki) -> None:
    server = await mptls.start_server(
        echo, "127.0.0.1", 0, ssl=pki.server(), mode="rfc8684"
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(
            mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), mode="rfc8684"
            ),
            10,
        )
        writer.write(b"ping")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"ping"
        assert writer.get_extra_info("mptcp").mode == "rfc8684"
        writer.close()


# open_connection / start_server arguments


# past 4300 digits Python cannot make an int a str, and said so with a
# ValueError of its own from the message meant to name the argument
HUGE = 10**5000


def repr_or_size(value: object) -> str:
    """A test id for ``value``: its repr, or its size when that is long."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"int-of-{value.bit_length()}-bits"
    shown = repr(value)
    return (
        shown
        if len(shown) <= 20
        else f"{type(value).__name__}-of-{len(shown)}"
    )


@pytest.mark.parametrize(
    "port",
    [-1, 70000, None, 1.5, True, HUGE, "9" * 5000, "", "http\x00s"],
    ids=repr_or_size,
)
async def test_bad_client_port(pki: Pki, port: object) -> None:
    with pytest.raises(ConfigurationError, match="port"):
        await mptls.open_connection("127.0.0.1", port, ssl=pki.client())


@pytest.mark.parametrize("port", [-1, 70000, 1.5])
async def test_bad_server_port(pki: Pki, port: object) -> None:
    with pytest.raises(ConfigurationError, match="port"):
        await mptls.start_server(noop, "127.0.0.1", port, ssl=pki.server())


@pytest.mark.parametrize("spelled", [" {}", "+{}", "00{}"])
async def test_a_port_is_read_as_the_system_reads_a_number(
    pki: Pki, spelled: str
) -> None:
    # asyncio takes these for the number, whatever the host: int()
    # for an IP literal, getaddrinfo()'s strtoul() for a name
    server = await start_on_loopback(pki)
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            _, writer = await mptls.open_connection(
                "localhost", spelled.format(port), ssl=pki.client()
            )
            writer.close()
            await writer.wait_closed()


# "\u00b2" and the Arabic-Indic and fullwidth eights and zeros are no
# number to getaddrinfo(): a service name it does not know. int() took
# the last two for 80
@pytest.mark.parametrize(
    "port", ["abc", "\u00b2", "\u0668\u0660", "\uff18\uff10", "80 "]
)
async def test_a_port_name_no_service_has_is_named(
    pki: Pki, port: str
) -> None:
    # a str that is not a number is a service name, as asyncio takes it
    # ("https"); one the services database lacks fails as asyncio's
    # getaddrinfo() does, with EAI_SERVICE
    with pytest.raises(HostLookupError) as caught:
        await mptls.open_connection("127.0.0.1", port, ssl=pki.client())
    assert caught.value.errno == socket.EAI_SERVICE
    assert repr(port) in str(caught.value)


@pytest.mark.parametrize("host", [127, b"127.0.0.1", ["127.0.0.1"], ""])
async def test_client_host_must_be_a_str(pki: Pki, host: object) -> None:
    with pytest.raises(ConfigurationError, match="host"):
        await mptls.open_connection(host, 4433, ssl=pki.client())


async def test_server_host_must_be_str_or_list(pki: Pki) -> None:
    with pytest.raises(ConfigurationError, match="host"):
        await mptls.start_server(noop, 127, 0, ssl=pki.server())


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
async def test_a_host_with_a_nul_is_a_configuration_error(
    pki: Pki, backend: str
) -> None:
    # getaddrinfo() raised a bare ValueError ("embedded null character")
    with pytest.raises(ConfigurationError, match="NUL"):
        await mptls.open_connection(
            "127.0.0.1\x00", 4433, ssl=pki.client(), backend=backend
        )
    for host in ("127.0.0.1\x00", ["127.0.0.1", "::1\x00"]):
        with pytest.raises(ConfigurationError, match="NUL"):
            await mptls.start_server(
                noop, host, 0, ssl=pki.server(), backend=backend
            )


async def test_a_server_hostname_with_a_nul_is_a_configuration_error(
    pki: Pki,
) -> None:
    # pyOpenSSL's SNI call raised a bare TypeError
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.close()

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server()
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConfigurationError, match="not a valid host"):
            await mptls.open_connection(
                "127.0.0.1",
                port,
                ssl=pki.client(),
                server_hostname="localhost\x00.example",
            )


@pytest.mark.parametrize(
    "name", ["ex ample", "-bad-", "a" * 300, ".", "localhost\x00.example"]
)
async def test_a_server_name_tls_refuses_is_refused_before_connecting(
    pki: Pki, name: str
) -> None:
    # the TLS engine refused it once the TCP connection was made, and
    # a socket given as sock= was closed under its owner a step later
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        with pytest.raises(ConfigurationError, match=r"(server|host) name"):
            await mptls.open_connection(
                *listening.getsockname(),
                ssl=pki.client(),
                server_hostname=name,
            )
        listening.setblocking(False)
        with pytest.raises(BlockingIOError):
            listening.accept()
        with socket.create_connection(listening.getsockname()) as sock:
            with pytest.raises(ConfigurationError):
                await mptls.open_connection(
                    ssl=pki.client(), sock=sock, server_hostname=name
                )
            await asyncio.sleep(0)
            assert sock.fileno() != -1
            sock.sendall(b"still the caller's")


def _openssl_checks_name_syntax() -> bool:
    """OpenSSL 4 checks a host name's syntax where OpenSSL 3 took any
    name without a NUL (cryptography >= 42 bundles either)."""
    from cryptography.hazmat.backends.openssl.backend import backend

    return bool(backend.openssl_version_number() >= 0x40000000)


@pytest.mark.skipif(
    not _openssl_checks_name_syntax(),
    reason="OpenSSL 3 checks a certificate against a one-letter name",
)
async def test_a_one_letter_server_name_says_openssl_refused_it(
    tmp_path: Path,
) -> None:
    # "OpenSSL cannot check the server name 'a'" read as mptls's own
    # limit, with no reason: OpenSSL 4 refuses a name of one character
    ca = trustme.CA()
    issued = ca.issue_cert("a", "ab")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca.cert_pem.bytes())

    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(await reader.read())
        writer.close()

    tls = mptls.TLSConfig(certfile=cert, keyfile=key)
    server = await mptls.start_server(echo, "127.0.0.1", 0, ssl=tls)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = mptls.TLSConfig(cafile=cafile)
        with pytest.raises(ConfigurationError) as refused:
            await mptls.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="a"
            )
        assert str(refused.value) == (
            "OpenSSL refused 'a' as the server name to check the "
            "certificate against: it takes no name of one character"
        )

        # the same certificate, checked against two letters
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="ab"
        )
        await still_echoes(reader, writer, b"checked")


@pytest.mark.skipif(
    not _openssl_checks_name_syntax(),
    reason="OpenSSL 3 takes any server name without a NUL",
)
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Z.", ": it takes no name of one character"),
        ("*.example", ": it takes no '*' in a name"),
        ("a!b", ": it takes no '!' in a name"),
        (
            "ab-.example",
            ": it takes no label that begins or ends with a hyphen",
        ),
    ],
)
def test_a_server_name_openssl_refuses_says_why(
    name: str, reason: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_server_name(name, True)
    assert str(refused.value) == (
        f"OpenSSL refused {name!r} as the server name to check the "
        f"certificate against{reason}"
    )


def allows_no_version(context: SSL.Context | None = None) -> SSL.Context:
    """``context`` (a bare client one by default) with a floor above its
    ceiling: OpenSSL can start no handshake on it."""
    if context is None:
        context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    return context


class Unreachable(Backend):
    """A backend that records every call to connect or listen."""

    name = "unreachable"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("create_connection")
        raise AssertionError("connected")

    async def create_server(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("create_server")
        raise AssertionError("listened")

    def install_keys(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("keys")

    def info(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("info")


async def test_a_context_that_allows_no_version_connects_nowhere() -> None:
    # the handshake failed as it began, after the TCP connection was up
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        with pytest.raises(ConfigurationError, match="allows no TLS version"):
            await mptls.open_connection(
                *listening.getsockname(),
                ssl=allows_no_version(),
                server_hostname="localhost",
            )
        listening.setblocking(False)
        with pytest.raises(BlockingIOError):
            listening.accept()
        # a socket the caller gave stays the caller's, as for any
        # argument refused before it was used
        with socket.create_connection(listening.getsockname()) as sock:
            with pytest.raises(ConfigurationError):
                await mptls.open_connection(
                    ssl=allows_no_version(),
                    sock=sock,
                    server_hostname="localhost",
                )
            await asyncio.sleep(0)
            assert sock.fileno() != -1
            sock.sendall(b"still the caller's")


async def test_a_server_context_that_allows_no_version_listens_nowhere(
    pki: Pki,
) -> None:
    # every client's handshake failed against it, the first one's too
    backend = Unreachable()
    context = allows_no_version(pki.server().server_context())
    with pytest.raises(ConfigurationError, match="allows no TLS version"):
        await mptls.start_server(
            noop, "127.0.0.1", 0, ssl=context, backend=backend
        )
    assert backend.calls == []

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ConfigurationError, match="allows no TLS version"):
            await mptls.start_server(noop, ssl=context, sock=sock)
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


def no_cipher_to_offer() -> SSL.Context:
    """A client context that allows TLS 1.2 alone, with only PSK
    ciphers, which a client without a PSK cannot offer: OpenSSL can
    build no ClientHello on it."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(b"PSK")
    return context


def below_tls12() -> SSL.Context:
    """A client context capped at TLS 1.1, with the security level
    lowered so that OpenSSL offers it."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_1_VERSION)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    return context


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
@pytest.mark.parametrize(
    ("unworkable", "match"),
    [
        # "TLS could not start: no ciphers available", once the TCP
        # connection was up
        (no_cipher_to_offer, "no cipher to offer"),
        # the server's protocol_version alert, once the TCP connection
        # was up
        (below_tls12, r"newer than TLS 1\.1"),
    ],
    ids=["no cipher", "below TLS 1.2"],
)
async def test_a_context_that_cannot_work_connects_nowhere(
    unworkable: Callable[[], SSL.Context], match: str, backend: str
) -> None:
    backend = usable_backend(backend)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        with pytest.raises(ConfigurationError, match=match):
            await mptls.open_connection(
                *listening.getsockname(),
                ssl=unworkable(),
                server_hostname="localhost",
                backend=backend,
            )
        listening.setblocking(False)
        with pytest.raises(BlockingIOError):
            listening.accept()


async def test_a_server_context_without_certificate_listens_nowhere() -> None:
    # every client's handshake failed against it
    backend = Unreachable()
    context = SSL.Context(SSL.TLS_METHOD)
    with pytest.raises(ConfigurationError, match="no certificate"):
        await mptls.start_server(
            noop, "127.0.0.1", 0, ssl=context, backend=backend
        )
    assert backend.calls == []


@pytest.mark.parametrize(
    ("local_addrs", "match"),
    [
        ("127.0.0.1", "list of addresses"),
        (b"127.0.0.1", "list of addresses"),
        ([127], "entries"),
        (["127.0.0.1", None], "entries"),
        # names are refused before any lookup, bad literals too
        (["localhost"], "IP addresses"),
        (["127.0.0.1", "999.1.1.1"], "IP addresses"),
        (["127.0.0.1:5"], "IP addresses"),
        # bound, yet the system picked the source: a path from elsewhere
        (["127.0.0.1", "224.0.0.1"], "multicast address"),
        (["255.255.255.255"], "broadcast address"),
    ],
)
async def test_bad_local_addrs(
    pki: Pki, local_addrs: object, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        await mptls.open_connection(
            "127.0.0.1", 4433, ssl=pki.client(), local_addrs=local_addrs
        )


async def test_an_address_no_subflow_can_use_is_refused_as_both_kinds(
    pki: Pki,
) -> None:
    # a ConfigurationError as other bad addresses are, a PathError as
    # the kernel backend refused such an endpoint
    with pytest.raises(mptls.AddressError) as raised:
        await mptls.open_connection(
            "127.0.0.1", 4433, ssl=pki.client(), local_addrs=["224.0.0.1"]
        )
    assert isinstance(raised.value, ConfigurationError)
    assert isinstance(raised.value, mptls.PathError)


async def test_an_empty_server_hostname_is_refused(pki: Pki) -> None:
    # OpenSSL would take "" as no name to check, so any certificate the
    # CA signed would pass: refused before anything is sent
    with pytest.raises(ConfigurationError, match="server_hostname"):
        await mptls.open_connection(
            "127.0.0.1", 4433, ssl=pki.client(), server_hostname=""
        )


async def test_unknown_keyword_is_named(pki: Pki) -> None:
    server = await start_on_loopback(pki)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConfigurationError, match="recieve_window"):
            await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), recieve_window=1
            )
    with pytest.raises(ConfigurationError, match="colour"):
        await start_on_loopback(pki, colour="red")


@pytest.mark.parametrize(
    "name", ["ssl_handshake_timeout", "ssl_shutdown_timeout"]
)
@pytest.mark.parametrize("timeout", [-1, 0, "5", float("inf")])
async def test_bad_ssl_timeouts(pki: Pki, name: str, timeout: object) -> None:
    with pytest.raises(ConfigurationError, match=name):
        await mptls.open_connection(
            "127.0.0.1", 4433, ssl=pki.client(), **{name: timeout}
        )
    with pytest.raises(ConfigurationError, match=name):
        await start_on_loopback(pki, **{name: timeout})


@pytest.mark.parametrize("value", [HUGE, -HUGE], ids=repr_or_size)
@pytest.mark.parametrize(
    "name",
    [
        "connect_timeout",
        "close_timeout",
        "ssl_handshake_timeout",
        "receive_window",
        "happy_eyeballs_delay",
    ],
)
async def test_a_huge_number_is_a_configuration_error(
    pki: Pki, name: str, value: int
) -> None:
    with pytest.raises(ConfigurationError, match=f"{name}.*an int of"):
        await mptls.open_connection(
            "127.0.0.1", 9, ssl=pki.client(), **{name: value}
        )


@pytest.mark.parametrize(
    "name",
    ["backend", "mode", "idsn_rule", "server_hostname", "local_addrs"],
)
async def test_a_huge_int_for_a_client_keyword_is_named_by_its_size(
    pki: Pki, name: str
) -> None:
    # each message repeated the value: past 4300 digits Python refuses to
    # make an int a str, and a bare ValueError took the error's place
    with pytest.raises(ConfigurationError, match="an int of 16610 bits"):
        await mptls.open_connection(
            "127.0.0.1", 9, ssl=pki.client(), **{name: HUGE}
        )


class _UnshowableValue:
    """An argument whose repr fails, as a broken proxy object's may."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    "name", ["connect_timeout", "mode", "local_addrs", "limit"]
)
async def test_a_value_whose_repr_fails_is_still_a_configuration_error(
    pki: Pki, name: str
) -> None:
    # the message repeated the value, and the repr's own RuntimeError
    # took the ConfigurationError's place
    with pytest.raises(ConfigurationError, match="a _UnshowableValue object"):
        await mptls.open_connection(
            "127.0.0.1", 9, ssl=pki.client(), **{name: _UnshowableValue()}
        )


@pytest.mark.parametrize(
    "name", ["backend", "modes", "announce_addrs", "server_id", "worker_id"]
)
async def test_a_huge_int_for_a_server_keyword_is_named_by_its_size(
    pki: Pki, name: str
) -> None:
    with pytest.raises(ConfigurationError, match="an int of 16610 bits"):
        await start_on_loopback(pki, **{name: HUGE})


@pytest.mark.parametrize(
    "make",
    [
        lambda: mptls.TLSConfig(minimum_version=HUGE),
        lambda: ConnectionConfig(idsn_rule=HUGE),
    ],
)
def test_a_huge_int_for_a_setting_is_named_by_its_size(make: Any) -> None:
    with pytest.raises(ConfigurationError, match="an int of 16610 bits"):
        make()


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
@pytest.mark.parametrize(
    "backlog",
    ["100", 1.5, None, True, -(2**31) - 1, 2**31, HUGE],
    ids=repr_or_size,
)
async def test_bad_backlog(pki: Pki, backend: str, backlog: object) -> None:
    # asyncio gave it to listen() as it was: a TypeError or OverflowError
    # there, or int() of it on the kernel backend; refused as no C int,
    # not as a backlog asyncio's loop would accept nothing with
    with pytest.raises(ConfigurationError, match="backlog must be"):
        await start_on_loopback(pki, backend=backend, backlog=backlog)


async def test_a_good_backlog_is_asyncios(pki: Pki) -> None:
    server = await start_on_loopback(pki, backlog=1)
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
@pytest.mark.parametrize("backlog", [0, -1])
async def test_a_backlog_asyncios_loop_accepts_nothing_with_is_refused(
    pki: Pki, backend: str, backlog: int
) -> None:
    # asyncio's loop takes it and then accepts up to `backlog` clients
    # per wakeup: none, so each client waited; -1 was refused as out of
    # range, though asyncio takes it
    with pytest.raises(ConfigurationError, match="accept no connection"):
        await start_on_loopback(pki, backend=backend, backlog=backlog)


@pytest.mark.parametrize("backlog", [0, -1])
def test_on_uvloop_any_backlog_serves(pki: Pki, backlog: int) -> None:
    # uvloop hands it to listen() and accepts all that come, as its own
    # start_server does: -1 was refused as out of range
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        server = await mptls.start_server(
            echo, "127.0.0.1", 0, ssl=pki.server(), backlog=backlog
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client()
            )
            await still_echoes(reader, writer, b"accepted")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (E_TOKEN_LAYOUT, "token_bits=64"),
        (TokenLayout(8, 8, token_bits=32), "token_bits=64"),
        ("8/8", "must be a TokenLayout"),
    ],
)
async def test_a_server_token_layout_is_a_64_bit_one(
    pki: Pki, layout: object, message: str
) -> None:
    # a 32-bit layout was taken, and every SYN|ACK then failed to
    # encode: asyncio logged a fatal error for each client, which heard
    # of no mptls server at all (NotMptlsPeerError)
    with pytest.raises(ConfigurationError, match=message):
        await start_on_loopback(pki, token_layout=layout)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("require_app_keys", "no"),
        ("require_app_keys", 0),
        # "false" is truthy: it accepted a downgrade to keys in the
        # clear, and joins keyed by them
        ("allow_legacy_fallback", "false"),
        ("allow_cleartext_keys", "no"),
    ],
)
async def test_a_flag_is_a_bool(pki: Pki, name: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"{name} must be True"):
        await mptls.open_connection(
            "127.0.0.1", 9, ssl=pki.client(), **{name: value}
        )
    if name != "allow_legacy_fallback":
        with pytest.raises(ConfigurationError, match=f"{name} must be True"):
            await start_on_loopback(pki, **{name: value})


@pytest.mark.parametrize("limit", [0, -1, "64", -HUGE], ids=repr_or_size)
async def test_bad_limit(pki: Pki, limit: object) -> None:
    with pytest.raises(ConfigurationError, match="limit"):
        await mptls.open_connection(
            "127.0.0.1", 4433, ssl=pki.client(), limit=limit
        )
    with pytest.raises(ConfigurationError, match="limit"):
        await start_on_loopback(pki, limit=limit)


@pytest.mark.parametrize(
    "kw",
    [
        {"cafile": 123},
        {"certfile": 1.5},
        {"cadata": "not bytes"},
        {"ciphers": 5},
        {"verify": "no"},
    ],
)
def test_tls_config_types(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kw))):
        mptls.TLSConfig(**kw)  # type: ignore[arg-type]


# what the operating system refuses: typed, and still an OSError


@pytest.mark.parametrize(
    ("host", "shown"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")]
)
@pytest.mark.parametrize(
    "backend", ["userspace", pytest.param("kernel", marks=pytest.mark.kernel)]
)
async def test_refused_connection_is_a_connect_error(
    pki: Pki, host: str, shown: str, backend: str
) -> None:
    skip_without_ipv6(host)
    if backend == "kernel" and not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    server = await asyncio.start_server(noop, host, 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectError) as caught:
        await mptls.open_connection(
            host, port, ssl=pki.client(), backend=backend
        )
    error = caught.value
    assert isinstance(error, OSError)
    assert isinstance(error, mptls.MptlsError)
    # what asyncio raises there, for code that waits for a server
    assert isinstance(error, ConnectionRefusedError)
    assert isinstance(error, mptls.ConnectRefusedError)
    assert error.errno == errno.ECONNREFUSED
    # an IPv6 host in brackets, or its port would read as part of it
    assert f"cannot connect to {shown}:{port}: " in str(error)
    # the system's words, not asyncio's "Connect call failed (...)",
    # which repeats the address
    assert str(error).endswith(os.strerror(errno.ECONNREFUSED))
    assert (error.host, error.port) == (host, port)


def _two_addresses_for_localhost(
    monkeypatch: pytest.MonkeyPatch, port: int
) -> None:
    """``localhost`` resolves to 127.0.0.1 and 127.0.0.2, in that order,
    as a host with two addresses (IPv4 and IPv6 on many machines) does;
    every other lookup (the IP literals) is the loop's own."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def lookup(host: object, *args: object, **kw: object) -> object:
        if host != "localhost":
            return await real(host, *args, **kw)  # type: ignore[arg-type]
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
            for address in ("127.0.0.1", "127.0.0.2")
        ]

    monkeypatch.setattr(loop, "getaddrinfo", lookup)


@pytest.mark.parametrize(
    "backend", ["userspace", pytest.param("kernel", marks=pytest.mark.kernel)]
)
async def test_a_host_whose_every_address_refuses_is_refused(
    pki: Pki, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host with several addresses, none listening, is a refusal with
    its errno on both backends, each address named: asyncio's own loop
    over the addresses gave the userspace backend an OSError without
    one ("Multiple exceptions: ..."), so a ConnectError that was not a
    ConnectionRefusedError, unlike the kernel backend's."""
    if backend == "kernel" and not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    server = await asyncio.start_server(noop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    _two_addresses_for_localhost(monkeypatch, port)
    before = open_fds()
    with pytest.raises(ConnectError) as caught:
        await mptls.open_connection(
            "localhost", port, ssl=pki.client(), backend=backend
        )
    error = caught.value
    assert isinstance(error, mptls.ConnectRefusedError)
    assert isinstance(error, ConnectionRefusedError)
    assert error.errno == errno.ECONNREFUSED
    refused = os.strerror(errno.ECONNREFUSED)
    assert str(error) == (
        f"cannot connect to localhost:{port}: "
        f"127.0.0.1 port {port}: {refused}; 127.0.0.2 port {port}: {refused}"
    )
    assert open_fds() == before


async def test_a_host_whose_every_address_times_out_is_a_timeout(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel giving up on the SYNs to each of a host's addresses
    (connect_timeout=None, so its retries alone) is an MptlsTimeoutError
    on the userspace backend, as it is on the kernel backend
    (test_kernel_netns.py), not a ConnectError without an errno."""
    _two_addresses_for_localhost(monkeypatch, 9)
    loop = asyncio.get_running_loop()
    tried: list[object] = []

    async def unanswered(sock: socket.socket, address: object) -> None:
        tried.append(address)
        raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    monkeypatch.setattr(loop, "sock_connect", unanswered)
    before = open_fds()
    with pytest.raises(mptls.MptlsTimeoutError) as caught:
        await mptls.open_connection(
            "localhost", 9, ssl=pki.client(), connect_timeout=None
        )
    assert tried == [("127.0.0.1", 9), ("127.0.0.2", 9)]
    assert isinstance(caught.value, OSError)
    timed_out = os.strerror(errno.ETIMEDOUT)
    assert str(caught.value) == (
        "TCP connect to localhost:9 timed out "
        f"(127.0.0.1 port 9: {timed_out}; 127.0.0.2 port 9: {timed_out})"
    )
    assert open_fds() == before


async def test_a_connect_nothing_answers_ends_at_connect_timeout(
    pki: Pki,
) -> None:
    """SYNs to a listener whose accept queue is full go unanswered
    (Linux drops them), so the connect waits: connect_timeout ends it
    with an MptlsTimeoutError that says the limit, and no socket
    stays open."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    # the one connection a backlog of 0 admits fills the queue
    filler = socket.create_connection(("127.0.0.1", port))
    try:
        loop = asyncio.get_running_loop()
        before = open_fds()
        started = loop.time()
        with pytest.raises(mptls.MptlsTimeoutError) as caught:
            await asyncio.wait_for(
                mptls.open_connection(
                    "127.0.0.1", port, ssl=pki.client(), connect_timeout=0.3
                ),
                10,
            )
        elapsed = loop.time() - started
        assert open_fds() == before
    finally:
        filler.close()
        listener.close()
    assert str(caught.value) == (
        f"TCP connect to 127.0.0.1:{port} timed out after 0.3 s "
        "(connect_timeout)"
    )
    assert isinstance(caught.value, TimeoutError)
    # the kernel's first SYN retransmission would come after 1 s
    assert 0.3 <= elapsed < 5


@pytest.mark.parametrize(
    ("host", "family", "expected"),
    [
        ("192.0.2.7", socket.AF_UNSPEC, (socket.AF_INET, ("192.0.2.7", 5))),
        (
            "2001:db8::7",
            socket.AF_UNSPEC,
            (socket.AF_INET6, ("2001:db8::7", 5, 0, 0)),
        ),
        (
            "2001:db8::7",
            socket.AF_INET6,
            (socket.AF_INET6, ("2001:db8::7", 5, 0, 0)),
        ),
        # left to getaddrinfo: a name, a scope id, another family
        ("localhost", socket.AF_UNSPEC, None),
        ("fe80::1%lo", socket.AF_UNSPEC, None),
        ("192.0.2.7", socket.AF_INET6, None),
        ("", socket.AF_UNSPEC, None),
    ],
)
def test_only_ip_literals_skip_the_lookup(
    host: str, family: int, expected: object
) -> None:
    assert numeric_address(host, 5, family) == expected


def _no_lookup(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, int]]:
    """Every getaddrinfo of the running loop, with its flags, fails the
    lookup at once: nothing leaves for a resolver."""
    loop = asyncio.get_running_loop()
    asked: list[tuple[object, int]] = []

    async def lookup(
        host: object, *args: object, flags: int = 0, **kw: object
    ) -> object:
        asked.append((host, flags))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(loop, "getaddrinfo", lookup)
    return asked


@pytest.mark.parametrize(
    "backend", ["userspace", pytest.param("kernel", marks=pytest.mark.kernel)]
)
@pytest.mark.parametrize("host", ["127.0.0.1", "::ffff:127.0.0.1"])
async def test_a_connect_to_an_ip_literal_asks_no_resolver(
    pki: Pki, backend: str, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop runs getaddrinfo in a thread: a connect from and to IP
    literals, every connection of a server given by address, does
    without that hop. ``::ffff:127.0.0.1`` from an IPv4 local address
    is 127.0.0.1, as getaddrinfo would map it."""
    if backend == "kernel" and not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    server = await start_on_loopback(pki, backend=backend)
    port = server.sockets[0].getsockname()[1]
    asked = _no_lookup(monkeypatch)
    try:
        _, writer = await mptls.open_connection(
            host,
            port,
            ssl=pki.client(),
            server_hostname="127.0.0.1",
            backend=backend,
            local_addrs=["127.0.0.1"],
        )
        assert writer.get_extra_info("peername")[:2] == ("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert asked == []


@pytest.mark.parametrize(
    "backend", ["userspace", pytest.param("kernel", marks=pytest.mark.kernel)]
)
@pytest.mark.parametrize(
    ("local", "host", "local_family", "host_family"),
    [
        ("127.0.0.1", "::1", "IPv4", "IPv6"),
        ("::1", "127.0.0.1", "IPv6", "IPv4"),
    ],
)
async def test_a_host_literal_of_the_other_family_says_so(
    pki: Pki,
    backend: str,
    local: str,
    host: str,
    local_family: str,
    host_family: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first subflow cannot leave an address of one family for an
    address of the other: the error says that, on both backends, where
    getaddrinfo's answer made it a failed lookup ("cannot resolve host
    '::1'") of an address that needs none. Still a ConnectError with
    getaddrinfo's errno for it (EAI_ADDRFAMILY)."""
    skip_without_ipv6(None)
    if backend == "kernel" and not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    asked = _no_lookup(monkeypatch)
    before = open_fds()
    with pytest.raises(ConnectError) as caught:
        await mptls.open_connection(
            host,
            9,
            ssl=pki.client(),
            backend=backend,
            local_addrs=[local],
        )
    where = f"[{host}]:9" if ":" in host else f"{host}:9"
    assert str(caught.value) == (
        f"cannot connect to {where} from an {local_family} local address: "
        f"the host is an {host_family} address"
    )
    assert caught.value.errno == socket.EAI_ADDRFAMILY
    assert asked == []
    assert open_fds() == before


@pytest.mark.parametrize(
    "backend", ["userspace", pytest.param("kernel", marks=pytest.mark.kernel)]
)
async def test_a_scoped_ip_literal_is_never_a_name_to_look_up(
    pki: Pki, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getaddrinfo reads a scope id (``fe80::1%eth0``); one it cannot use
    (an interface that does not exist, a scope on an address that takes
    none) made it look the whole string up as a host name, a query to
    the network's resolver for an IP literal. Asked with AI_NUMERICHOST,
    it fails instead."""
    if backend == "kernel" and not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    asked = _no_lookup(monkeypatch)
    with pytest.raises(ConnectError) as caught:
        await mptls.open_connection(
            "fe80::1%mptls-none", 9, ssl=pki.client(), backend=backend
        )
    assert caught.value.errno == socket.EAI_NONAME
    assert asked
    for host, flags in asked:
        assert host == "fe80::1%mptls-none"
        assert flags & socket.AI_NUMERICHOST


@pytest.mark.parametrize("callback", [None, 5, "handler"])
async def test_a_server_callback_that_cannot_be_called_is_refused(
    pki: Pki, callback: Any
) -> None:
    # the server listened, then failed every client: each one logged
    # with a TypeError traceback and reset
    with pytest.raises(ConfigurationError) as refused:
        await mptls.start_server(callback, "127.0.0.1", 0, ssl=pki.server())
    assert str(refused.value) == (
        f"client_connected_cb must be callable, got {callback!r}"
    )


async def test_a_protocol_factory_that_cannot_be_called_is_refused(
    pki: Pki,
) -> None:
    loop_server = await asyncio.start_server(noop, "127.0.0.1", 0)
    async with loop_server:
        port = loop_server.sockets[0].getsockname()[1]
        with pytest.raises(ConfigurationError, match="protocol_factory"):
            await mptls.create_connection(
                None,  # type: ignore[arg-type]
                "127.0.0.1",
                port,
                ssl=pki.client(),
            )
    with pytest.raises(ConfigurationError, match="protocol_factory"):
        await mptls.create_server(
            object(),  # type: ignore[arg-type]
            "127.0.0.1",
            0,
            ssl=pki.server(),
        )


@pytest.mark.parametrize(
    "backend", ["userspace", pytest.param("kernel", marks=pytest.mark.kernel)]
)
async def test_start_serving_a_closed_server_says_it_is_closed(
    pki: Pki, backend: str
) -> None:
    # asyncio's server raised a bare TypeError ("'NoneType' object is
    # not iterable") and then reported itself serving
    if backend == "kernel" and not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    server = await start_on_loopback(pki, backend=backend, start_serving=False)
    server.close()
    await server.wait_closed()

    with pytest.raises(RuntimeError, match="is closed"):
        await server.start_serving()
    assert not server.is_serving()


async def test_a_wrong_host_name_is_caught_as_stdlib_ssl_reports_it(
    pki: Pki,
) -> None:
    # code written for asyncio streams over stdlib ssl catches a failed
    # certificate check as ssl.SSLCertVerificationError; so it does here
    server = await start_on_loopback(pki)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            await mptls.open_connection(
                "127.0.0.1",
                port,
                ssl=pki.client(),
                server_hostname="127.0.0.4",
            )
    error = caught.value
    assert isinstance(error, mptls.CertificateError)
    assert isinstance(error, ssl.SSLError)
    assert error.reason == "CERTIFICATE_VERIFY_FAILED"
    assert error.verify_code == X509_V_ERR_IP_ADDRESS_MISMATCH
    assert str(error) == error.verify_message
    assert str(error).startswith("server certificate verify failed")
    # stdlib's errno for a failure in the TLS library itself
    assert error.errno == ssl.SSL_ERROR_SSL
    assert error.strerror == str(error)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (mptls.PeerResetError("peer reset", reset_reason=6), errno.ECONNRESET),
        (mptls.PathsLostError("every subflow closed"), errno.ECONNRESET),
        (
            mptls.JoinRefusedError("the join was refused", reset_reason=1),
            errno.ECONNRESET,
        ),
        (mptls.TLSError("handshake failure", alert=40), ssl.SSL_ERROR_SSL),
        (mptls.CertificateError("verify failed", verify_code=10), 1),
    ],
)
def test_errors_carry_the_errno_stdlib_gives_the_same_failure(
    error: OSError, code: int
) -> None:
    # code written for asyncio may test e.errno (ECONNRESET after a
    # reset, SSL_ERROR_SSL after a TLS failure); the message reads as
    # it did, without "[Errno N]", and survives a pickle
    assert error.errno == code
    assert error.strerror == error.args[0]
    assert str(error) == error.args[0]
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (copy.errno, str(copy)) == (code, str(error))
    assert copy.__dict__ == error.__dict__


@pytest.mark.parametrize(
    ("raised", "kind", "also"),
    [
        (
            ConnectionResetError(errno.ECONNRESET, "reset"),
            mptls.PeerResetError,
            ConnectionResetError,
        ),
        (
            BrokenPipeError(errno.EPIPE, "pipe"),
            mptls.PeerResetError,
            ConnectionResetError,
        ),
        (
            TimeoutError(errno.ETIMEDOUT, "timed out"),
            mptls.MptlsTimeoutError,
            TimeoutError,
        ),
        (
            OSError(errno.EHOSTUNREACH, "unreachable"),
            mptls.PathsLostError,
            OSError,
        ),
    ],
)
def test_a_socket_transports_error_keeps_its_kind(
    raised: OSError, kind: type[Exception], also: type[Exception]
) -> None:
    # the kernel backend's socket ends a connection with the system's
    # errors: the application gets them in mptls's tree, of the kind
    # asyncio's code catches (a timeout is no reset)
    error = _in_mptls_tree(raised, "")
    assert isinstance(error, kind)
    assert isinstance(error, also)
    assert error.__cause__ is raised
    assert raised.strerror in str(error)
    already = mptls.TLSError("x")
    assert _in_mptls_tree(already, "") is already
    assert _in_mptls_tree(None, "") is None


async def test_port_in_use_is_a_connect_error(pki: Pki) -> None:
    first = await start_on_loopback(pki)
    async with first:
        port = first.sockets[0].getsockname()[1]
        with pytest.raises(OSError) as caught:
            await mptls.start_server(
                noop, "127.0.0.1", port, ssl=pki.server(), reuse_port=False
            )
    assert isinstance(caught.value, ConnectError)
    assert caught.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{port}" in str(caught.value)


async def test_unknown_host_is_named(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()

    async def no_such_name(*args: object, **kw: object) -> object:
        # no lookup leaves the process: the resolver's answer is faked
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(loop, "getaddrinfo", no_such_name)
    with pytest.raises(ConnectError) as caught:
        await mptls.open_connection(
            "no-such-host.invalid", 4433, ssl=pki.client()
        )
    message = str(caught.value)
    assert "'no-such-host.invalid'" in message
    assert "Name or service not known" in message
    assert caught.value.errno == socket.EAI_NONAME


@pytest.mark.parametrize("announce", ["127.0.0.2", ["x"], [("127.0.0.2", 1)]])
async def test_kernel_backend_checks_announce_first(
    pki: Pki, announce: object
) -> None:
    # refused before any socket or netlink request exists
    with pytest.raises(ConfigurationError, match="announce"):
        await start_on_loopback(pki, backend="kernel", announce=announce)


def _kernel_mptcp() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262).close()
    except OSError:
        return False
    return True


async def test_kernel_backend_refusals_are_connect_errors(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _kernel_mptcp():
        pytest.skip("the running kernel has no usable MPTCP")
    first = await start_on_loopback(pki, backend="kernel")
    async with first:
        port = first.sockets[0].getsockname()[1]
        with pytest.raises(ConnectError) as caught:
            await mptls.start_server(
                noop,
                "127.0.0.1",
                port,
                ssl=pki.server(),
                backend="kernel",
                reuse_address=False,
            )
        assert caught.value.errno == errno.EADDRINUSE
        assert str(port) in str(caught.value)

    async def no_such_name(*args: object, **kw: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(
        asyncio.get_running_loop(), "getaddrinfo", no_such_name
    )
    with pytest.raises(OSError) as looked_up:
        await mptls.open_connection(
            "no-such-host.invalid", 4433, ssl=pki.client(), backend="kernel"
        )
    assert isinstance(looked_up.value, ConnectError)
    assert "'no-such-host.invalid'" in str(looked_up.value)


async def test_a_failing_protocol_factory_is_raised_at_once(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    # the client raises the factory's own error as soon as TLS is up,
    # not the handshake timeout; the server logs its own and resets
    class Refused(Exception):
        pass

    def refuse() -> asyncio.Protocol:
        raise Refused("no protocol today")

    server = await mptls.create_server(
        refuse, "127.0.0.1", 0, ssl=pki.server()
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(Refused):
            await asyncio.wait_for(
                mptls.create_connection(
                    refuse, "127.0.0.1", port, ssl=pki.client()
                ),
                5,
            )
        _, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        # the server's factory fails once the client's Finished is in,
        # and the server resets the connection
        with pytest.raises(mptls.PeerResetError):
            await asyncio.wait_for(writer.wait_closed(), 5)
    assert "protocol factory failed" in caplog.text


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("connect_timeout", "5"),
        ("connect_timeout", -1),
        ("connect_timeout", float("nan")),
        ("close_timeout", "x"),
        ("close_timeout", 0),
        ("config", 5),
        ("happy_eyeballs_delay", -0.5),
        ("interleave", -1),
    ],
)
async def test_client_backend_options_are_checked_at_the_call(
    pki: Pki, option: str, value: object
) -> None:
    # refused before any connect (port 9 would only refuse it)
    with pytest.raises(ConfigurationError, match=option):
        await mptls.open_connection(
            "127.0.0.1", 9, ssl=pki.client(), **{option: value}
        )


@pytest.mark.parametrize("value", ["5", 0, -1, float("nan"), 1e9, True])
async def test_a_bad_key_rotation_interval_is_refused_at_the_call(
    pki: Pki, value: object
) -> None:
    with pytest.raises(ConfigurationError, match="key_rotation_interval"):
        await mptls.open_connection(
            "127.0.0.1",
            9,
            ssl=pki.client(),
            mode="e",
            key_rotation_interval=value,
        )
    with pytest.raises(ConfigurationError, match="key_rotation_interval"):
        await start_on_loopback(pki, mode="e", key_rotation_interval=value)


async def test_a_rotation_interval_without_mode_e_is_refused(
    pki: Pki,
) -> None:
    # only E rotates: without E the interval would be dropped in
    # silence, where the CLI refuses --rotate-every
    with pytest.raises(ConfigurationError, match="needs mode E"):
        await mptls.open_connection(
            "127.0.0.1", 9, ssl=pki.client(), key_rotation_interval=5
        )
    with pytest.raises(ConfigurationError, match="needs mode E"):
        await start_on_loopback(
            pki, modes=["G", "rfc8684"], key_rotation_interval=5
        )
    # a server that accepts E next to G rotates its E connections
    server = await start_on_loopback(
        pki, modes=["G", "E"], key_rotation_interval=5
    )
    server.close()
    await server.wait_closed()


async def test_an_unknown_mode_names_the_modes(pki: Pki) -> None:
    with pytest.raises(ConfigurationError, match="'G', 'E' or 'rfc8684'"):
        await mptls.open_connection("127.0.0.1", 9, ssl=pki.client(), mode="H")


@pytest.mark.parametrize(
    ("option", "value"),
    [("close_timeout", "x"), ("join_handoff", 5), ("config", 5)],
)
async def test_server_backend_options_are_checked_at_the_call(
    pki: Pki, option: str, value: object
) -> None:
    with pytest.raises(ConfigurationError, match=option):
        await start_on_loopback(pki, **{option: value})


async def test_a_userspace_option_on_the_kernel_backend_names_its_stand_in(
    pki: Pki,
) -> None:
    # close_timeout is the userspace backend's; the kernel backend's
    # close is bounded by asyncio's own ssl_shutdown_timeout
    with pytest.raises(ConfigurationError) as caught:
        await mptls.open_connection(
            "127.0.0.1",
            9,
            ssl=pki.client(),
            backend="kernel",
            close_timeout=1.0,
        )
    message = str(caught.value)
    assert "close_timeout" in message
    assert "for close_timeout, use ssl_shutdown_timeout" in message
    assert "manage_paths" in message


async def test_announce_addrs_on_the_kernel_backend_names_announce(
    pki: Pki,
) -> None:
    # the README's announce_addrs=[(ip, port)] is the userspace
    # backend's; a kernel server announces addresses alone, on its port
    with pytest.raises(ConfigurationError) as caught:
        await start_on_loopback(
            pki, backend="kernel", announce_addrs=[("127.0.0.2", 4433)]
        )
    assert "for announce_addrs, use announce=[address, ...]" in str(
        caught.value
    )


@pytest.mark.parametrize("address", ["224.0.0.1", "0.0.0.0", "ff02::1"])
async def test_the_kernel_backend_announces_no_address_that_names_no_peer(
    pki: Pki, address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # refused before the listen, and so before any kernel endpoint is
    # added: were it not, the test stops there, not in the system's table
    def no_listen(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{address} reached the listen")

    monkeypatch.setattr(kernel_sockets, "listening_sockets", no_listen)
    with pytest.raises(ConfigurationError, match="unicast address"):
        await start_on_loopback(pki, backend="kernel", announce=[address])


@pytest.mark.parametrize(
    "options",
    [{"mode": "E"}, {"mode": "G"}, {"key_rotation_interval": 5.0}],
    ids=["mode-E", "mode-G", "interval"],
)
async def test_a_mode_on_the_kernel_backend_says_which_backend_has_it(
    pki: Pki, options: dict[str, object]
) -> None:
    # a newcomer trying mode E (or rotation) with backend="kernel" was
    # told only that the option is unknown there
    with pytest.raises(ConfigurationError) as caught:
        await mptls.open_connection(
            "127.0.0.1", 9, ssl=pki.client(), backend="kernel", **options
        )
    assert "own RFC 8684 MPTCP" in str(caught.value)
    assert "backend='userspace'" in str(caught.value)
    with pytest.raises(ConfigurationError, match="backend='userspace'"):
        await start_on_loopback(pki, backend="kernel", modes=["E"])


@pytest.mark.parametrize(
    ("keyword", "advice"),
    [
        ("all_errors", "raises one error"),
    ],
)
async def test_asyncio_keywords_mptls_does_not_take_say_what_to_do(
    pki: Pki, keyword: str, advice: str
) -> None:
    # a program moved from asyncio meets these first
    with pytest.raises(ConfigurationError, match=f"{keyword}= is asyncio's"):
        await mptls.open_connection(
            "127.0.0.1", 4433, ssl=pki.client(), **{keyword: None}
        )
    with pytest.raises(ConfigurationError, match=advice):
        await mptls.open_connection(
            "127.0.0.1", 4433, ssl=pki.client(), **{keyword: None}
        )


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"local_addr": ("127.0.0.1", 5555)}, "port must be 0"),
        ({"local_addr": ("127.0.0.1", True)}, "port must be 0"),
        ({"local_addr": "127.0.0.1"}, "pair"),
        ({"local_addr": ("127.0.0.1",)}, "pair"),
        # the errors named local_addrs, which the caller never passed
        ({"local_addr": ("localhost", 0)}, "local_addr's address must be"),
        (
            {"local_addr": ("127.0.0.1", 0), "sock": "a connected socket"},
            "pass local_addr or sock=",
        ),
        (
            {"local_addr": ("127.0.0.1", 0), "local_addrs": ["127.0.0.1"]},
            "not both",
        ),
    ],
)
async def test_a_local_addr_mptls_cannot_keep_says_why(
    pki: Pki, options: dict[str, object], reason: str
) -> None:
    if "sock" not in options:
        with pytest.raises(ConfigurationError, match=reason):
            await mptls.open_connection(
                "127.0.0.1", 4433, ssl=pki.client(), **options
            )
        return
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        with (
            socket.create_connection(listening.getsockname()) as sock,
            pytest.raises(ConfigurationError, match=reason),
        ):
            await mptls.open_connection(
                ssl=pki.client(),
                server_hostname="localhost",
                **{**options, "sock": sock},
            )


@pytest.mark.parametrize(
    ("keyword", "advice"),
    [
        ("keep_alive", "find dead paths"),
    ],
)
async def test_asyncio_server_keywords_say_what_to_do(
    pki: Pki, keyword: str, advice: str
) -> None:
    with pytest.raises(ConfigurationError, match=advice):
        await mptls.create_server(
            asyncio.Protocol,
            "127.0.0.1",
            0,
            ssl=pki.server(),
            **{keyword: None},
        )


@pytest.mark.parametrize(
    ("family", "kind", "where", "reason"),
    [
        (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0), "not both"),
        (socket.AF_INET, socket.SOCK_DGRAM, (None, None), "TCP socket"),
        (socket.AF_UNIX, socket.SOCK_STREAM, (None, None), "TCP socket"),
    ],
)
async def test_a_socket_to_listen_on_is_checked(
    pki: Pki, family: int, kind: int, where: tuple[Any, Any], reason: str
) -> None:
    with (
        socket.socket(family, kind) as sock,
        pytest.raises(ConfigurationError, match=reason),
    ):
        await mptls.start_server(noop, *where, ssl=pki.server(), sock=sock)


def test_a_local_addrs_scope_id_is_kept() -> None:
    # getsockname() gives a link-local address as (ip, port, flowinfo,
    # scope id); the scope was dropped, and the bind failed (EINVAL)
    loopback = socket.if_nametoindex("lo")
    options: dict[str, Any] = {"local_addr": ("fe80::1", 0, 0, loopback)}
    assert take_local_addr(options, None) == ["fe80::1%lo"]
    options = {"local_addr": ("::1", 0, 0, 0)}
    assert take_local_addr(options, None) == ["::1"]


async def test_a_local_addrs_unknown_scope_id_says_so(pki: Pki) -> None:
    unknown = max(index for index, _ in socket.if_nameindex()) + 1
    with pytest.raises(ConfigurationError, match="scope id"):
        await mptls.open_connection(
            "::1",
            9,
            ssl=pki.client(),
            local_addr=("fe80::1", 0, 0, unknown),
        )


@pytest.mark.parametrize(
    ("address", "kind"),
    [("224.0.0.1", mptls.AddressError), ("::1%lo", ConfigurationError)],
)
async def test_a_bad_local_addr_is_named_as_the_caller_wrote_it(
    pki: Pki, address: str, kind: type[Exception]
) -> None:
    # the error named "local_addrs entry", a keyword the caller never
    # passed; refused before any lookup or connect
    with pytest.raises(kind, match=r"^local_addr's address "):
        await mptls.open_connection(
            "127.0.0.1", 9, ssl=pki.client(), local_addr=(address, 0)
        )


async def test_a_tls_socket_is_refused_as_sock(pki: Pki) -> None:
    # asyncio's loop raised a bare TypeError from inside for one
    context = ssl.create_default_context()
    with socket.socket() as plain:
        wrapped = context.wrap_socket(
            plain, server_hostname="localhost", do_handshake_on_connect=False
        )
        with wrapped:
            with pytest.raises(ConfigurationError, match="SSLSocket"):
                await mptls.open_connection(
                    ssl=pki.client(), server_hostname="localhost", sock=wrapped
                )
            with pytest.raises(ConfigurationError, match="SSLSocket"):
                await mptls.start_server(noop, ssl=pki.server(), sock=wrapped)


async def test_a_socket_to_listen_on_is_open_and_unconnected(
    pki: Pki,
) -> None:
    # listen() failed on each, and the error named no address: "cannot
    # listen on None:0: Bad file descriptor" ("Invalid argument")
    closed = socket.socket()
    closed.close()
    with pytest.raises(ConfigurationError, match="sock is closed"):
        await mptls.start_server(noop, ssl=pki.server(), sock=closed)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        with (
            socket.create_connection(listening.getsockname()) as connected,
            pytest.raises(ConfigurationError, match="connected"),
        ):
            await mptls.start_server(noop, ssl=pki.server(), sock=connected)


@pytest.mark.parametrize("family", [socket.AF_UNIX, "AF_INET", True, None])
async def test_a_family_is_one_of_ips(pki: Pki, family: object) -> None:
    with pytest.raises(ConfigurationError, match="family must be"):
        await mptls.open_connection(
            "127.0.0.1", 4433, ssl=pki.client(), family=family
        )
    with pytest.raises(ConfigurationError, match="family must be"):
        await start_on_loopback(pki, family=family)


async def test_a_family_and_a_local_address_of_another_say_so(
    pki: Pki,
) -> None:
    with pytest.raises(ConfigurationError, match="another family"):
        await mptls.open_connection(
            "::1",
            4433,
            ssl=pki.client(),
            family=socket.AF_INET6,
            local_addrs=["127.0.0.1"],
        )


@pytest.mark.parametrize(
    ("host", "family", "name"),
    [
        ("::1", socket.AF_INET, "AF_INET"),
        ("127.0.0.1", socket.AF_INET6, "AF_INET6"),
    ],
)
async def test_a_host_literal_of_another_family_than_asked_says_so(
    pki: Pki,
    host: str,
    family: int,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no local address was given: the error blamed one
    asked = _no_lookup(monkeypatch)
    with pytest.raises(ConnectError) as caught:
        await mptls.open_connection(host, 9, ssl=pki.client(), family=family)
    where = f"[{host}]:9" if ":" in host else f"{host}:9"
    version = "IPv6" if ":" in host else "IPv4"
    assert str(caught.value) == (
        f"cannot connect to {where} with family={name}: the host is an "
        f"{version} address"
    )
    assert caught.value.errno == socket.EAI_ADDRFAMILY
    assert asked == []


async def test_the_kernel_backend_takes_no_family(pki: Pki) -> None:
    with pytest.raises(ConfigurationError, match="userspace backend only"):
        await mptls.open_connection(
            "127.0.0.1",
            4433,
            ssl=pki.client(),
            family=socket.AF_INET,
            backend="kernel",
        )
    with pytest.raises(ConfigurationError, match="userspace backend only"):
        await start_on_loopback(pki, family=socket.AF_INET, backend="kernel")


@pytest.mark.parametrize(
    ("kind", "options", "reason"),
    [
        (socket.SOCK_STREAM, {"host": "127.0.0.1", "port": 1}, "not both"),
        (socket.SOCK_STREAM, {"local_addrs": ["127.0.0.1"]}, "not both"),
        (socket.SOCK_STREAM, {}, "must be connected"),
        (socket.SOCK_DGRAM, {}, "TCP socket"),
    ],
)
async def test_a_socket_to_connect_over_is_checked(
    pki: Pki, kind: int, options: dict[str, Any], reason: str
) -> None:
    with (
        socket.socket(socket.AF_INET, kind) as sock,
        pytest.raises(ConfigurationError, match=reason),
    ):
        await mptls.open_connection(
            ssl=pki.client(), sock=sock, server_hostname="localhost", **options
        )


async def test_a_socket_the_server_reset_is_a_connection_error(
    pki: Pki,
) -> None:
    # the application connected it, then the server reset it before the
    # call: that was "sock must be connected", a ConfigurationError that
    # blamed the caller's argument, and the socket stayed open
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        sock = socket.create_connection(listening.getsockname())
        accepted, _ = listening.accept()
        # SO_LINGER with a zero timeout: the close is a TCP reset
        accepted.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0"
        )
        accepted.close()
        # readable once the reset came, which a read would consume
        assert select.select([sock], [], [], 10)[0] == [sock]
        with pytest.raises(PeerResetError) as raised:
            await mptls.open_connection(
                ssl=pki.client(), sock=sock, server_hostname="localhost"
            )
    assert raised.value.errno == errno.ECONNRESET
    assert "reset the connection of sock=" in str(raised.value)
    assert sock.fileno() == -1


@contextlib.contextmanager
def connected_socket() -> Iterator[socket.socket]:
    """A TCP socket connected to a local listener that never accepts it:
    a ``sock=`` nothing answers on, so that only mptls's checks of the
    socket itself can end the call."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        with socket.create_connection(listening.getsockname()) as sock:
            yield sock


async def test_a_socket_shut_for_writing_is_refused_as_such(
    pki: Pki,
) -> None:
    # the caller's shutdown(SHUT_WR) failed the first write with EPIPE,
    # which was reported as the server's reset (PeerResetError)
    with connected_socket() as sock:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5.0)
        with pytest.raises(ConfigurationError, match="shut for writing"):
            await mptls.open_connection(
                ssl=pki.client(), sock=sock, server_hostname="localhost"
            )
        # refused before it was taken: still the caller's, as it was
        assert sock.fileno() != -1
        assert sock.gettimeout() == 5.0


async def test_a_socket_refused_for_another_argument_is_as_it_was(
    pki: Pki,
) -> None:
    # the check for a shut socket makes it non-blocking for a moment
    with connected_socket() as sock:
        sock.settimeout(5.0)
        with pytest.raises(ConfigurationError, match="handshake"):
            await mptls.open_connection(
                ssl=pki.client(),
                sock=sock,
                server_hostname="localhost",
                ssl_handshake_timeout=-1,
            )
        assert sock.gettimeout() == 5.0


async def test_a_socket_a_live_connection_carries_is_refused(
    pki: Pki,
) -> None:
    # as asyncio's loop refuses a socket one of its transports uses
    # (3.12+), leaving both alone: the second call closed the socket
    # under the first connection (3.12+), or wrote a ClientHello into
    # its stream (3.11)
    server = await mptls.start_server(echo, "127.0.0.1", 0, ssl=pki.server())
    async with server:
        port = server.sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as sock:
            reader, writer = await mptls.open_connection(
                ssl=pki.client(), sock=sock, server_hostname="localhost"
            )
            with pytest.raises(SocketInUseError) as raised:
                await mptls.open_connection(
                    ssl=pki.client(), sock=sock, server_hostname="localhost"
                )
            assert isinstance(raised.value, RuntimeError)
            assert sock.fileno() != -1
            await still_echoes(reader, writer, b"still there")


def refuse_sockets_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make Python 3.11's loop refuse a socket one of its transports
    uses, as the loop of 3.12 and later does on its own (its
    ``_make_socket_transport`` asks ``_ensure_fd_no_transport`` first)."""
    loop = asyncio.get_running_loop()
    make = loop._make_socket_transport  # type: ignore[attr-defined]

    def checked(sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
        loop._ensure_fd_no_transport(sock)  # type: ignore[attr-defined]
        return make(sock, *args, **kwargs)

    monkeypatch.setattr(loop, "_make_socket_transport", checked)


async def test_a_socket_another_transport_uses_is_left_to_it(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the loop refused it before taking it, and mptls closed it under
    # the transport that uses it
    if sys.version_info < (3, 12):
        refuse_sockets_in_use(monkeypatch)
    with connected_socket() as sock:
        _, writer = await asyncio.open_connection(sock=sock)
        with pytest.raises(SocketInUseError):
            await mptls.open_connection(
                ssl=pki.client(), sock=sock, server_hostname="localhost"
            )
        assert sock.fileno() != -1
        assert not writer.is_closing()
        writer.close()
        await writer.wait_closed()


def test_on_uvloop_a_socket_another_transport_uses_is_left_to_it(
    pki: Pki,
) -> None:
    # uvloop refuses it with libuv's EEXIST, which read as a failed
    # connect: "cannot connect to ...: File exists" (a ConnectError);
    # its descriptor stays the other transport's, though uvloop detaches
    # the socket object from it
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen(1)
            with socket.create_connection(listening.getsockname()) as sock:
                _, writer = await asyncio.open_connection(sock=sock)
                descriptor = sock.fileno()
                with pytest.raises(SocketInUseError) as raised:
                    await mptls.open_connection(
                        ssl=pki.client(),
                        sock=sock,
                        server_hostname="localhost",
                    )
                assert isinstance(raised.value.__cause__, FileExistsError)
                assert "in use by the loop" in str(raised.value)
                assert not writer.is_closing()
                os.fstat(descriptor)
                writer.write(b"still there")
                await writer.drain()
                writer.close()
                await writer.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_the_kernel_backend_connects_its_own_sockets(pki: Pki) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        with (
            socket.create_connection(listening.getsockname()) as sock,
            pytest.raises(ConfigurationError, match="its own MPTCP"),
        ):
            await mptls.open_connection(
                ssl=pki.client(),
                sock=sock,
                server_hostname="localhost",
                backend="kernel",
            )
    # said first: an unconnected one was told to connect, only to be
    # refused then
    with (
        socket.socket() as sock,
        pytest.raises(ConfigurationError, match="its own MPTCP"),
    ):
        await mptls.open_connection(
            ssl=pki.client(),
            sock=sock,
            server_hostname="localhost",
            backend="kernel",
        )


async def test_the_kernel_backend_makes_its_own_listening_sockets(
    pki: Pki,
) -> None:
    with (
        socket.socket() as sock,
        pytest.raises(ConfigurationError, match="its own MPTCP"),
    ):
        await mptls.start_server(
            noop, ssl=pki.server(), sock=sock, backend="kernel"
        )


async def test_a_server_is_not_told_of_client_keywords(pki: Pki) -> None:
    # local_addr is asyncio's for clients only: a server names it as
    # unknown rather than pointing to local_addrs, which it does not take
    with pytest.raises(ConfigurationError) as raised:
        await mptls.create_server(
            asyncio.Protocol,
            "127.0.0.1",
            0,
            ssl=pki.server(),
            local_addr=("127.0.0.1", 0),
        )
    assert "local_addrs" not in str(raised.value)


async def test_a_server_without_ssl_says_what_it_needs() -> None:
    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.close()

    with pytest.raises(ConfigurationError, match="a server needs ssl="):
        await mptls.start_server(handle, "127.0.0.1", 0)


async def test_an_address_family_without_sockets_is_skipped() -> None:
    """A host's IPv6 address on a machine that makes no IPv6 sockets
    (EAFNOSUPPORT: IPv6 disabled) is one failed address: the next one
    is tried, as asyncio's own loop over the addresses did, where the
    error ended the connect before any IPv4 address was tried."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def new_socket(family: int) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    addresses = [
        (socket.AF_INET6, ("::1", port, 0, 0)),
        (socket.AF_INET, ("127.0.0.1", port)),
    ]
    try:
        sock = await connect_any(
            "localhost",
            port,
            addresses,
            local=None,
            new_socket=new_socket,
            connect=loop.sock_connect,
        )
        assert sock.getpeername() == ("127.0.0.1", port)
        sock.close()
        with pytest.raises(BackendError) as caught:
            await connect_any(
                "localhost",
                port,
                addresses[:1],
                local=None,
                new_socket=new_socket,
                connect=loop.sock_connect,
            )
    finally:
        listener.close()
    unsupported = os.strerror(errno.EAFNOSUPPORT)
    assert (
        str(caught.value)
        == f"cannot connect to localhost:{port}: {unsupported}"
    )
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.EAFNOSUPPORT
