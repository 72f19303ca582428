"""Address ids of joins and REMOVE_ADDR in the sans-I/O core.

RFC 8684 section 3.2: an MP_JOIN carries the id of its sender's
address, 0 being the first subflow's on both sides; the core takes the
local id from its adapter and learns the peer's from the MP_JOIN it
receives. Section 3.4.2: a REMOVE_ADDR ends the subflows that use the
removed id with a FIN exchange and the data goes on over the others,
except the last working subflow, which stays. Every segment crosses the
wire codec of tests/memnet.py; time is its fake clock.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import cast

import pytest
from memnet import MemNet, both_have, established, has_data, join, stream

from mptls.errors import ConfigurationError, MptlsError
from mptls.mptcp import events as ev
from mptls.mptcp.connection import Connection
from mptls.mptcp.endpoint import Refused
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import (
    AddAddr,
    MpJoinSyn,
    MpJoinSynAck,
    MpTcpRst,
    RemoveAddr,
    ResetReason,
)


def status(connection: Connection | None, subflow_id: int) -> ev.SubflowStatus:
    assert connection is not None
    (found,) = [
        s for s in connection.info().subflows if s.subflow_id == subflow_id
    ]
    return found


def server_id_of(net: MemNet, client_id: int) -> int:
    server_id = net.link(client_id).server_id
    assert server_id is not None
    return server_id


def only(segments: list[Segment], kind: type) -> list[object]:
    return [o for s in segments for o in s.options if isinstance(o, kind)]


# address ids on the wire and in info()


def test_first_subflow_has_id_zero_on_both_sides() -> None:
    net = established(MemNet())
    for connection in (net.client, net.server):
        first = status(connection, 0)
        assert (first.address_id, first.remote_address_id) == (0, 0)


def test_join_syn_carries_the_local_id_the_adapter_names() -> None:
    net = established(MemNet())
    sid = join(net, address_id=1)
    (syn,) = only(net.link(sid).to_server.sent, MpJoinSyn)
    assert isinstance(syn, MpJoinSyn) and syn.address_id == 1
    # no adapter on the server side: the SYN|ACK says id 0
    (syn_ack,) = only(net.link(sid).to_client.sent, MpJoinSynAck)
    assert isinstance(syn_ack, MpJoinSynAck) and syn_ack.address_id == 0
    client = status(net.client, sid)
    assert (client.address_id, client.remote_address_id) == (1, 0)
    server = status(net.server, server_id_of(net, sid))
    assert (server.address_id, server.remote_address_id) == (0, 1)


def test_syn_ack_carries_the_id_of_the_address_the_syn_reached() -> None:
    net = established(MemNet())
    asked: list[Connection] = []

    def announced_id(connection: Connection) -> int:
        asked.append(connection)
        return 2

    net.server_address_id = announced_id
    sid = join(net, address_id=3)
    assert asked == [net.server]
    (syn_ack,) = only(net.link(sid).to_client.sent, MpJoinSynAck)
    assert isinstance(syn_ack, MpJoinSynAck) and syn_ack.address_id == 2
    client = status(net.client, sid)
    assert (client.address_id, client.remote_address_id) == (3, 2)
    server = status(net.server, server_id_of(net, sid))
    assert (server.address_id, server.remote_address_id) == (2, 3)


def test_a_held_join_is_answered_with_its_address_id() -> None:
    # the SYN comes before the server's keys: the SYN|ACK that the keys
    # release carries the id named when the SYN arrived
    net = established(MemNet(server_keys_at=1.0))
    net.server_address_id = lambda connection: 5
    sid = join(net, address_id=1)
    (syn_ack, *_) = only(net.link(sid).to_client.sent, MpJoinSynAck)
    assert isinstance(syn_ack, MpJoinSynAck) and syn_ack.address_id == 5
    assert net.now >= 1.0


def test_no_id_left_refuses_the_join_for_lack_of_resources() -> None:
    net = established(MemNet())

    def exhausted(connection: Connection) -> int:
        raise MptlsError("no address id left for one more local address")

    net.server_address_id = exhausted
    net.open_subflow(address_id=1)
    net.run()
    (refused,) = net.refusals
    assert isinstance(refused, Refused) and refused.reply is not None
    assert refused.reply.options == (
        MpTcpRst(reason=ResetReason.LACK_OF_RESOURCES),
    )
    assert net.client_side.closed is None


@pytest.mark.parametrize("address_id", [-1, 256, True, 1.0])
def test_an_address_id_must_fit_its_octet(address_id: object) -> None:
    bad = cast(int, address_id)
    net = established(MemNet())
    with pytest.raises(ConfigurationError, match="address_id"):
        net.client.open_subflow(net.now, address_id=bad)
    assert net.server is not None
    syn = Segment(Flag.SYN, (MpJoinSyn(net.server.local_token or b"", 1, 1),))
    with pytest.raises(ConfigurationError, match="address_id"):
        net.server.accept_join(syn, net.now, address_id=bad)


# REMOVE_ADDR (RFC 8684 section 3.4.2)


def remove(ids: tuple[int, ...]) -> Segment:
    return Segment(Flag.ACK, (RemoveAddr(ids),))


def closed_ids(side: list[ev.Event]) -> list[tuple[int, str]]:
    return [
        (e.subflow_id, e.reason)
        for e in side
        if isinstance(e, ev.SubflowClosed)
    ]


def test_remove_addr_keeps_a_working_subflow_of_that_id() -> None:
    # RFC 8684 section 3.4.2: a path that still works is not torn down
    # by the receiver (the end that removed the address closes it), and
    # a REMOVE_ADDR carries no HMAC: one sent, or forged, on subflow 0
    # must not end the join's working subflow on another path
    net = established(MemNet(reorder=True, seed=3))
    kept = join(net, address_id=1, delay=0.003)
    named = join(net, address_id=2, delay=0.001)
    size = 2 * 1024 * 1024
    up, down = stream(size, 1), stream(size, 2)
    assert net.server is not None
    net.client.send(up)
    net.server.send(down)
    assert net.run(has_data(net.server_side, size // 4))

    net.inject_to_server(0, remove((2,)))
    assert net.run(both_have(net, size + 5, size))
    assert bytes(net.server_side.data[5:]) == up
    assert bytes(net.client_side.data) == down
    net.run()
    assert closed_ids(net.server_side.events) == []
    assert closed_ids(net.client_side.events) == []
    for sid in (kept, named):
        assert status(net.server, server_id_of(net, sid)).state == (
            "ESTABLISHED"
        )
        assert not any(
            s.flags & (Flag.RST | Flag.FIN)
            for s in net.link(sid).to_client.sent
        )
    assert net.client_side.closed is None and net.server_side.closed is None


def test_remove_addr_of_id_zero_keeps_the_working_first_subflow() -> None:
    # id 0 is the address of the first subflow (RFC 8684 section 3.2);
    # it works, so it stays, as any other working subflow does
    net = established(MemNet())
    sid = join(net, address_id=1)
    net.inject(sid, remove((0,)))
    net.run()
    assert closed_ids(net.client_side.events) == []
    net.client.send(b" still on both")
    assert net.run(has_data(net.server_side, len(b"hello still on both")))
    assert bytes(net.server_side.data) == b"hello still on both"


def test_the_last_working_subflow_is_not_removed() -> None:
    net = established(MemNet())
    net.inject_to_server(0, remove((0,)))
    net.run()
    assert closed_ids(net.server_side.events) == []
    net.client.send(b" still here")
    assert net.run(has_data(net.server_side, len(b"hello still here")))
    assert net.server_side.closed is None


def test_remove_addr_naming_every_subflow_keeps_them_all() -> None:
    net = established(MemNet())
    sid = join(net, address_id=1)
    net.inject_to_server(0, remove((0, 1)))
    net.run()
    assert closed_ids(net.server_side.events) == []
    assert status(net.server, server_id_of(net, sid)).state == "ESTABLISHED"
    net.client.send(b"!")
    assert net.run(has_data(net.server_side, len(b"hello!")))
    assert net.server_side.closed is None


def test_unknown_ids_are_ignored() -> None:
    net = established(MemNet())
    join(net, address_id=1)
    net.inject_to_server(0, remove((7, 200)))
    net.run()
    assert closed_ids(net.server_side.events) == []


def removed(side: list[ev.Event]) -> list[int]:
    return [e.address_id for e in side if isinstance(e, ev.AddressRemoved)]


def test_ids_never_heard_of_are_no_event() -> None:
    # RFC 8684 section 3.4.2: an id that names nothing is ignored; each
    # of them was an AddressRemoved event, 252 a frame for the asking
    net = established(MemNet())
    net.server_address_id = lambda _: 1
    join(net, address_id=1)
    made_up = tuple(range(100, 108))
    net.inject_to_server(0, remove(made_up))
    net.inject(0, remove(made_up))
    net.run()
    assert removed(net.server_side.events) == []
    assert removed(net.client_side.events) == []


def test_an_id_removed_again_is_told_once() -> None:
    # the working first subflow stays, and each REMOVE_ADDR naming it
    # again was one more event for the client's paths to act on
    net = established(MemNet())
    for _ in range(50):
        net.inject(0, remove((0,)))
    net.run()
    assert removed(net.client_side.events) == [0]
    assert closed_ids(net.client_side.events) == []


def test_ids_of_joins_and_announcements_are_told_when_removed() -> None:
    # the client's paths read the event to stop joining a withdrawn
    # address, also one whose join is gone from the subflow table
    net = established(MemNet())
    assert net.server is not None
    net.server_address_id = lambda _: 3
    first = join(net, address_id=1)
    net.kill(first)
    net.server_address_id = lambda _: 5
    for _ in range(20):
        net.kill(join(net, address_id=1))
    assert all(s.subflow_id != first for s in net.client.info().subflows)
    net.server.announce(7, IPv4Address("192.0.2.7"), 443)
    net.run()
    net.inject(0, remove((3, 9, 7, 0, 8)))
    net.run()
    assert removed(net.client_side.events) == [3, 7, 0]
    # told once: the ids are forgotten, and no live subflow uses 3 or 7
    net.inject(0, remove((3, 7)))
    net.run()
    assert removed(net.client_side.events) == [3, 7, 0]
    # the server hears of the ids the client's joins came from
    net.inject_to_server(0, remove((1, 2)))
    net.run()
    assert removed(net.server_side.events) == [1]


def test_a_removed_announcement_may_be_replaced() -> None:
    # section 3.4.1: an id names one address until it is removed
    net = established(MemNet())
    assert net.server is not None
    net.server.announce(1, IPv4Address("192.0.2.1"), 443)
    net.run()
    net.server.announce(1, IPv6Address("2001:db8::1"), 443)
    net.run()
    announced = net.client_side.of_type(ev.AddressAnnounced)
    assert [a.address for a in announced] == [IPv4Address("192.0.2.1")]
    net.inject(0, remove((1,)))
    net.run()
    net.server.announce(1, IPv6Address("2001:db8::1"), 443)
    net.run()
    announced = net.client_side.of_type(ev.AddressAnnounced)
    assert [a.address for a in announced] == [
        IPv4Address("192.0.2.1"),
        IPv6Address("2001:db8::1"),
    ]
    echoes = only(net.link(0).to_server.sent, AddAddr)
    assert all(isinstance(e, AddAddr) and e.echo for e in echoes)


def test_remove_addr_resets_a_join_still_under_way() -> None:
    # a join from the removed address that carries nothing yet is no
    # path in use: the receiver resets it (RFC 8684 section 3.4.2)
    net = established(MemNet())
    assert net.server is not None
    sid = net.open_subflow(address_id=1, delay=0.01)

    def held() -> bool:
        assert net.server is not None
        return any(
            s.remote_address_id == 1 and s.state != "ESTABLISHED"
            for s in net.server.info().subflows
        )

    assert net.run(held)
    net.inject_to_server(0, remove((1,)))
    net.run()
    assert closed_ids(net.server_side.events) == [
        (server_id_of(net, sid), "the peer removed its address id 1")
    ]
    assert status(net.client, sid).state != "ESTABLISHED"
    net.client.send(b" on the first")
    assert net.run(has_data(net.server_side, len(b"hello on the first")))


def test_a_join_syn_advertises_the_receive_window() -> None:
    # every frame carries the data-level receive window (RFC 8684
    # section 3.3.5); a join SYN that said 0 read as a closed window
    net = established(MemNet())
    sid = join(net, address_id=1)
    syns = [s for s in net.link(sid).to_server.sent if s.flags & Flag.SYN]
    assert syns
    assert all(s.window > 0 for s in syns)
    # as large as what the first subflow's frames advertise
    first = [s.window for s in net.link(0).to_server.sent if s.window]
    assert syns[0].window >= min(first)
