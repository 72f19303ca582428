"""An abort reaches the peer as an abort, with unread data on its way.

On the userspace backend MP_FASTCLOSE travels in the subflow's byte
stream. An end that aborts while the peer's bytes wait unread in its
socket must not let the kernel answer its close with a TCP reset: the
reset drops what is still queued to go, the MP_FASTCLOSE included, and
the peer then took the abort for lost paths and failed on a refused
rejoin (``JoinRefusedError``) or a path loss timeout. The subflow that
carried the reset frame lingers instead (``close_after_reset``): it
reads and drops what comes, shuts its write side, and closes when the
peer does, or after ``ABORT_LINGER``.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import warnings
import weakref

import pytest
from pki import Pki
from support import established, until

import mptls
from mptls.backends.userspace import subflow as subflow_module
from mptls.backends.userspace.subflow import SubflowProtocol
from mptls.errors import PeerResetError
from mptls.mptcp.framing import PREAMBLE

ROUNDS = 20
# more than the data-level window and the socket buffers take at once:
# the aborting end still has its own bytes queued, and the peer's wait
# unread in its socket, when it aborts
PAYLOAD = bytes(6 << 20)


async def _server_aborts(
    pki: Pki, rounds: int, subflows: list[SubflowProtocol] | None = None
) -> list[BaseException | None]:
    """What the client's read ends with, for each of ``rounds``
    connections whose server writes a burst and aborts while the
    client is still writing; the server's subflows go to ``subflows``.

    The client answers the MP_FASTCLOSE by closing its side, which ends
    the server's lingering subflows long before ``ABORT_LINGER`` (set
    far beyond the test's wait by the callers).
    """
    aborting = [] if subflows is None else subflows

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # the client goes on writing; the handler reads no more
        await reader.readexactly(1)
        for tcp in writer.get_extra_info("subflow_transports").values():
            aborting.append(tcp.get_protocol())
        writer.write(PAYLOAD)
        writer.transport.abort()

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server()
    )
    port = int(server.sockets[0].getsockname()[1])
    outcomes: list[BaseException | None] = []
    async with server:
        for _ in range(rounds):
            reader, writer = await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client()
            )
            writer.write(PAYLOAD)
            async with asyncio.timeout(10):
                outcomes.append(await _how_reading_ends(reader))
            writer.close()
            async with asyncio.timeout(5):
                while not all(subflow.gone for subflow in aborting):
                    await asyncio.sleep(0)
    return outcomes


async def _how_reading_ends(
    reader: asyncio.StreamReader,
) -> BaseException | None:
    """Read to the end: None at an orderly one, else the error."""
    try:
        await reader.read()
    except Exception as exc:
        return exc
    return None


def _assert_all_aborts(outcomes: list[BaseException | None]) -> None:
    wrong = [
        repr(outcome)
        for outcome in outcomes
        if not isinstance(outcome, PeerResetError)
        or "MP_FASTCLOSE" not in str(outcome)
    ]
    assert not wrong, f"{len(wrong)} of {len(outcomes)}: {wrong[:3]}"


async def test_a_server_abort_under_unread_data_reaches_the_client(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subflow_module, "ABORT_LINGER", 30.0)
    _assert_all_aborts(await _server_aborts(pki, ROUNDS))


def test_a_server_abort_under_unread_data_reaches_the_client_on_uvloop(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvloop shuts the write side and reads on its own terms
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.setattr(subflow_module, "ABORT_LINGER", 30.0)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        outcomes = runner.run(_server_aborts(pki, ROUNDS // 2))
    _assert_all_aborts(outcomes)


def _record_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> dict[SubflowProtocol, Exception | None]:
    """How each subflow's TCP connection ends, filled in as they do;
    with a linger long enough that only the peer's answer ends one."""
    ends: dict[SubflowProtocol, Exception | None] = {}
    recorded = SubflowProtocol.connection_lost

    def recording(subflow: SubflowProtocol, exc: Exception | None) -> None:
        ends[subflow] = exc
        recorded(subflow, exc)

    monkeypatch.setattr(SubflowProtocol, "connection_lost", recording)
    monkeypatch.setattr(subflow_module, "ABORT_LINGER", 30.0)
    return ends


async def test_the_client_answers_mp_fastclose_with_a_reset(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RFC 8684 section 3.5: the connection is gone, and what the client
    # still had queued reaches nobody. It resets its subflows rather
    # than send all that first: the server's linger ends at once
    ends = _record_ends(monkeypatch)
    subflows: list[SubflowProtocol] = []
    _assert_all_aborts(await _server_aborts(pki, 3, subflows))
    assert subflows
    for subflow in subflows:
        assert isinstance(ends[subflow], ConnectionResetError)


async def test_the_client_resets_every_subflow_on_mp_fastclose(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with two subflows the client answers the MP_FASTCLOSE that came
    # on one with a reset frame on the other: that subflow is reset
    # too, not kept open to send what it still holds to an aborted peer
    ends = _record_ends(monkeypatch)
    aborting: list[SubflowProtocol] = []
    joined = asyncio.Event()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(1)
        await joined.wait()
        for tcp in writer.get_extra_info("subflow_transports").values():
            aborting.append(tcp.get_protocol())
        writer.write(PAYLOAD)
        writer.transport.abort()

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server()
    )
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        reader, writer = await mptls.open_connection(
            "127.0.0.1",
            port,
            ssl=pki.client(),
            local_addrs=["127.0.0.1", "127.0.0.2"],
        )
        writer.write(b"x")
        await established(writer, 2)
        joined.set()
        with pytest.raises(PeerResetError, match="MP_FASTCLOSE"):
            async with asyncio.timeout(10):
                await reader.read()
        writer.close()
        async with asyncio.timeout(5):
            while len(aborting) < 2 or not all(s.gone for s in aborting):
                await asyncio.sleep(0)
    assert [type(ends[subflow]) for subflow in aborting] == [
        ConnectionResetError,
        ConnectionResetError,
    ]


async def test_a_lingering_subflow_keeps_no_connection_alive(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a server aborts many connections whose clients read nothing: each
    # subflow lingers up to CLOSE_LINGER, and must not hold its aborted
    # connection (the TLS layer, the core, the unacknowledged data that
    # nobody will send again) all that time
    monkeypatch.setattr(subflow_module, "ABORT_LINGER", 30.0)
    lingering: list[SubflowProtocol] = []
    gone: list[weakref.ref[object]] = []
    handled = asyncio.Event()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(1)
        for tcp in writer.get_extra_info("subflow_transports").values():
            lingering.append(tcp.get_protocol())
            gone.append(weakref.ref(tcp.get_protocol().sink))
        writer.write(PAYLOAD)
        writer.transport.abort()
        handled.set()

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server()
    )
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        _, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        # the client reads nothing: the server's queue stays full
        for tcp in writer.get_extra_info("subflow_transports").values():
            tcp.pause_reading()
        writer.write(b"x")
        try:
            async with asyncio.timeout(10):
                await handled.wait()
                while any(ref() is not None for ref in gone):
                    await asyncio.sleep(0.01)
                    gc.collect()
            assert lingering
            assert not any(subflow.gone for subflow in lingering)
        finally:
            writer.transport.abort()


async def test_a_client_abort_under_unread_data_reaches_the_server(
    pki: Pki,
) -> None:
    loop = asyncio.get_running_loop()
    outcomes: list[asyncio.Future[BaseException | None]] = []

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        outcome = outcomes[-1]
        writer.write(PAYLOAD)
        outcome.set_result(await _how_reading_ends(reader))
        writer.close()

    # a lost MP_FASTCLOSE leaves the server waiting for a rejoin: a path
    # loss timeout short enough to show as a wrong error, not a hang
    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server(), path_loss_timeout=2.0
    )
    port = int(server.sockets[0].getsockname()[1])
    ended: list[BaseException | None] = []
    async with server:
        for _ in range(ROUNDS):
            outcomes.append(loop.create_future())
            reader, writer = await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client()
            )
            async with asyncio.timeout(10):
                # the server is writing its burst: the client's socket
                # holds its bytes unread as the client aborts
                await reader.readexactly(1)
                writer.write(PAYLOAD)
                writer.transport.abort()
                ended.append(await outcomes[-1])
    _assert_all_aborts(ended)


# a lost MP_FASTCLOSE leaves the peer waiting for a rejoin until
# path_loss_timeout: short, so that it shows as a wrong error soon
SHORT_PATH_LOSS = 3.0
# mode E right after the handshake: the aborting end may not have the
# peer's NEW_KEY yet, so its keys are still pending (unconfirmed)
MODES = pytest.mark.parametrize(
    ("client_mode", "server_modes"), [("G", ["G"]), ("e", ["E"])]
)


def _assert_prompt_abort(
    ended: list[tuple[BaseException | None, float]],
) -> None:
    """Each peer saw an MP_FASTCLOSE, well before a path loss timeout."""
    _assert_all_aborts([outcome for outcome, _ in ended])
    slowest = max(elapsed for _, elapsed in ended)
    assert slowest < SHORT_PATH_LOSS / 2, slowest


@MODES
async def test_a_client_abort_right_after_the_handshake_reaches_the_server(
    pki: Pki, client_mode: str, server_modes: list[str]
) -> None:
    # the client's TLS Finished and its MP_FASTCLOSE reach the server in
    # one read; the server verifies the MP_FASTCLOSE only with the keys
    # that Finished gives it, so the frames before the reset must reach
    # TLS first (before: PathsLostError, "every subflow of the
    # connection closed before the TLS handshake gave the keys ...").
    # In mode E the client has not had the server's NEW_KEY yet: its
    # reset carries the tag of the keys still waiting for it (before: a
    # plain RST, and the server's MptlsTimeoutError at path_loss_timeout)
    loop = asyncio.get_running_loop()
    outcomes: list[asyncio.Future[BaseException | None]] = []

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        outcome = outcomes[-1]
        outcome.set_result(await _how_reading_ends(reader))
        writer.close()

    server = await mptls.start_server(
        handler,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        modes=server_modes,
        path_loss_timeout=SHORT_PATH_LOSS,
    )
    port = int(server.sockets[0].getsockname()[1])
    ended: list[tuple[BaseException | None, float]] = []
    async with server:
        for _ in range(5):
            outcomes.append(loop.create_future())
            _, writer = await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), mode=client_mode
            )
            writer.transport.abort()
            aborted = loop.time()
            async with asyncio.timeout(10):
                outcome = await outcomes[-1]
            ended.append((outcome, loop.time() - aborted))
    _assert_prompt_abort(ended)


@MODES
async def test_a_server_abort_right_after_the_handshake_reaches_the_client(
    pki: Pki, client_mode: str, server_modes: list[str]
) -> None:
    # the server's handler runs once its TLS handshake is complete, and
    # aborts there. In mode E the client's keys still wait for the
    # server's NEW_KEY, which the server sends before its reset (over
    # loopback the client's NEW_KEY came with its Finished, so the
    # server's keys are active; test_rotation_joins.py has the core
    # aborting with both ends' keys pending)
    loop = asyncio.get_running_loop()
    aborted_at: list[float] = []

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.transport.abort()
        aborted_at.append(loop.time())

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server(), modes=server_modes
    )
    port = int(server.sockets[0].getsockname()[1])
    ended: list[tuple[BaseException | None, float]] = []
    async with server:
        for _ in range(5):
            reader, writer = await mptls.open_connection(
                "127.0.0.1",
                port,
                ssl=pki.client(),
                mode=client_mode,
                path_loss_timeout=SHORT_PATH_LOSS,
            )
            async with asyncio.timeout(10):
                outcome = await _how_reading_ends(reader)
            ended.append((outcome, loop.time() - aborted_at[-1]))
            writer.close()
    _assert_prompt_abort(ended)


# one subflow on a TCP connection whose far end the test drives


class _Sink:
    """Records what the subflow hands on: after a reset frame, nothing."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def segments_received(self, subflow: object, segments: object) -> None:
        self.calls.append("segments")

    def subflow_lost(self, subflow: object, exc: object) -> None:
        self.calls.append("lost")

    def subflow_writable(self, subflow: object, writable: bool) -> None:
        pass


class _Watched(SubflowProtocol):
    """Resolves ``lost`` with the loop's time when its TCP connection
    is gone."""

    def __init__(self, sink: _Sink) -> None:
        super().__init__(sink, initiator=True)
        self.lost: asyncio.Future[float] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(asyncio.get_running_loop().time())


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one TCP connection on loopback: (near, far), with
    small buffers so that a megabyte waits in the near end's queue."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    far.setblocking(False)
    return near, far


async def _read_to_end(sock: socket.socket, limit: int) -> bytes:
    """What ``sock`` reads up to the peer's FIN (at most ``limit``)."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    while len(received) <= limit:
        chunk = await loop.sock_recv(sock, 256 * 1024)
        if not chunk:
            return bytes(received)
        received += chunk
    raise AssertionError(f"more than {limit} bytes and no end")


async def _lingering(
    far: socket.socket, sink: _Sink, near: socket.socket
) -> tuple[_Watched, asyncio.Transport, bytes]:
    """A subflow on ``near`` that wrote a megabyte (its reset frame
    last) and closed after it while the far end's bytes waited unread
    in ``near``; returns it, its transport and what it wrote."""
    loop = asyncio.get_running_loop()
    subflow = _Watched(sink)
    transport, _ = await loop.connect_accepted_socket(lambda: subflow, near)
    frames = bytes(range(256)) * 4096
    subflow.send([frames])
    assert transport.get_write_buffer_size()
    # no loop step between these: the far end's bytes are unread when
    # the close comes, as an aborting server's client's are
    far.send(b"unread bytes of the peer")
    subflow.close_after_reset()
    return subflow, transport, PREAMBLE + frames


async def test_a_reset_frame_reaches_a_peer_whose_bytes_wait_unread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # far beyond the wait below: the linger ends on the peer's close
    monkeypatch.setattr(subflow_module, "ABORT_LINGER", 30.0)
    near, far = _tcp_pair()
    sink = _Sink()
    subflow, transport, written = await _lingering(far, sink, near)
    try:
        async with asyncio.timeout(10):
            # everything written arrives, then the FIN: no reset
            assert await _read_to_end(far, len(written)) == written
            # what the peer sends meanwhile is read and dropped
            far.send(b"more bytes of the peer" * 1000)
            far.shutdown(socket.SHUT_WR)
            await subflow.lost
        assert near.fileno() == -1
        assert sink.calls == []
    finally:
        if not subflow.lost.done():
            transport.abort()
        far.close()


@pytest.mark.parametrize("far_reads", [False, True], ids=["deaf", "mute"])
async def test_a_lingering_subflow_is_reset_after_abort_linger(
    monkeypatch: pytest.MonkeyPatch, far_reads: bool
) -> None:
    # a peer that never reads (the queue never drains, so the write side
    # is never shut), or reads but never closes: the socket is reset
    # after ABORT_LINGER, not held for as long as the peer likes
    linger = 0.3
    monkeypatch.setattr(subflow_module, "ABORT_LINGER", linger)
    loop = asyncio.get_running_loop()
    near, far = _tcp_pair()
    sink = _Sink()
    started = loop.time()
    subflow, transport, written = await _lingering(far, sink, near)
    try:
        async with asyncio.timeout(10):
            if far_reads:
                assert await _read_to_end(far, len(written)) == written
            gone_at = await subflow.lost
        # it lingered: neither closed at once nor held much past it
        assert linger * 0.9 <= gone_at - started < linger + 5.0
        assert near.fileno() == -1
        assert sink.calls == []
        if not far_reads:
            # the far end hears a reset, not an end it would wait on
            with pytest.raises(ConnectionResetError):
                await _read_to_end(far, len(written))
    finally:
        if not subflow.lost.done():
            transport.abort()
        far.close()


async def _read_slowly(sock: socket.socket, pause: float) -> bytes:
    """What ``sock`` reads up to the peer's FIN, taking a little at a
    time: a slow path (a bounded count of reads)."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    for _ in range(1000):
        chunk = await loop.sock_recv(sock, 32 * 1024)
        if not chunk:
            return bytes(received)
        received += chunk
        await asyncio.sleep(pause)
    raise AssertionError("no end after 1000 reads")


@pytest.mark.parametrize("limit", [30.0, 0.5], ids=["ends", "cut"])
async def test_a_lingering_subflow_waits_while_its_queue_drains(
    monkeypatch: pytest.MonkeyPatch, limit: float
) -> None:
    # the bytes before the reset frame take longer than ABORT_LINGER to
    # leave on a slow path: the linger waits again while they move (the
    # frame and the FIN still arrive), up to CLOSE_LINGER in all
    linger = 0.2
    monkeypatch.setattr(subflow_module, "ABORT_LINGER", linger)
    monkeypatch.setattr(subflow_module, "CLOSE_LINGER", limit)
    loop = asyncio.get_running_loop()
    near, far = _tcp_pair()
    sink = _Sink()
    started = loop.time()
    subflow, transport, written = await _lingering(far, sink, near)
    try:
        async with asyncio.timeout(10):
            if limit > linger * 10:
                assert await _read_slowly(far, linger / 10) == written
                # slower than one linger: it was waited for
                assert loop.time() - started > 2 * linger
                far.shutdown(socket.SHUT_WR)
            else:
                with pytest.raises(ConnectionResetError):
                    await _read_slowly(far, linger / 10)
            gone_at = await subflow.lost
        assert gone_at - started < limit + linger + 5.0
        assert sink.calls == []
    finally:
        if not subflow.lost.done():
            transport.abort()
        far.close()


class _ResetBeforeShutdown(socket.socket):
    """A socket whose peer's reset lands between the last send and the
    shutdown of the write side: a race a peer that resets on the reset
    frame wins now and then on a machine with more than one core."""

    def shutdown(self, how: int) -> None:
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))


async def _read_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while len(received) < size:
        chunk = await loop.sock_recv(sock, 256 * 1024)
        assert chunk, "the connection ended early"
        received += chunk
    return bytes(received)


async def test_a_reset_before_the_fin_of_a_lingering_subflow_is_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # asyncio's write callback shuts the socket, unguarded, once a
    # buffer that write_eof() found full has gone: there ENOTCONN went
    # to the loop's exception handler ("Exception in callback"). The
    # subflow shuts its write side itself and resets on a refusal
    monkeypatch.setattr(subflow_module, "ABORT_LINGER", 30.0)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    plain, far = _tcp_pair()
    near = _ResetBeforeShutdown(fileno=plain.detach())
    sink = _Sink()
    subflow, transport, written = await _lingering(far, sink, near)
    try:
        async with asyncio.timeout(10):
            assert await _read_exactly(far, len(written)) == written
        await until(lambda: subflow.lost.done() or errors, "the subflow's end")
        assert errors == []
        assert subflow.lost.done()
        assert near.fileno() == -1
        assert sink.calls == []
    finally:
        loop.set_exception_handler(None)
        if not subflow.lost.done():
            transport.abort()
        far.close()


def _still_open(fd: int, inode: int) -> bool:
    """Whether descriptor ``fd`` still holds the socket of ``inode``
    (its number may be another file's by now)."""
    try:
        return os.fstat(fd).st_ino == inode
    except OSError:
        return False


async def _left_lingering(
    far: socket.socket, sink: _Sink, near: socket.socket, *, held: bool
) -> tuple[_Watched, bytes]:
    """A subflow on ``near`` that closed after its reset frame and
    lingers: the far end never reads, and never closes, while the loop
    runs. ``held``: a megabyte still in asyncio's buffer (the write
    side is not shut yet); else a few frames the kernel holds, the FIN
    behind them. Returns it and what it wrote."""
    if held:
        subflow, _, written = await _lingering(far, sink, near)
    else:
        loop = asyncio.get_running_loop()
        subflow = _Watched(sink)
        transport, _ = await loop.connect_accepted_socket(
            lambda: subflow, near
        )
        frames = b"the last frames, the reset frame among them"
        subflow.send([frames])
        assert not transport.get_write_buffer_size()
        subflow.close_after_reset()
        written = PREAMBLE + frames
    # the peer's bytes wait unread at the loop's end: a close that found
    # them would be a reset, which drops what the kernel still holds
    far.send(b"unread bytes of the peer")
    # the premise, by construction: no timer ends the linger before the
    # test's own timeout, and no FIN or reset comes from the far end
    assert subflow.closed
    assert not subflow.gone
    return subflow, written


@pytest.mark.parametrize("held", [False, True], ids=["sent", "held"])
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_the_loop_s_end_closes_a_lingering_subflow(
    monkeypatch: pytest.MonkeyPatch, loop_name: str, held: bool
) -> None:
    # a program that ends its loop (asyncio.run() returns, Ctrl-C)
    # while the subflows of an abort linger left their sockets to the
    # garbage collector: a ResourceWarning for each, and a close with
    # the peer's bytes unread, a reset that lost the reset frame
    if loop_name == "uvloop":
        loop_factory = pytest.importorskip("uvloop").new_event_loop
    else:
        loop_factory = asyncio.new_event_loop
    monkeypatch.setattr(subflow_module, "ABORT_LINGER", 3600.0)
    near, far = _tcp_pair()
    fd, inode = near.fileno(), os.fstat(near.fileno()).st_ino
    sink = _Sink()
    # what an earlier test left to the collector is not this test's
    gc.collect()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                subflow, written = runner.run(
                    _left_lingering(far, sink, near, held=held)
                )
            assert subflow.gone
            assert not _still_open(fd, inode)
            assert sink.calls == []
            del subflow
            gc.collect()
        unclosed = [w for w in caught if w.category is ResourceWarning]
        assert [str(warning.message) for warning in unclosed] == []

        # the far end: what the kernel held, then the FIN; a reset when
        # asyncio still held bytes, which could leave only from a loop
        far.setblocking(True)
        far.settimeout(10.0)
        if held:
            with pytest.raises(ConnectionResetError):
                _read_blocking(far, len(written))
        else:
            assert _read_blocking(far, len(written)) == written
    finally:
        far.close()
        near.close()


def _read_blocking(sock: socket.socket, limit: int) -> bytes:
    """What ``sock``, a blocking socket, reads up to the peer's FIN."""
    received = bytearray()
    while len(received) <= limit:
        chunk = sock.recv(256 * 1024)
        if not chunk:
            return bytes(received)
        received += chunk
    raise AssertionError(f"more than {limit} bytes and no end")
