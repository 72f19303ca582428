"""The asyncio face of mptls: drop-in ``open_connection`` and ``start_server``.

Both take the arguments of the asyncio functions of the same name plus
mptls's own keywords, and give real ``asyncio.StreamReader`` /
``asyncio.StreamWriter`` objects. ``create_connection`` and
``create_server`` are the protocol-level forms, like the loop methods.

Arguments are checked before any socket exists
(:mod:`mptls.aio.keywords`): a bad one is a
:class:`~mptls.errors.ConfigurationError`, never a ``TypeError`` from
deep inside. What the operating system refuses (a port in use, a refused
connection, an unknown host) is a :class:`~mptls.errors.ConnectError`,
which is an ``OSError`` too. This module must never swallow an error or
put key material in one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from OpenSSL import SSL

from mptls.aio.keywords import (
    ASYNCIO_CLIENT_ONLY,
    ASYNCIO_SERVER_ONLY,
    bound_close,
    bound_silent_clients,
    check_backlog,
    check_callable,
    check_client_args,
    check_limit,
    check_listening_socket,
    check_port,
    check_server_host,
    check_timeout,
    connected_socket_peer,
    listen_on_given_socket,
    refuse_asyncio_only,
    refuse_family_elsewhere,
    refuse_sock_elsewhere,
    take_local_addr,
)
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
from mptls.mptcp.config import check_bool
from mptls.tls.config import to_openssl_context
from mptls.tls.engine import check_server_name

_DEFAULT_LIMIT = 2**16

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
]


def _resolve_backend(backend: str | Backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    return get_backend(backend)


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
    check_callable("protocol_factory", protocol_factory)
    local_addrs = take_local_addr(backend_options, local_addrs)
    refuse_asyncio_only(backend_options, ASYNCIO_CLIENT_ONLY)
    backend_obj = _resolve_backend(backend)
    sock = backend_options.get("sock")
    if sock is not None:
        refuse_sock_elsewhere(backend_obj)
        host, port = connected_socket_peer(
            sock, host, port, local_addrs, server_hostname
        )
    else:
        backend_options.pop("sock", None)
    if host is None or port is None:
        raise ConfigurationError("host and port are required")
    port = check_port(port, server=False)
    local_addrs = check_client_args(host, local_addrs, server_hostname)
    check_timeout(ssl_handshake_timeout)
    check_timeout(ssl_shutdown_timeout, "ssl_shutdown_timeout")
    check_bool("require_app_keys", require_app_keys)
    context, check_hostname = _client_context(ssl)
    if server_hostname is None:
        # a host that is no name to check fails its lookup first, with
        # the HostLookupError asyncio's code expects
        server_hostname = _default_server_hostname(host)
    else:
        check_server_name(server_hostname, check_hostname)
    _refuse_keyless(backend_obj, require_app_keys)
    refuse_family_elsewhere(backend_obj, backend_options)
    bound_close(backend_obj, ssl_shutdown_timeout, backend_options)
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
        # its sockets closed, the caller's too, when the error reaches the
        # caller (asyncio's create_connection closes them a step later)
        backend_obj.abandon(transport)
        if sock is not None:
            sock.close()
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
    check_callable("protocol_factory", protocol_factory)
    refuse_asyncio_only(backend_options, ASYNCIO_SERVER_ONLY)
    if ssl is None or ssl is False or ssl is True:
        raise ConfigurationError(
            "a server needs ssl=TLSConfig(certfile=..., keyfile=...) or "
            "an OpenSSL.SSL.Context holding its certificate and key"
        )
    check_server_host(host)
    sock = backend_options.pop("sock", None)
    if sock is not None:
        check_listening_socket(sock, host, port)
        port = 0
    port = check_port(0 if port is None else port, server=True)
    check_timeout(ssl_handshake_timeout)
    check_timeout(ssl_shutdown_timeout, "ssl_shutdown_timeout")
    check_backlog(backend_options)
    check_bool("require_app_keys", require_app_keys)
    context, _ = to_openssl_context(ssl, server_side=True)
    backend_obj = _resolve_backend(backend)
    _refuse_keyless(backend_obj, require_app_keys)
    bound_silent_clients(backend_obj, ssl_handshake_timeout, backend_options)
    bound_close(backend_obj, ssl_shutdown_timeout, backend_options)
    refuse_family_elsewhere(backend_obj, backend_options)
    if sock is not None:
        listen_on_given_socket(backend_obj, sock, backend_options)

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
    check_limit(limit)
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
    check_callable("client_connected_cb", client_connected_cb)
    check_limit(limit)
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
