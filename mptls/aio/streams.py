"""The asyncio face of mptls: drop-in ``open_connection`` and ``start_server``.

Both take the arguments of the asyncio functions of the same name plus
mptls's own keywords, and give real ``asyncio.StreamReader`` /
``asyncio.StreamWriter`` objects. ``create_connection`` and
``create_server`` are the protocol-level forms, like the loop methods.

Arguments are checked here, before any socket exists: a bad one is a
:class:`~mptls.errors.ConfigurationError`, never a ``TypeError`` from
deep inside. What the operating system refuses (a port in use, a refused
connection, an unknown host) is a :class:`~mptls.errors.ConnectError`,
which is an ``OSError`` too. This module must never swallow an error or
put key material in one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from OpenSSL import SSL

from mptls.aio.protocol import StreamProtocol, TLSProtocol, TLSTransport
from mptls.backends import get_backend
from mptls.backends.base import Backend, Server, format_address
from mptls.errors import (
    BackendError,
    ConfigurationError,
    ConnectError,
    KeysUnavailableError,
    MptlsError,
    shown_value,
)
from mptls.mptcp.config import (
    HANDSHAKE_TIMEOUT,
    check_bool,
    check_range,
    check_seconds,
)
from mptls.tls.config import to_openssl_context

_DEFAULT_LIMIT = 2**16

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
]


def _resolve_backend(backend: str | Backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    return get_backend(backend)


def _check_port(port: object, *, server: bool) -> int:
    low = 0 if server else 1
    if isinstance(port, str) and port and not port.isdecimal():
        return _service_port(port)
    if isinstance(port, str) and port.isdecimal():
        # int() refuses more than 4300 digits with a ValueError of its
        # own, and a digit that is not a decimal one ("\u00b2"); no port
        # needs more than 5
        if len(port) > 5:
            raise _port_out_of_range(port, low)
        port = int(port)
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


def _check_client_args(
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
        try:
            # addresses of this host, not names: a name would be looked
            # up on the network, and could stand for several addresses
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigurationError(
                "local_addrs entries must be IP addresses, got "
                f"{shown_value(address)}"
            ) from None
    return list(local_addrs)


def _check_no_nul(name: str, what: str) -> None:
    """getaddrinfo() raised a bare ValueError ("embedded null
    character") for a host name with a NUL in it."""
    if "\x00" in name:
        raise ConfigurationError(
            f"{what} must not contain a NUL character, got {shown_value(name)}"
        )


def _check_server_host(host: object) -> None:
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


def _check_timeout(value: object, name: str = "ssl_handshake_timeout") -> None:
    if value is not None:
        check_seconds(name, value)


# asyncio's keywords mptls does not take, and what to do instead: of
# loop.create_connection, then of loop.create_server
_ASYNCIO_CLIENT_ONLY = {
    "proto": "mptls chooses the sockets' protocol",
    "flags": "mptls resolves host names itself",
    "all_errors": "mptls raises one error, an OSError with the cause",
}
_ASYNCIO_SERVER_ONLY = {
    "flags": "mptls resolves host names itself",
    "keep_alive": "mptls's own timeouts find dead paths (docs/reliability.md)",
}


def _refuse_asyncio_only(
    options: dict[str, Any], asyncio_only: dict[str, str]
) -> None:
    """A clear error for an asyncio keyword mptls does not take."""
    for name, instead in asyncio_only.items():
        if name in options:
            raise ConfigurationError(
                f"{name}= is asyncio's, and mptls does not take it: {instead}"
            )


def _take_local_addr(
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
    return [address]


def _check_limit(limit: object) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ConfigurationError(
            f"limit must be a positive int, got {shown_value(limit)}"
        )


# listen() takes a C int; the kernel caps it at net.core.somaxconn
_MAX_BACKLOG = 2**31 - 1


def _check_backlog(options: dict[str, Any]) -> None:
    """asyncio hands ``backlog`` to ``listen()`` as it is: a str raised
    a bare TypeError there, a huge int an OverflowError (and the kernel
    backend took a float or a numeric str through ``int()``)."""
    if "backlog" in options:
        check_range("backlog", options["backlog"], 0, _MAX_BACKLOG)


def _connect_error(
    exc: OSError, what: str, host: object, port: int
) -> ConnectError:
    """``exc`` from the OS, with the host and port it was aimed at."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):
        message = f"cannot resolve host {shown_value(host)}: {reason}"
    else:
        if exc.errno:
            # the system's words: asyncio's own text ("Connect call
            # failed (...)") repeats the address the message names
            reason = os.strerror(exc.errno)
        message = f"cannot {what} {format_address((host, port))}: {reason}"
    where = host if isinstance(host, str) else None
    return ConnectError.of(
        exc.errno,
        message,
        host=where,
        port=port,
        lookup=isinstance(exc, socket.gaierror),
    )


def _os_refusal(
    exc: BaseException, what: str, host: object, port: int
) -> ConnectError | None:
    """The :class:`ConnectError` for ``exc`` if the OS refused, else None.

    A backend may have wrapped the OS error in a ``BackendError`` of its
    own (the kernel backend does); its message is kept, and its errno.
    """
    if isinstance(exc, ConnectError):
        return None
    if _is_plain_os_error(exc):
        return _connect_error(cast(OSError, exc), what, host, port)
    cause = exc.__cause__
    if isinstance(exc, BackendError) and _is_plain_os_error(cause):
        where = host if isinstance(host, str) else None
        errno = cast(OSError, cause).errno
        return ConnectError.of(
            errno,
            str(exc),
            host=where,
            port=port,
            lookup=isinstance(cause, socket.gaierror),
        )
    return None


def _is_plain_os_error(exc: BaseException | None) -> bool:
    # timeouts are MptlsTimeoutError already, or a wait of the caller's
    return isinstance(exc, OSError) and not isinstance(
        exc, MptlsError | TimeoutError
    )


def _default_server_hostname(host: str | None) -> str | None:
    if host is None:
        return None
    return host.strip("[]")


def _refuse_keyless(backend: Backend, require_app_keys: bool) -> None:
    """``require_app_keys`` on a backend that can install keys on no
    connection: refused before anything is tried. A server would
    complete every TLS handshake only to drop each client after it."""
    if not require_app_keys:
        return
    reason = backend.keys_unavailable()
    if reason is not None:
        raise KeysUnavailableError(
            "TLS-derived MPTCP keys are required but the "
            f"{backend.name} backend cannot install them: {reason}"
        )


async def create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None = None,
    port: int | None = None,
    *,
    ssl: Any = True,
    server_hostname: str | None = None,
    local_addrs: Sequence[str] | None = None,
    backend: str | Backend = "userspace",
    require_app_keys: bool = False,
    ssl_handshake_timeout: float | None = 30.0,
    ssl_shutdown_timeout: float | None = 30.0,
    **backend_options: Any,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Open a secure multipath connection; like ``loop.create_connection``.

    ``ssl`` is an :class:`mptls.TLSConfig`, an ``OpenSSL.SSL.Context``, a
    client-side ``ssl.SSLContext`` or ``True`` for system defaults. TLS
    cannot be turned off: the MPTCP keys come from it.
    ``local_addrs`` lists local addresses: the first carries the first
    subflow, each further one an extra subflow; asyncio's
    ``local_addr=(ip, 0)`` is ``local_addrs=[ip]``. ``require_app_keys``
    fails the connection before any application data if the backend
    cannot install the TLS-derived keys (before connecting at all, with
    :class:`~mptls.errors.KeysUnavailableError`, on a backend that can
    install them on no connection). ``ssl_handshake_timeout`` bounds
    the TLS handshake (``None``: the default, 30 s, as asyncio takes
    ``None`` for its own; never no limit). ``ssl_shutdown_timeout`` is how
    long a close waits for the peer's close_notify over a socket
    transport (the kernel backend), as asyncio's does (``None``: its
    default, 30 s); the userspace backend ends the stream in order
    itself, within its ``close_timeout``, which a shorter
    ``ssl_shutdown_timeout`` sets.
    """
    local_addrs = _take_local_addr(backend_options, local_addrs)
    _refuse_asyncio_only(backend_options, _ASYNCIO_CLIENT_ONLY)
    sock = backend_options.get("sock")
    if sock is not None:
        host, port = _connected_socket_peer(
            sock, host, port, local_addrs, server_hostname
        )
    else:
        backend_options.pop("sock", None)
    if host is None or port is None:
        raise ConfigurationError("host and port are required")
    port = _check_port(port, server=False)
    local_addrs = _check_client_args(host, local_addrs, server_hostname)
    _check_timeout(ssl_handshake_timeout)
    _check_timeout(ssl_shutdown_timeout, "ssl_shutdown_timeout")
    check_bool("require_app_keys", require_app_keys)
    context, check_hostname = _client_context(ssl)
    if server_hostname is None:
        server_hostname = _default_server_hostname(host)
    backend_obj = _resolve_backend(backend)
    _refuse_keyless(backend_obj, require_app_keys)
    _refuse_family_elsewhere(backend_obj, backend_options)
    _bound_close(backend_obj, ssl_shutdown_timeout, backend_options)
    if sock is not None and not _is_userspace(backend_obj):
        raise ConfigurationError(
            f"sock= is taken by the userspace backend only: the "
            f"{backend_obj.name} backend makes its own MPTCP sockets"
        )
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[TLSTransport] = loop.create_future()

    def tls_factory() -> TLSProtocol:
        return TLSProtocol(
            backend_obj,
            context,
            protocol_factory,
            server_side=False,
            server_hostname=server_hostname,
            check_hostname=check_hostname,
            require_app_keys=require_app_keys,
            handshake_timeout=ssl_handshake_timeout,
            shutdown_timeout=ssl_shutdown_timeout,
            waiter=waiter,
        )

    try:
        transport, tls = await backend_obj.create_connection(
            tls_factory, host, port, local_addrs=local_addrs, **backend_options
        )
    except BaseException as exc:
        # the TLS protocol may have failed the waiter already; nobody
        # will await it now
        if waiter.done() and not waiter.cancelled():
            waiter.exception()
        waiter.cancel()
        refusal = _os_refusal(exc, "connect to", host, port)
        if refusal is not None:
            raise refusal from exc
        raise
    try:
        app_transport = await waiter
    except BaseException:
        transport.abort()
        raise
    return _application_side(tls, app_transport)


def _client_context(ssl: Any) -> tuple[SSL.Context, bool]:
    """The client's OpenSSL context and whether to check the host name."""
    if ssl is None or ssl is False:
        raise ConfigurationError(
            "mptls always runs TLS: its MPTCP keys come from the TLS "
            "exporter; pass ssl=True, a TLSConfig or a context"
        )
    return to_openssl_context(ssl, server_side=False)


def _application_side(
    tls: asyncio.BaseProtocol, app_transport: TLSTransport
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """The application's transport (the waiter's result: the protocol
    keeps it only weakly once the application heard of an end) and
    protocol over a completed handshake."""
    assert isinstance(tls, TLSProtocol)
    app_protocol = tls._app_protocol
    assert app_protocol is not None
    return app_transport, app_protocol


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    ssl: Any = None,
    backend: str | Backend = "userspace",
    require_app_keys: bool = False,
    ssl_handshake_timeout: float | None = 30.0,
    ssl_shutdown_timeout: float | None = 30.0,
    **backend_options: Any,
) -> Server:
    """Listen for secure multipath connections; like ``loop.create_server``.

    ``ssl`` is an :class:`mptls.TLSConfig` or an ``OpenSSL.SSL.Context``
    with the server's certificate and key.
    """
    _refuse_asyncio_only(backend_options, _ASYNCIO_SERVER_ONLY)
    if ssl is None or ssl is False or ssl is True:
        raise ConfigurationError(
            "a server needs ssl=TLSConfig(certfile=..., keyfile=...) or "
            "an OpenSSL.SSL.Context holding its certificate and key"
        )
    _check_server_host(host)
    sock = backend_options.pop("sock", None)
    if sock is not None:
        _check_listening_socket(sock, host, port)
        port = 0
    port = _check_port(0 if port is None else port, server=True)
    _check_timeout(ssl_handshake_timeout)
    _check_timeout(ssl_shutdown_timeout, "ssl_shutdown_timeout")
    _check_backlog(backend_options)
    check_bool("require_app_keys", require_app_keys)
    context, _ = to_openssl_context(ssl, server_side=True)
    backend_obj = _resolve_backend(backend)
    _refuse_keyless(backend_obj, require_app_keys)
    _bound_silent_clients(backend_obj, ssl_handshake_timeout, backend_options)
    _bound_close(backend_obj, ssl_shutdown_timeout, backend_options)
    _refuse_family_elsewhere(backend_obj, backend_options)
    if sock is not None:
        _listen_on_given_socket(backend_obj, sock, backend_options)

    def tls_factory() -> TLSProtocol:
        return TLSProtocol(
            backend_obj,
            context,
            protocol_factory,
            server_side=True,
            require_app_keys=require_app_keys,
            handshake_timeout=ssl_handshake_timeout,
            shutdown_timeout=ssl_shutdown_timeout,
        )

    try:
        return await backend_obj.create_server(
            tls_factory, host, port, **backend_options
        )
    except (MptlsError, OSError) as exc:
        refusal = _os_refusal(exc, "listen on", host, port)
        if refusal is None:
            raise
        raise refusal from exc


def _connected_socket_peer(
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
    try:
        peer = cast(socket.socket, sock).getpeername()
    except OSError:
        raise ConfigurationError(
            f"sock must be connected, got {shown_value(sock)}"
        ) from None
    return str(peer[0]), int(peer[1])


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


def _check_listening_socket(sock: object, host: object, port: object) -> None:
    """``sock=``, a socket the application bound (or inherited, as from
    systemd), to listen on instead of ``host`` and ``port``, as asyncio
    takes it."""
    if host is not None or port is not None:
        raise ConfigurationError(
            "pass host and port, or sock=, not both: the socket is "
            "bound already"
        )
    _check_tcp_socket(sock)


def _listen_on_given_socket(
    backend: Backend, sock: socket.socket, options: dict[str, Any]
) -> None:
    """The userspace backend's subflows are TCP connections, so a TCP
    socket serves it; the kernel backend needs MPTCP sockets of its
    own making."""
    if not _is_userspace(backend):
        raise ConfigurationError(
            f"sock= is taken by the userspace backend only: the "
            f"{backend.name} backend makes its own MPTCP sockets"
        )
    options["sock"] = sock


def _refuse_family_elsewhere(
    backend: Backend, options: dict[str, Any]
) -> None:
    """asyncio's ``family=`` picks the host's addresses of one family;
    the userspace backend takes it, the kernel backend does not."""
    if "family" in options and not _is_userspace(backend):
        raise ConfigurationError(
            f"family= is taken by the userspace backend only; on the "
            f"{backend.name} backend pass IP literals (local_addrs too) "
            "of the family wanted"
        )


def _is_userspace(backend: Backend) -> bool:
    from mptls.backends.userspace import UserspaceBackend

    return isinstance(backend, UserspaceBackend)


def _bound_close(
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
        or not _is_userspace(backend)
        or "close_timeout" in options
        or shutdown_limit >= CLOSE_TIMEOUT
    ):
        return
    options["close_timeout"] = shutdown_limit


def _bound_silent_clients(
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
    from mptls.backends.userspace import UserspaceBackend

    if (
        tls_limit is None
        or not isinstance(backend, UserspaceBackend)
        or "handshake_timeout" in options
        or "config" in options
        or tls_limit >= HANDSHAKE_TIMEOUT
    ):
        return
    options["handshake_timeout"] = tls_limit


class _StreamReader(asyncio.StreamReader):
    """asyncio's reader, with one copy per ``read(n)`` instead of two.

    asyncio before 3.12 returns ``bytes(buffer[:n])``: a bytearray slice,
    then bytes of it, two copies of every byte read where one does (3.12
    reads through a memoryview, as here). ``read`` was about a sixth of
    a loopback bulk receiver's CPU. Otherwise the method is asyncio's.
    """

    async def read(self, n: int = -1) -> bytes:
        this = cast(Any, self)
        if n <= 0 or this._exception is not None:
            # read-all, read(0) and a failed stream: asyncio's own path
            return await super().read(n)
        if not this._buffer and not this._eof:
            await this._wait_for_data("read")
        buffer = this._buffer
        data = bytes(memoryview(buffer)[:n])
        del buffer[:n]
        this._maybe_resume_transport()
        return data


def _new_reader(
    limit: int, loop: asyncio.AbstractEventLoop
) -> asyncio.StreamReader:
    if sys.version_info >= (3, 12):
        return asyncio.StreamReader(limit=limit, loop=loop)
    return _StreamReader(limit=limit, loop=loop)


async def open_connection(
    host: str | None = None,
    port: int | None = None,
    *,
    limit: int = _DEFAULT_LIMIT,
    **kwds: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A drop-in for ``asyncio.open_connection`` over secure multipath.

    Takes :func:`create_connection`'s keywords; returns real asyncio
    streams.
    """
    _check_limit(limit)
    loop = asyncio.get_running_loop()
    reader = _new_reader(limit, loop)
    protocol = StreamProtocol(reader, loop=loop)
    transport, _ = await create_connection(
        lambda: protocol, host, port, **kwds
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def start_server(
    client_connected_cb: ClientConnectedCallback,
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    limit: int = _DEFAULT_LIMIT,
    **kwds: Any,
) -> Server:
    """A drop-in for ``asyncio.start_server`` over secure multipath.

    ``client_connected_cb(reader, writer)`` runs once the TLS handshake is
    complete and its keys went to the backend. Only the userspace
    backend's modes G and E install them (E uses them once the peer's
    NEW_KEY confirmed them); the kernel backend and mode rfc8684 keep
    keys of their own, as ``get_extra_info("mptcp")`` says. With
    ``require_app_keys=True`` a connection whose keys were not installed
    fails before the callback runs.
    """
    _check_limit(limit)
    loop = asyncio.get_running_loop()
    connected = _ending_with_handler(client_connected_cb)

    def factory() -> StreamProtocol:
        reader = _new_reader(limit, loop)
        return StreamProtocol(reader, connected, loop=loop)

    return await create_server(factory, host, port, **kwds)


def _ending_with_handler(
    callback: ClientConnectedCallback,
) -> ClientConnectedCallback:
    """``callback``, after whose coroutine the connection ends with the peer.

    asyncio's TLS server closes a connection at the peer's close_notify,
    whatever its handler does. mptls keeps a half-closed connection open
    for a handler that still answers, so a handler that returned without
    closing its writer would hold it for good, and the peer's close
    would wait out its timeout. Once the handler's coroutine is done,
    the peer's end (already here, or still to come) closes it.
    """

    def connected(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Awaitable[None] | None:
        result = callback(reader, writer)
        if asyncio.iscoroutine(result):
            return _handle_then_end(result, writer)
        return result

    return connected


async def _handle_then_end(
    handler: Awaitable[None], writer: asyncio.StreamWriter
) -> None:
    try:
        await handler
    finally:
        transport = writer.transport
        if isinstance(transport, TLSTransport):
            transport._end_with_peer()
