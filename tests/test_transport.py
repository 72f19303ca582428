"""The multipath transport's hand-over of lent payloads to its protocol,
the order in which one flush writes to its subflows, and the address ids
its joins carry.

Subflows lend their payloads as views of the reused read buffer; what
the transport keeps past a read (for a paused reader) must be bytes of
its own. The transport numbers local addresses for the core (RFC 8684
section 3.2): a join from a second client address says id 1, the
server's SYN|ACK from an announced address says its ADD_ADDR id, on the
wire as in ``get_extra_info("mptcp")``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pcapfile import read_pcap
from pki import Pki
from support import established, still_echoes

import mptls
import mptls.trace
from mptls.backends.base import SubflowInfo
from mptls.backends.userspace import paths as paths_module
from mptls.backends.userspace import transport as transport_module
from mptls.backends.userspace.paths import Paths
from mptls.backends.userspace.subflow import SubflowProtocol
from mptls.backends.userspace.transport import MultipathTransport
from mptls.errors import MptlsError, PeerResetError
from mptls.mptcp import events
from mptls.mptcp.config import ConnectionConfig
from mptls.mptcp.connection import Connection
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import MpJoinSyn, MpJoinSynAck
from mptls.mptcp.scheduler import UNCAPPED


class StubCore:
    """Just what process() and the data path ask of a Connection."""

    send_buffer_size = 0
    send_pending = 0
    peer_window_closed = True
    config = ConnectionConfig()

    def __init__(self) -> None:
        self.consumed_bytes = 0

    def consumed(self, n: int) -> None:
        self.consumed_bytes += n

    def next_event(self) -> None:
        return None

    def segments_to_send(self, now: float) -> list[Any]:
        return []

    def get_timer(self) -> None:
        return None

    def info(self) -> Any:
        # attach() asks which subflows the core still reports; log
        # lines ask for its token
        return SimpleNamespace(subflows=(), local_token=None)


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.pieces.append(data)

    def data_received_many(self, chunks: list[bytes]) -> None:
        # as TLS does: copied before the call returns
        self.pieces.extend(bytes(chunk) for chunk in chunks)


def make_transport() -> tuple[MultipathTransport, StubCore, Recorder]:
    core = StubCore()
    transport = MultipathTransport(cast(Connection, core), initiator=True)
    protocol = Recorder()
    transport.set_protocol(protocol)
    return transport, core, protocol


async def test_a_paused_reader_keeps_copies_of_lent_views() -> None:
    transport, core, protocol = make_transport()
    transport.pause_reading()
    read = bytearray(b"abcdef")
    transport._on_data([memoryview(read)[:3], memoryview(read)[3:]])
    read[:] = b"XXXXXX"  # the next socket read reuses the buffer
    transport.resume_reading()
    assert b"".join(protocol.pieces) == b"abcdef"
    assert core.consumed_bytes == 6


class Calls(Recorder):
    """A Recorder that also notes what each call brought."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[bytes]] = []

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.calls.append([data])

    def data_received_many(self, chunks: list[bytes]) -> None:
        super().data_received_many(chunks)
        self.calls.append([bytes(chunk) for chunk in chunks])


async def test_a_resumed_reader_takes_each_held_read_in_one_call() -> None:
    # the frames of one socket read reach a paused reader on resume in
    # one call, as they would have while it read: one TLS pass each
    transport, core, _ = make_transport()
    protocol = Calls()
    transport.set_protocol(protocol)
    transport.pause_reading()
    read = bytearray(b"abcdef")
    transport._on_data([memoryview(read)[:2], memoryview(read)[2:]])
    read[:] = b"ghijkl"
    transport._on_data([memoryview(read)[:1], memoryview(read)[1:]])
    transport._on_data([memoryview(read)[:3]])
    read[:] = b"XXXXXX"
    assert protocol.calls == [] and core.consumed_bytes == 0
    transport.resume_reading()
    assert protocol.calls == [[b"ab", b"cdef"], [b"g", b"hijkl"], [b"ghi"]]
    assert core.consumed_bytes == 15


async def test_a_plain_reader_pausing_in_a_held_read_keeps_the_rest() -> None:
    # a protocol without data_received_many takes a held read a frame
    # at a time: a pause after one frame leaves the others held, and
    # the window opens only for what it took
    transport, core, _ = make_transport()
    received: list[bytes] = []

    class PausesOnce(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            received.append(data)
            if len(received) == 1:
                transport.pause_reading()

    transport.set_protocol(PausesOnce())
    transport.pause_reading()
    transport._on_data([memoryview(b"ab"), memoryview(b"cd")])
    transport._on_data([memoryview(b"ef")])
    transport.resume_reading()
    assert received == [b"ab"] and core.consumed_bytes == 2
    transport.resume_reading()
    assert received == [b"ab", b"cd", b"ef"] and core.consumed_bytes == 6


async def test_a_reading_protocol_gets_the_views_at_once() -> None:
    transport, core, protocol = make_transport()
    read = bytearray(b"abcdef")
    transport._on_data([memoryview(read)[:2], memoryview(read)[2:]])
    read[:] = b"XXXXXX"
    assert protocol.pieces == [b"ab", b"cdef"]
    assert core.consumed_bytes == 6


async def test_a_plain_protocol_gets_bytes_of_lent_views() -> None:
    transport, core, _ = make_transport()
    received: list[bytes] = []

    class Plain(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            received.append(data)

    transport.set_protocol(Plain())
    read = bytearray(b"abc")
    transport._on_data([memoryview(read)])
    read[:] = b"XYZ"
    assert received == [b"abc"] and type(received[0]) is bytes
    assert core.consumed_bytes == 3


class WriteLog:
    """A subflow's TCP connection that notes each write, in order."""

    def __init__(self, subflow_id: int, log: list[int]) -> None:
        self.subflow_id = subflow_id
        self.log = log
        self.uncapped_until = 0.0

    def send(self, chunks: list[Any]) -> None:
        self.log.append(self.subflow_id)

    def queue_state(self) -> tuple[int, float]:
        return 0, 0.0


async def test_a_join_syn_is_written_before_the_first_subflows_data() -> None:
    # one flush with the Finished on subflow 0 and a join's SYN on 1:
    # the SYN leaves first, so that a server on a path of like delay
    # holds it before the Finished brings the keys
    transport, core, _ = make_transport()
    sent = [
        (0, Segment(Flag.ACK, (), b"finished")),
        (1, Segment(Flag.SYN, ())),
        (0, Segment(Flag.ACK, (), b"more data")),
    ]
    core.segments_to_send = lambda now: sent  # type: ignore[method-assign]
    log: list[int] = []
    transport._subflows = {0: WriteLog(0, log), 1: WriteLog(1, log)}  # type: ignore[dict-item]
    transport._flush()
    assert log == [1, 0]


class QueuedLog(WriteLog):
    """A subflow whose socket holds ``queued`` bytes not yet sent, on a
    path whose kernel reports ``rate`` bytes per second (0: unknown)."""

    def __init__(
        self, subflow_id: int, queued: int, rate: float = 0.0
    ) -> None:
        super().__init__(subflow_id, [])
        self.queued = queued
        self.rate = rate
        self.measured = 0

    def queue_state(self) -> tuple[int, float]:
        self.measured += 1
        return self.queued, self.rate


def _rooms(
    subflows: dict[int, QueuedLog],
    *,
    reinjecting: bool = False,
    transport: MultipathTransport | None = None,
) -> list[tuple[int, int]]:
    """The queue room one flush gives each subflow."""
    if transport is None:
        transport, _, _ = make_transport()
    core = cast(StubCore, transport._core)
    core.send_buffer_size = 1 << 20
    core.has_reinjection = reinjecting  # type: ignore[attr-defined]
    rooms: list[tuple[int, int]] = []
    core.set_queue_room = lambda subflow_id, room: rooms.append(  # type: ignore[attr-defined]
        (subflow_id, room)
    )
    transport._subflows = subflows  # type: ignore[assignment]
    transport._flush()
    return rooms


@pytest.mark.parametrize("reinjecting", [False, True])
async def test_one_subflow_is_capped_only_while_data_is_sent_again(
    reinjecting: bool,
) -> None:
    # one path: its queue is capped in bytes only while a lost
    # subflow's data waits to be sent again, so that the copies wait in
    # the core, where a Data ACK can still drop them
    rooms = _rooms({0: QueuedLog(0, 200_000)}, reinjecting=reinjecting)
    if reinjecting:
        assert rooms == [(0, transport_module._SUBFLOW_QUEUE - 200_000)]
    else:
        assert rooms == [(0, UNCAPPED)]


async def test_a_lone_subflow_on_a_slow_path_queues_a_quarter_second() -> None:
    # a soak (20 Mbit/s shared by 30 connections) saw a lone subflow
    # hold 2 MiB in its socket at tens of kB/s: the other direction's
    # Data ACKs, written behind it, came after the peer's close_timeout
    # and path_loss_timeout had given up on a path that delivered. At
    # 80 kB/s the socket now takes 20 kB, the rest waits in the core
    assert _rooms({0: QueuedLog(0, 5_000, rate=80_000.0)}) == [(0, 15_000)]
    # what the floor leaves (a record) on a path slower still
    assert _rooms({0: QueuedLog(0, 5_000, rate=8_000.0)}) == [
        (0, transport_module._MIN_QUEUE - 5_000)
    ]
    # a fast path keeps what a bulk transfer needs: the cap is far off
    rooms = _rooms({0: QueuedLog(0, 5_000, rate=1e9)})
    assert rooms == [(0, UNCAPPED)]


async def test_a_fast_lone_subflow_is_not_measured_on_every_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a one-path bulk transfer flushes thousands of times a second: a
    # path whose quarter second is past the in-flight limit cannot be
    # capped by it, and is measured again only after _RATE_RECHECK
    clock = [100.0]
    transport, _, _ = make_transport()
    monkeypatch.setattr(transport._loop, "time", lambda: clock[0])
    limit = ConnectionConfig().subflow_inflight_limit
    quarter = transport_module._QUEUE_SECONDS
    fast = QueuedLog(0, 5_000, rate=8 * limit / quarter)
    for _ in range(3):
        assert _rooms({0: fast}, transport=transport) == [(0, UNCAPPED)]
    assert fast.measured == 1
    clock[0] += transport_module._RATE_RECHECK
    _rooms({0: fast}, transport=transport)
    assert fast.measured == 2
    # a slow path is measured on every flush: its cap moves with its queue
    slow = QueuedLog(0, 5_000, rate=80_000.0)
    for _ in range(3):
        assert _rooms({0: slow}, transport=transport) == [(0, 15_000)]
    assert slow.measured == 3
    # and a subflow among several on every flush, fast or not
    other = QueuedLog(1, 0, rate=1e9)
    for _ in range(2):
        _rooms({0: fast, 1: other}, transport=transport)
    assert (fast.measured, other.measured) == (4, 2)


async def test_several_subflows_take_the_lower_of_the_two_caps() -> None:
    # 100 Mbit/s: the 256 KiB cap holds less than a quarter second
    fast = QueuedLog(0, 1_000, rate=12.5e6)
    # 40 kB/s: a quarter second is 10 kB, below the floor
    slow = QueuedLog(1, 1_000, rate=40_000.0)
    cap = transport_module._SUBFLOW_QUEUE
    assert _rooms({0: fast, 1: slow}) == [
        (0, cap - 1_000),
        (1, transport_module._MIN_QUEUE - 1_000),
    ]


# address ids (RFC 8684 sections 3.2 and 3.4.1), over loopback


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ids(subflows: tuple[SubflowInfo, ...]) -> set[tuple[Any, ...]]:
    """(local host, remote host, local id, remote id) of each subflow."""
    return {
        (
            s.local_address and s.local_address[0],
            s.remote_address and s.remote_address[0],
            s.address_id,
            s.remote_address_id,
        )
        for s in subflows
        if s.state == "ESTABLISHED"
    }


async def test_joins_carry_the_ids_of_their_addresses(
    pki: Pki, tmp_path: Path
) -> None:
    port = _free_port()
    server_views: list[tuple[SubflowInfo, ...]] = []

    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        data = await reader.read()
        server_views.append(writer.get_extra_info("mptcp").subflows)
        writer.write(data)
        writer.write_eof()
        with contextlib.suppress(ConnectionError, mptls.MptlsError):
            await writer.drain()
        writer.close()

    trace = tmp_path / "ids.pcap"
    with mptls.trace.capture(trace):
        server = await mptls.start_server(
            echo,
            ["127.0.0.1", "127.0.0.3"],
            port,
            ssl=pki.server(),
            announce_addrs=[("127.0.0.3", port)],
        )
        async with server:
            reader, writer = await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), local_addrs=["127.0.0.1"]
            )
            # the announced 127.0.0.3 is joined from 127.0.0.1 (id 0)
            await established(writer, 2)
            await writer.transport.add_path(  # type: ignore[attr-defined]
                ("127.0.0.1", port), local="127.0.0.2"
            )
            client_view = writer.get_extra_info("mptcp").subflows
            await still_echoes(reader, writer, b"three paths")

    assert _ids(client_view) == {
        ("127.0.0.1", "127.0.0.1", 0, 0),
        ("127.0.0.1", "127.0.0.3", 0, 1),
        ("127.0.0.2", "127.0.0.1", 1, 0),
    }
    (server_view,) = server_views
    assert _ids(server_view) == {
        ("127.0.0.1", "127.0.0.1", 0, 0),
        ("127.0.0.3", "127.0.0.1", 1, 0),
        ("127.0.0.1", "127.0.0.2", 0, 1),
    }

    # the same ids on the wire: the join SYNs and their SYN|ACKs
    _, packets = read_pcap(trace)
    syns = {
        (p.source[0], p.destination[0], o.address_id)
        for p in packets
        for o in p.only(MpJoinSyn)
    }
    assert syns == {
        ("127.0.0.1", "127.0.0.3", 0),
        ("127.0.0.2", "127.0.0.1", 1),
    }
    syn_acks = {
        (p.source[0], p.destination[0], o.address_id)
        for p in packets
        for o in p.only(MpJoinSynAck)
    }
    assert syn_acks == {
        ("127.0.0.3", "127.0.0.1", 1),
        ("127.0.0.1", "127.0.0.2", 0),
    }


class NamedSubflow:
    """A subflow's TCP connection that only knows its socket names."""

    def __init__(self, sockname: tuple[Any, ...]) -> None:
        self.sockname = sockname
        self.subflow_id: int | None = None
        self.sink: object = None

    def name(self, which: str) -> Any:
        return self.sockname if which == "sockname" else ("127.0.0.9", 1)

    def lend_payloads(self) -> None:
        return None


def numbered(initiator: bool, announce: list[tuple[str, int]]) -> Paths:
    transport = MultipathTransport(
        cast(Connection, StubCore()), initiator=initiator, announce=announce
    )
    first = NamedSubflow(("127.0.0.1", 4433))
    transport.attach(0, cast(Any, first))
    return transport.paths


async def test_a_client_numbers_its_addresses_in_order_of_first_use() -> None:
    paths = numbered(True, [])
    ids = [
        paths.local_address_id(name)
        for name in (
            ("127.0.0.2", 50001),
            ("::1", 50002, 0, 0),
            ("127.0.0.1", 50003),
            ("127.0.0.2", 50004),
        )
    ]
    # the first subflow's address is 0 whatever the port; a port never
    # makes a new id on the client
    assert ids == [1, 2, 0, 1]


async def test_a_server_keeps_announced_ids_and_numbers_others_after() -> None:
    paths = numbered(False, [("127.0.0.3", 0), ("::1", 8443)])
    ids = [
        paths.local_address_id(name)
        for name in (
            ("127.0.0.3", 4433),  # port 0 announced: the first's port
            ("::1", 8443, 0, 0),
            ("127.0.0.2", 4433),
            ("127.0.0.1", 4433),
            ("127.0.0.2", 4433),
            ("127.0.0.3", 9999),
        )
    ]
    assert ids == [1, 2, 3, 0, 3, 4]


class Ends(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future()
        )

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


def reset_after_held_end(
    unacknowledged: int,
) -> tuple[MultipathTransport, Ends]:
    core = StubCore()
    core.send_buffer_size = unacknowledged
    transport = MultipathTransport(cast(Connection, core), initiator=True)
    protocol = Ends()
    transport.set_protocol(protocol)
    transport.pause_reading()
    transport._on_data([b"the whole stream"])
    transport._on_end_of_stream(events.EndOfStream())
    transport._finish(
        PeerResetError("MP_FASTCLOSE", unacknowledged=unacknowledged)
    )
    return transport, protocol


async def test_a_reset_that_lost_our_data_is_no_clean_end() -> None:
    # the peer's stream is complete, but 100 bytes of ours were never
    # acknowledged: the reset lost them, and must be told
    transport, protocol = reset_after_held_end(100)
    transport.resume_reading()
    lost = await asyncio.wait_for(protocol.lost, 10)
    assert protocol.data == b"the whole stream"
    assert isinstance(lost, PeerResetError)


async def test_a_write_after_a_held_back_reset_is_told() -> None:
    # everything of ours was acknowledged: the paused reader may still
    # take the peer's stream, but a write cannot reach the peer
    transport, protocol = reset_after_held_end(0)
    transport.write(b"reply")
    lost = await asyncio.wait_for(protocol.lost, 10)
    assert isinstance(lost, PeerResetError)


async def test_a_reader_alone_still_gets_a_clean_end() -> None:
    transport, protocol = reset_after_held_end(0)
    transport.resume_reading()
    assert await asyncio.wait_for(protocol.lost, 10) is None
    assert protocol.data == b"the whole stream" and protocol.eof


async def test_scoped_link_local_addresses_get_their_own_ids() -> None:
    # fe80::1 on two interfaces is two addresses: one id would make a
    # REMOVE_ADDR of one end the subflows of the other
    paths = numbered(True, [])
    first = paths.local_address_id(("fe80::1%eth0", 50001, 0, 2))
    second = paths.local_address_id(("fe80::1%eth1", 50002, 0, 3))
    assert first != second
    assert paths.local_address_id(("fe80::1%eth0", 50003, 0, 2)) == first


async def test_a_client_has_255_ids_beside_the_first() -> None:
    paths = numbered(True, [])
    ids = [
        paths.local_address_id((f"10.0.{n // 250}.{n % 250 + 1}", 1))
        for n in range(255)
    ]
    assert ids == list(range(1, 256))
    # known addresses keep their ids once all are used
    assert paths.local_address_id(("10.0.0.1", 9)) == 1
    assert paths.local_address_id(("127.0.0.1", 9)) == 0
    with pytest.raises(MptlsError, match="no address id left"):
        paths.local_address_id(("10.9.9.9", 1))


async def test_a_server_numbers_after_255_announced() -> None:
    announce = [(f"10.1.{n // 250}.{n % 250 + 1}", 0) for n in range(255)]
    paths = numbered(False, announce)
    assert paths.local_address_id(("10.1.1.5", 4433)) == 255
    with pytest.raises(MptlsError, match="no address id left"):
        paths.local_address_id(("127.0.0.2", 4433))


async def test_announcing_the_first_address_keeps_id_zero() -> None:
    # the first subflow reached 127.0.0.1:4433, which is also announced:
    # one address, one id (0); no ADD_ADDR goes out for it
    paths = numbered(False, [("127.0.0.1", 4433), ("127.0.0.3", 0)])
    assert paths.local_address_id(("127.0.0.1", 4433)) == 0
    assert paths.local_address_id(("127.0.0.3", 4433)) == 2
    assert paths.local_address_id(("127.0.0.2", 4433)) == 3
    assert [i for i, _, _ in paths._announcements()] == [2]


async def test_a_first_subflow_numbers_no_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the setup path of a connection that never joins stays as it was

    parsed: list[str] = []
    real = paths_module._address_of

    def counting(host: str) -> object:
        parsed.append(host)
        return real(host)

    monkeypatch.setattr(paths_module, "_address_of", counting)
    paths = numbered(False, [("127.0.0.3", 0)])
    assert parsed == []
    assert paths.local_address_id(("127.0.0.3", 4433)) == 1
    assert paths.local_address_id(("127.0.0.1", 4433)) == 0


class _ClosedUnder(asyncio.Transport):
    """A socket transport closed under its subflow, as asyncio 3.12 and
    3.13 leave one: ``writelines`` fails with a TypeError."""

    def is_closing(self) -> bool:
        return True

    def writelines(self, list_of_data: Any) -> None:
        raise TypeError("'NoneType' object is not callable")


def test_a_subflow_sends_nothing_into_a_transport_closed_under_it() -> None:
    # the frame is dropped: the transport's connection_lost, a loop step
    # later, makes the subflow lost and its data is sent again elsewhere
    subflow = SubflowProtocol(cast(Any, SimpleNamespace()), initiator=True)
    subflow.connection_made(_ClosedUnder())
    subflow.send(b"a frame")
    assert not subflow.preamble_sent


class _CloseClock:
    """A transport whose close timer runs on a clock the test sets:
    ``delays`` are the timer's arming delays, ``resets`` its aborts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.transport, self.core, _ = make_transport()
        self.now = 100.0
        self.delays: list[float] = []
        self.resets: list[Exception | None] = []
        loop = self.transport._loop
        monkeypatch.setattr(loop, "time", lambda: self.now)
        monkeypatch.setattr(loop, "call_later", self._call_later)
        monkeypatch.setattr(self.transport, "_reset", self.resets.append)
        self.transport._close_timeout = 10.0

    def _call_later(self, delay: float, callback: Any) -> asyncio.TimerHandle:
        self.delays.append(delay)
        return cast(asyncio.TimerHandle, SimpleNamespace(cancel=lambda: None))

    def progress(self, unacked: int, at: float) -> None:
        """The Data ACK moved at ``at`` and left ``unacked`` bytes."""
        self.core.send_buffer_size = unacked
        self.core.last_progress = at  # type: ignore[attr-defined]

    def expire(self, at: float) -> None:
        """The close timer fires at ``at``."""
        self.now = at
        self.transport._on_close_timeout()


async def test_close_timeout_counts_from_the_last_progress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a peer that acknowledges a window's worth just after close() and
    # then stops: the close is cut close_timeout after that progress,
    # not after a second full period (it took up to twice the limit)
    close = _CloseClock(monkeypatch)
    close.core.send_buffer_size = 1_000_000
    close.transport._arm_close_timer()
    assert close.delays == [10.0]
    # the Data ACK moved at 100.5, then stood still
    close.progress(600_000, at=100.5)
    close.expire(at=110.0)
    assert close.delays[-1] == pytest.approx(0.5)
    assert close.resets == []
    close.expire(at=110.5)
    assert len(close.resets) == 1
    assert "600000 bytes unacknowledged" in str(close.resets[0])


async def test_a_close_waits_for_a_path_as_an_open_connection_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # data stands unacknowledged with room for it in the peer's window:
    # a path holds it, not the peer's reader, so the close is cut only
    # when an open connection would give up, path_loss_timeout after
    # the last progress (in an overloaded soak, close_timeout cut
    # closes whose data the connection's recovery was about to resend)
    close = _CloseClock(monkeypatch)
    path_loss_timeout = close.core.config.path_loss_timeout
    close.core.peer_window_closed = False
    close.progress(300_000, at=100.0)
    close.transport._arm_close_timer()
    close.expire(at=110.0)
    assert close.resets == []
    assert close.delays[-1] == pytest.approx(path_loss_timeout - 10.0)
    # the peer took some meanwhile: close_timeout counts from that again
    close.progress(200_000, at=125.0)
    close.expire(at=130.0)
    assert close.delays[-1] == pytest.approx(5.0)
    close.expire(at=135.0)
    assert close.resets == []
    # then no progress until path_loss_timeout after the last: cut
    close.expire(at=125.0 + path_loss_timeout)
    assert len(close.resets) == 1
    assert "200000 bytes unacknowledged" in str(close.resets[0])


async def test_a_close_to_a_peer_that_takes_nothing_ends_at_close_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the peer's window is shut: its reader, not a path, holds the data,
    # and close_timeout is the limit
    close = _CloseClock(monkeypatch)
    close.core.peer_window_closed = True
    close.progress(300_000, at=100.0)
    close.transport._arm_close_timer()
    close.expire(at=110.0)
    assert len(close.resets) == 1


async def test_a_resumed_reader_takes_held_pieces_from_a_deque() -> None:
    # a peer may send one byte per frame, and while the reader is
    # paused each frame's payload waits as a piece of its own (a 4 MiB
    # window holds millions); each left a list with a pop(0), which
    # moved every piece still held: 400,000 took about 10 s, the event
    # loop blocked all along. Held in a deque, each leaves in O(1).
    count = 100_000
    transport, core, protocol = make_transport()
    transport.pause_reading()
    for index in range(count):
        transport._on_data([bytes((index % 251,))])
    assert type(transport._held) is collections.deque
    transport.resume_reading()
    assert b"".join(protocol.pieces) == bytes(i % 251 for i in range(count))
    assert core.consumed_bytes == count
    assert not transport._held
