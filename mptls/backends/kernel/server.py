"""One asyncio server over several listening sockets.

``loop.create_server(sock=...)`` takes a single socket, while an MPTCP
server listening on both address families (or several hosts) has one
socket each. :class:`MultiServer` presents their servers as one
:class:`~mptls.backends.base.Server`. It does no I/O of its own.
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

from mptls.backends.base import Server, closed_server_error


class StopListener(Protocol):
    """A connection's protocol that hears when its server stops."""

    def server_stopping(self) -> None: ...


class MultiServer(Server):
    """Several ``asyncio.Server`` objects acting as one.

    ``protocols``: the protocols the servers' factory made that hear
    when it stops (:class:`StopListener`). :meth:`close_clients` and
    :meth:`abort_clients` tell them the server stops before ending their
    connections: a handshake cut short by that is no refusal.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        servers: Sequence[asyncio.Server],
        protocols: weakref.WeakSet[StopListener] | None = None,
    ) -> None:
        self._loop = loop
        self._servers = tuple(servers)
        self._protocols = protocols
        self._closed = False

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        found: list[socket.socket] = []
        for server in self._servers:
            found.extend(server.sockets)
        return tuple(found)

    def close(self) -> None:
        self._closed = True
        for server in self._servers:
            server.close()

    def close_clients(self) -> None:
        """Close every accepted connection (asyncio's, from Python 3.13)."""
        methods = _clients_methods(self._servers, "close_clients")
        self._stopping()
        for close in methods:
            close()

    def abort_clients(self) -> None:
        """Abort every accepted connection (asyncio's, from Python 3.13)."""
        methods = _clients_methods(self._servers, "abort_clients")
        self._stopping()
        for abort in methods:
            abort()

    def _stopping(self) -> None:
        for protocol in list(self._protocols or ()):
            protocol.server_stopping()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return any(server.is_serving() for server in self._servers)

    async def start_serving(self) -> None:
        if self._closed:
            raise closed_server_error(self)
        for server in self._servers:
            await server.start_serving()

    async def serve_forever(self) -> None:
        await asyncio.gather(
            *(server.serve_forever() for server in self._servers)
        )

    async def wait_closed(self) -> None:
        for server in self._servers:
            await server.wait_closed()


def _clients_methods(
    servers: Sequence[asyncio.Server], name: str
) -> list[Callable[[], None]]:
    """Each server's ``name`` method, all looked up before any is called:
    no server's clients are ended when another's cannot be."""
    methods = []
    for server in servers:
        method: Callable[[], None] | None = getattr(server, name, None)
        if method is None:
            # asyncio's servers track their connections from Python
            # 3.13, other loops' (uvloop's) may not; doing nothing would
            # let the caller believe they were ended
            kind = type(server)
            raise NotImplementedError(
                f"{name}() on the kernel backend needs the event loop's "
                f"server to have it, and "
                f"{kind.__module__}.{kind.__qualname__} has not "
                "(asyncio's servers have it from Python 3.13)"
            )
        methods.append(method)
    return methods
