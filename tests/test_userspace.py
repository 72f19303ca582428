"""The userspace backend end to end, on real loopback sockets."""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import random
import socket
import ssl
import struct
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pki import Pki
from support import (
    answer_streamer,
    echo,
    is_paused,
    leave,
    reporting_to,
    skip_without_ipv6,
    still_echoes,
    until,
)

import mptls
from mptls.backends.userspace.backend import (
    _FirstSubflow,
    _shared_client_tokens,
)
from mptls.mptcp.config import ConnectionConfig
from mptls.mptcp.framing import NOT_MPTLS_REPLY, PREAMBLE, Segment
from mptls.mptcp.options import Dss
from mptls.mptcp.state import options_of

Handler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]

CHUNK = 256 * 1024


class Served:
    """A running server and what its handler saw."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.infos: list[mptls.MptcpInfo] = []
        self.done: asyncio.Queue[object] = asyncio.Queue()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


async def serve(pki: Pki, handler: Handler, **kw: object) -> Served:
    served = Served()

    async def run(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await handler(reader, writer)
            served.infos.append(writer.get_extra_info("mptcp"))
            await served.done.put(None)
        except Exception as exc:  # reported to the test through the queue
            await served.done.put(exc)
        finally:
            writer.close()

    served.server = await mptls.start_server(
        run, "127.0.0.1", 0, ssl=pki.server(), **kw
    )
    return served


@pytest.fixture
async def echo_server(pki: Pki) -> AsyncIterator[Served]:
    served = await serve(pki, echo)
    assert served.server is not None
    async with served.server:
        yield served


async def open_one_path(
    pki: Pki, port: int, **options: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with one subflow, from the default address."""
    return await mptls.open_connection(
        "127.0.0.1", port, ssl=pki.client(), **options
    )


async def open_two_paths(
    pki: Pki, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a subflow from 127.0.0.1 and one from 127.0.0.2."""
    return await mptls.open_connection(
        "127.0.0.1",
        port,
        ssl=pki.client(),
        local_addrs=["127.0.0.1", "127.0.0.2"],
    )


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    async def send() -> None:
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK):
            writer.write(view[offset : offset + CHUNK])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await reader.read()
    await sender
    return received


async def test_echo_over_two_paths(pki: Pki, echo_server: Served) -> None:
    reader, writer = await open_two_paths(pki, echo_server.port)
    payload = bytes(range(256)) * 4096
    assert await exchange(reader, writer, payload) == payload

    info = writer.get_extra_info("mptcp")
    assert info.backend == "userspace"
    assert info.mode == "G"
    assert info.keys_installed
    assert len(info.local_token) == 16 and len(info.remote_token) == 16
    local_ips = {sub.local_address[0] for sub in info.subflows}
    assert local_ips == {"127.0.0.1", "127.0.0.2"}
    writer.close()
    await writer.wait_closed()

    assert await echo_server.done.get() is None
    server_info = echo_server.infos[0]
    assert server_info.local_token == info.remote_token
    assert server_info.remote_token == info.local_token
    assert server_info.key_fingerprint == info.key_fingerprint


@pytest.mark.slow
async def test_64_mib_over_two_subflows(pki: Pki) -> None:
    digests: list[str] = []

    async def sink(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        digest = hashlib.sha256()
        while data := await reader.read(CHUNK):
            digest.update(data)
        digests.append(digest.hexdigest())
        writer.write(b"ok")
        writer.write_eof()

    served = await serve(pki, sink)
    assert served.server is not None
    async with served.server:
        reader, writer = await open_two_paths(pki, served.port)
        block = hashlib.sha256(b"mptls").digest() * (CHUNK // 32)
        sent = hashlib.sha256()
        total = 64 * 1024 * 1024
        for _ in range(total // CHUNK):
            writer.write(block)
            sent.update(block)
            await writer.drain()
        writer.write_eof()
        assert await reader.read() == b"ok"
        assert await served.done.get() is None
        writer.close()
        await writer.wait_closed()

    assert digests == [sent.hexdigest()]
    received = [sub.bytes_received for sub in served.infos[0].subflows]
    assert len(received) == 2
    assert sum(received) >= total
    # both loopback paths are alike: the lowest-RTT subflow takes data
    # until its in-flight limit, the other what that leaves over
    for share in received:
        assert share >= total // 20, received


async def test_readexactly_of_more_than_twice_the_limit(
    pki: Pki,
) -> None:
    # the reader pauses the TLS transport at twice its limit (64 KiB by
    # default) and resumes it right before it waits: what TLS delivers
    # on resume must come after that wait began, or the reader hangs
    payload = random.Random(6).randbytes(1 << 20)

    async def echo_whole(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(await reader.readexactly(len(payload)))
        await writer.drain()

    served = await serve(pki, echo_whole)
    assert served.server is not None
    async with served.server:
        reader, writer = await open_two_paths(pki, served.port)
        writer.write(payload)
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        writer.close()
        await writer.wait_closed()
        assert await served.done.get() is None
    assert echoed == payload


async def test_a_protocol_of_its_own_gets_bytes_it_may_keep(
    pki: Pki, echo_server: Served
) -> None:
    # mptls's own stream protocol takes plaintext as views of the TLS
    # engine's buffer (it copies them at once); any other protocol gets
    # bytes that stay what they were after its data_received returns
    payload = random.Random(9).randbytes(300_000)
    kept: list[object] = []
    arrived = asyncio.get_running_loop().create_future()

    class Keeper(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            kept.append(data)
            if sum(map(len, kept)) >= len(payload):
                arrived.set_result(None)

    transport, _ = await mptls.create_connection(
        Keeper, "127.0.0.1", echo_server.port, ssl=pki.client()
    )
    try:
        transport.write(payload)
        await asyncio.wait_for(arrived, 10)
    finally:
        transport.close()
    assert {type(data) for data in kept} == {bytes}
    assert b"".join(map(bytes, kept)) == payload


@pytest.mark.parametrize("reuse_address", [True, False])
async def test_asyncio_server_keywords_are_taken(
    pki: Pki, reuse_address: bool
) -> None:
    # asyncio.start_server's own keywords, as a drop-in is called
    server = await mptls.start_server(
        echo,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        start_serving=False,
        reuse_address=reuse_address,
        backlog=8,
    )
    async with server:
        (sock,) = server.sockets
        reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert bool(reuse) is reuse_address
        assert not server.is_serving()
        await server.start_serving()
        assert server.is_serving()
        reader, writer = await mptls.open_connection(
            "127.0.0.1", sock.getsockname()[1], ssl=pki.client()
        )
        assert await exchange(reader, writer, b"once started") == (
            b"once started"
        )


async def test_an_abort_right_after_connect_is_not_a_send_error(
    pki: Pki,
) -> None:
    # the client's MP_FASTCLOSE reaches the server in the read that
    # completes its handshake: the server's session tickets then met an
    # ended connection, and its reader failed with a "send() after
    # close()" it never made
    seen: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    server = await mptls.start_server(
        reporting_to(seen, handler), "127.0.0.1", 0, ssl=pki.server()
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        for _ in range(5):
            _, writer = await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client()
            )
            writer.transport.abort()
            error = await asyncio.wait_for(seen.get(), 10)
            assert isinstance(error, ConnectionResetError), repr(error)
            assert "send()" not in str(error)


async def test_a_protocol_set_on_a_stream_gets_what_follows(
    pki: Pki, echo_server: Served
) -> None:
    # set_protocol hands the stream's transport to another protocol:
    # what arrives after that is the new protocol's, not the old
    # reader's (which took plaintext as views of the TLS buffer)
    reader, writer = await mptls.open_connection(
        "127.0.0.1", echo_server.port, ssl=pki.client()
    )
    writer.write(b"first")
    assert await reader.readexactly(5) == b"first"
    payload = random.Random(11).randbytes(50_000)
    kept: list[bytes] = []
    arrived = asyncio.get_running_loop().create_future()

    class Taker(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            kept.append(bytes(data))
            if sum(map(len, kept)) >= len(payload):
                arrived.set_result(None)

    writer.transport.set_protocol(Taker())
    try:
        writer.write(payload)
        await asyncio.wait_for(arrived, 10)
    finally:
        writer.transport.abort()
    assert b"".join(kept) == payload
    assert not reader._buffer  # type: ignore[attr-defined]


@pytest.mark.parametrize("protocol", [None, 5])
async def test_set_protocol_refuses_what_is_no_protocol(
    pki: Pki, echo_server: Served, protocol: Any
) -> None:
    # None was the transport's "no handshake yet": the next read made
    # the reader's connection_made() run again ("Transport already
    # set"), which failed the connection
    reader, writer = await mptls.open_connection(
        "127.0.0.1", echo_server.port, ssl=pki.client()
    )
    transport = writer.transport
    before = transport.get_protocol()

    with pytest.raises(mptls.ConfigurationError, match="set_protocol"):
        transport.set_protocol(protocol)
    assert transport.get_protocol() is before
    await still_echoes(reader, writer, b"still the stream's")


async def test_a_missing_client_certificate_is_the_tls_alert(
    pki: Pki,
) -> None:
    # the server's alert is written while it handles the read that
    # brought the client's Finished, and must leave before its reset:
    # the client then fails with the alert, not with a refused rejoin
    async def never(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.close()

    server = await mptls.start_server(
        never,
        "127.0.0.1",
        0,
        ssl=pki.server(cafile=pki.ca_pem, require_client_cert=True),
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        # TLS 1.3: the client's handshake is over before the server has
        # checked its (missing) certificate
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        with pytest.raises(ssl.SSLError) as caught:
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert isinstance(caught.value, mptls.TLSError)
    assert "certificate_required" in str(caught.value)


async def test_client_with_one_address(pki: Pki, echo_server: Served) -> None:
    reader, writer = await mptls.open_connection(
        "127.0.0.1", echo_server.port, ssl=pki.client()
    )
    assert await exchange(reader, writer, b"hello") == b"hello"
    info = writer.get_extra_info("mptcp")
    assert len(info.subflows) == 1
    writer.close()
    await writer.wait_closed()


async def test_half_close_lets_the_peer_answer(pki: Pki) -> None:
    async def upper(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        data = await reader.read()  # until the client's write_eof
        writer.write(data.upper())
        writer.write_eof()

    served = await serve(pki, upper)
    assert served.server is not None
    async with served.server:
        reader, writer = await open_one_path(pki, served.port)
        writer.write(b"half ")
        writer.write(b"close")
        assert writer.can_write_eof()
        writer.write_eof()
        assert await reader.read() == b"HALF CLOSE"
        assert await served.done.get() is None
        writer.close()
        await writer.wait_closed()


async def test_standard_extra_info(pki: Pki, echo_server: Served) -> None:
    _reader, writer = await mptls.open_connection(
        "127.0.0.1", echo_server.port, ssl=pki.client()
    )
    assert writer.get_extra_info("peername")[1] == echo_server.port
    assert writer.get_extra_info("sockname")[0] == "127.0.0.1"
    cert = writer.get_extra_info("peercert")
    assert cert is not None and "subjectAltName" in cert
    cipher = writer.get_extra_info("cipher")
    assert cipher is not None and cipher[1] == "TLSv1.3"
    assert writer.get_extra_info("no such key", "default") == "default"
    writer.close()
    await writer.wait_closed()


async def test_stdlib_client_context(pki: Pki, echo_server: Served) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    reader, writer = await mptls.open_connection(
        "127.0.0.1", echo_server.port, ssl=context
    )
    assert await exchange(reader, writer, b"stdlib") == b"stdlib"
    writer.close()
    await writer.wait_closed()


async def test_wrong_host_name_is_refused(
    pki: Pki, echo_server: Served
) -> None:
    with pytest.raises(mptls.CertificateError):
        await mptls.open_connection(
            "127.0.0.1",
            echo_server.port,
            ssl=pki.client(),
            server_hostname="not-this-server.invalid",
        )


async def test_server_that_is_not_mptls() -> None:
    async def plain(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(mptls.NotMptlsPeerError, match="HTTP"):
            await asyncio.wait_for(
                mptls.open_connection("127.0.0.1", port, ssl=True), 10
            )


async def test_plain_client_gets_a_clear_answer(
    echo_server: Served,
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", echo_server.port
    )
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer == NOT_MPTLS_REPLY
    writer.close()


async def test_tls_is_required(echo_server: Served) -> None:
    with pytest.raises(mptls.ConfigurationError, match="TLS"):
        await mptls.open_connection("127.0.0.1", echo_server.port, ssl=None)


async def test_slow_reader_pushes_back(pki: Pki) -> None:
    release = asyncio.Event()
    total = 0

    async def lazy(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal total
        await release.wait()
        while data := await reader.read(CHUNK):
            total += len(data)

    served = await serve(pki, lazy)
    assert served.server is not None
    async with served.server:
        _reader, writer = await open_two_paths(pki, served.port)
        block = b"x" * CHUNK
        written = 0
        # the reader does not read: drain() must stop returning long
        # before the 256 MiB the writer would like to send
        while written < 256 * 1024 * 1024:
            writer.write(block)
            written += len(block)
            try:
                await asyncio.wait_for(writer.drain(), 2.0)
            except TimeoutError:
                break
        assert written < 64 * 1024 * 1024, written

        release.set()
        await writer.drain()
        writer.write_eof()
        assert await served.done.get() is None
        assert total == written
        writer.close()
        await writer.wait_closed()


def test_runs_on_uvloop_with_two_subflows(pki: Pki) -> None:
    # uvloop's transports are not asyncio.Transport subclasses and its
    # servers take no attributes: neither may stop the backend
    uvloop = pytest.importorskip("uvloop")
    data = hashlib.sha256(b"uvloop").digest() * (4 * 1024 * 1024 // 32)

    async def main() -> tuple[bytes, int, object]:
        served = await serve(pki, echo)
        assert served.server is not None
        async with served.server:
            reader, writer = await open_two_paths(pki, served.port)
            writer.write(data)
            writer.write_eof()
            echoed = await reader.read(-1)
            info = writer.get_extra_info("mptcp")
            writer.close()
            await writer.wait_closed()
            listener = getattr(served.server, "mptls_listener", None)
        return echoed, len(info.subflows), listener

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        echoed, subflows, listener = runner.run(main())
    assert echoed == data
    assert subflows == 2
    assert listener is not None


@pytest.mark.parametrize(
    "sent", [b"", b"MPTLS/1\n"], ids=["nothing", "preamble"]
)
@pytest.mark.parametrize(
    "limit", ["handshake_timeout", "ssl_handshake_timeout"]
)
async def test_silent_subflow_is_closed_after_handshake_timeout(
    pki: Pki, sent: bytes, limit: str
) -> None:
    # asyncio's ssl_handshake_timeout counts from the accept: a shorter
    # one bounds a client that sends nothing, as the MPTCP limit does
    served = await serve(pki, echo, **{limit: 0.3})
    assert served.server is not None
    async with served.server:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", served.port
        )
        started = loop.time()
        writer.write(sent)
        # the server ends the TCP connection; without a limit this read
        # waits for ever and the wait_for below fails the test
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.25 <= loop.time() - started < 3.0
        assert served.server.mptls_listener.transports == []
        writer.close()


async def test_plain_tls_server_is_named_not_mptls(pki: Pki) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert_pem, pki.key_pem)

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.close()

    server = await asyncio.start_server(
        handler, "127.0.0.1", 0, ssl=context, ssl_handshake_timeout=5
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(mptls.NotMptlsPeerError, match="not an mptls"):
            await asyncio.wait_for(
                mptls.open_connection("127.0.0.1", port, ssl=pki.client()),
                10,
            )


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        # options length 41: more than a TCP header holds
        (struct.pack(">BBHI", 0x12, 41, 0, 0) + b"\x01" * 41, "length 41"),
        (struct.pack(">BBHI", 0xFF, 0, 0, 0), "flags"),
        (struct.pack(">BBHI", 0x12, 4, 0, 0) + b"\x02\x04\x05\xb4", "kind 2"),
    ],
    ids=["options-length", "flags", "option-kind"],
)
async def test_a_frame_the_client_cannot_read_is_named(
    pki: Pki, frame: bytes, message: str
) -> None:
    # the client closed the subflow and reported only that "every
    # subflow of the connection closed before the MPTCP handshake
    # completed", with the framing error in a debug line
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(1)
        writer.write(PREAMBLE + frame)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(mptls.FramingError, match=message):
            await asyncio.wait_for(
                mptls.open_connection("127.0.0.1", port, ssl=pki.client()),
                10,
            )


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_server_ending_before_the_preamble_is_not_mptls(
    pki: Pki, how: str
) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(1)
        if how == "reset":
            writer.transport.abort()
        else:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(
            mptls.NotMptlsPeerError, match="preamble"
        ) as caught:
            # a lost subflow would wait path_loss_timeout (30 s) instead
            await asyncio.wait_for(
                mptls.open_connection("127.0.0.1", port, ssl=pki.client()),
                10,
            )
        assert loop.time() - started < 2.0
    # asyncio's TLS client raises ConnectionResetError for a server that
    # ends the connection in its handshake: its except clauses catch this
    assert isinstance(caught.value, ConnectionResetError)
    assert caught.value.errno == errno.ECONNRESET


@pytest.mark.parametrize(
    ("host", "shown"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")]
)
async def test_listener_closed_with_the_connection_queued_is_a_reset(
    pki: Pki, host: str, shown: str
) -> None:
    # what the kernel does to connections queued on the listening socket
    # of a pool worker that dies (net.ipv4.tcp_migrate_req=0): a reset
    # before the preamble, which a retry may get past
    skip_without_ipv6(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()
    queued: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not queued.done():
            queued.set_result(None)

    loop.add_reader(listener.fileno(), readable)
    connecting = asyncio.create_task(
        mptls.open_connection(host, port, ssl=pki.client())
    )
    try:
        await asyncio.wait_for(queued, 10)
    finally:
        loop.remove_reader(listener.fileno())
        listener.close()  # never accepted: the kernel resets the queue
    with pytest.raises(mptls.PeerResetError, match="preamble") as caught:
        await asyncio.wait_for(connecting, 10)
    assert isinstance(caught.value, ConnectionResetError)
    # an IPv6 host in brackets, or its port would read as part of it
    assert str(caught.value).startswith(f"{shown}:{port} reset")
    assert "not an mptls" not in str(caught.value)


class _LostSink:
    def __init__(self) -> None:
        self.lost: list[BaseException | None] = []

    def subflow_lost(self, _: object, exc: BaseException | None) -> None:
        self.lost.append(exc)


def test_a_reset_before_the_transport_names_the_address_connected_to() -> None:
    # a reset that comes before asyncio builds the transport leaves it no
    # peername (Python 3.12 gets there first): the address connected to
    # names the server all the same
    sink = _LostSink()
    subflow = _FirstSubflow(sink)
    subflow.target = ("::1", 4433)
    subflow.connection_lost(ConnectionResetError())
    (error,) = sink.lost
    assert isinstance(error, mptls.PeerResetError)
    assert str(error).startswith("[::1]:4433 reset")


@pytest.mark.parametrize(
    "exc", [ConnectionResetError(), BrokenPipeError()], ids=type
)
def test_a_reset_seen_by_the_first_write_is_a_reset(
    exc: OSError,
) -> None:
    """A server that resets before the preamble is a PeerResetError,
    whether the client's read saw the reset (ECONNRESET) or its first
    write did (EPIPE, as the ClientHello leaves after the reset came):
    which one comes first is timing, not what the server is."""
    sink = _LostSink()
    subflow = _FirstSubflow(sink)
    subflow.target = ("127.0.0.1", 4433)
    subflow.connection_lost(exc)
    (error,) = sink.lost
    assert isinstance(error, mptls.PeerResetError)
    assert error.__cause__ is exc
    assert "not an mptls" not in str(error)


@pytest.mark.parametrize("paths", [1, 2])
async def test_a_finished_connection_leaves_little_cyclic_garbage(
    pki: Pki, paths: int
) -> None:
    """A closed connection is freed by reference counting: its
    transport, paths, TLS engine and MPTCP core are no reference cycle
    that only the garbage collector could free (that left about 120
    objects a connection and made the collector run often). What
    asyncio's own streams leave on Python 3.11 (14 objects a
    connection with one path, 28 with two, both ends; none on 3.12 and
    later) stays."""
    served = await serve(pki, echo)
    assert served.server is not None
    local_addrs = ["127.0.0.1", "127.0.0.2"][:paths]
    count = 10

    async def one() -> None:
        reader, writer = await mptls.open_connection(
            "127.0.0.1", served.port, ssl=pki.client(), local_addrs=local_addrs
        )
        writer.write(b"ping")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"ping"
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10)
        assert await asyncio.wait_for(served.done.get(), 10) is None

    async with served.server:
        await one()  # caches filled once per process are not garbage
        gc.collect()
        gc.disable()
        try:
            for _ in range(count):
                await one()
            # the ends' last callbacks run within a few loop steps
            for _ in range(10):
                await asyncio.sleep(0)
            found = gc.collect()
        finally:
            gc.enable()
    assert found / count < 60, f"{found / count:.0f} objects a connection"


async def test_addresses_outlive_the_connection(
    pki: Pki, echo_server: Served
) -> None:
    reader, writer = await mptls.open_connection(
        "127.0.0.1", echo_server.port, ssl=pki.client()
    )
    peername = writer.get_extra_info("peername")
    sockname = writer.get_extra_info("sockname")
    assert peername[1] == echo_server.port
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await writer.wait_closed()
    # as with asyncio's own transports, the first subflow's addresses
    # stay readable once the connection closed
    assert writer.get_extra_info("peername") == peername
    assert writer.get_extra_info("sockname") == sockname
    assert writer.get_extra_info("socket") is None


async def test_one_read_of_frames_is_one_tls_pass(pki: Pki) -> None:
    received: list[int] = []

    async def sink(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        tls = writer.transport._tls  # type: ignore[attr-defined]
        many = tls.data_received_many

        def counted(chunks: list[bytes]) -> None:
            received.append(len(chunks))
            many(chunks)

        tls.data_received_many = counted
        total = 0
        while data := await reader.read(CHUNK):
            total += len(data)
        writer.write(total.to_bytes(8, "big"))
        await writer.drain()
        writer.close()

    served = await serve(pki, sink)
    try:
        reader, writer = await open_one_path(pki, served.port)
        writer.write(bytes(4 * 1024 * 1024))
        writer.write_eof()
        answer = await asyncio.wait_for(reader.readexactly(8), 30)
        writer.close()
        await writer.wait_closed()
    finally:
        assert served.server is not None
        served.server.close()
        await served.server.wait_closed()

    assert int.from_bytes(answer, "big") == 4 * 1024 * 1024
    # frames of one socket read reached TLS together, at least once
    assert max(received) > 1


async def test_close_notify_and_data_fin_leave_in_one_write(
    pki: Pki, echo_server: Served
) -> None:
    reader, writer = await mptls.open_connection(
        "127.0.0.1", echo_server.port, ssl=pki.client()
    )
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    multipath = writer.transport._tls._transport  # type: ignore[attr-defined]
    subflow = multipath._subflows[0]
    sent: list[int] = []
    send = subflow.send

    def counted(data: bytes) -> None:
        sent.append(len(data))
        send(data)

    subflow.send = counted

    writer.close()

    # one write: the close_notify record and the DATA_FIN in one frame
    assert len(sent) == 1
    # the DATA_FIN is mapped (RFC 8684 section 3.3.3), so it went too
    assert multipath._core._send.fin_offset is not None
    await writer.wait_closed()


async def test_closing_when_the_peer_closed_sends_one_frame(
    pki: Pki, echo_server: Served
) -> None:
    # the server acknowledges the client's DATA_FIN one loop step late,
    # so that its own close_notify and DATA_FIN carry that Data ACK: no
    # frame that is only an ACK comes back between the two DATA_FINs
    _, writer = await open_one_path(pki, echo_server.port)
    multipath = multipath_of(writer)
    received: list[Segment] = []
    segments_received = multipath.segments_received

    def recorded(subflow: object, segments: list[Segment]) -> None:
        received.extend(segments)
        segments_received(subflow, segments)

    multipath.segments_received = recorded
    writer.close()
    await asyncio.wait_for(writer.wait_closed(), 10)

    signals = [(s, options_of(s).get(Dss)) for s in received]
    data_fin = next(
        i
        for i, (_, dss) in enumerate(signals)
        if isinstance(dss, Dss) and dss.data_fin
    )
    assert [s for s, _ in signals[:data_fin] if not s.payload] == []


async def test_close_that_times_out_with_data_unacknowledged_fails(
    pki: Pki,
) -> None:
    release = asyncio.Event()

    async def stalled(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # never reads: the receive window fills and the Data ACK stops
        await release.wait()

    served = await serve(pki, stalled)
    assert served.server is not None
    async with served.server:
        _reader, writer = await open_one_path(
            pki, served.port, close_timeout=0.3
        )
        # far more than the 4 MiB window and the sockets' buffers
        writer.write(b"x" * (32 * 1024 * 1024))
        writer.write_eof()
        writer.close()
        # bytes the peer never acknowledged may be lost: not a clean close
        with pytest.raises(mptls.MptlsTimeoutError, match="unacknowledged"):
            await writer.wait_closed()
        release.set()
        assert await served.done.get() is None


def multipath_of(writer: asyncio.StreamWriter) -> Any:
    """The client's multipath transport under its TLS transport."""
    return writer.transport._tls._transport  # type: ignore[attr-defined]


async def test_a_paused_reader_gets_everything_after_a_clean_end(
    pki: Pki,
) -> None:
    # the client half-closes and does not read; the server answers 1 MiB
    # and closes. The connection ends cleanly while the client's reader
    # is paused with most of the answer held below it: the end must
    # reach the reader only after all of it
    answer = random.Random(7).randbytes(1 << 20)

    async def answer_and_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert await reader.read() == b"?"
        writer.write(answer)
        await writer.drain()

    served = await serve(pki, answer_and_close)
    assert served.server is not None
    async with served.server:
        reader, writer = await open_one_path(pki, served.port)
        writer.write(b"?")
        writer.write_eof()
        assert await served.done.get() is None
        multipath = multipath_of(writer)
        await until(lambda: multipath._closed, "the end of the connection")
        received = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        await writer.wait_closed()
    assert received == answer


def held_bytes(multipath: Any) -> int:
    """What a multipath transport holds below its paused reader."""
    return sum(sum(map(len, pieces)) for pieces in multipath._held)


async def test_a_peer_reset_while_paused_reaches_the_reader(pki: Pki) -> None:
    # the server aborts while the client's reader is paused with data
    # held below it: the reader is told of the reset, and what it read
    # before it is the start of what was sent
    answer = random.Random(12).randbytes(3 * ConnectionConfig().receive_window)
    held = asyncio.Event()

    async def stream_then_abort(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(answer)
        await held.wait()
        writer.transport.abort()

    served = await serve(pki, stream_then_abort)
    assert served.server is not None
    async with served.server:
        reader, writer = await open_one_path(pki, served.port)
        assert await reader.readexactly(10) == answer[:10]
        await until(lambda: is_paused(reader), "the reader's pause")
        multipath = multipath_of(writer)
        await until(lambda: held_bytes(multipath), "data held below")
        held.set()
        await until(lambda: multipath._closed, "the reset")
        got = b""
        with pytest.raises((ConnectionError, mptls.MptlsError)):
            while chunk := await asyncio.wait_for(reader.read(1 << 16), 20):
                got += chunk
        writer.close()
    assert answer.startswith(answer[:10] + got)


async def test_a_paused_reader_gets_several_windows_whole_and_in_order(
    pki: Pki,
) -> None:
    # the server sends three windows at once; the client's reader stops
    # after ten bytes while socket reads pile up below it (no more than
    # a window), then takes the rest, pausing again and again on its
    # way: every byte arrives, once and in order
    window = ConnectionConfig().receive_window
    answer = random.Random(11).randbytes(3 * window)
    served = await serve(pki, answer_streamer(answer))
    assert served.server is not None
    async with served.server:
        reader, writer = await open_one_path(pki, served.port)
        assert await reader.readexactly(10) == answer[:10]
        await until(lambda: is_paused(reader), "the reader's pause")
        multipath = multipath_of(writer)
        await until(
            lambda: len(multipath._held) > 1, "reads held below the reader"
        )
        assert held_bytes(multipath) <= window
        rest = await asyncio.wait_for(reader.readexactly(len(answer) - 10), 20)
        writer.close()
        await writer.wait_closed()
    assert rest == answer[10:]


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_leaving_while_paused_with_unread_data_ends(
    pki: Pki, how: str
) -> None:
    # the application reads a little and leaves while the rest waits
    # below its paused reader: it is told of the end at once
    answer = random.Random(8).randbytes(1 << 20)
    served = await serve(pki, answer_streamer(answer))
    assert served.server is not None
    async with served.server:
        reader, writer = await open_one_path(pki, served.port)
        assert await reader.readexactly(10) == answer[:10]
        await until(lambda: is_paused(reader), "the reader's pause")
        await leave(writer, how)
        assert writer.transport.is_closing()


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_leaving_after_a_clean_end_without_reading_ends(
    pki: Pki, how: str
) -> None:
    async def answer_and_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(bytes(1 << 18))
        await writer.drain()

    served = await serve(pki, answer_and_close)
    assert served.server is not None
    async with served.server:
        _reader, writer = await open_one_path(pki, served.port)
        writer.write_eof()
        multipath = multipath_of(writer)
        await until(lambda: multipath._closed, "the end of the connection")
        await leave(writer, how)
        assert not multipath._held


def test_shared_client_tokens_stay_unique_across_threads() -> None:
    # event loops in several threads open connections through one
    # allocator; each token must still be handed out once
    tokens = _shared_client_tokens()
    made: list[list[bytes]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def allocate(into: list[bytes]) -> None:
        try:
            for _ in range(3000):
                into.append(tokens.allocate())
        except BaseException as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [
            threading.Thread(target=allocate, args=(into,)) for into in made
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    everything = [token for into in made for token in into]
    for token in set(everything):
        tokens.release(token)
    assert errors == []
    assert len(set(everything)) == len(everything) == 12000


@pytest.mark.parametrize("name", ["a" * 70, ".x"])
async def test_a_server_name_tls_refuses_is_refused_before_connecting(
    pki: Pki, name: str
) -> None:
    # TLS refused the name only once the first subflow's TCP connection
    # was open, which then had to go, and the token it was given: the
    # name is now checked first, and nothing connects
    first_bytes: asyncio.Queue[bytes] = asyncio.Queue()

    async def listener(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        first_bytes.put_nowait(await reader.read())
        writer.close()

    server = await asyncio.start_server(listener, "127.0.0.1", 0)
    live = _shared_client_tokens().live
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(mptls.ConfigurationError, match="not a valid host"):
            await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), server_hostname=name
            )
        # a marker after the refusal: the first connection the server
        # sees is the marker's
        _, marker = await asyncio.open_connection("127.0.0.1", port)
        marker.write(b"marker")
        marker.close()
        await marker.wait_closed()
        assert await asyncio.wait_for(first_bytes.get(), 5) == b"marker"
    assert _shared_client_tokens().live == live


async def test_a_config_of_the_wrong_type_is_refused_before_connecting(
    pki: Pki,
) -> None:
    with pytest.raises(mptls.ConfigurationError, match="ConnectionConfig"):
        await mptls.open_connection("127.0.0.1", 9, ssl=pki.client(), config=5)
