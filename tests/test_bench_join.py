"""How many one-way flights a join needs before it carries data.

The ``connect`` benchmark times a second subflow's first data on a real
round trip; this counts the same thing without a clock that moves by
itself: two sans-I/O cores joined by in-memory links with a fixed
one-way delay, both ends with data waiting. The join SYN leaves with
the client's TLS Finished (its TCP connection was opened during the
handshake). The responder may send once the third ACK arrived (RFC 8684
section 3.2): two flights after the Finished reached it. The initiator
sends right behind its third ACK, which a subflow of this wire cannot
lose (docs/wire.md "Joins"): two flights after it sent the Finished,
where RFC 8684's wait for the responder's ACK would make four. The
delay relay that gives the benchmark its round trip is checked here
too.
"""

from __future__ import annotations

import asyncio

import pytest
from memnet import MemNet, established, has_data, stream

from mptls.bench.relay import RelayProcess
from mptls.errors import ConfigurationError
from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig
from mptls.mptcp.framing import Flag, Segment, encode_segment
from mptls.mptcp.options import MpJoinAck, MpJoinSyn
from mptls.mptcp.state import options_of

DELAY = 0.010
# small enough that the first subflow is full and data waits for a path
CONFIG = ConnectionConfig(subflow_inflight_limit=64 * 1024)
BACKLOG = 1 << 20


def _both_keyed(net: MemNet) -> MemNet:
    established(net)
    server = net.server
    assert server is not None
    # the fake TLS installs keys when each end's MPTCP handshake is done
    assert net.run(
        lambda: net.client.handshake_complete and server.handshake_complete
    )
    return net


def _first_data_at(net: MemNet, *directions: list[Segment]) -> list[float]:
    """When each direction first sent a payload, in one run."""
    first: dict[int, float] = {}

    def all_sent() -> bool:
        for index, sent in enumerate(directions):
            if index not in first and any(s.payload for s in sent):
                first[index] = net.now
        return len(first) == len(directions)

    assert net.run(all_sent)
    return [first[index] for index in range(len(directions))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_join_carries_data_at_the_protocol_floor(seed: int) -> None:
    net = MemNet(CONFIG, CONFIG, seed=seed)
    net.links[0].delay = DELAY
    _both_keyed(net)
    assert net.server is not None
    # the client's handshake ends when it sends its Finished; the join
    # SYN leaves in the same flush, the Finished reaches the server one
    # flight later and ends the server's handshake there
    client_done = net.now
    server_done = client_done + DELAY
    net.client.send(stream(BACKLOG, seed))
    net.server.send(stream(BACKLOG, seed + 1))
    link = net.link(net.open_subflow(delay=DELAY))

    server_sent, client_sent = _first_data_at(
        net, link.to_client.sent, link.to_server.sent
    )

    assert (server_sent - server_done) / DELAY == pytest.approx(2)
    assert (client_sent - client_done) / DELAY == pytest.approx(2)
    # the SYN and the third ACK went first on the join's TCP connection
    syn, third, first_data = link.to_server.sent[:3]
    assert MpJoinSyn in options_of(syn)
    assert MpJoinAck in options_of(third)
    assert first_data.payload


def test_data_behind_a_refused_third_ack_is_reinjected() -> None:
    # a path that rewrites HMAC-A: the responder resets the join, and the
    # data the initiator sent behind its third ACK arrives by the first
    # subflow, whole and in order
    net = MemNet(CONFIG, CONFIG)
    net.links[0].delay = DELAY
    _both_keyed(net)
    data = stream(BACKLOG, 3)
    net.client.send(data)
    link = net.link(net.open_subflow(delay=DELAY))
    assert net.run(lambda: len(link.to_server.sent) > 2)
    # the SYN reached the server; the third ACK is next in the pipe
    assert MpJoinAck in options_of(link.to_server.sent[1])
    at, _ = link.to_server.queue[0]
    forged = Segment(Flag.ACK, (MpJoinAck(hmac=bytes(20)),))
    link.to_server.queue[0] = (at, encode_segment(forged))
    carried = sum(len(s.payload) for s in link.to_server.sent)
    assert carried > 0

    assert net.run(has_data(net.server_side, len(data) + len(b"hello")))
    assert bytes(net.server_side.data) == b"hello" + data
    assert net.server_side.of_type(ev.SubflowEstablished) == []
    refused = net.client_side.of_type(ev.JoinRefused)
    assert [event.subflow_id for event in refused] == [link.client_id]


def test_join_data_is_not_held_by_a_timer() -> None:
    # with no delay at all, nothing but the exchange itself may stand
    # between the join and its data: no retransmission or ACK timer
    net = _both_keyed(MemNet(CONFIG, CONFIG))
    assert net.server is not None
    start = net.now
    net.client.send(stream(BACKLOG))
    net.server.send(stream(BACKLOG, 8))
    link = net.link(net.open_subflow())
    assert _first_data_at(net, link.to_client.sent, link.to_server.sent) == [
        start,
        start,
    ]


async def test_relay_delays_each_direction_and_keeps_order() -> None:
    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(4096):
            writer.write(data)
        writer.close()

    delay = 0.05
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    upstream = server.sockets[0].getsockname()[:2]
    try:
        with RelayProcess(upstream, delay=delay, lifetime=60) as relay:
            loop = asyncio.get_running_loop()
            started = loop.time()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", relay.ports["relay"]
            )
            for piece in (b"one ", b"two ", b"three"):
                writer.write(piece)
            echoed = await reader.readexactly(len(b"one two three"))
            elapsed = loop.time() - started
            writer.close()
    finally:
        server.close()
    assert echoed == b"one two three"
    # a connect's round trip, then the bytes' way there and back
    assert elapsed >= 4 * delay


def test_relay_refuses_anything_but_loopback() -> None:
    with pytest.raises(ConfigurationError, match="loopback"):
        RelayProcess(("192.0.2.2", 443))
