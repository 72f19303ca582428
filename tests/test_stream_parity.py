"""The same stream code over asyncio with stdlib ssl and over mptls.

Each test runs once per stack, with the same assertions: what an
application does with asyncio's TLS streams (reading by line, by
separator and by count, the errors that keep the data readable,
writes after an end, the server's life cycle, a cancelled connect)
behaves the same over ``mptls.open_connection`` / ``start_server``.
Where mptls differs on purpose (half-close, a peer's abort raised by
the reader, no stdlib TLS object), the README says so and the test
leaves that step out, or says what each stack does.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import select
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pki import Pki
from support import open_fds

import mptls

LIMIT = 10.0

Handler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]


class Stack:
    """Opens servers and connections of one stack with the test PKI."""

    def __init__(self, name: str, pki: Pki) -> None:
        self.name = name
        self.pki = pki

    async def serve(
        self,
        handler: Handler,
        host: Any = "127.0.0.1",
        port: int | str | None = 0,
        **options: Any,
    ) -> Any:
        if self.name == "asyncio":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.pki.cert_pem, self.pki.key_pem)
            return await asyncio.start_server(
                handler, host, port, ssl=context, **options
            )
        return await mptls.start_server(
            handler, host, port, ssl=self.pki.server(), **options
        )

    async def connect(
        self,
        port: int | str | None,
        host: str | None = "127.0.0.1",
        **options: Any,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.name == "asyncio":
            context = ssl.create_default_context(cafile=self.pki.ca_pem)
            opening = asyncio.open_connection(
                host, port, ssl=context, **options
            )
        else:
            opening = mptls.open_connection(
                host, port, ssl=self.pki.client(), **options
            )
        async with asyncio.timeout(LIMIT):
            return await opening


@pytest.fixture(params=["asyncio", "mptls"])
def stack(request: pytest.FixtureRequest, pki: Pki) -> Stack:
    return Stack(request.param, pki)


def port_of(server: Any) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def sending(stack: Stack, payload: bytes) -> AsyncIterator[int]:
    """A server that sends ``payload`` in pieces, then closes."""

    async def send(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        for start in range(0, len(payload), 777):
            writer.write(payload[start : start + 777])
        await writer.drain()
        writer.close()

    server = await stack.serve(send)
    try:
        yield port_of(server)
    finally:
        server.close()
        async with asyncio.timeout(LIMIT):
            await server.wait_closed()


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    async with asyncio.timeout(LIMIT):
        await writer.wait_closed()


# reading


SEPARATOR = b"<<-- a separator longer than the limit -->>"


async def test_an_overrun_leaves_every_byte_readable(stack: Stack) -> None:
    body = bytes(range(256)) * 1000
    payload = b"first line\n" + body + SEPARATOR + b"last, no newline"
    async with sending(stack, payload) as port:
        reader, writer = await stack.connect(port, limit=32)
        got = bytearray(await reader.readline())
        assert got == b"first line\n"

        # the separator is further than the limit: the error says how
        # much may be taken, and takes nothing
        with pytest.raises(asyncio.LimitOverrunError) as overrun:
            await reader.readuntil(SEPARATOR)
        assert overrun.value.consumed > 32
        got += await reader.readexactly(overrun.value.consumed)
        rest_of_body = len(b"first line\n") + len(body) - len(got)
        got += await reader.readexactly(rest_of_body)
        got += await reader.readuntil(SEPARATOR)
        assert got.endswith(SEPARATOR)

        # the end comes before the separator: what there was is kept
        with pytest.raises(asyncio.IncompleteReadError) as short:
            await reader.readuntil(b"\n")
        assert short.value.partial == b"last, no newline"
        got += short.value.partial
        assert bytes(got) == payload
        assert await reader.read() == b""
        assert reader.at_eof()
        await closed(writer)


async def test_read_all_and_readexactly_at_the_end(stack: Stack) -> None:
    payload = b"".join(b"line %d\n" % n for n in range(5000))
    async with sending(stack, payload) as port:
        reader, writer = await stack.connect(port, limit=64)
        assert await reader.readline() == b"line 0\n"
        assert await reader.readexactly(7) == b"line 1\n"
        rest = await reader.read()
        assert rest == payload[14:]
        assert reader.at_eof()
        with pytest.raises(asyncio.IncompleteReadError) as short:
            await reader.readexactly(1)
        assert short.value.partial == b""
        await closed(writer)


# writing after an end


async def greet_until_the_end(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"hello")
    await writer.drain()
    await reader.read()
    writer.close()


async def test_writes_after_close_are_dropped(stack: Stack) -> None:
    server = await stack.serve(greet_until_the_end)
    async with server:
        reader, writer = await stack.connect(port_of(server))
        assert await reader.readexactly(5) == b"hello"
        # the connection is still open at both ends when it closes
        writer.close()
        assert writer.is_closing()
        writer.write(b"dropped")
        writer.writelines([b"dropped", b"too"])
        async with asyncio.timeout(LIMIT):
            await writer.wait_closed()
        # the end is the drain's error, and a second wait returns as the
        # first did
        with pytest.raises(ConnectionResetError):
            await writer.drain()
        async with asyncio.timeout(LIMIT):
            await writer.wait_closed()


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_writes_take_any_bytes_like_object(stack: Stack) -> None:
    server = await stack.serve(echo)
    async with server:
        reader, writer = await stack.connect(port_of(server))
        # a memoryview counts bytes, whatever its items
        writer.write(memoryview(array.array("i", [1, 2])))
        writer.write(bytearray(b"ab"))
        writer.writelines([memoryview(b"cd"), bytearray(b"ef"), b"gh"])
        for not_bytes in ("text", 7, None):
            with pytest.raises(TypeError):
                writer.write(not_bytes)  # type: ignore[arg-type]
        await writer.drain()
        expected = array.array("i", [1, 2]).tobytes() + b"abcdefgh"
        async with asyncio.timeout(LIMIT):
            assert await reader.readexactly(len(expected)) == expected
        writer.close()
        writer.close()
        await closed(writer)


async def test_write_buffer_limits_as_asyncios(stack: Stack) -> None:
    server = await stack.serve(echo)
    async with server:
        reader, writer = await stack.connect(port_of(server))
        transport = writer.transport
        assert transport.get_write_buffer_size() == 0
        # the defaults differ (README): mptls keeps more in flight
        high = 4 * 2**20 if stack.name == "mptls" else 512 * 2**10
        assert transport.get_write_buffer_limits() == (high // 4, high)
        with pytest.raises(ValueError):
            transport.set_write_buffer_limits(high=10, low=20)
        with pytest.raises(ValueError):
            transport.set_write_buffer_limits(high=-1)
        transport.set_write_buffer_limits(high=100)
        assert transport.get_write_buffer_limits() == (25, 100)
        transport.set_write_buffer_limits(low=5)
        assert transport.get_write_buffer_limits() == (5, 20)
        # with no room, drain() waits until everything has left
        transport.set_write_buffer_limits(0)
        writer.write(b"q" * 100_000)
        async with asyncio.timeout(LIMIT):
            await writer.drain()
        assert transport.get_write_buffer_size() == 0
        assert transport.is_reading()
        transport.pause_reading()
        assert not transport.is_reading()
        transport.resume_reading()
        assert transport.is_reading()
        async with asyncio.timeout(LIMIT):
            assert len(await reader.readexactly(100_000)) == 100_000
        await closed(writer)


async def test_an_abort_of_ones_own_ends_the_streams(stack: Stack) -> None:
    server = await stack.serve(greet_until_the_end)
    async with server:
        reader, writer = await stack.connect(port_of(server))
        async with asyncio.timeout(LIMIT):
            assert await reader.readexactly(2) == b"he"
            # the reader keeps what it had, then ends; a write is
            # dropped, drain() says the connection is gone
            writer.transport.abort()
            assert writer.is_closing()
            assert await reader.read() == b"llo"
            assert reader.at_eof()
            assert reader.exception() is None
            writer.write(b"dropped")
            with pytest.raises(ConnectionResetError):
                await writer.drain()
            await writer.wait_closed()


async def test_a_timed_out_wait_closed_leaves_the_next_working(
    pki: Pki,
) -> None:
    # mptls only: asyncio's streams hand every wait_closed() one future,
    # which a cancelled wait cancels, and the next wait_closed() raises
    # CancelledError. mptls's close waits for the peer's end, which a
    # timeout may well cut short (README)
    stack = Stack("mptls", pki)
    ending = asyncio.Event()

    async def end_when_told(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await ending.wait()
        writer.close()

    server = await stack.serve(end_when_told)
    async with server:
        _, writer = await stack.connect(port_of(server))
        writer.close()
        # the server has not closed its side: the close waits for it
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await writer.wait_closed()
        ending.set()
        async with asyncio.timeout(LIMIT):
            await writer.wait_closed()
            await writer.wait_closed()


async def test_ssl_shutdown_timeout_bounds_a_close(stack: Stack) -> None:
    # asyncio's TLS server answers close_notify at once, whatever its
    # handler does; mptls's keeps the connection half-open for a handler
    # that is busy, and the client's close waits for it, within the
    # shorter ssl_shutdown_timeout asked for (not close_timeout's 10 s)
    release = asyncio.Event()
    heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def busy(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await release.wait()
        heard.set_result(await reader.read())
        writer.close()

    server = await stack.serve(busy)
    async with server:
        loop = asyncio.get_running_loop()
        _, writer = await stack.connect(
            port_of(server), ssl_shutdown_timeout=0.5
        )
        writer.write(b"request")
        await writer.drain()
        started = loop.time()
        writer.close()
        async with asyncio.timeout(LIMIT):
            await writer.wait_closed()
        assert loop.time() - started < 5.0
        # what was written before the close still reaches the handler
        release.set()
        async with asyncio.timeout(LIMIT):
            assert await heard == b"request"


async def test_writes_after_a_peer_abort_fail_in_drain(stack: Stack) -> None:
    aborted = asyncio.Event()

    async def abort(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(4)
        writer.transport.abort()
        aborted.set()

    server = await stack.serve(abort)
    async with server:
        reader, writer = await stack.connect(port_of(server))
        writer.write(b"ping")
        async with asyncio.timeout(LIMIT):
            await aborted.wait()
            # asyncio's reader ends with b"", mptls's raises the abort
            # (README: a peer never reads an abort as an end of data)
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
            # asyncio's TLS abort is a FIN: its client hears of the
            # reset only once a write met the closed socket; mptls's
            # MP_FASTCLOSE is heard at once. Either way a write never
            # raises, and drain() says the connection is gone
            while True:
                writer.write(b"x" * 100)
                try:
                    await writer.drain()
                except ConnectionResetError:
                    break
                await asyncio.sleep(0.01)
        writer.writelines([b"y"])
        with pytest.raises(ConnectionResetError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(LIMIT):
                await writer.wait_closed()


async def test_what_get_extra_info_answers(stack: Stack) -> None:
    async with sending(stack, b"x") as port:
        reader, writer = await stack.connect(port)
        peername = writer.get_extra_info("peername")
        assert peername == ("127.0.0.1", port)
        assert writer.get_extra_info("sockname")[0] == "127.0.0.1"
        assert writer.get_extra_info("socket").fileno() >= 0
        cipher = writer.get_extra_info("cipher")
        assert isinstance(cipher, tuple)
        assert len(cipher) == 3
        assert writer.get_extra_info("peercert")["subjectAltName"]
        # no TLS compression, as asyncio's TLS transport answers it
        assert writer.get_extra_info("compression", "default") is None
        assert writer.get_extra_info("no such key", "default") == "default"
        await reader.read()
        await closed(writer)


@pytest.mark.parametrize(
    "local_addr", [("127.0.0.2", 0), ["127.0.0.2", 0], ("127.0.0.2", 0, 0, 0)]
)
async def test_local_addr_picks_the_clients_address(
    stack: Stack, local_addr: Any
) -> None:
    peers: list[str] = []

    async def note_the_peer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        await greet_until_the_end(reader, writer)

    server = await stack.serve(note_the_peer)
    async with server:
        reader, writer = await stack.connect(
            port_of(server), local_addr=local_addr
        )
        assert writer.get_extra_info("sockname")[0] == "127.0.0.2"
        async with asyncio.timeout(LIMIT):
            assert await reader.readexactly(5) == b"hello"
        await closed(writer)
    assert peers == ["127.0.0.2"]


async def test_a_server_listens_on_each_host_it_is_given(
    stack: Stack,
) -> None:
    server = await stack.serve(
        greet_until_the_end, ["127.0.0.1", "127.0.0.2"], reuse_port=True
    )
    async with server:
        assert isinstance(server.sockets, tuple)
        addresses = [sock.getsockname() for sock in server.sockets]
        assert sorted(host for host, _ in addresses) == [
            "127.0.0.1",
            "127.0.0.2",
        ]
        for sock in server.sockets:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        for host, port in addresses:
            reader, writer = await stack.connect(port, host)
            async with asyncio.timeout(LIMIT):
                assert await reader.readexactly(5) == b"hello"
            await closed(writer)
        # a second server may share a port that allows it
        _, port = addresses[0]
        sharing = await stack.serve(
            greet_until_the_end, "127.0.0.1", port, reuse_port=True
        )
        sharing.close()
        await sharing.wait_closed()
    assert server.sockets == ()


async def test_a_server_listens_on_a_socket_it_is_given(
    stack: Stack,
) -> None:
    # a socket bound before (or inherited, as from systemd)
    with socket.socket() as given:
        given.bind(("127.0.0.1", 0))
        server = await stack.serve(greet_until_the_end, None, None, sock=given)
        async with server:
            address = given.getsockname()
            assert [s.getsockname() for s in server.sockets] == [address]
            reader, writer = await stack.connect(address[1])
            async with asyncio.timeout(LIMIT):
                assert await reader.readexactly(5) == b"hello"
            await closed(writer)


async def test_family_picks_the_hosts_addresses(stack: Stack) -> None:
    server = await stack.serve(greet_until_the_end, "::1")
    async with server:
        reader, writer = await stack.connect(
            port_of(server), "::1", family=socket.AF_INET6
        )
        async with asyncio.timeout(LIMIT):
            assert await reader.readexactly(5) == b"hello"
        await closed(writer)
        # no IPv4 address of "::1" to connect to
        with pytest.raises(socket.gaierror):
            await stack.connect(port_of(server), "::1", family=socket.AF_INET)


async def test_a_server_listens_on_its_hosts_of_one_family(
    stack: Stack,
) -> None:
    server = await stack.serve(
        greet_until_the_end, None, family=socket.AF_INET
    )
    async with server:
        families = {sock.family for sock in server.sockets}
        assert families == {socket.AF_INET}


async def test_a_client_connects_over_a_socket_it_is_given(
    stack: Stack,
) -> None:
    # a socket connected before (through a proxy, say): the first path
    server = await stack.serve(greet_until_the_end)
    async with server:
        with socket.create_connection(("127.0.0.1", port_of(server))) as sock:
            reader, writer = await stack.connect(
                None, None, sock=sock, server_hostname="localhost"
            )
            assert writer.get_extra_info("sockname") == sock.getsockname()
            async with asyncio.timeout(LIMIT):
                assert await reader.readexactly(5) == b"hello"
            await closed(writer)


async def test_a_given_socket_needs_the_servers_name(stack: Stack) -> None:
    server = await stack.serve(greet_until_the_end)
    async with server:
        with (
            socket.create_connection(("127.0.0.1", port_of(server))) as sock,
            pytest.raises(ValueError, match="server_hostname"),
        ):
            await stack.connect(None, None, sock=sock)


async def test_a_failed_connect_closes_the_socket_it_was_given(
    stack: Stack,
) -> None:
    # a listener that never accepts: the TLS handshake times out. The
    # caller's socket is closed when the call raises, so that a caller
    # that closes it too (a with block) frees no descriptor the loop
    # still watches: the loop's next transport on that number was
    # refused while mptls's abort lingered
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        with socket.create_connection(silent.getsockname()) as sock:
            # asyncio's is a ConnectionAbortedError, mptls's a
            # TimeoutError: both OSError
            with pytest.raises(OSError):
                await stack.connect(
                    None,
                    None,
                    sock=sock,
                    server_hostname="localhost",
                    ssl_handshake_timeout=0.2,
                )
            assert sock.fileno() == -1


async def test_a_cancelled_connect_closes_the_socket_it_was_given(
    stack: Stack,
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        with socket.create_connection(silent.getsockname()) as sock:
            connecting = asyncio.create_task(
                stack.connect(
                    None, None, sock=sock, server_hostname="localhost"
                )
            )
            accepted, _ = silent.accept()
            with accepted:
                async with asyncio.timeout(LIMIT):
                    # the ClientHello came: the handshake has begun
                    while not select.select([accepted], [], [], 0)[0]:
                        await asyncio.sleep(0.01)
                connecting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await connecting
                assert sock.fileno() == -1


# differences on purpose (README, "Use it like asyncio")


async def test_a_client_half_closes_and_outlives_the_servers_end(
    stack: Stack,
) -> None:
    async def answer_then_end(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write((await reader.read()).upper())
        writer.close()

    server = await stack.serve(answer_then_end)
    async with server:
        reader, writer = await stack.connect(port_of(server))
        writer.write(b"question")
        if stack.name == "asyncio":
            # asyncio's TLS transport cannot half-close, and closes the
            # client at the server's close_notify
            assert not writer.can_write_eof()
            with pytest.raises(NotImplementedError):
                writer.write_eof()
            await closed(writer)
            return
        # mptls: close_notify then DATA_FIN, while the server answers;
        # the server's end leaves the client's writer to the client
        assert writer.can_write_eof()
        writer.write_eof()
        async with asyncio.timeout(LIMIT):
            assert await reader.read() == b"QUESTION"
        assert not writer.is_closing()
        await closed(writer)


async def test_writes_after_the_servers_close_fail_at_its_limit(
    stack: Stack,
) -> None:
    async def close_at_once(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await writer.wait_closed()

    server = await stack.serve(close_at_once, ssl_shutdown_timeout=1.0)
    async with server:
        reader, writer = await stack.connect(port_of(server))
        async with asyncio.timeout(LIMIT):
            assert await reader.read() == b""
        writer.write(b"after the end")
        if stack.name == "mptls":
            # the client cannot tell a close from a write_eof(): it
            # writes on, for nobody, until the server's close limit
            await writer.drain()
            assert not writer.is_closing()
        # asyncio's TLS client closed itself at the close_notify
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(LIMIT):
                while True:
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(b"more")
        writer.close()


async def test_no_stdlib_tls_object_is_shown(stack: Stack) -> None:
    async with sending(stack, b"x") as port:
        reader, writer = await stack.connect(port)
        ssl_object = writer.get_extra_info("ssl_object")
        context = writer.get_extra_info("sslcontext")
        if stack.name == "asyncio":
            assert isinstance(ssl_object, ssl.SSLObject)
            assert isinstance(context, ssl.SSLContext)
        else:
            # the TLS object is pyOpenSSL's: what was negotiated is in
            # "cipher", "tls_version", "peercert" and "mptcp"
            assert ssl_object is None
            assert context is None
            assert writer.get_extra_info("tls_version") == "TLSv1.3"
        await reader.read()
        await closed(writer)


# the server


async def test_a_server_lives_and_ends_as_asyncios(stack: Stack) -> None:
    async def greet(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"hi")
        await writer.drain()
        writer.close()

    server = await stack.serve(greet, start_serving=False)
    assert not server.is_serving()
    assert server.get_loop() is asyncio.get_running_loop()
    serving = asyncio.create_task(server.serve_forever())
    async with asyncio.timeout(LIMIT):
        while not server.is_serving():
            await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already being awaited"):
        await server.serve_forever()

    reader, writer = await stack.connect(port_of(server))
    async with asyncio.timeout(LIMIT):
        assert await reader.read() == b"hi"
    await closed(writer)

    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert server.sockets == ()
    with pytest.raises(RuntimeError, match="is closed"):
        await server.serve_forever()
    async with asyncio.timeout(LIMIT):
        await server.wait_closed()
        await server.wait_closed()


# a handler that fails


async def test_a_handler_that_raises_is_logged_and_closed(
    stack: Stack,
) -> None:
    loop = asyncio.get_running_loop()
    heard: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: heard.append(context))

    async def fail(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(4)
        writer.write(b"partial answer")
        raise RuntimeError("the handler failed")

    server = await stack.serve(fail)
    async with server:
        reader, writer = await stack.connect(port_of(server))
        writer.write(b"ping")
        # the loop's exception handler hears it, and the transport is
        # closed: what the handler wrote arrives, then the end
        async with asyncio.timeout(LIMIT):
            assert await reader.read() == b"partial answer"
        await closed(writer)
    assert [str(context.get("exception")) for context in heard] == [
        "the handler failed"
    ]


async def test_a_cancelled_handler_ends_its_connection_as_asyncio_does(
    stack: Stack,
) -> None:
    # asyncio 3.13 closes a cancelled handler's connection; before it,
    # the handler's done-callback raises the CancelledError into the
    # loop's exception handler and leaves the connection open
    loop = asyncio.get_running_loop()
    heard = loop.create_future()

    def exception_handler(
        _: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        if not heard.done():
            heard.set_result(context.get("exception"))

    loop.set_exception_handler(exception_handler)
    handler_writers: list[asyncio.StreamWriter] = []

    async def cancelled(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        handler_writers.append(writer)
        writer.write(b"before")
        await writer.drain()
        raise asyncio.CancelledError

    server = await stack.serve(cancelled)
    async with server:
        reader, writer = await stack.connect(port_of(server))
        async with asyncio.timeout(LIMIT):
            assert await reader.readexactly(6) == b"before"
        if sys.version_info >= (3, 13):
            async with asyncio.timeout(LIMIT):
                assert await reader.read() == b""
            await closed(writer)
            assert not heard.done()
        else:
            async with asyncio.timeout(LIMIT):
                assert isinstance(await heard, asyncio.CancelledError)
            (handler_writer,) = handler_writers
            assert not handler_writer.is_closing()
            handler_writer.close()
            async with asyncio.timeout(LIMIT):
                assert await reader.read() == b""
            await closed(writer)


# a host name that does not resolve


async def test_an_unknown_host_is_a_gaierror(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # code that tells a name that does not resolve from a server that
    # does not answer catches socket.gaierror, with getaddrinfo's errno
    async def no_such_name(*args: object, **kw: object) -> object:
        # no lookup leaves the process: the resolver's answer is faked
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(
        asyncio.get_running_loop(), "getaddrinfo", no_such_name
    )
    with pytest.raises(socket.gaierror) as connecting:
        await stack.connect(443, host="no-such-host.invalid")
    assert connecting.value.errno == socket.EAI_NONAME
    with pytest.raises(socket.gaierror) as listening:
        await stack.serve(greet_until_the_end, host="no-such-host.invalid")
    assert listening.value.errno == socket.EAI_NONAME


# a port by its service name

# services of unprivileged ports that the services database may name
SERVICES = ("http-alt", "postgresql", "mysql", "x11", "redis")


def a_free_service() -> str:
    """A service name whose TCP port is free on 127.0.0.1."""
    for name in SERVICES:
        try:
            port = socket.getservbyname(name, "tcp")
        except OSError:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return name
    pytest.skip("no service of a free unprivileged port is known here")


async def test_a_port_may_be_a_service_name(stack: Stack) -> None:
    name = a_free_service()
    server = await stack.serve(greet_until_the_end, port=name)
    async with server:
        assert port_of(server) == socket.getservbyname(name, "tcp")
        reader, writer = await stack.connect(name)
        async with asyncio.timeout(LIMIT):
            assert await reader.readexactly(5) == b"hello"
        await closed(writer)


async def test_an_unknown_service_name_is_a_gaierror(stack: Stack) -> None:
    with pytest.raises(socket.gaierror) as connecting:
        await stack.connect("no-such-service")
    assert connecting.value.errno == socket.EAI_SERVICE
    with pytest.raises(socket.gaierror) as listening:
        await stack.serve(greet_until_the_end, port="no-such-service")
    assert listening.value.errno == socket.EAI_SERVICE


# a cancelled connect


async def test_a_cancelled_connect_leaves_nothing(stack: Stack) -> None:
    # a listener that never accepts: the TCP connection is made by the
    # kernel, and the TLS handshake waits for an answer that never comes
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        gc.collect()
        fds = open_fds()
        tasks = asyncio.all_tasks()
        connecting = asyncio.create_task(stack.connect(port_of_socket(silent)))
        async with asyncio.timeout(LIMIT):
            # the client's TCP connection is queued on the listener
            while not select.select([silent], [], [], 0)[0]:
                await asyncio.sleep(0.01)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting

        # the socket is closed when the cancel reaches the caller
        assert open_fds() == fds
        assert not asyncio.all_tasks() - tasks


def port_of_socket(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def test_on_uvloop_server_sockets_is_the_stdlibs_tuple(pki: Pki) -> None:
    # uvloop's own server gives a list; asyncio's gives a tuple on every
    # version (3.11 to 3.13), and so does mptls's on either loop, open
    # or closed
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        server = await mptls.start_server(
            greet_until_the_end, "127.0.0.1", 0, ssl=pki.server()
        )
        assert isinstance(server.sockets, tuple)
        assert len(server.sockets) == 1
        server.close()
        await server.wait_closed()
        assert server.sockets == ()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
