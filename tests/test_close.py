"""Closing while joins are in flight, and a server that dies, on sockets.

A client with two local addresses that closes right after
``open_connection`` returns closes while its second subflow is still
connecting or joining: both ends must finish promptly, far inside
``close_timeout``, and the late subflow must not be attached to the
closed connection. A client whose server process is killed (no close,
no MP_FASTCLOSE) must end within ``path_loss_timeout`` with
:class:`~mptls.errors.MptlsTimeoutError`, not retry for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar, cast

import pytest
from pki import Pki
from support import until, usable_backend

import mptls
from mptls.backends.kernel.server import MultiServer
from mptls.errors import MptlsError, MptlsTimeoutError, PeerResetError

CLOSE_TIMEOUT = 5.0
# far inside close_timeout: a close that waits for it fails the test
PROMPT = 1.0
ROUNDS = 40

T = TypeVar("T")


async def test_close_with_a_join_in_flight_is_prompt_on_both_ends(
    pki: Pki,
) -> None:
    server_closes: list[float] = []
    handlers_done = asyncio.Event()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        await reader.read()
        started = loop.time()
        writer.close()
        await writer.wait_closed()
        server_closes.append(loop.time() - started)
        if len(server_closes) == ROUNDS:
            handlers_done.set()

    server = await mptls.start_server(
        handler,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        close_timeout=CLOSE_TIMEOUT,
    )
    port = int(server.sockets[0].getsockname()[1])
    loop = asyncio.get_running_loop()
    client_closes: list[float] = []
    async with server:
        for round_number in range(ROUNDS):
            _, writer = await mptls.open_connection(
                "127.0.0.1",
                port,
                ssl=pki.client(),
                local_addrs=["127.0.0.1", "127.0.0.2"],
                close_timeout=CLOSE_TIMEOUT,
            )
            # close at a different point of the join each round: at once,
            # or after a few turns of the loop
            for _ in range(round_number % 5):
                await asyncio.sleep(0)
            started = loop.time()
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT * 2)
            client_closes.append(loop.time() - started)
            info = writer.get_extra_info("mptcp")
            assert all(s.state == "CLOSED" for s in info.subflows)
        await asyncio.wait_for(handlers_done.wait(), CLOSE_TIMEOUT * 2)
        assert server.mptls_listener.transports == []

    assert len(client_closes) == len(server_closes) == ROUNDS
    assert max(client_closes) < PROMPT
    assert max(server_closes) < PROMPT


async def test_a_close_waits_while_a_slow_reader_still_takes_the_data(
    pki: Pki,
) -> None:
    # the server closes with 512 KiB not yet taken by a reader that
    # takes about 320 KB/s: the close takes longer than close_timeout,
    # and the Data ACK moves all along. Such a close was cut short at
    # close_timeout and the reader lost the rest
    size = 512 * 1024
    payload = bytes(range(256)) * (size // 256)
    closed: asyncio.Future[BaseException | None] = (
        asyncio.get_running_loop().create_future()
    )

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(payload)
        writer.close()
        try:
            await writer.wait_closed()
        except (MptlsError, ConnectionError) as exc:
            closed.set_result(exc)
        else:
            closed.set_result(None)

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server(), close_timeout=1.0
    )
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        reader, writer = await mptls.open_connection(
            "127.0.0.1",
            port,
            ssl=pki.client(),
            # the server's data is acknowledged as the reader takes it
            receive_window=64 * 1024,
        )
        received = bytearray()
        loop = asyncio.get_running_loop()
        started = loop.time()
        while data := await asyncio.wait_for(reader.read(16384), 10.0):
            received += data
            # a reader slower than the path: its pace, not a wait
            await asyncio.sleep(0.05)
        took = loop.time() - started
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10.0)
        assert await asyncio.wait_for(closed, 10.0) is None
    assert took > 1.0
    assert bytes(received) == payload


_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import mptls
    from mptls.tls.config import TLSConfig

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)

    async def main():
        folder = Path(sys.argv[1])
        tls = TLSConfig(
            certfile=folder / "server.pem", keyfile=folder / "server.key"
        )
        server = await mptls.start_server(echo, "127.0.0.1", 0, ssl=tls)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    "local_addrs", [["127.0.0.1"], ["127.0.0.1", "127.0.0.2"]]
)
async def test_a_killed_server_ends_the_client_within_path_loss_timeout(
    pki: Pki, local_addrs: list[str]
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SERVER,
        str(Path(pki.cert_pem).parent),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        port = int(line)
        reader, writer = await mptls.open_connection(
            "127.0.0.1",
            port,
            ssl=pki.client(),
            local_addrs=local_addrs,
            path_loss_timeout=1.0,
        )
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"

        # no close_notify, no DATA_FIN, no MP_FASTCLOSE: the process is gone
        process.send_signal(signal.SIGKILL)
        await process.wait()
        started = time.monotonic()
        with pytest.raises(MptlsTimeoutError, match="none came back"):
            await asyncio.wait_for(reader.read(), 10)
        elapsed = time.monotonic() - started
        # the client tried to join again (refused: nothing listens), then
        # gave up once path_loss_timeout had passed
        assert 0.9 <= elapsed < 2.0
        writer.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _closed_while_busy(
    pki: Pki,
    payload: bytes,
    then: Callable[
        [bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[T]
    ],
) -> T:
    """What ``then`` makes of a connection its client closed meanwhile.

    The client writes ``payload`` and closes; the server's handler waits
    after the first byte until the client's close has timed out (its
    close_timeout, 0.2 s) and ended with MP_FASTCLOSE. Then ``then``
    runs in the handler, with that first byte.
    """
    loop = asyncio.get_running_loop()
    busy = asyncio.Event()
    outcome: asyncio.Future[T] = loop.create_future()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        first = await reader.readexactly(1)
        await busy.wait()
        try:
            outcome.set_result(await then(first, reader, writer))
        except Exception as exc:
            outcome.set_exception(exc)
        writer.close()

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server()
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client(), close_timeout=0.2
        )
        writer.write(payload)
        await writer.drain()
        writer.close()
        async with asyncio.timeout(10):
            await writer.wait_closed()
        busy.set()
        async with asyncio.timeout(10):
            return await outcome


@pytest.mark.parametrize("size", [100_001, 3_000_001])
async def test_a_clean_close_loses_nothing_for_a_late_reader(
    pki: Pki, size: int
) -> None:
    # everything the client wrote was acknowledged and its DATA_FIN
    # taken in order before its MP_FASTCLOSE: the server's reader still
    # gets every byte and a clean end
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)

    async def read_the_rest(
        first: bytes, reader: asyncio.StreamReader, _: asyncio.StreamWriter
    ) -> bytes:
        return first + await reader.read()

    assert await _closed_while_busy(pki, payload, read_the_rest) == payload


async def test_a_reply_into_a_reset_connection_is_heard(pki: Pki) -> None:
    # the handler's reply can reach nobody: as asyncio's transports end
    # on a failed write, the reader raises after it
    async def reply(
        _: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"reply")
        await writer.drain()
        await reader.read()

    with pytest.raises(ConnectionResetError):
        await _closed_while_busy(pki, bytes(3_000_000), reply)


async def _reset_after_the_clients_end(
    pki: Pki, answer: bytes, *, server_closes: bool
) -> BaseException | None:
    """What the server's ``wait_closed()`` raises, if anything.

    The server writes ``answer``; the client reads five bytes of it and
    ends its stream (close_notify, DATA_FIN), and resets once the
    server's reader has that end (and the server has closed, with
    ``server_closes``), before it reads anything more.
    """
    ended = asyncio.Event()
    outcome: asyncio.Future[BaseException | None] = (
        asyncio.get_running_loop().create_future()
    )

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(answer)
        assert await reader.read() == b""
        ended.set()
        if server_closes:
            writer.close()
        try:
            await writer.wait_closed()
        except PeerResetError as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server()
    )
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        async with asyncio.timeout(10):
            await reader.readexactly(5)
            writer.write_eof()
            await ended.wait()
            writer.transport.abort()
            return await outcome


async def test_a_reset_after_the_peers_end_that_lost_our_data_is_heard(
    pki: Pki,
) -> None:
    # the reset truncates nothing the server reads, but loses what it
    # wrote and the client never took, and the server hears of it
    error = await _reset_after_the_clients_end(
        pki, bytes(8 << 20), server_closes=False
    )
    assert isinstance(error, PeerResetError)
    assert error.unacknowledged
    assert f"{error.unacknowledged} bytes of ours" in str(error)


# a server handler that returns without closing its writer


async def _sloppy_exchange(
    pki: Pki,
    backend: str,
    handler: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
    ],
    client: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
    ],
) -> asyncio.StreamWriter:
    """Run ``client`` against ``handler``, close, and give the server's
    writer. Both ends' close timeouts are far above the test's limit:
    a close that waits for them fails the test."""
    handed: asyncio.Future[asyncio.StreamWriter] = (
        asyncio.get_running_loop().create_future()
    )

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        handed.set_result(writer)
        await handler(reader, writer)

    limits = (
        {"ssl_shutdown_timeout": 30.0}
        if backend == "kernel"
        else {"close_timeout": 30.0, "ssl_shutdown_timeout": 30.0}
    )
    server = await mptls.start_server(
        handle, "127.0.0.1", 0, ssl=pki.server(), backend=backend, **limits
    )
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client(), backend=backend, **limits
        )
        await client(reader, writer)
        writer.close()
        async with asyncio.timeout(PROMPT * 5):
            await writer.wait_closed()
            server_writer = await handed
            await server_writer.wait_closed()
    return server_writer


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
async def test_a_handler_that_returns_unclosed_ends_with_the_peer(
    pki: Pki, backend: str
) -> None:
    # asyncio's TLS server closes at the peer's close_notify whatever its
    # handler does; mptls waits for a handler that may still answer, and
    # once it has returned, the peer's end closes the connection
    async def echo_line(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(await reader.readline())
        await writer.drain()

    async def ask(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"one line\n")
        assert await reader.readline() == b"one line\n"

    served = await _sloppy_exchange(
        pki, usable_backend(backend), echo_line, ask
    )
    assert served.transport.is_closing()


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
async def test_a_returned_handlers_writer_serves_until_the_peer_ends(
    pki: Pki, backend: str
) -> None:
    # the writer outlives its handler, kept for later: the connection
    # stays open for it until the peer's close
    kept: list[asyncio.StreamWriter] = []

    async def keep(
        _: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        kept.append(writer)

    async def hear_later(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # the handler returns in the step that keeps the writer
        await until(lambda: kept, "the handler's return")
        assert not kept[0].transport.is_closing()
        kept[0].write(b"later\n")
        assert await reader.readline() == b"later\n"

    served = await _sloppy_exchange(
        pki, usable_backend(backend), keep, hear_later
    )
    assert served is kept[0]


async def test_a_half_closed_peer_still_gets_the_handlers_answer(
    pki: Pki,
) -> None:
    # the peer's end does not close a handler that is still running: it
    # answers after the end, and its return closes
    async def answer_after_end(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        data = await reader.read()
        writer.write(data[::-1])

    async def half_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"abc")
        writer.write_eof()
        assert await reader.read() == b"cba"

    await _sloppy_exchange(pki, "userspace", answer_after_end, half_close)


async def test_a_write_after_the_peers_full_close_is_heard_as_lost(
    pki: Pki,
) -> None:
    # the server closes without reading; the client writes after the
    # server's end. MPTCP acknowledges those bytes, but the server's TLS
    # layer drops what comes after its close: the reset at its
    # close_timeout may have lost them, and the client hears of it
    async def close_at_once(
        _: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"bye")
        writer.close()
        with contextlib.suppress(MptlsError):
            await writer.wait_closed()

    server = await mptls.start_server(
        close_at_once, "127.0.0.1", 0, ssl=pki.server(), close_timeout=0.5
    )
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        async with asyncio.timeout(10):
            assert await reader.read() == b"bye"
            writer.write(b"late")
            with pytest.raises(PeerResetError):
                await writer.wait_closed()


async def test_an_unacknowledged_close_notify_alone_is_no_loss(
    pki: Pki,
) -> None:
    # the client resets before it reads the server's close: only the
    # server's close_notify is unacknowledged, none of its application's
    # bytes, and the server's end is clean
    error = await _reset_after_the_clients_end(
        pki, b"hello", server_closes=True
    )
    assert error is None


# asyncio's servers close and abort their clients from Python 3.13; the
# kernel backend's are asyncio's, the userspace backend's are mptls's own
_ENDING_BACKENDS = ["userspace"] + (
    ["kernel"] if hasattr(asyncio.Server, "abort_clients") else []
)


@pytest.mark.parametrize("how", ["close_clients", "abort_clients"])
@pytest.mark.parametrize("backend", _ENDING_BACKENDS)
async def test_a_server_ends_its_clients_as_python_3_13s_do(
    pki: Pki, backend: str, how: str
) -> None:
    held: asyncio.Future[asyncio.StreamWriter] = (
        asyncio.get_running_loop().create_future()
    )

    async def hold(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        held.set_result(writer)
        with contextlib.suppress(MptlsError, ConnectionError):
            await reader.read()

    server = await mptls.start_server(
        hold, "127.0.0.1", 0, ssl=pki.server(), backend=usable_backend(backend)
    )
    port = int(server.sockets[0].getsockname()[1])
    reader, writer = await mptls.open_connection(
        "127.0.0.1", port, ssl=pki.client(), backend=backend
    )
    async with asyncio.timeout(PROMPT * 5):
        served = await held
        server.close()
        getattr(server, how)()
        # a handler's write after that is dropped, as asyncio's transports
        # drop it, not an error of its own
        served.write(b"after the end")
        if how == "close_clients" and backend == "userspace":
            # each connection closes as its application's close() does
            assert await reader.read() == b""
            writer.close()
        else:
            # asyncio closes a TLS server's sockets under the TLS layer:
            # no close_notify came first, an end but not a clean one
            with pytest.raises(MptlsError):
                await reader.read()
        await server.wait_closed()
    writer.close()


class _Held:
    """A stand-in for one of asyncio's servers, with or without 3.13's
    methods for ending its clients."""

    def __init__(self, *, ends_clients: bool) -> None:
        self.calls: list[str] = []
        if ends_clients:
            self.close_clients = lambda: self.calls.append("close")
            self.abort_clients = lambda: self.calls.append("abort")


def test_the_kernel_servers_end_clients_only_where_asyncio_can() -> None:
    # before Python 3.13 asyncio's servers do not track their clients:
    # a call that did nothing would let the caller believe them ended
    loop = asyncio.new_event_loop()
    try:
        able = _Held(ends_clients=True)
        both = MultiServer(loop, [cast(asyncio.Server, able)] * 2)
        both.close_clients()
        both.abort_clients()
        assert able.calls == ["close", "close", "abort", "abort"]
        unable = MultiServer(
            loop, [cast(asyncio.Server, _Held(ends_clients=False))]
        )
        for how in ("close_clients", "abort_clients"):
            with pytest.raises(NotImplementedError) as raised:
                getattr(unable, how)()
            # the loop's server is named: uvloop's lacks them on 3.13 too
            assert f"{how}()" in str(raised.value)
            assert "test_close._Held has not" in str(raised.value)
            assert "Python 3.13" in str(raised.value)
        # one server that cannot: the others' clients are left alone too
        mixed = MultiServer(
            loop,
            [
                cast(asyncio.Server, able),
                cast(asyncio.Server, _Held(ends_clients=False)),
            ],
        )
        with pytest.raises(NotImplementedError):
            mixed.close_clients()
        assert able.calls == ["close", "close", "abort", "abort"]
    finally:
        loop.close()
