"""asyncio's keywords for ``open_connection`` and ``start_server``.

Each is checked here, before any socket exists, and carried over to
what mptls takes for it: a bad one is a
:class:`~mptls.errors.ConfigurationError` that says why, never a
``TypeError`` from deep inside, and one mptls cannot take says what to
do instead. What asyncio hands to the system (a service name, a socket
of the application's) goes as asyncio's does, with the same errors.
This module opens no socket and looks nothing up on the network.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import re
import socket
import ssl
from asyncio.selector_events import BaseSelectorEventLoop
from collections.abc import Mapping, Sequence
from typing import Any, cast

from mptls.backends.base import Backend, check_local_address
from mptls.errors import (
    ConfigurationError,
    ConnectError,
    PeerResetError,
    SocketInUseError,
    shown_value,
)
from mptls.mptcp.config import HANDSHAKE_TIMEOUT, check_range, check_seconds

# a port number as getaddrinfo() reads one (strtoul): ASCII space
# before it and a plus sign are allowed, ASCII digits only ("\u0668",
# an Arabic-Indic eight, is a digit to int() and a name to the system)
_PORT_NUMBER = re.compile(r"[ \t\n\v\f\r]*\+?0*([0-9]+)")


def check_port(port: object, *, server: bool) -> int:
    low = 0 if server else 1
    number = _PORT_NUMBER.fullmatch(port) if isinstance(port, str) else None
    if number is not None:
        # int() refuses more than 4300 digits with a ValueError of its
        # own; no port needs more than 5 after the leading zeros
        digits = number.group(1)
        if len(digits) > 5:
            raise _port_out_of_range(cast(str, port), low)
        port = int(digits)
    elif isinstance(port, str) and port:
        return _service_port(port)
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigurationError(
            f"port must be an int or a service name, got {shown_value(port)}"
        )
    if not low <= port <= 65535:
        raise _port_out_of_range(port, low)
    return port


def _service_port(name: str) -> int:
    """The TCP port of a service name ("https"), as asyncio takes one.

    asyncio hands the name to ``getaddrinfo``; an unknown one fails
    there with ``EAI_SERVICE``, raised here as the same
    ``socket.gaierror``. The services database is a local file: no
    lookup leaves the machine for it.
    """
    _check_no_nul(name, "port")
    try:
        return socket.getservbyname(name, "tcp")
    except OSError:
        raise ConnectError.of(
            socket.EAI_SERVICE,
            f"unknown service name {shown_value(name)} for a port",
            lookup=True,
        ) from None


def _port_out_of_range(port: int | str, low: int) -> ConfigurationError:
    return ConfigurationError(
        f"port must be between {low} and 65535, got {shown_value(port)}"
    )


def check_client_args(
    host: object, local_addrs: object, server_hostname: object
) -> list[str] | None:
    if not isinstance(host, str) or not host:
        raise ConfigurationError(
            f"host must be a non-empty str, got {shown_value(host)}"
        )
    _check_no_nul(host, "host")
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise ConfigurationError(
            "server_hostname must be a str, got "
            f"{shown_value(server_hostname)}"
        )
    if server_hostname == "":
        # OpenSSL takes an empty name as no name to check: the server's
        # certificate would pass for any host (stdlib ssl refuses it too)
        raise ConfigurationError(
            "server_hostname must not be empty; to skip the host name "
            "check pass a TLSConfig with check_hostname=False"
        )
    if local_addrs is None:
        return None
    if isinstance(local_addrs, str | bytes) or not isinstance(
        local_addrs, Sequence
    ):
        # a str is a sequence too: its characters are no addresses
        raise ConfigurationError(
            "local_addrs must be a list of addresses, got "
            f"{shown_value(local_addrs)}; write [{shown_value(local_addrs)}] "
            "for one"
        )
    for address in local_addrs:
        if not isinstance(address, str) or not address:
            raise ConfigurationError(
                "local_addrs entries must be non-empty str, got "
                f"{shown_value(address)}"
            )
        if not _is_ip_address(address):
            # addresses of this host, not names: a name would be looked
            # up on the network, and could stand for several addresses
            raise ConfigurationError(
                "local_addrs entries must be IP addresses, got "
                f"{shown_value(address)}"
            )
        check_local_address(address, "local address")
    return list(local_addrs)


def _check_no_nul(name: str, what: str) -> None:
    """getaddrinfo() raised a bare ValueError ("embedded null
    character") for a host name with a NUL in it."""
    if "\x00" in name:
        raise ConfigurationError(
            f"{what} must not contain a NUL character, got {shown_value(name)}"
        )


def check_server_host(host: object) -> None:
    if host is None:
        return
    if isinstance(host, str):
        _check_no_nul(host, "host")
        return
    if (
        isinstance(host, Sequence)
        and not isinstance(host, bytes)
        and host
        and all(isinstance(h, str) and h for h in host)
    ):
        for name in host:
            _check_no_nul(name, "host")
        return
    raise ConfigurationError(
        f"host must be a str, a list of str or None, got {shown_value(host)}"
    )


def check_timeout(value: object, name: str = "ssl_handshake_timeout") -> None:
    if value is not None:
        check_seconds(name, value)


# asyncio's keywords mptls does not take, and what to do instead: of
# loop.create_connection, then of loop.create_server
ASYNCIO_CLIENT_ONLY = {
    "proto": "mptls chooses the sockets' protocol",
    "flags": "mptls resolves host names itself",
    "all_errors": "mptls raises one error, an OSError with the cause",
}
ASYNCIO_SERVER_ONLY = {
    "flags": "mptls resolves host names itself",
    "keep_alive": "mptls's own timeouts find dead paths (docs/reliability.md)",
}


def refuse_asyncio_only(
    options: dict[str, Any], asyncio_only: dict[str, str]
) -> None:
    """A clear error for an asyncio keyword mptls does not take."""
    for name, instead in asyncio_only.items():
        if name in options:
            raise ConfigurationError(
                f"{name}= is asyncio's, and mptls does not take it: {instead}"
            )


def take_local_addr(
    options: dict[str, Any], local_addrs: Sequence[str] | None
) -> Sequence[str] | None:
    """asyncio's ``local_addr=(ip, 0)``, as ``local_addrs=[ip]``.

    One local address is the first subflow's, as asyncio binds its one
    socket there. mptls picks each subflow's local port: a port other
    than 0 cannot be kept for the subflows after the first.
    """
    local_addr = options.pop("local_addr", None)
    if local_addr is None:
        return local_addrs
    if local_addrs is not None:
        raise ConfigurationError(
            "pass local_addr= or local_addrs=, not both: local_addrs' "
            "first address is the one local_addr names"
        )
    if options.get("sock") is not None:
        # asyncio ignores local_addr then: the socket is bound already
        raise ConfigurationError(
            "pass local_addr or sock=, not both: the socket's own "
            "address carries the first subflow"
        )
    # an IPv6 socket address may come whole: (ip, port, flowinfo, scope)
    if (
        not isinstance(local_addr, tuple | list)
        or len(local_addr) not in (2, 4)
        or not isinstance(local_addr[0], str)
    ):
        raise ConfigurationError(
            "local_addr must be an (IP address, port) pair, got "
            f"{shown_value(local_addr)}"
        )
    address, port = local_addr[:2]
    if port not in (0, None) or isinstance(port, bool):
        raise ConfigurationError(
            f"local_addr's port must be 0, got {shown_value(port)}: mptls "
            "picks each subflow's local port"
        )
    if not _is_ip_address(address):
        # asyncio would look a name up; mptls takes addresses only
        raise ConfigurationError(
            "local_addr's address must be an IP address, got "
            f"{shown_value(address)}"
        )
    if len(local_addr) == 4 and "%" not in address:
        address += _scope_suffix(local_addr[3])
    # named as the caller wrote it, not as the local_addrs it becomes
    check_local_address(address, "local_addr's address")
    return [address]


def _scope_suffix(scope: object) -> str:
    """An IPv6 socket address's scope id as a literal's ``%interface``.

    A link-local address cannot be bound without it: getsockname()
    gives one as ``("fe80::1", port, 0, 2)``, and the address alone
    failed with EINVAL.
    """
    if isinstance(scope, bool) or not isinstance(scope, int):
        raise ConfigurationError(
            f"local_addr's scope id must be an int, got {shown_value(scope)}"
        )
    if scope == 0:
        return ""
    try:
        return "%" + socket.if_indextoname(scope)
    except (OSError, OverflowError, ValueError):
        raise ConfigurationError(
            f"local_addr's scope id {shown_value(scope)} names no network "
            "interface of this host"
        ) from None


def _is_ip_address(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def check_callable(name: str, value: object) -> None:
    """Refuse a callback or protocol factory that cannot be called.

    asyncio takes one as it is: a server's failed at every client (each
    logged and reset), a client's once connected. Nothing here can
    work without it, so it is refused before anything listens or
    connects.
    """
    if not callable(value):
        raise ConfigurationError(
            f"{name} must be callable, got {shown_value(value)}"
        )


def check_limit(limit: object) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ConfigurationError(
            f"limit must be a positive int, got {shown_value(limit)}"
        )


# listen() takes a C int; the kernel caps it at net.core.somaxconn, and
# reads a negative one as that cap
_MIN_BACKLOG = -(2**31)
_MAX_BACKLOG = 2**31 - 1


def check_backlog(
    options: Mapping[str, Any], *, selector_loop: bool | None = None
) -> None:
    """asyncio hands ``backlog`` to ``listen()`` as it is: a str raised
    a bare TypeError there, a huge int an OverflowError (and the kernel
    backend took a float or a numeric str through ``int()``).

    Any C int passes, as in asyncio, except where the loop would never
    accept: asyncio's own selector loop accepts up to ``backlog``
    connections per wakeup, so with 0 or less its server took none and
    every client waited (uvloop serves with any). ``selector_loop``
    says whether the server will run on such a loop; ``None``: whether
    the running loop is one.
    """
    if "backlog" not in options:
        return
    backlog = options["backlog"]
    check_range("backlog", backlog, _MIN_BACKLOG, _MAX_BACKLOG)
    if selector_loop is None:
        loop = asyncio.get_running_loop()
        selector_loop = isinstance(loop, BaseSelectorEventLoop)
    if backlog <= 0 and selector_loop:
        raise ConfigurationError(
            f"backlog={backlog} makes asyncio's event loop accept no "
            "connection (it accepts up to backlog at a time); pass a "
            "positive backlog (the system caps it at net.core.somaxconn)"
        )


def connected_socket_peer(
    sock: object,
    host: object,
    port: object,
    local_addrs: object,
    server_hostname: object,
) -> tuple[str, int]:
    """``sock=``, a TCP socket the application connected, to carry the
    first subflow, as asyncio takes one: its peer's address, which the
    socket names in place of ``host`` and ``port``."""
    if host is not None or port is not None:
        raise ConfigurationError(
            "pass host and port, or sock=, not both: the socket is "
            "connected already"
        )
    if local_addrs is not None:
        raise ConfigurationError(
            "pass local_addrs or sock=, not both: the socket's own "
            "address carries the first subflow"
        )
    if server_hostname is None:
        # as asyncio: nothing else names the server to verify
        raise ConfigurationError(
            "sock= needs server_hostname=, the name the server's "
            "certificate must carry"
        )
    _check_tcp_socket(sock)
    connected = cast(socket.socket, sock)
    _refuse_carried_socket(connected)
    try:
        peer = connected.getpeername()
    except OSError:
        _raise_if_connection_failed(connected)
        raise ConfigurationError(
            f"sock must be connected, got {shown_value(sock)}"
        ) from None
    _refuse_shut_socket(connected)
    return str(peer[0]), int(peer[1])


def _refuse_carried_socket(sock: socket.socket) -> None:
    """A socket a live mptls connection runs over, given again.

    Taking it would write a second handshake into that connection's
    stream, and a failure would close the socket under it.
    """
    from mptls.backends.userspace.subflow import carries_socket

    if carries_socket(sock):
        raise SocketInUseError(
            f"sock is in use by a live mptls connection, got "
            f"{shown_value(sock)}: pass a socket of its own to each "
            "connection"
        )


def _refuse_shut_socket(sock: socket.socket) -> None:
    """A connected socket the caller shut for writing (``SHUT_WR``).

    The handshake's first write would fail with ``EPIPE``, which reads
    as the server's reset. An empty send asks the same question and
    sends nothing: it fails only on a socket that cannot send (one the
    peer reset has no peer name, and failed before this). It is
    non-blocking meanwhile: with a timeout, Python would first wait for
    room in a full send buffer.
    """
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.send(b"")
    except OSError as exc:
        if exc.errno in _SHUT_ERRNOS:
            raise ConfigurationError(
                "sock is shut for writing (shutdown(SHUT_WR)): the TLS "
                f"handshake must send over it, got {shown_value(sock)}"
            ) from None
    finally:
        sock.settimeout(timeout)


# what a send on a socket shut for writing fails with (Windows' own)
_SHUT_ERRNOS = (errno.EPIPE, errno.ESHUTDOWN)


def _raise_if_connection_failed(sock: socket.socket) -> None:
    """Raise what ended the connection of a socket that has no peer.

    One the application connected and the server reset (or whose own
    connect failed) before this call holds that error: the connection
    failed, the argument is not wrong. The socket is closed first, as
    a connection that fails later in the call closes it.
    """
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if not error:
        return
    sock.close()
    if error == errno.ECONNRESET:
        raise PeerResetError(
            "the server reset the connection of sock= before the TLS "
            "handshake began"
        )
    raise ConnectError.of(
        error, f"the connection of sock= failed: {os.strerror(error)}"
    )


def _check_tcp_socket(sock: object) -> None:
    if (
        not isinstance(sock, socket.socket)
        or sock.type != socket.SOCK_STREAM
        or sock.family not in (socket.AF_INET, socket.AF_INET6)
    ):
        raise ConfigurationError(
            "sock must be a TCP socket (AF_INET or AF_INET6, "
            f"SOCK_STREAM), got {shown_value(sock)}"
        )
    if isinstance(sock, ssl.SSLSocket):
        raise ConfigurationError(
            "sock must be a plain TCP socket, not an ssl.SSLSocket: mptls "
            "runs TLS itself, over the MPTCP connection"
        )
    if sock.fileno() == -1:
        raise ConfigurationError("sock is closed; pass an open socket")


def check_listening_socket(sock: object, host: object, port: object) -> None:
    """``sock=``, a socket the application bound (or inherited, as from
    systemd), to listen on instead of ``host`` and ``port``, as asyncio
    takes it."""
    if host is not None or port is not None:
        raise ConfigurationError(
            "pass host and port, or sock=, not both: the socket is "
            "bound already"
        )
    _check_tcp_socket(sock)
    try:
        cast(socket.socket, sock).getpeername()
    except OSError:
        return
    # listen() fails on it with EINVAL, which names no reason
    raise ConfigurationError(
        f"sock is connected, got {shown_value(sock)}: a server listens "
        "on a bound socket; a connected one is open_connection()'s"
    )


def listen_on_given_socket(
    backend: Backend, sock: socket.socket, options: dict[str, Any]
) -> None:
    """The userspace backend's subflows are TCP connections, so a TCP
    socket serves it; the kernel backend needs MPTCP sockets of its
    own making."""
    refuse_sock_elsewhere(backend)
    options["sock"] = sock


def refuse_sock_elsewhere(backend: Backend) -> None:
    """``sock=`` on a backend other than userspace, refused before the
    socket is looked at: one that is fine there is no use here."""
    if not is_userspace(backend):
        raise ConfigurationError(
            f"sock= is taken by the userspace backend only: the "
            f"{backend.name} backend makes its own MPTCP sockets"
        )


def refuse_family_elsewhere(backend: Backend, options: dict[str, Any]) -> None:
    """asyncio's ``family=`` picks the host's addresses of one family;
    the userspace backend takes it, the kernel backend does not."""
    if "family" in options and not is_userspace(backend):
        raise ConfigurationError(
            f"family= is taken by the userspace backend only; on the "
            f"{backend.name} backend pass IP literals (local_addrs too) "
            "of the family wanted"
        )


def is_userspace(backend: Backend) -> bool:
    from mptls.backends.userspace import UserspaceBackend

    return isinstance(backend, UserspaceBackend)


def bound_close(
    backend: Backend, shutdown_limit: float | None, options: dict[str, Any]
) -> None:
    """Let a shorter ``ssl_shutdown_timeout`` bound a close too.

    asyncio's bounds how long a close waits for the peer's close_notify.
    The userspace backend ends the stream in order itself (DATA_FIN
    both ways), and its ``close_timeout`` (10 s) bounds that wait, so a
    program that asks for a shorter ``ssl_shutdown_timeout`` gets it as
    that limit, unless it set ``close_timeout=`` itself.
    """
    from mptls.backends.userspace.backend import CLOSE_TIMEOUT

    if (
        shutdown_limit is None
        or not is_userspace(backend)
        or "close_timeout" in options
        or shutdown_limit >= CLOSE_TIMEOUT
    ):
        return
    options["close_timeout"] = shutdown_limit


def bound_silent_clients(
    backend: Backend, tls_limit: float | None, options: dict[str, Any]
) -> None:
    """Let a shorter ``ssl_handshake_timeout`` bound a silent client too.

    On the userspace backend the TLS handshake starts with a client's
    first MPTCP segment, and until then the MPTCP ``handshake_timeout``
    (30 s) holds a client that connects and sends nothing. asyncio's
    ``ssl_handshake_timeout`` counts from the accept, so a server that
    asks for a shorter one gets it as that limit too, unless it set the
    limit itself (``handshake_timeout=`` or ``config=``).
    """
    if (
        tls_limit is None
        or not is_userspace(backend)
        or "handshake_timeout" in options
        or "config" in options
        or tls_limit >= HANDSHAKE_TIMEOUT
    ):
        return
    options["handshake_timeout"] = tls_limit
