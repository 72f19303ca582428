"""Application protocols below the streams, as asyncio's TLS takes them.

``create_connection`` / ``create_server`` hand the plaintext to any
protocol asyncio's own TLS transport serves: an ``asyncio.Protocol``, an
``asyncio.BufferedProtocol`` (through its ``get_buffer``), and a protocol
whose callbacks raise, which ends its connection with the error instead
of leaving it open and silent.
"""

from __future__ import annotations

import asyncio
import functools
import random

import pytest
from pki import Pki
from support import usable_backend

import mptls


@pytest.fixture(
    params=["userspace", pytest.param("kernel", marks=pytest.mark.kernel)]
)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend, the kernel's skipped where this kernel has no MPTCP."""
    return usable_backend(request.param)


WAIT = 10.0


class Sink(asyncio.Protocol):
    """A server that keeps what it is sent and says when it ended."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def queued_sink(sinks: asyncio.Queue[Sink]) -> Sink:
    """A server's protocol factory that hands each new Sink to the test."""
    made = Sink()
    sinks.put_nowait(made)
    return made


class Buffered(asyncio.BufferedProtocol):
    """Reads into buffers of a few odd sizes, as a parser might."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._rng = random.Random(3)
        self._buffer = bytearray()
        self.eof: asyncio.Future[None] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        self._buffer = bytearray(self._rng.choice((1, 7, 100, 4096)))
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self._buffer[:nbytes]

    def eof_received(self) -> bool:
        self.eof.set_result(None)
        return False


async def test_a_buffered_protocol_gets_every_byte(
    pki: Pki, backend: str
) -> None:
    payload = random.Random(4).randbytes(200_000)

    def send_and_end() -> asyncio.Protocol:
        class Sender(asyncio.Protocol):
            def connection_made(
                self, transport: asyncio.BaseTransport
            ) -> None:
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(payload)
                transport.write_eof()

        return Sender()

    server = await mptls.create_server(
        send_and_end, "127.0.0.1", 0, ssl=pki.server(), backend=backend
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        transport, client = await mptls.create_connection(
            Buffered, "127.0.0.1", port, ssl=pki.client(), backend=backend
        )
        try:
            await asyncio.wait_for(client.eof, WAIT)
            assert bytes(client.data) == payload
        finally:
            transport.close()


class AnswersAfterTheEnd(asyncio.Protocol):
    """Reads a question to its end, then answers on the next turn."""

    def __init__(self) -> None:
        self.question = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.question += data

    def eof_received(self) -> bool:
        asyncio.get_running_loop().call_soon(self.answer)
        return True

    def answer(self) -> None:
        assert isinstance(self.transport, asyncio.WriteTransport)
        self.transport.write(b"answer to " + self.question)
        self.transport.close()


class Asks(asyncio.Protocol):
    def __init__(self) -> None:
        self.answer = bytearray()
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"a question")
        transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.answer += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def test_an_eof_received_that_returns_true_keeps_the_answer_open(
    pki: Pki, backend: str
) -> None:
    # asyncio's TLS transport warns that a true eof_received() has no
    # effect and closes, dropping the answer; mptls half-closes (README)
    server = await mptls.create_server(
        AnswersAfterTheEnd, "127.0.0.1", 0, ssl=pki.server(), backend=backend
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        transport, client = await mptls.create_connection(
            Asks, "127.0.0.1", port, ssl=pki.client(), backend=backend
        )
        try:
            assert isinstance(client, Asks)
            assert await asyncio.wait_for(client.lost, WAIT) is None
            assert client.answer == b"answer to a question"
        finally:
            transport.close()


class Failing(Exception):
    pass


class RaisesOnData(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future()
        )

    def data_received(self, data: bytes) -> None:
        raise Failing("the application's parser failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def test_an_error_in_data_received_ends_the_connection(
    pki: Pki, backend: str
) -> None:
    # as asyncio's TLS does: the loop's exception handler hears it, the
    # connection is aborted and connection_lost gets the error; the
    # peer hears an end instead of waiting on a silent connection
    loop = asyncio.get_running_loop()
    heard: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: heard.append(context))
    sinks: asyncio.Queue[Sink] = asyncio.Queue()
    sink = functools.partial(queued_sink, sinks)
    server = await mptls.create_server(
        sink, "127.0.0.1", 0, ssl=pki.server(), backend=backend
    )
    try:
        async with server:
            port = server.sockets[0].getsockname()[1]
            transport, client = await mptls.create_connection(
                RaisesOnData,
                "127.0.0.1",
                port,
                ssl=pki.client(),
                backend=backend,
            )
            server_side = await asyncio.wait_for(sinks.get(), WAIT)
            server_side.transport.write(b"breaks the parser")  # type: ignore[attr-defined]
            error = await asyncio.wait_for(client.lost, WAIT)
            assert isinstance(error, Failing)
            assert transport.is_closing()
            assert isinstance(
                await asyncio.wait_for(server_side.lost, WAIT), Exception
            )
    finally:
        loop.set_exception_handler(None)
    assert [type(c.get("exception")) for c in heard] == [Failing]


async def test_an_error_in_connection_made_is_raised_by_create_connection(
    pki: Pki, backend: str
) -> None:
    class RaisesOnMade(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            raise Failing("not today")

    sinks: asyncio.Queue[Sink] = asyncio.Queue()
    sink = functools.partial(queued_sink, sinks)
    server = await mptls.create_server(
        sink, "127.0.0.1", 0, ssl=pki.server(), backend=backend
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(Failing):
            await asyncio.wait_for(
                mptls.create_connection(
                    RaisesOnMade,
                    "127.0.0.1",
                    port,
                    ssl=pki.client(),
                    backend=backend,
                ),
                WAIT,
            )
        # and the server's connection ends too
        server_side = await asyncio.wait_for(sinks.get(), WAIT)
        await asyncio.wait_for(server_side.lost, WAIT)


async def test_a_connection_lost_that_raises_is_reported_once(
    pki: Pki, backend: str
) -> None:
    # connection_made fails, and so does the connection_lost that tells
    # the application: create_connection still raises the first error,
    # and the second reaches the loop's handler, once, not the socket
    class RaisesTwice(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            raise Failing("first")

        def connection_lost(self, exc: Exception | None) -> None:
            raise Failing("second")

    loop = asyncio.get_running_loop()
    heard: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: heard.append(context))
    server = await mptls.create_server(
        Sink, "127.0.0.1", 0, ssl=pki.server(), backend=backend
    )
    try:
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(Failing, match="first"):
                await asyncio.wait_for(
                    mptls.create_connection(
                        RaisesTwice,
                        "127.0.0.1",
                        port,
                        ssl=pki.client(),
                        backend=backend,
                    ),
                    WAIT,
                )
    finally:
        loop.set_exception_handler(None)
    assert [str(c.get("exception")) for c in heard] == ["second"]
