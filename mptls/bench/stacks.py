"""The stacks a benchmark puts side by side, both ends of each.

A *stack* is what a user could pick to move bytes securely (or, for the
ceilings, not securely): mptls on either backend, asyncio streams with
the standard library's ``ssl``, plain asyncio TCP, and asyncio over a
kernel MPTCP socket. Every server speaks the same tiny benchmark
protocol, so that only the stack differs:

- ``S`` and an 8-byte length: the server reads that many bytes and
  answers ``K`` with the count (bulk transfers; no half-close needed,
  which stdlib ``ssl`` transports cannot do);
- ``E``: the server echoes every byte back until the client leaves
  (round trips, idle connections).

This module must never listen or connect anywhere but the addresses it
is given, which the scenarios take from loopback or their own
namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

import mptls
from mptls.backends.base import Server
from mptls.backends.kernel.sockets import connect_socket
from mptls.errors import MptlsError

IPPROTO_MPTCP = 262
STREAM_LIMIT = 1 << 20
CHUNK = 256 * 1024
READ_SIZE = 1 << 20
_LENGTH = struct.Struct("!Q")

# names on the benchmark server's certificate: loopback and every
# documentation-range address a namespace topology hands out
CERT_NAMES = (
    "localhost",
    "127.0.0.1",
    "127.0.0.2",
    "127.0.0.3",
    "::1",
    "192.0.2.2",
    "198.51.100.2",
    "203.0.113.2",
)

STACKS = (
    "mptls",
    "mptls-kernel",
    "ssl",
    "ssl-mptcp",
    "tcp",
    "mptcp",
)


@dataclass(frozen=True, slots=True)
class Pki:
    """A throwaway CA and a server certificate, as files."""

    ca: Path
    chain: Path
    key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> Pki:
        """The files :func:`write_pki` writes into ``directory``; child
        processes find them by the directory alone."""
        return cls(
            directory / "ca.pem", directory / "chain.pem", directory / "k"
        )


def write_pki(directory: Path) -> Pki:
    """A fresh CA and server certificate in ``directory``."""
    authority = trustme.CA(organization_name="mptls benchmark CA")
    leaf = authority.issue_cert(*CERT_NAMES)
    pki = Pki.in_directory(directory)
    authority.cert_pem.write_to_path(str(pki.ca))
    leaf.private_key_pem.write_to_path(str(pki.key))
    pki.chain.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    return pki


# the server side


async def _serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        command = await reader.readexactly(1)
        if command == b"S":
            (length,) = _LENGTH.unpack(await reader.readexactly(8))
            await _sink(reader, length)
            writer.write(b"K" + _LENGTH.pack(length))
            await writer.drain()
        elif command == b"E":
            while data := await reader.read(READ_SIZE):
                writer.write(data)
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, MptlsError):
        return
    except asyncio.CancelledError:
        # the server process's own shutdown ends its connections; a
        # handler that ends cancelled makes Python 3.11's stream callback
        # raise from task.exception() and print a traceback
        return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, MptlsError, ssl.SSLError):
            await writer.wait_closed()


async def _sink(reader: asyncio.StreamReader, length: int) -> None:
    left = length
    while left:
        data = await reader.read(min(left, READ_SIZE))
        if not data:
            raise ConnectionError("the client left early")
        left -= len(data)


def _server_ssl(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(pki.chain, pki.key)
    return context


def _mptcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(256)
    sock.setblocking(False)
    return sock


async def start_stack_server(
    stack: str,
    host: str,
    pki: Pki,
) -> asyncio.Server | Server:
    """Listen on ``host`` (any free port) with ``stack``."""
    if stack in ("mptls", "mptls-kernel"):
        backend = "userspace" if stack == "mptls" else "kernel"
        return await mptls.start_server(
            _serve,
            host,
            0,
            ssl=mptls.TLSConfig(certfile=pki.chain, keyfile=pki.key),
            limit=STREAM_LIMIT,
            backend=backend,
        )
    secure = _server_ssl(pki) if stack.startswith("ssl") else None
    if stack in ("mptcp", "ssl-mptcp"):
        return await asyncio.start_server(
            _serve,
            sock=_mptcp_listener(host, 0),
            ssl=secure,
            limit=STREAM_LIMIT,
        )
    return await asyncio.start_server(
        _serve, host, 0, ssl=secure, limit=STREAM_LIMIT
    )


# the client side


def _client_ssl(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


async def _mptcp_socket(
    host: str, port: int, local: str | None
) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
    sock.setblocking(False)
    try:
        if local:
            sock.bind((local, 0))
        # loop.sock_connect would re-resolve with protocol 262, which
        # getaddrinfo refuses; the kernel backend's connect does not
        await connect_socket(asyncio.get_running_loop(), sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_stack(
    stack: str,
    host: str,
    port: int,
    pki: Pki,
    *,
    local_addrs: Sequence[str] = (),
    client_context: Any = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a :func:`start_stack_server` of the same ``stack``.

    ``local_addrs``: mptls takes all of them (one subflow each), the
    other stacks bind to the first. ``client_context`` is reused when
    given (a TLSConfig or SSLContext made once by the caller).
    """
    local = local_addrs[0] if local_addrs else None
    if stack in ("mptls", "mptls-kernel"):
        backend = "userspace" if stack == "mptls" else "kernel"
        return await mptls.open_connection(
            host,
            port,
            ssl=client_context or mptls.TLSConfig(cafile=pki.ca),
            server_hostname=host,
            local_addrs=list(local_addrs) or None,
            backend=backend,
            limit=STREAM_LIMIT,
        )
    secure = None
    if stack.startswith("ssl"):
        secure = client_context or _client_ssl(pki)
    name = host if secure is not None else None
    if stack in ("mptcp", "ssl-mptcp"):
        sock = await _mptcp_socket(host, port, local)
        return await asyncio.open_connection(
            sock=sock, ssl=secure, server_hostname=name, limit=STREAM_LIMIT
        )
    return await asyncio.open_connection(
        host,
        port,
        ssl=secure,
        server_hostname=name,
        local_addr=(local, 0) if local else None,
        limit=STREAM_LIMIT,
    )


def client_context(stack: str, pki: Pki) -> Any:
    """The TLS client settings a stack's connections can share."""
    if stack.startswith("mptls"):
        return mptls.TLSConfig(cafile=pki.ca)
    if stack.startswith("ssl"):
        return _client_ssl(pki)
    return None


async def send_bulk(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    size: int,
) -> None:
    """Send ``size`` bytes and wait until the server has them all."""
    writer.write(b"S" + _LENGTH.pack(size))
    block = memoryview(bytes(CHUNK))
    left = size
    while left:
        step = min(left, CHUNK)
        writer.write(block[:step])
        left -= step
        await writer.drain()
    answer = await reader.readexactly(1 + _LENGTH.size)
    if answer[:1] != b"K" or _LENGTH.unpack(answer[1:])[0] != size:
        raise MptlsError(f"the server did not confirm {size} bytes")


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Close a benchmark connection, ignoring how the peer goes away."""
    writer.close()
    with contextlib.suppress(
        ConnectionError, MptlsError, ssl.SSLError, TimeoutError
    ):
        await asyncio.wait_for(writer.wait_closed(), 10)
