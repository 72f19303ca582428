"""TLSProtocol between two in-memory transports, for orderings a socket
cannot be made to produce on demand."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from pki import Pki

from mptls.aio.protocol import StreamProtocol, TLSProtocol
from mptls.backends.base import KeyInstall
from mptls.tls.keys import KeyMaterial


class NoKeysBackend:
    """Takes no keys: enough for TLS alone."""

    name = "memory"

    def install_keys(
        self, transport: asyncio.BaseTransport, keys: KeyMaterial
    ) -> KeyInstall:
        return KeyInstall(False, "in memory")


class MemoryTransport(asyncio.Transport):
    """Hands each write to the peer protocol one loop step later.

    It ignores pause_reading, so that what a paused application does not
    take piles up in the TLS engine.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peer: TLSProtocol | None = None
        self.closing = False

    def write(self, data: Any) -> None:
        peer = self.peer
        if peer is not None:
            asyncio.get_running_loop().call_soon(
                peer.data_received, bytes(data)
            )

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


async def connected_pair(
    pki: Pki, client_protocol: asyncio.BaseProtocol
) -> tuple[TLSProtocol, TLSProtocol, asyncio.Queue[asyncio.Transport]]:
    loop = asyncio.get_running_loop()
    backend: Any = NoKeysBackend()
    servers: asyncio.Queue[asyncio.Transport] = asyncio.Queue()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            servers.put_nowait(transport)

    waiter: asyncio.Future[None] = loop.create_future()
    client = TLSProtocol(
        backend,
        pki.client().client_context(),
        lambda: client_protocol,
        server_side=False,
        server_hostname="localhost",
        waiter=waiter,
    )
    server = TLSProtocol(
        backend, pki.server().server_context(), Accept, server_side=True
    )
    to_server, to_client = MemoryTransport(), MemoryTransport()
    to_server.peer, to_client.peer = server, client
    server.connection_made(to_client)
    client.connection_made(to_server)
    await asyncio.wait_for(waiter, 10)
    return client, server, servers


async def test_a_clean_end_right_after_a_resume_loses_nothing(
    pki: Pki,
) -> None:
    # the application reads from its paused reader, which resumes the
    # TLS transport; the delivery that follows waits a loop step. A
    # clean end in between must wait for that delivery, not drop what
    # the engine still holds
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1024, loop=loop)
    client, _, servers = await connected_pair(pki, StreamProtocol(reader))
    server_transport = await asyncio.wait_for(servers.get(), 10)
    answer = random.Random(12).randbytes(100_000)
    server_transport.write(answer)
    server_transport.close()  # close_notify

    first = await reader.readexactly(10)
    for _ in range(100):
        if not client._engine.unread:
            await asyncio.sleep(0)
    assert client._engine.unread, "the paused reader left nothing held"
    held = len(reader._buffer)  # type: ignore[attr-defined]
    taken = await reader.read(held)  # resumes: delivery a step later
    client.connection_lost(None)  # the transport's clean end, first
    rest = await asyncio.wait_for(reader.read(), 10)

    assert first + taken + rest == answer
    assert reader.at_eof()
