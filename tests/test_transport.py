"""The multipath transport's hand-over of lent payloads to its protocol,
and the order in which one flush writes to its subflows.

Subflows lend their payloads as views of the reused read buffer; what
the transport keeps past a read (for a paused reader) must be bytes of
its own.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from mptls.backends.userspace.transport import MultipathTransport
from mptls.mptcp.connection import Connection
from mptls.mptcp.framing import Flag, Segment


class StubCore:
    """Just what process() and the data path ask of a Connection."""

    send_buffer_size = 0
    send_pending = 0

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

    def send(self, chunks: list[Any]) -> None:
        self.log.append(self.subflow_id)

    def unsent(self) -> int:
        return 0


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
