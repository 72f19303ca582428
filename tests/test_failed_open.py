"""An open_connection that fails or is cancelled leaves no socket open.

As with asyncio's ``open_connection``, the TCP connections the call made
are closed, and no longer watched by the loop, when its error (or the
``CancelledError``) reaches the caller; before, the first subflow stayed
open for up to ``ABORT_LINGER`` after its reset frame. What the client
wrote before it gave up, that frame or a TLS alert, still reaches the
server ahead of a FIN: the kernel sends it after the close.

Each test reaches its point by what its own server sees or by a loop
method it wraps, never by waiting a while. Where a connection stands is
read from Linux's ``/proc/net/tcp``, in which a socket no process holds
any more (the kernel still ending it) has inode 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from OpenSSL import SSL
from pki import Pki
from support import until, usable_backend

import mptls
from mptls.mptcp.framing import PREAMBLE, Flag, Segment, SegmentDecoder

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="reads Linux's /proc/net/tcp"
)

LIMIT = 10.0

# TCP states as /proc/net/tcp numbers them
_FIN_WAIT1, _FIN_WAIT2, _TIME_WAIT = 4, 5, 6
# a close that sent a FIN: the client's end waits for the server's
_ENDED_IN_ORDER = {_FIN_WAIT1, _FIN_WAIT2, _TIME_WAIT}

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def connections_to(port: int, source: int = 0) -> list[tuple[int, bool]]:
    """This host's TCP connections to ``port`` (from port ``source`` if
    given): each one's state, and whether a process still holds its
    socket."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, remote = fields[1], fields[2]
                if int(remote.rsplit(":", 1)[1], 16) != port:
                    continue
                if source and int(local.rsplit(":", 1)[1], 16) != source:
                    continue
                found.append((int(fields[3], 16), fields[9] != "0"))
    return found


def held_to(port: int, source: int = 0) -> int:
    """How many sockets connected to ``port`` (from ``source``) a
    process still holds."""
    return sum(held for _, held in connections_to(port, source))


def ended_in_order(port: int) -> bool:
    """Whether every connection to ``port`` was closed with a FIN (not
    reset, which removes it) and no process holds it any more."""
    states = connections_to(port)
    return bool(states) and all(
        state in _ENDED_IN_ORDER and not held for state, held in states
    )


class Stalled:
    """A TCP server that takes what a client sends and never answers:
    an mptls client waits in its handshakes. It keeps every stream."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[Stream] = asyncio.Queue()
        self.streams: list[Stream] = []
        self.port = 0

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.streams.append((reader, writer))
        await self.accepted.put((reader, writer))

    async def took_the_client(self) -> None:
        """Return once the server has taken the client's connection, so
        that the server is not closed with it half taken (Python 3.13.0
        then fails in the transport's ``__del__``, after the test)."""
        async with asyncio.timeout(LIMIT):
            await self.accepted.get()

    async def heard(self) -> tuple[Stream, bytes]:
        """The next client and its first bytes: its handshake is under
        way once they came, for it writes them as it starts it."""
        async with asyncio.timeout(LIMIT):
            stream = await self.accepted.get()
            first = await stream[0].read(65536)
        assert first.startswith(PREAMBLE[:1])
        return stream, first


@contextlib.asynccontextmanager
async def stalled_server() -> AsyncIterator[Stalled]:
    stalled = Stalled()
    server = await asyncio.start_server(stalled.handle, "127.0.0.1", 0)
    stalled.port = server.sockets[0].getsockname()[1]
    try:
        yield stalled
    finally:
        for _, writer in stalled.streams:
            writer.close()
        server.close()
        async with asyncio.timeout(LIMIT):
            await server.wait_closed()


async def rest_of(reader: asyncio.StreamReader, first: bytes) -> list[Segment]:
    """What the client sent, up to its FIN: a reset instead raises."""
    async with asyncio.timeout(LIMIT):
        rest = await reader.read()
    return SegmentDecoder(preamble=True).feed(first + rest)


def cancel_on_first_bytes(
    stalled: Stalled,
) -> asyncio.Task[tuple[Stream, bytes]]:
    """Cancel the running task once the server has the client's first
    bytes: the cancel lands where the client waits for the answer."""
    caller = asyncio.current_task()
    assert caller is not None

    async def watch() -> tuple[Stream, bytes]:
        heard = await stalled.heard()
        caller.cancel()
        return heard

    return asyncio.create_task(watch())


async def test_a_cancel_in_the_handshake_closes_the_socket_before_it_returns(
    pki: Pki,
) -> None:
    # the caller's own task is cancelled, as asyncio.timeout() does: no
    # loop step passes between the cancel reaching it and the checks
    async with stalled_server() as stalled:
        watching = cancel_on_first_bytes(stalled)
        with pytest.raises(asyncio.CancelledError):
            await mptls.open_connection(
                "127.0.0.1", stalled.port, ssl=pki.client()
            )
        caller = asyncio.current_task()
        assert caller is not None
        caller.uncancel()
        assert held_to(stalled.port) == 0
        assert ended_in_order(stalled.port)
        # the reset frame came, then the FIN, and no TCP reset
        (reader, _), first = await watching
        segments = await rest_of(reader, first)
        assert segments[-1].flags & Flag.RST


async def test_bytes_unread_at_the_cancel_do_not_turn_the_close_into_a_reset(
    pki: Pki,
) -> None:
    # the server's answer arrives in the same loop step as the cancel:
    # closed with it unread, the socket would send a TCP reset that drops
    # what it has not sent yet
    async with stalled_server() as stalled:
        connecting = asyncio.create_task(
            mptls.open_connection("127.0.0.1", stalled.port, ssl=pki.client())
        )
        (reader, writer), first = await stalled.heard()
        writer.write(PREAMBLE)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        assert ended_in_order(stalled.port)
        segments = await rest_of(reader, first)
        assert segments[-1].flags & Flag.RST


async def test_a_handshake_that_times_out_leaves_no_socket(pki: Pki) -> None:
    async with stalled_server() as stalled:
        with pytest.raises(mptls.HandshakeTimeoutError):
            await mptls.open_connection(
                "127.0.0.1",
                stalled.port,
                ssl=pki.client(),
                ssl_handshake_timeout=0.1,
            )
        assert ended_in_order(stalled.port)
        (reader, _), first = await stalled.heard()
        segments = await rest_of(reader, first)
        assert segments[-1].flags & Flag.RST


@pytest.mark.parametrize("stage", ["sock_connect", "create_connection"])
async def test_a_cancel_while_connecting_leaves_no_socket(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    # the cancel lands in the TCP connect (once the kernel connected),
    # or while asyncio makes the first subflow's transport
    loop = asyncio.get_running_loop()
    reached: asyncio.Future[None] = loop.create_future()
    original = getattr(loop, stage)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        if stage == "create_connection":
            reached.set_result(None)
            return await original(*args, **kwargs)
        await original(*args, **kwargs)
        reached.set_result(None)
        await loop.create_future()  # a connect that never returns

    monkeypatch.setattr(loop, stage, wrapped)
    async with stalled_server() as stalled:
        connecting = asyncio.create_task(
            mptls.open_connection("127.0.0.1", stalled.port, ssl=pki.client())
        )
        async with asyncio.timeout(LIMIT):
            await reached
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        monkeypatch.undo()
        assert held_to(stalled.port) == 0
        await stalled.took_the_client()


async def test_paths_opened_ahead_are_closed_with_the_first(
    pki: Pki,
) -> None:
    # a second local address: its TCP connection opens while TLS runs.
    # Its connect runs in a task of its own, which closes the socket in
    # the loop steps that follow, as asyncio's connect does when cancelled
    async with stalled_server() as stalled:
        connecting = asyncio.create_task(
            mptls.open_connection(
                "127.0.0.1",
                stalled.port,
                ssl=pki.client(),
                local_addrs=["127.0.0.1", "127.0.0.2"],
            )
        )
        (_, first_writer), _ = await stalled.heard()
        async with asyncio.timeout(LIMIT):
            await stalled.accepted.get()
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        first_port = first_writer.get_extra_info("peername")[1]
        assert held_to(stalled.port, first_port) == 0
        await until(
            lambda: held_to(stalled.port) == 0, "the path opened ahead closed"
        )


@contextlib.contextmanager
def spoiled_as_it_connects() -> Iterator[SSL.Context]:
    """A client context whose handshake fails as it starts, inside the
    backend's create_connection.

    A context OpenSSL can build no ClientHello on is refused before
    anything connects; this one passes that check and is then left with
    no cipher to offer as the first TCP connect begins (as another task
    sharing it could do meanwhile): TLS 1.2 alone, with only PSK
    ciphers, which a client without a PSK cannot offer.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    loop = asyncio.get_running_loop()
    original = loop.create_connection

    async def connect(*args: Any, **kwargs: Any) -> Any:
        if not spoiled:
            context.set_max_proto_version(SSL.TLS1_2_VERSION)
            context.set_cipher_list(b"PSK")
            spoiled.append(True)
        return await original(*args, **kwargs)

    spoiled: list[bool] = []
    loop.create_connection = connect  # type: ignore[method-assign]
    try:
        yield context
    finally:
        del loop.create_connection
    assert spoiled


async def open_that_cannot_start(
    stalled: Stalled, **keywords: Any
) -> mptls.TLSError:
    """The TLSError of a connect to ``stalled`` (or over ``sock=``)
    with :func:`spoiled_as_it_connects`'s context."""
    if "sock" not in keywords:
        keywords.update(host="127.0.0.1", port=stalled.port)
    with (
        spoiled_as_it_connects() as context,
        pytest.raises(mptls.TLSError, match="could not start") as raised,
    ):
        await mptls.open_connection(
            ssl=context, server_hostname="localhost", **keywords
        )
    return raised.value


async def test_a_handshake_that_cannot_start_leaves_no_socket() -> None:
    async with stalled_server() as stalled:
        error = await open_that_cannot_start(stalled)
        assert held_to(stalled.port) == 0
        # it said it sent an alert, which never left
        assert str(error) == "TLS could not start: no ciphers available"
        assert error.alert is None
        (reader, _), first = await stalled.heard()
        segments = await rest_of(reader, first)
        assert [bytes(segment.payload) for segment in segments] == [b""]
        assert segments[-1].flags & Flag.RST


async def test_a_handshake_that_cannot_start_closes_the_given_socket() -> None:
    # the backend's own create_connection fails after it took the socket
    async with stalled_server() as stalled:
        with socket.create_connection(("127.0.0.1", stalled.port)) as sock:
            await open_that_cannot_start(stalled, sock=sock)
            assert sock.fileno() == -1
        assert held_to(stalled.port) == 0
        await stalled.took_the_client()


async def test_a_kernel_handshake_that_cannot_start_fails_at_once() -> None:
    # the engine's error escaped the socket transport's connection_made
    # into the loop's exception handler, and the client waited out its
    # handshake timeout for an answer it had never asked for
    backend = usable_backend("kernel")
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        async with stalled_server() as stalled:
            await open_that_cannot_start(
                stalled, backend=backend, ssl_handshake_timeout=LIMIT
            )
            assert reported == []
            async with asyncio.timeout(LIMIT):
                reader, _ = await stalled.accepted.get()
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
    finally:
        loop.set_exception_handler(None)


async def test_a_handshake_that_cannot_start_opens_no_path_ahead() -> None:
    # a second local address: its TCP connection is opened ahead while
    # TLS runs, and must not be for a connection that already failed
    async with stalled_server() as stalled:
        before = asyncio.all_tasks()
        await open_that_cannot_start(
            stalled, local_addrs=["127.0.0.1", "127.0.0.2"]
        )
        left = [
            task
            for task in asyncio.all_tasks() - before
            if getattr(task.get_coro(), "cr_code", None)
            is not Stalled.handle.__code__
        ]
        assert left == []
        assert held_to(stalled.port) == 0
        await stalled.took_the_client()


def test_on_uvloop_a_cancelled_sock_connect_frees_the_socket_a_step_later(
    pki: Pki,
) -> None:
    # uvloop's transport holds the descriptor until its close callback,
    # the loop step after the abort, as for its own connections: the
    # socket object is closed at the raise, its descriptor one step on
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with stalled_server() as stalled:
            with socket.create_connection(("127.0.0.1", stalled.port)) as sock:
                watching = cancel_on_first_bytes(stalled)
                with pytest.raises(asyncio.CancelledError):
                    await mptls.open_connection(
                        sock=sock,
                        ssl=pki.client(),
                        server_hostname="localhost",
                    )
                caller = asyncio.current_task()
                assert caller is not None
                caller.uncancel()
                await asyncio.sleep(0)
                assert sock.fileno() == -1
                assert held_to(stalled.port) == 0
                assert ended_in_order(stalled.port)
                (reader, _), first = await watching
                segments = await rest_of(reader, first)
                assert segments[-1].flags & Flag.RST

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
