"""Linux MPTCP sockets: creating, connecting, listening, telling fallback.

This module speaks to the socket API only. It resolves names without
asking ``getaddrinfo`` for protocol 262 (the C library refuses it: no
services entry names MPTCP), creates ``IPPROTO_MPTCP`` sockets itself,
and reads the kernel's word on whether a connection really is MPTCP.

It must never quietly swap an MPTCP socket for a TCP one: when the kernel
refuses ``IPPROTO_MPTCP`` it raises, and when a connection falls back to
TCP it says so.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from mptls.backends.base import (
    ONE_BY_ONE,
    AddressRace,
    connect_any,
    host_addresses,
    within_connect_timeout,
)
from mptls.errors import BackendError

logger = logging.getLogger("mptls.backends.kernel")

# include/uapi/linux/in.h and include/linux/socket.h
IPPROTO_MPTCP = 262
SOL_MPTCP = 284
# include/uapi/linux/tcp.h: SOL_TCP option telling whether the socket
# runs MPTCP (0 once a connection has fallen back to TCP).
TCP_IS_MPTCP = 43

# The receive window every kernel-backend socket starts with (see
# open_receive_window): the low-water mark the kernel sizes the receive
# buffer for. It grows the buffer to about twice this, up to half of
# net.ipv4.tcp_rmem's maximum, and autotuning goes on from there.
RECEIVE_WINDOW = 2 * 1024 * 1024

# The errors MPTCP_INFO gives once a connection has fallen back to TCP:
# the request then reaches the plain TCP socket, whose IPv4 side answers
# EOPNOTSUPP and whose IPv6 side answers ENOPROTOOPT.
FALLBACK_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOPROTOOPT})


class MptcpSockopt(IntEnum):
    """SOL_MPTCP getsockopt names (include/uapi/linux/mptcp.h)."""

    MPTCP_INFO = 1
    MPTCP_TCPINFO = 2
    MPTCP_SUBFLOW_ADDRS = 3
    MPTCP_FULL_INFO = 4


# Why an MPTCP socket of ours runs plain TCP, when nothing narrows it
# down. Linux itself gives MPTCP up when handshake packets are lost: it
# sends a client's SYN without MPTCP after MPTCP SYNs went unanswered
# (connected_fallback_state tells), and for every new connection of the
# namespace for a while after (its blackhole backoff), and it falls back
# when the handshake's last packet is lost; the socket shows neither.
FELL_BACK = (
    "fell back to TCP: the peer did not answer with MPTCP, or Linux gave "
    "MPTCP up because handshake packets were lost (on this connection, "
    "or MPTCP SYNs on an earlier one within net.mptcp.blackhole_timeout)"
)

# Retransmitted SYNs after which Linux sends them without MPTCP; 128 or
# more means never. Kernels without the sysctl leave the reason general.
SYN_FALLBACK_SYSCTL = "/proc/sys/net/mptcp/syn_retrans_before_tcp_fallback"
SYN_FALLBACK_NEVER = 128


@dataclass(frozen=True, slots=True)
class FallbackState:
    """Whether a connected socket runs MPTCP, and if not, why not."""

    fallback: bool
    reason: str = ""


def mptcp_socket(family: int) -> socket.socket:
    """A new non-blocking ``IPPROTO_MPTCP`` stream socket.

    Raises :class:`BackendError` when the kernel refuses the protocol
    (MPTCP not built in, or ``net.mptcp.enabled = 0``).
    """
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
    except OSError as exc:
        raise BackendError(
            f"the kernel refused an IPPROTO_MPTCP socket "
            f"({errno.errorcode.get(exc.errno or 0, exc.errno)}): "
            "MPTCP is not built in or net.mptcp.enabled is 0"
        ) from exc
    sock.setblocking(False)
    # asyncio turns Nagle off only for IPPROTO_TCP sockets
    # (base_events._set_nodelay), so MPTCP ones would keep it: a small
    # write behind unacknowledged data (a TLS record, an answer) then
    # waits for the peer's delayed ACK, about 40 ms. The kernel applies
    # the option to every subflow, and accepted sockets inherit it from
    # the listener, fallen-back plain TCP ones included.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    open_receive_window(sock)
    return sock


def open_receive_window(sock: socket.socket) -> None:
    """Start ``sock`` with a receive buffer for :data:`RECEIVE_WINDOW`.

    Linux MPTCP (6.x) stalls a transfer for its 200 ms retransmission
    timer each time a receiver that reads slower than the path has let
    its window close and then fails to announce the reopened window
    (mptcp_cleanup_rbuf in net/mptcp/protocol.c). A buffer that starts
    large instead of growing from tcp_rmem's default makes that rarer.
    SO_RCVLOWAT is the one way to grow it without SO_RCVBUF, which
    would cap it at net.core.rmem_max and turn autotuning off: the
    kernel sizes the buffer for the low-water mark
    (mptcp_set_rcvlowat in net/mptcp/sockopt.c), and a mark set back
    to 1 at once leaves the larger buffer. Accepted sockets inherit it
    from their listener. A kernel that refuses the option only loses
    the head start.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, RECEIVE_WINDOW)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    except OSError as exc:
        logger.debug("receive window left to the kernel: %s", exc)


def socket_protocol(sock: socket.socket) -> int:
    """SO_PROTOCOL: 262 for an MPTCP socket, 6 for plain TCP.

    An MPTCP listener hands out a plain TCP socket for a client that did
    not ask for MPTCP, so on an accepted socket this is the client's
    choice.
    """
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)


def fallback_state(sock: socket.socket) -> FallbackState:
    """Ask the kernel whether ``sock``'s connection runs MPTCP."""
    if socket_protocol(sock) != IPPROTO_MPTCP:
        return FallbackState(True, "the peer did not ask for MPTCP")
    try:
        sock.getsockopt(SOL_MPTCP, MptcpSockopt.MPTCP_INFO, 16)
    except OSError as exc:
        if exc.errno in FALLBACK_ERRNOS:
            return FallbackState(True, FELL_BACK)
        raise
    return FallbackState(False)


def syn_fallback_limit() -> int | None:
    """net.mptcp.syn_retrans_before_tcp_fallback, ``None`` if unreadable.

    Read in the calling thread's network namespace.
    """
    try:
        with open(SYN_FALLBACK_SYSCTL, encoding="ascii") as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def connected_fallback_state(
    sock: socket.socket, syn_retransmissions: int | None
) -> FallbackState:
    """:func:`fallback_state` of a socket this end has just connected.

    ``syn_retransmissions`` is the socket's ``tcpi_total_retrans`` before
    any data: the SYNs sent again. Past the kernel's limit its later
    SYNs carried no MPTCP, so the fallback is this end's kernel's doing
    (lost SYNs or SYN|ACKs, such as a link down at connect), which the
    reason says: the peer may well speak MPTCP.
    """
    state = fallback_state(sock)
    limit = syn_fallback_limit()
    if (
        not state.fallback
        or syn_retransmissions is None
        or limit is None
        or limit >= SYN_FALLBACK_NEVER
        or syn_retransmissions <= limit
    ):
        return state
    return FallbackState(
        True,
        f"fell back to TCP: Linux sent the SYN {syn_retransmissions} more "
        f"times, the last {syn_retransmissions - limit} without MPTCP "
        f"(net.mptcp.syn_retrans_before_tcp_fallback = {limit})",
    )


async def resolve(
    loop: asyncio.AbstractEventLoop,
    host: str | None,
    port: int,
    *,
    family: int = socket.AF_UNSPEC,
    passive: bool = False,
) -> list[tuple[int, tuple[Any, ...]]]:
    """``(family, sockaddr)`` pairs for ``host`` (see ``host_addresses``),
    its lookup's failure a ``BackendError``.

    ``getaddrinfo`` is asked for TCP stream addresses: glibc has no entry
    for protocol 262 and fails with it, and the addresses are the same.
    """
    flags = socket.AI_PASSIVE if passive else 0
    try:
        pairs = await host_addresses(loop, host, port, family, flags=flags)
    except socket.gaierror as exc:
        raise BackendError(f"cannot resolve {host!r}: {exc}") from exc
    if not pairs:
        raise BackendError(f"no IPv4 or IPv6 address for {host!r}")
    return pairs


async def connect(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    *,
    local_addr: str | None = None,
    timeout: float | None = None,
    race: AddressRace = ONE_BY_ONE,
) -> socket.socket:
    """A connected MPTCP socket to ``host``, trying its addresses as
    ``race`` says (one after the other by default).

    With ``local_addr`` the first subflow leaves from that address, and
    only addresses of its family are tried. ``timeout`` bounds the whole
    call, resolution and every address included, as the userspace
    backend's ``connect_timeout`` does; ``None`` leaves it to the
    kernel's SYN retries.
    """
    return await within_connect_timeout(
        _connect(loop, host, port, local_addr, race), host, port, timeout
    )


async def _connect(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    local_addr: str | None,
    race: AddressRace,
) -> socket.socket:
    family: int = socket.AF_UNSPEC
    local: tuple[Any, ...] | None = None
    if local_addr is not None:
        family = address_family(local_addr.partition("%")[0])
        local = (await resolve(loop, local_addr, 0, family=family))[0][1]
    addresses = await resolve(loop, host, port, family=family)
    sock = await connect_any(
        host,
        port,
        addresses,
        local=local,
        new_socket=mptcp_socket,
        connect=lambda sock, address: connect_socket(loop, sock, address),
        race=race,
    )
    logger.debug("connected %s -> %s", sock.getsockname(), sock.getpeername())
    return sock


async def connect_socket(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    address: tuple[Any, ...],
) -> None:
    """Non-blocking connect of ``sock`` to a numeric ``address``.

    ``loop.sock_connect`` cannot be used: it re-resolves the address
    with the socket's own protocol, 262, which getaddrinfo refuses even
    for a numeric address (EAI_SOCKTYPE). This is the same connect, with
    the address already resolved.
    """
    code = sock.connect_ex(address)
    if code == 0:
        return
    if code not in (errno.EINPROGRESS, errno.EAGAIN):
        raise OSError(code, os.strerror(code))
    writable = loop.create_future()
    fd = sock.fileno()

    def on_writable() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(fd, on_writable)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code != 0:
        raise OSError(code, os.strerror(code))


def numeric_family(address: str) -> int | None:
    """AF_INET or AF_INET6 for a numeric address, else ``None``."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address)
        except OSError:
            continue
        return family
    return None


def address_family(address: str) -> int:
    """AF_INET or AF_INET6 for a numeric address."""
    family = numeric_family(address)
    if family is None:
        raise BackendError(f"not a numeric IPv4 or IPv6 address: {address!r}")
    return family


async def listening_sockets(
    loop: asyncio.AbstractEventLoop,
    host: str | Sequence[str] | None,
    port: int,
    *,
    reuse_address: bool = True,
    reuse_port: bool = False,
) -> list[socket.socket]:
    """Bound MPTCP sockets for ``host``; both families when ``None``.

    They listen once an asyncio server serves on them (with its
    ``backlog``), as its own sockets do. Joins aimed at an address the
    server announced with ADD_ADDR reach only a listener there (a
    wildcard one, or one on that address and port), so ``host=None``
    suits a server that announces more than one address.
    """
    hosts: list[str | None] = []
    if host is None or isinstance(host, str):
        # "" is every interface, as None is (asyncio's create_server)
        hosts.append(host or None)
    else:
        hosts.extend(host)
    sockets: list[socket.socket] = []
    try:
        for one_host in hosts:
            for family, address in await resolve(
                loop, one_host, port, passive=True
            ):
                sockets.append(
                    _listen(family, address, reuse_address, reuse_port)
                )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listen(
    family: int,
    address: tuple[Any, ...],
    reuse_address: bool,
    reuse_port: bool,
) -> socket.socket:
    sock = mptcp_socket(family)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Each family gets its own listener, as asyncio does.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BackendError(
            f"cannot listen on {address[0]} port {address[1]}: {exc}"
        ) from exc
    return sock
