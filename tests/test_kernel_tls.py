"""TLS over the kernel backend through mptls's own stream API, on loopback.

``mptls.open_connection`` / ``mptls.start_server`` with
``backend="kernel"``: the stream's ``get_extra_info("mptcp")`` shows
the kernel's view, a fallback to TCP is reported, and
``require_app_keys=True`` fails before any application data flows,
since no released kernel can take TLS-derived keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import netns
import pytest
from support import (
    answer_streamer,
    is_paused,
    leave,
    reporting_to,
    skip_without_ipv6,
    until,
)

import mptls
from mptls.aio.protocol import TLSProtocol
from mptls.backends.base import KeyInstall, Server
from mptls.backends.kernel.backend import KernelBackend
from mptls.backends.kernel.keys import KernelKeyHook, KeySupport
from mptls.errors import KeysUnavailableError
from mptls.tls.config import TLSConfig
from mptls.tls.keys import KeyMaterial

pytestmark = pytest.mark.kernel

HOSTS = ["127.0.0.1", "::1"]


@pytest.fixture(autouse=True)
def _needs_mptcp() -> None:
    reason = netns.mptcp_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[netns.ServerPki]:
    yield netns.write_pki(str(tmp_path))


async def kernel_server(
    handler: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
    ],
    pki: netns.ServerPki,
    *,
    host: str = "127.0.0.1",
    **options: Any,
) -> Server:
    """An mptls server on the kernel backend, on any free port."""
    return await mptls.start_server(
        handler,
        host,
        0,
        ssl=TLSConfig(certfile=pki.server_pem),
        backend="kernel",
        **options,
    )


@contextlib.asynccontextmanager
async def kernel_serving(
    handler: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
    ],
    pki: netns.ServerPki,
    **options: Any,
) -> AsyncIterator[int]:
    """:func:`kernel_server` while the block runs; its port."""
    server = await kernel_server(handler, pki, **options)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def kernel_client(
    pki: netns.ServerPki, port: int, *, host: str = "127.0.0.1", **options: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An mptls client on the kernel backend, trusting the test CA."""
    return await mptls.open_connection(
        host,
        port,
        ssl=TLSConfig(cafile=pki.ca_pem),
        backend="kernel",
        **options,
    )


async def close_at_the_end(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A server handler that reads until the client's end, then closes."""
    await reader.read()
    writer.close()


class EchoServer:
    """Echoes one line per connection; keeps what each server end saw."""

    def __init__(self) -> None:
        self.infos: list[mptls.MptcpInfo] = []
        self.received: list[bytes] = []

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await reader.readline()
            self.received.append(line)
            self.infos.append(writer.get_extra_info("mptcp"))
            writer.write(line)
            await writer.drain()
        except (mptls.MptlsError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("host", HOSTS)
async def test_tls_over_kernel_mptcp(pki: netns.ServerPki, host: str) -> None:
    skip_without_ipv6(host)
    echo = EchoServer()
    server = await kernel_server(echo.handle, pki, host=host)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await kernel_client(pki, port, host=host)
    writer.write(b"over kernel mptcp\n")
    assert await asyncio.wait_for(reader.readline(), 10) == (
        b"over kernel mptcp\n"
    )
    client_info = writer.get_extra_info("mptcp")
    assert client_info.backend == "kernel"
    assert client_info.mode == "kernel"
    assert client_info.keys_installed is False
    assert "no interface to take external MPTCP keys" in (
        client_info.keys_reason
    )
    (server_info,) = echo.infos
    assert server_info.mode == "kernel"
    # both ends derived the same exporter keys, and only say so by tag
    assert server_info.key_fingerprint == client_info.key_fingerprint
    assert server_info.key_fingerprint is not None
    writer.close()
    server.close()
    await server.wait_closed()


async def test_write_buffer_limits_are_asyncio_tls_ones(
    pki: netns.ServerPki,
) -> None:
    # asyncio's TLS transport pauses its writer above 512 KiB; the kernel
    # backend's streams paused theirs above their socket transport's
    # 64 KiB, so drain() waited where asyncio's would not
    limits: list[tuple[int, int]] = []

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        limits.append(writer.transport.get_write_buffer_limits())
        await reader.read()
        writer.close()

    async with kernel_serving(handler, pki) as port:
        reader, writer = await kernel_client(pki, port)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert writer.transport.get_write_buffer_limits() == (
            128 * 2**10,
            512 * 2**10,
        )
        assert limits == [(128 * 2**10, 512 * 2**10)]
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10)


async def test_a_closed_stream_shows_no_socket(pki: netns.ServerPki) -> None:
    # as asyncio's TLS streams: the addresses stay readable, the closed
    # socket is no longer shown (it was, with descriptor -1)
    async with kernel_serving(close_at_the_end, pki) as port:
        _, writer = await kernel_client(pki, port)
        assert writer.get_extra_info("socket").fileno() >= 0
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10)
        assert writer.get_extra_info("socket") is None
        assert writer.get_extra_info("peername")[1] == port


async def test_a_close_right_after_connect_ends_both_sides_cleanly(
    pki: netns.ServerPki,
) -> None:
    # the client closes before it has read the server's session tickets:
    # a socket closed with unread bytes answers the server with a TCP
    # reset. As asyncio's TLS does, the client waits for the server's
    # close_notify (reading what came before it) and then closes.
    ends: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()

    async with kernel_serving(reporting_to(ends, handler), pki) as port:
        for _ in range(5):
            _, writer = await kernel_client(pki, port)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 10)
            assert await asyncio.wait_for(ends.get(), 10) is None


async def test_nothing_reaches_the_application_after_its_close(
    pki: netns.ServerPki,
) -> None:
    # the close waits for the peer's close_notify and reads what comes
    # before it: that is dropped, as asyncio's transports deliver
    # nothing after close()
    answer = random.Random(10).randbytes(1 << 20)

    async def stream_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(answer)
        await writer.drain()
        await reader.read()
        writer.close()

    class CloseAtFirstData(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.after_close = 0
            self.lost = asyncio.get_running_loop().create_future()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            assert self.transport is not None
            if self.transport.is_closing():
                self.after_close += len(data)
            else:
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.set_result(exc)

    async with kernel_serving(stream_then_close, pki) as port:
        _, client = await mptls.create_connection(
            CloseAtFirstData,
            "127.0.0.1",
            port,
            ssl=TLSConfig(cafile=pki.ca_pem),
            backend="kernel",
        )
        assert isinstance(client, CloseAtFirstData)
        assert await asyncio.wait_for(client.lost, 10) is None
    assert client.after_close == 0


async def test_an_abort_reaches_the_peer_as_a_reset(
    pki: netns.ServerPki,
) -> None:
    # as the userspace backend's MP_FASTCLOSE does: the peer's reader
    # fails with a ConnectionResetError (PeerResetError), not with an end
    # without close_notify
    async def abort_after_five(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(5)
        writer.transport.abort()

    async with kernel_serving(abort_after_five, pki) as port:
        reader, writer = await kernel_client(pki, port)
        writer.write(b"hello, and more the server never reads")
        with pytest.raises(ConnectionResetError) as caught:
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert isinstance(caught.value, mptls.PeerResetError)
    assert "reset" in str(caught.value)


async def test_a_reset_during_the_handshake_is_an_mptls_error(
    pki: netns.ServerPki,
) -> None:
    # a plain TCP server that resets the connection as the ClientHello
    # arrives: the client's error is in mptls's tree, and still a
    # ConnectionResetError
    async def reset_at_hello(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()

    server = await asyncio.start_server(reset_at_hello, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(mptls.PeerResetError) as caught:
            await asyncio.wait_for(kernel_client(pki, port), 10)
    assert isinstance(caught.value, ConnectionResetError)
    assert "during the TLS handshake" in str(caught.value)


async def test_a_close_during_the_handshake_is_a_connection_reset(
    pki: netns.ServerPki,
) -> None:
    # a plain TCP server that reads the ClientHello and ends its side
    # (FIN, no reset): asyncio's TLS raises ConnectionResetError, and
    # code written for it must catch mptls's error the same way
    release = asyncio.Event()

    async def end_at_hello(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(4096)
        writer.write_eof()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(end_at_hello, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionResetError) as caught:
            await asyncio.wait_for(kernel_client(pki, port), 10)
        release.set()
    assert isinstance(caught.value, mptls.PeerResetError)
    assert "during the TLS handshake" in str(caught.value)


async def test_a_close_right_after_a_read_resumed_delivers_nothing(
    pki: netns.ServerPki,
) -> None:
    # a read from a paused reader resumes it (later, in a callback) and
    # returns at once; a close in the same step must not let that
    # callback hand the shutdown's plaintext to the closed reader, whose
    # limit would pause the socket until ssl_shutdown_timeout aborts
    answer = random.Random(10).randbytes(4 << 20)
    ends: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(answer)
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()

    async with kernel_serving(reporting_to(ends, handler), pki) as port:
        reader, writer = await kernel_client(
            pki, port, ssl_shutdown_timeout=30
        )
        assert await reader.readexactly(10) == answer[:10]
        await until(lambda: is_paused(reader), "the reader's pause")
        held = len(reader._buffer)  # type: ignore[attr-defined]
        assert await reader.read(held) == answer[10 : 10 + held]
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10)
        assert reader._buffer == b""  # type: ignore[attr-defined]
        assert await asyncio.wait_for(ends.get(), 10) is None


async def test_a_close_the_peer_never_answers_ends_in_a_timeout(
    pki: netns.ServerPki,
) -> None:
    # as asyncio's TLS: no close_notify within ssl_shutdown_timeout makes
    # wait_closed() raise a TimeoutError
    release = asyncio.Event()

    async def hold(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await release.wait()
        writer.close()

    async with kernel_serving(hold, pki) as port:
        _, writer = await kernel_client(pki, port, ssl_shutdown_timeout=0.3)
        writer.close()
        with pytest.raises(TimeoutError) as caught:
            await asyncio.wait_for(writer.wait_closed(), 10)
        release.set()
    assert isinstance(caught.value, mptls.MptlsTimeoutError)
    assert "ssl_shutdown_timeout" in str(caught.value)


async def test_a_peer_that_keeps_writing_after_a_close_is_reset(
    pki: netns.ServerPki,
) -> None:
    # the server's close gave up at ssl_shutdown_timeout, but the kernel
    # kept its MPTCP connection (closed with nothing unread: the close
    # reads until then) and took the client's bytes for nobody, until
    # its window was full and the client's drain() waited for room that
    # never came. Paced, so that the server has read all at its close.
    async def close_at_once(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.close()
        with contextlib.suppress(TimeoutError):
            await writer.wait_closed()

    async with kernel_serving(
        close_at_once, pki, ssl_shutdown_timeout=0.5
    ) as port:
        reader, writer = await kernel_client(pki, port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(10):
                while True:
                    writer.write(bytes(2**14))
                    await writer.drain()
                    await asyncio.sleep(0.01)
        writer.close()


async def test_a_close_that_gives_up_still_delivers_what_was_sent(
    pki: netns.ServerPki,
) -> None:
    # the close gives up on the client's close_notify, but the client
    # has not taken all the server sent yet: a reset would lose what
    # the kernel still holds for it (the client read until a reset)
    size = 2 * 2**20
    gave_up = asyncio.Event()

    async def send_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert await reader.readexactly(2) == b"go"
        # all of it handed to the kernel: none left to drop at the abort
        writer.transport.set_write_buffer_limits(0)
        writer.write(bytes(size))
        await asyncio.wait_for(writer.drain(), 10)
        writer.close()
        with contextlib.suppress(TimeoutError):
            await writer.wait_closed()
        gave_up.set()

    async with kernel_serving(
        send_then_close, pki, ssl_shutdown_timeout=0.5
    ) as port:
        reader, writer = await kernel_client(pki, port)
        # a small window: the server's kernel holds the rest
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 2**16
        )
        writer.write(b"go")
        # the client takes nothing until the server gave up
        await asyncio.wait_for(gave_up.wait(), 10)
        received = 0
        async with asyncio.timeout(10):
            while data := await reader.read(2**16):
                received += len(data)
        assert received == size
        writer.close()


class KeysThatFail(KernelKeyHook):
    """A hook that may install keys, as a patched kernel's would, and
    fails on every connection."""

    def support(self) -> KeySupport:
        return KeySupport(True, "a hook of the tests")

    def install(self, sock: socket.socket, keys: KeyMaterial) -> KeyInstall:
        return KeyInstall(installed=False, reason="refused by the test")


async def test_require_app_keys_fails_before_application_data(
    pki: netns.ServerPki,
) -> None:
    echo = EchoServer()
    # no released kernel takes the keys: neither end tries at all
    with pytest.raises(KeysUnavailableError, match="no interface"):
        await kernel_server(echo.handle, pki, require_app_keys=True)
    server = await kernel_server(echo.handle, pki)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(KeysUnavailableError, match="no interface"):
        await kernel_client(pki, port, require_app_keys=True)
    # a hook that may install keys, and does not on this connection: the
    # server refuses the connection before the application sees a byte
    strict = await mptls.start_server(
        echo.handle,
        "127.0.0.1",
        0,
        ssl=TLSConfig(certfile=pki.server_pem),
        backend=KernelBackend(key_hook=KeysThatFail()),
        require_app_keys=True,
    )
    strict_port = strict.sockets[0].getsockname()[1]
    reader, writer = await kernel_client(pki, strict_port)
    writer.write(b"must not arrive\n")
    with pytest.raises((mptls.MptlsError, ConnectionError)):
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            raise ConnectionError("closed without an answer")
    assert echo.received == []
    writer.close()
    for one in (server, strict):
        one.close()
        await one.wait_closed()


@pytest.mark.parametrize("host", HOSTS)
async def test_plain_tls_server_gives_reported_fallback(
    pki: netns.ServerPki, host: str
) -> None:
    skip_without_ipv6(host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_pem)

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    plain = await asyncio.start_server(handle, host, 0, ssl=context)
    port = plain.sockets[0].getsockname()[1]
    reader, writer = await kernel_client(pki, port, host=host)
    writer.write(b"plain tcp underneath\n")
    assert await asyncio.wait_for(reader.readline(), 10) == (
        b"plain tcp underneath\n"
    )
    report = writer.get_extra_info("mptcp")
    assert report.mode == "fallback"
    assert report.fallback is True
    assert report.subflows[0].remote_address == (host, port)
    writer.close()
    plain.close()
    await plain.wait_closed()


async def _echo_over_kernel(
    pki: netns.ServerPki, payload: bytes, limit: int
) -> bytes:
    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(await reader.readexactly(len(payload)))
        await writer.drain()
        writer.close()

    server = await kernel_server(echo, pki, limit=limit)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await kernel_client(pki, port, limit=limit)
    writer.write(payload)
    try:
        return await asyncio.wait_for(reader.readexactly(len(payload)), 20)
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def test_reads_go_through_one_reused_buffer(
    pki: netns.ServerPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # both ends read the socket with buffer_updated, never a fresh bytes
    # per recv, and the reuse of the buffer corrupts nothing: 3 MiB (six
    # buffers' worth) of seeded random bytes come back intact
    fills: list[int] = []
    original = TLSProtocol.buffer_updated

    def counting(self: TLSProtocol, nbytes: int) -> None:
        fills.append(nbytes)
        original(self, nbytes)

    def no_plain_reads(self: TLSProtocol, data: bytes) -> None:
        raise AssertionError("a plain-protocol read on the kernel path")

    monkeypatch.setattr(TLSProtocol, "buffer_updated", counting)
    monkeypatch.setattr(TLSProtocol, "data_received", no_plain_reads)
    payload = random.Random(5).randbytes(3 << 20)
    # a limit above the payload: no pause, only the reads are tested
    assert await _echo_over_kernel(pki, payload, 4 << 20) == payload
    # the ciphertext of both directions, plus the handshake
    assert sum(fills) > 2 * len(payload)


async def test_readexactly_of_more_than_twice_the_limit(
    pki: netns.ServerPki,
) -> None:
    # the reader pauses the TLS transport at twice its limit (64 KiB by
    # default) and resumes it right before it waits: what TLS delivers
    # on resume must come after that wait began, or the reader hangs
    payload = random.Random(6).randbytes(1 << 20)
    assert await _echo_over_kernel(pki, payload, 64 * 1024) == payload


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_leaving_while_paused_with_unread_data_ends(
    pki: netns.ServerPki, how: str
) -> None:
    await _leave_while_paused(pki, how)


@pytest.mark.parametrize("how", ["close", "abort"])
def test_runs_on_uvloop(pki: netns.ServerPki, how: str) -> None:
    # uvloop's transports are not asyncio.Transport subclasses: the TLS
    # layer over a kernel socket must take them all the same
    uvloop = pytest.importorskip("uvloop")
    payload = random.Random(9).randbytes(1 << 20)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        echoed = runner.run(
            asyncio.wait_for(_echo_over_kernel(pki, payload, 64 * 1024), 30)
        )
        assert echoed == payload
        runner.run(asyncio.wait_for(_leave_while_paused(pki, how), 30))


def test_an_abort_after_the_close_does_nothing_on_uvloop(
    pki: netns.ServerPki,
) -> None:
    # as on asyncio's loop: uvloop's closed socket refuses setsockopt()
    # with a ValueError, which the abort's reset let through
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(_abort_after_close(pki), 30))


async def _abort_after_close(pki: netns.ServerPki) -> None:
    async with kernel_serving(close_at_the_end, pki) as port:
        _, writer = await kernel_client(pki, port)
        writer.close()
        await writer.wait_closed()
        writer.transport.abort()
        assert writer.transport.is_closing()


async def _leave_while_paused(pki: netns.ServerPki, how: str) -> None:
    """Close or abort while the reader is paused over unread data."""
    answer = random.Random(8).randbytes(1 << 20)
    server = await kernel_server(answer_streamer(answer), pki)
    port = server.sockets[0].getsockname()[1]
    async with server:
        # the server never closes: a close gives up waiting for its
        # close_notify after ssl_shutdown_timeout
        reader, writer = await kernel_client(
            pki, port, ssl_shutdown_timeout=0.5
        )
        assert await reader.readexactly(10) == answer[:10]
        await until(lambda: is_paused(reader), "the reader's pause")
        await leave(writer, how)
        assert writer.transport.is_closing()


async def test_mptcp_info_of_a_connection_reset_before_it_was_asked(
    pki: netns.ServerPki,
) -> None:
    # the kernel forgets a closed socket: a first get_extra_info("mptcp")
    # after a reset raised BackendError instead of the connection's info
    async def reset(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.transport.abort()

    async with kernel_serving(reset, pki) as port:
        reader, writer = await kernel_client(pki, port)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(reader.read(), 10)
        # shown no longer once closed (asyncio closes it right after the
        # protocol's connection_lost, in the same step)
        await until(
            lambda: writer.get_extra_info("socket") is None,
            "the client's socket closed",
        )
        info = writer.get_extra_info("mptcp")
        writer.close()
    assert info.mode == "kernel"
    assert info.local_token is not None
    assert info.subflows == ()
    assert info.keys_installed is False
