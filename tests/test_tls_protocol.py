"""TLSProtocol between two in-memory transports, for orderings a socket
cannot be made to produce on demand."""

from __future__ import annotations

import asyncio
import errno
import random
from typing import Any

import pytest
from pki import Pki

from mptls.aio.protocol import StreamProtocol, TLSProtocol, TLSTransport
from mptls.backends.base import KeyDerivation, KeyInstall
from mptls.errors import PeerResetError, TLSError
from mptls.tls.config import TLSConfig
from mptls.tls.engine import AlertDescription
from mptls.tls.keys import KeyMaterial


class NoKeysBackend:
    """Takes no keys: enough for TLS alone. Keeps each end's ``derive``,
    the TLS layer's way to export later key generations."""

    name = "memory"

    def __init__(self) -> None:
        self.derives: list[KeyDerivation] = []

    def install_keys(
        self,
        transport: asyncio.BaseTransport,
        keys: KeyMaterial,
        *,
        derive: KeyDerivation | None = None,
    ) -> KeyInstall:
        assert derive is not None
        self.derives.append(derive)
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
    pki: Pki,
    client_protocol: asyncio.BaseProtocol,
    server_config: TLSConfig | None = None,
    backend: Any = None,
) -> tuple[TLSProtocol, TLSProtocol, asyncio.Queue[asyncio.Transport]]:
    loop = asyncio.get_running_loop()
    backend = backend or NoKeysBackend()
    servers: asyncio.Queue[asyncio.Transport] = asyncio.Queue()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            servers.put_nowait(transport)

    waiter: asyncio.Future[TLSTransport] = loop.create_future()
    client = TLSProtocol(
        backend,
        pki.client().client_context(),
        lambda: client_protocol,
        server_side=False,
        server_hostname="localhost",
        waiter=waiter,
    )
    server = TLSProtocol(
        backend,
        (server_config or pki.server()).server_context(),
        Accept,
        server_side=True,
    )
    to_server, to_client = MemoryTransport(), MemoryTransport()
    to_server.peer, to_client.peer = server, client
    server.connection_made(to_client)
    client.connection_made(to_server)
    await asyncio.wait_for(waiter, 10)
    return client, server, servers


async def test_the_backend_can_export_later_key_generations(
    pki: Pki,
) -> None:
    # what the E mode's rotations ask for: generation n of the same TLS
    # session, the same on both ends, and still once it is closing
    loop = asyncio.get_running_loop()
    backend = NoKeysBackend()
    reader = asyncio.StreamReader(loop=loop)
    _, _, servers = await connected_pair(
        pki, StreamProtocol(reader), backend=backend
    )
    # both handshakes are complete once the server's application has
    # its transport
    server_transport = await asyncio.wait_for(servers.get(), 10)
    assert len(backend.derives) == 2
    first, second = backend.derives
    generations = [first(n) for n in (1, 2)]
    assert generations == [second(n) for n in (1, 2)]
    assert [keys.generation for keys in generations] == [1, 2]
    assert generations[0] != generations[1]

    # after the server's close_notify the session still exports
    server_transport.close()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert first(3) == second(3)


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


async def test_a_write_after_the_peer_refused_the_client_is_dropped(
    pki: Pki,
) -> None:
    # TLS 1.3: the client's handshake is complete before the server
    # reads its (missing) certificate, so the refusal reaches a client
    # that already holds its streams. Its write must not raise a bare
    # RuntimeError, as asyncio's would not: drain() says why it ended
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = StreamProtocol(reader, loop=loop)
    strict = pki.server(cafile=pki.ca_pem, require_client_cert=True)
    client, _, _ = await connected_pair(pki, protocol, strict)
    # the application's own hold on its transport: the protocol keeps it
    # only weakly once the application has heard of the end
    transport = client._app_transport
    assert transport is not None
    for _ in range(100):
        if reader.exception() is not None:
            break
        await asyncio.sleep(0)
    assert reader.exception() is not None, "the server's alert never came"
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)

    writer.write(b"request")
    with pytest.raises(TLSError) as raised:
        await writer.drain()
    assert raised.value.alert == AlertDescription.CERTIFICATE_REQUIRED


async def test_a_write_after_a_held_back_reset_makes_drain_raise(
    pki: Pki,
) -> None:
    # the peer sent all it had and close_notify, then reset; the paused
    # application has bytes left to read. Its reply cannot reach the
    # peer: the write is dropped, and drain() must say so
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1024, loop=loop)
    protocol = StreamProtocol(reader, loop=loop)
    client, _, servers = await connected_pair(pki, protocol)
    server_transport = await asyncio.wait_for(servers.get(), 10)
    server_transport.write(random.Random(7).randbytes(100_000))
    server_transport.close()  # close_notify
    await reader.readexactly(10)
    for _ in range(100):
        if client._engine.eof_received:
            break
        await asyncio.sleep(0)
    assert client._engine.eof_received, "the close_notify never came"
    client.connection_lost(ConnectionResetError(errno.ECONNRESET, "reset"))
    transport = client._app_transport
    assert transport is not None
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)

    writer.write(b"reply")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(writer.drain(), 10)


async def test_a_reply_lost_to_a_broken_pipe_is_not_a_clean_end(
    pki: Pki,
) -> None:
    # the application read the whole request and its close_notify, then
    # replied; the socket's send failed (EPIPE: the peer had reset). The
    # reply is lost, so wait_closed() must not report a clean end
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = StreamProtocol(reader, loop=loop)
    client, _, servers = await connected_pair(pki, protocol)
    server_transport = await asyncio.wait_for(servers.get(), 10)
    server_transport.write(b"request")
    server_transport.close()  # close_notify
    assert await asyncio.wait_for(reader.read(), 10) == b"request"
    transport = client._app_transport
    assert transport is not None
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    writer.write(b"reply")
    await writer.drain()
    client.connection_lost(BrokenPipeError(errno.EPIPE, "Broken pipe"))

    writer.close()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(writer.wait_closed(), 10)


async def test_drain_right_after_a_reset_raises_the_reset(
    pki: Pki,
) -> None:
    # the reset ends the transport at once and tells the application a
    # loop step later; a write and drain() in between found no error
    # on the reader yet, and asyncio's fallback hid the reset behind a
    # bare ConnectionResetError('Connection lost')
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = StreamProtocol(reader, loop=loop)
    client, _, _ = await connected_pair(pki, protocol)
    transport = client._app_transport
    assert transport is not None
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    reset = PeerResetError("the peer aborted the connection (MP_FASTCLOSE)")
    client.connection_lost(reset)

    writer.write(b"into the reset")
    # drain() in this task, as a writing loop calls it: no task of its
    # own, whose start would wait the loop step that tells the reader
    async with asyncio.timeout(10):
        with pytest.raises(PeerResetError) as raised:
            await writer.drain()
        assert raised.value is reset
        with pytest.raises(PeerResetError):
            await writer.drain()
