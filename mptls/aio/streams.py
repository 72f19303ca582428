"""The asyncio face of mptls: drop-in ``open_connection`` and ``start_server``.

Both take the arguments of the asyncio functions of the same name plus
mptls's own keywords, and give real ``asyncio.StreamReader`` /
``asyncio.StreamWriter`` objects. ``create_connection`` and
``create_server`` are the protocol-level forms, like the loop methods.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mptls.aio.protocol import TLSProtocol
from mptls.backends import get_backend
from mptls.backends.base import Backend
from mptls.errors import ConfigurationError
from mptls.tls.config import to_openssl_context

_DEFAULT_LIMIT = 2**16

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
]


def _resolve_backend(backend: str | Backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    return get_backend(backend)


def _default_server_hostname(host: str | None) -> str | None:
    if host is None:
        return None
    return host.strip("[]")


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
    **backend_options: Any,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Open a secure multipath connection; like ``loop.create_connection``.

    ``ssl`` is an :class:`mptls.TLSConfig`, an ``OpenSSL.SSL.Context``, a
    client-side ``ssl.SSLContext`` or ``True`` for system defaults. TLS
    cannot be turned off: the MPTCP keys come from it.
    ``local_addrs`` lists local addresses: the first carries the first
    subflow, each further one an extra subflow. ``require_app_keys``
    fails the connection before any application data if the backend
    cannot install the TLS-derived keys.
    """
    if host is None or port is None:
        raise ConfigurationError("host and port are required")
    if ssl is None or ssl is False:
        raise ConfigurationError(
            "mptls always runs TLS: its MPTCP keys come from the TLS "
            "exporter; pass ssl=True, a TLSConfig or a context"
        )
    context, check_hostname = to_openssl_context(ssl, server_side=False)
    if server_hostname is None:
        server_hostname = _default_server_hostname(host)
    backend_obj = _resolve_backend(backend)
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

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
            waiter=waiter,
        )

    try:
        transport, tls = await backend_obj.create_connection(
            tls_factory, host, port, local_addrs=local_addrs, **backend_options
        )
    except BaseException:
        # the TLS protocol may have failed the waiter already; nobody
        # will await it now
        if waiter.done() and not waiter.cancelled():
            waiter.exception()
        waiter.cancel()
        raise
    try:
        await waiter
    except BaseException:
        transport.abort()
        raise
    assert isinstance(tls, TLSProtocol)
    app_transport = tls._app_transport
    app_protocol = tls._app_protocol
    assert app_transport is not None and app_protocol is not None
    return app_transport, app_protocol


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    ssl: Any,
    backend: str | Backend = "userspace",
    require_app_keys: bool = False,
    ssl_handshake_timeout: float | None = 30.0,
    **backend_options: Any,
) -> asyncio.AbstractServer:
    """Listen for secure multipath connections; like ``loop.create_server``.

    ``ssl`` is an :class:`mptls.TLSConfig` or an ``OpenSSL.SSL.Context``
    with the server's certificate and key.
    """
    if ssl is None or ssl is False or ssl is True:
        raise ConfigurationError(
            "a server needs ssl=TLSConfig(certfile=..., keyfile=...) or "
            "an OpenSSL.SSL.Context holding its certificate and key"
        )
    context, _ = to_openssl_context(ssl, server_side=True)
    backend_obj = _resolve_backend(backend)

    def tls_factory() -> TLSProtocol:
        return TLSProtocol(
            backend_obj,
            context,
            protocol_factory,
            server_side=True,
            require_app_keys=require_app_keys,
            handshake_timeout=ssl_handshake_timeout,
        )

    return await backend_obj.create_server(
        tls_factory, host, port or 0, **backend_options
    )


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
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
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
) -> asyncio.AbstractServer:
    """A drop-in for ``asyncio.start_server`` over secure multipath.

    ``client_connected_cb(reader, writer)`` runs once the TLS handshake is
    complete and the MPTCP keys are installed.
    """
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(
            reader, client_connected_cb, loop=loop
        )

    return await create_server(factory, host, port, **kwds)
