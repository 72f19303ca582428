"""The TCP connections under subflows, to and from addresses as given.

An IP literal is never looked up as a name. asyncio's
``create_connection`` hands one it cannot parse itself (any with a scope
id) to ``getaddrinfo`` without ``AI_NUMERICHOST``; where the system
refuses the scope (glibc takes one on a link-local address only, so not
``"::1%lo"``), that looked the whole string up as a name, on the
network. Every subflow, the first, a path of its own and ``add_path``'s,
connects here instead, through
:func:`mptls.backends.base.host_addresses`.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from mptls.backends.base import (
    ONE_BY_ONE,
    AddressRace,
    connect_any,
    host_addresses,
)
from mptls.errors import ConfigurationError


async def connect_subflow(
    protocol: asyncio.BaseProtocol,
    remote: tuple[str, int],
    local: str | None,
) -> None:
    """Connect a TCP connection from ``local`` to ``remote`` and make it
    ``protocol``'s; the socket is closed if that fails or is cancelled."""
    loop = asyncio.get_running_loop()
    sock = await connect_tcp(loop, remote[0], remote[1], local, ONE_BY_ONE)
    try:
        await loop.create_connection(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise


async def connect_tcp(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    local: str | None,
    race: AddressRace,
    family: int = socket.AF_UNSPEC,
) -> socket.socket:
    """A TCP socket connected to ``host``, trying its addresses as
    ``race`` says.

    As on the kernel backend (one helper for both): with ``local`` only
    addresses of its family are tried, and a host whose every address
    fails is one error with the errno of the last, where asyncio's own
    loop over the addresses gives an ``OSError`` with none.
    """
    bind_to: tuple[Any, ...] | None = None
    family_keyword = local is None and family != socket.AF_UNSPEC
    if local is not None:
        # an address of this host, never a name to look up
        local_addresses = await host_addresses(
            loop, local, 0, flags=socket.AI_NUMERICHOST
        )
        local_family, bind_to = local_addresses[0]
        if family not in (socket.AF_UNSPEC, local_family):
            raise ConfigurationError(
                f"family={socket.AddressFamily(family).name} and a local "
                f"address of another family, {local}"
            )
        family = local_family
    addresses = await host_addresses(
        loop, host, port, family, family_keyword=family_keyword
    )
    return await connect_any(
        host,
        port,
        addresses,
        local=bind_to,
        new_socket=_tcp_socket,
        connect=loop.sock_connect,
        race=race,
    )


def _tcp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setblocking(False)
    return sock
