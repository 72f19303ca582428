"""Mode E in the sans-I/O core: joins, ADD_ADDR and MP_FASTCLOSE keyed
by the slot their K names.

Two cores wired in memory (tests/memnet.py, set up by rotation_net.py),
every segment through the real codec: the opener's K, joins held for a
slot not active yet, the previous generation verifying until replaced,
wrong keys failing the HMAC, the SYN|ACK's echo of K, ADD_ADDR's K, the
E-mode MP_FASTCLOSE tag, and joins that a second rotation overtakes.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from memnet import (
    KEYS,
    Link,
    MemNet,
    Side,
    established,
    generation_keys,
    has_data,
    join,
)
from rotation_net import (
    confirmed,
    e_net,
    finish_raw_join,
    option_of,
    raw_join,
    run_for,
    server_of,
    settle,
    status_of,
    syn_ack_matches,
    tokens,
)

from mptls.errors import PathsLostError, PeerResetError
from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.crypto import (
    add_addr_hmac,
    fastclose_tag,
    join_hmac,
    new_key_tag,
)
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import (
    AddAddr,
    MpFastclose,
    MpJoinSyn,
    MpJoinSynAck,
    MpTcpRst,
    ResetReason,
)
from mptls.tls.keys import KeyMaterial


def test_joins_use_the_current_key_and_its_k() -> None:
    net = confirmed(established(e_net()))
    net.client.request_rotation()
    confirmed(net, 1)
    sid = join(net)
    syn = option_of(net.link(sid).to_server.sent[0], MpJoinSyn)
    syn_ack = option_of(net.link(sid).to_client.sent[0], MpJoinSynAck)
    assert isinstance(syn, MpJoinSyn) and isinstance(syn_ack, MpJoinSynAck)
    assert syn.key_id == syn_ack.key_id == 1
    keys = generation_keys(1)
    expected = join_hmac(keys.key_b, keys.key_a, syn_ack.nonce, syn.nonce)
    assert syn_ack.hmac == expected[:8]
    net.client.send(b"over the new path")
    assert net.run(has_data(net.server_side, 22))


def test_a_join_naming_an_empty_slot_waits_for_it() -> None:
    net = confirmed(established(e_net()))
    raw = raw_join(net, key_id=1)
    run_for(net, 0.5)
    assert raw.inbox == []
    held = [s.state for s in server_of(net).info().subflows]
    assert "WAITING_KEYS" in held
    net.client.request_rotation()
    confirmed(net, 1)
    net.run(lambda: raw.inbox != [])
    assert syn_ack_matches(raw, generation_keys(1), key_id=1)
    last = finish_raw_join(net, raw, generation_keys(1))
    assert last.flags == Flag.ACK
    assert len(net.server_side.of_type(ev.SubflowEstablished)) == 1


def test_a_join_naming_a_pending_slot_waits_then_times_out() -> None:
    net = confirmed(established(e_net()))
    net.derive = None
    server = server_of(net)
    assert server.install_keys(generation_keys(1))
    raw = raw_join(net, key_id=1)
    # never confirmed: the join is dropped with its rotation's clock
    net.run(lambda: net.now >= 12.0)
    assert all(s.flags & Flag.RST for s in raw.inbox)
    assert server.key_generation == 0
    closed = net.server_side.of_type(ev.SubflowClosed)
    assert [c.reason for c in closed] == ["join timed out"]


def join_on_the_previous_key(net: MemNet) -> Link:
    """Rotate to generation 1, then a raw join naming K = 0, which
    generation 0 still holds: its SYN|ACK is keyed by generation 0."""
    net.client.request_rotation()
    confirmed(net, 1)
    raw = raw_join(net, key_id=0)
    net.run(lambda: raw.inbox != [])
    assert syn_ack_matches(raw, KEYS, key_id=0)
    return raw


def test_the_previous_generation_verifies_until_replaced() -> None:
    net = confirmed(established(e_net()))
    raw = join_on_the_previous_key(net)
    assert finish_raw_join(net, raw, KEYS).flags == Flag.ACK
    # generation 2 replaces it: a join keyed by generation 0 now fails
    net.client.request_rotation()
    confirmed(net, 2)
    raw = raw_join(net, key_id=0, nonce=7)
    net.run(lambda: raw.inbox != [])
    assert syn_ack_matches(raw, generation_keys(2), key_id=0, nonce=7)
    last = finish_raw_join(net, raw, KEYS, nonce=7)
    assert last.flags == Flag.RST
    assert option_of(last, MpTcpRst) == MpTcpRst(ResetReason.MPTCP_ERROR)


def test_a_join_keyed_with_the_wrong_generation_fails_its_hmac() -> None:
    net = confirmed(established(e_net()))
    net.client.request_rotation()
    confirmed(net, 1)
    raw = raw_join(net, key_id=1)
    net.run(lambda: raw.inbox != [])
    last = finish_raw_join(net, raw, KEYS)
    assert last.flags == Flag.RST
    assert option_of(last, MpTcpRst) == MpTcpRst(ResetReason.MPTCP_ERROR)
    net.client.send(b"still fine")
    assert net.run(has_data(net.server_side, 15))


def test_a_join_under_way_keeps_its_generation_across_a_rotation() -> None:
    net = confirmed(established(e_net()))
    sid = net.open_subflow(delay=0.5)
    net.client.request_rotation()
    confirmed(net, 1)
    assert net.run(
        lambda: ev.SubflowEstablished(sid) in net.client_side.events
    )
    syn = option_of(net.link(sid).to_server.sent[0], MpJoinSyn)
    assert isinstance(syn, MpJoinSyn) and syn.key_id == 0


def test_add_addr_carries_the_current_k() -> None:
    net = confirmed(established(e_net()))
    net.client.request_rotation()
    confirmed(net, 1)
    address = IPv4Address("192.0.2.7")
    server_of(net).announce(5, address, 4433)
    assert net.run(lambda: net.client_side.of_type(ev.AddressAnnounced))
    sent = [
        o
        for s in net.link(0).to_client.sent
        for o in s.options
        if isinstance(o, AddAddr)
    ]
    keys = generation_keys(1)
    mac = add_addr_hmac(keys.key_b, keys.key_a, 5, address, 4433)
    assert sent == [AddAddr(5, address, 4433, hmac=mac, key_id=1)]


def test_add_addr_is_checked_with_the_slot_its_k_names() -> None:
    net = confirmed(established(e_net()))
    address = IPv4Address("198.51.100.9")
    keys_1 = generation_keys(1)
    # good HMAC under generation 1, which the client does not have yet
    early = add_addr_hmac(keys_1.key_b, keys_1.key_a, 3, address, None)
    net.inject(
        0, Segment(Flag.ACK, (AddAddr(3, address, hmac=early, key_id=1),))
    )
    run_for(net, 0.5)
    assert net.client_side.of_type(ev.AddressAnnounced) == []
    net.client.request_rotation()
    confirmed(net, 1)
    # generation 0's K still verifies after the rotation
    old = add_addr_hmac(KEYS.key_b, KEYS.key_a, 4, address, None)
    net.inject(
        0, Segment(Flag.ACK, (AddAddr(4, address, hmac=old, key_id=0),))
    )
    # and K=1 with generation 0's HMAC is a bad HMAC
    net.inject(
        0, Segment(Flag.ACK, (AddAddr(6, address, hmac=old, key_id=1),))
    )
    settle(net)
    assert net.client_side.of_type(ev.AddressAnnounced) == [
        ev.AddressAnnounced(4, address, None)
    ]


def test_fastclose_carries_the_e_tag_of_the_current_key() -> None:
    net = confirmed(established(e_net()))
    net.client.request_rotation()
    confirmed(net, 1)
    net.client.abort()
    net.run()
    resets = [s for s in net.link(0).to_server.sent if s.flags & Flag.RST]
    token_a, token_b = tokens(net)
    keys = generation_keys(1)
    assert option_of(resets[0], MpFastclose) == MpFastclose(
        key=fastclose_tag(token_a, token_b, keys), key_id=1
    )
    closed = net.server_side.closed
    assert closed is not None and isinstance(closed.error, PeerResetError)


def aborted_by_fastclose(net: MemNet, side: Side | None = None) -> bool:
    """``side`` (the server's by default) ended at once, as an
    MP_FASTCLOSE says: no clock moved, so no path loss timeout can have
    ended it."""
    closed = (side or net.server_side).closed
    return (
        net.now == 0.0
        and closed is not None
        and isinstance(closed.error, PeerResetError)
        and "MP_FASTCLOSE" in str(closed.error)
    )


def test_an_abort_before_the_peers_new_key_carries_the_pending_tag() -> None:
    # TLS completes on the client first: it aborts with generation 0
    # pending (the server's NEW_KEY not here yet); the server takes the
    # same keys from the Finished that arrives before the reset (before:
    # a plain RST, and the server waited out path_loss_timeout)
    net = established(e_net(keys=None))
    net.client.install_keys(KEYS)
    assert net.client.first_keys_pending
    net.client.abort()
    server_of(net).install_keys(KEYS)
    assert net.run(lambda: net.server_side.closed is not None)
    resets = [s for s in net.link(0).to_server.sent if s.flags & Flag.RST]
    token_a, token_b = tokens(net)
    assert option_of(resets[0], MpFastclose) == MpFastclose(
        key=fastclose_tag(token_a, token_b, KEYS), key_id=0
    )
    assert aborted_by_fastclose(net)


def test_a_server_abort_before_the_peers_new_key_reaches_the_client() -> None:
    # the server's handler aborts as soon as its TLS is done, the
    # client's NEW_KEY still on its way: both ends hold generation 0
    # pending, and the server's own NEW_KEY goes out before its reset
    net = established(e_net(keys=None))
    net.client.install_keys(KEYS)
    server = server_of(net)
    server.install_keys(KEYS)
    assert server.first_keys_pending
    server.abort()
    net.run(lambda: net.client_side.closed is not None)
    assert aborted_by_fastclose(net, net.client_side)


def test_a_fastclose_verifies_under_keys_still_pending() -> None:
    # the server has generation 0 pending (the client's NEW_KEY is
    # lost), the client has it active (the server's NEW_KEY came)
    net = established(e_net(keys=None))
    net.link(0).to_server.lost = True
    net.client.install_keys(KEYS)
    settle(net)
    net.link(0).to_server.lost = False
    server_of(net).install_keys(KEYS)
    settle(net)
    assert net.client.key_generation == 0
    assert server_of(net).first_keys_pending
    net.client.abort()
    net.run(lambda: net.server_side.closed is not None)
    assert aborted_by_fastclose(net)


def test_a_fastclose_under_keys_the_receiver_lacks_is_refused() -> None:
    # the server has generation 0 pending: a tag under other keys, or
    # under the K of a slot it holds nothing in, proves nothing
    net = established(e_net(keys=None))
    server_of(net).install_keys(KEYS)
    settle(net)
    token_a, token_b = tokens(net)
    refused = (
        MpFastclose(key=fastclose_tag(token_a, token_b, KEYS), key_id=1),
        MpFastclose(
            key=fastclose_tag(token_a, token_b, generation_keys(1)), key_id=0
        ),
    )
    for option in refused:
        net.inject_to_server(0, Segment(Flag.ACK, (option,)))
    settle(net)
    assert net.server_side.closed is None
    good = MpFastclose(key=fastclose_tag(token_a, token_b, KEYS), key_id=0)
    net.inject_to_server(0, Segment(Flag.ACK, (good,)))
    net.run(lambda: net.server_side.closed is not None)
    assert aborted_by_fastclose(net)


def test_a_fastclose_before_the_receiver_has_keys_is_no_abort() -> None:
    # the client's keys are pending; the server's TLS is not done, so it
    # holds no key that could verify the tag: the reset is a lost path
    # (its only one, and with no keys no join can come back)
    net = e_net(server_keys_at=60.0)
    established(net)
    assert net.client.first_keys_pending
    net.client.abort()
    settle(net)
    resets = [s for s in net.link(0).to_server.sent if s.flags & Flag.RST]
    assert resets and option_of(resets[0], MpFastclose) is not None
    closed = net.server_side.closed
    assert closed is not None and isinstance(closed.error, PathsLostError)


def test_fastclose_before_any_key_is_a_plain_reset() -> None:
    net = established(e_net(keys=None))
    net.client.abort()
    net.run()
    resets = [s for s in net.link(0).to_server.sent if s.flags & Flag.RST]
    assert resets and option_of(resets[0], MpFastclose) is None


def test_a_fastclose_under_the_generation_a_rotation_replaced() -> None:
    # the server is active in generation 1 as soon as the client's
    # NEW_KEY came, and starts generation 2 in slot 0 at once; the
    # client, its generation 1 still waiting for the server's NEW_KEY,
    # aborts under generation 0, which generation 2 (pending) replaced
    # (before: refused, and the server waited out path_loss_timeout)
    net = confirmed(established(e_net()))
    net.link(0).delay = 0.01
    server = server_of(net)
    net.client.request_rotation()
    assert net.run(lambda: server.key_generation == 1)
    assert server.request_rotation() == 2
    settle(net)
    assert net.client.key_generation == 0
    net.client.abort()
    aborted = net.now
    assert net.run(lambda: net.server_side.closed is not None)
    closed = net.server_side.closed
    assert closed is not None and isinstance(closed.error, PeerResetError)
    assert net.now - aborted <= 2 * net.link(0).delay


def test_a_fastclose_under_a_generation_two_back_is_refused() -> None:
    # generation 2 is active: generation 0, which it replaced, is gone
    net = confirmed(established(e_net()))
    for generation in (1, 2):
        net.client.request_rotation()
        confirmed(net, generation)
    token_a, token_b = tokens(net)
    stale = MpFastclose(key=fastclose_tag(token_a, token_b, KEYS), key_id=0)
    net.inject_to_server(0, Segment(Flag.ACK, (stale,)))
    settle(net)
    assert net.server_side.closed is None


def test_a_new_key_tag_is_no_fastclose() -> None:
    net = confirmed(established(e_net()))
    token_a, token_b = tokens(net)
    # what the client's NEW_KEY showed, tried as its MP_FASTCLOSE
    seen = new_key_tag(token_a, token_b, KEYS)
    for key_id in (0, 1):
        option = MpFastclose(key=seen, key_id=key_id)
        net.inject_to_server(0, Segment(Flag.ACK, (option,)))
    settle(net)
    assert net.server_side.closed is None
    good = MpFastclose(key=fastclose_tag(token_a, token_b, KEYS), key_id=0)
    net.inject_to_server(0, Segment(Flag.ACK, (good,)))
    assert net.run(lambda: net.server_side.closed is not None)


def answer_join(
    net: MemNet, sid: int, keys: KeyMaterial, nonce: int, *, key_id: int = 0
) -> str:
    """Hand the client a SYN|ACK for join ``sid`` keyed by ``keys``
    (server nonce 9); the join's state after it."""
    mac = join_hmac(keys.key_b, keys.key_a, 9, nonce)[:8]
    reply = MpJoinSynAck(mac, 9, 0, key_id=key_id)
    net.client.receive_segment(
        sid, Segment(Flag.SYN | Flag.ACK, (reply,)), net.now
    )
    return status_of(net.client, sid)


def test_a_syn_ack_must_echo_the_joins_k() -> None:
    net = confirmed(established(e_net()))
    results = []
    for key_id in (1, 0):
        sid = net.client.open_subflow(net.now)
        (_, syn_segment), *_ = [
            (i, s) for i, s in net.client.segments_to_send(net.now) if i == sid
        ]
        syn = option_of(syn_segment, MpJoinSyn)
        assert isinstance(syn, MpJoinSyn) and syn.key_id == 0
        results.append(answer_join(net, sid, KEYS, syn.nonce, key_id=key_id))
    assert results == ["CLOSED", "PRE_ESTABLISHED"]
    settle(net)
    refused = net.client_side.of_type(ev.JoinRefused)
    assert [r.reason for r in refused] == ["SYN|ACK names another key (K)"]


def test_a_join_answered_with_one_generation_ends_with_it() -> None:
    net = confirmed(established(e_net()))
    raw = join_on_the_previous_key(net)
    # generation 2 takes slot 0 before the third ACK
    net.client.request_rotation()
    confirmed(net, 2)
    last = finish_raw_join(net, raw, generation_keys(2))
    assert last.flags == Flag.RST
    assert net.server_side.of_type(ev.SubflowEstablished) == []
    # the join keeps the keys its SYN|ACK was made with: a third ACK
    # keyed by the generation that replaced them fails its HMAC
    closed = net.server_side.of_type(ev.SubflowClosed)
    assert [c.reason for c in closed] == ["bad MP_JOIN HMAC in the third ACK"]


def test_a_join_slower_than_the_rotation_interval_still_opens() -> None:
    # a 50 ms interval, a second path with a 200 ms one-way delay: the
    # join's handshake would outlast several rotations on the first
    # path, so the interval waits while the join holds keys, then goes on
    client = ConnectionConfig(mode=Mode.E, key_rotation_interval=0.05)
    net = confirmed(established(e_net(client)))
    sid = net.open_subflow(delay=0.2)
    net.run(
        lambda: ev.SubflowEstablished(sid) in net.client_side.events,
        max_time=net.now + 5.0,
    )
    refused = net.client_side.of_type(ev.JoinRefused)
    assert refused == []
    assert ev.SubflowEstablished(sid) in net.client_side.events
    joined = net.client.key_generation
    assert joined is not None
    assert net.run(
        lambda: (net.client.key_generation or 0) >= joined + 3,
        max_time=net.now + 2.0,
    )


# joins that a second rotation overtakes: generation 0 is current when
# the client opens the join on a slow path, and the server's rotation
# to generation 2, which takes the slot the join's K names, starts
# while the join is under way


def stingy_server() -> ConnectionConfig:
    """An E server that takes a single failed join, then refuses all."""
    return ConnectionConfig(
        accept_modes=frozenset({Mode.G, Mode.E}),
        join_failure_burst=1,
        join_failure_rate=0.001,
    )


def second_rotation_under_a_join(join_delay: float) -> tuple[MemNet, int]:
    """Rotate 0 -> 1 (the client) -> 2 (the server) with the join SYN
    on its way; the first path has 0.1 s of delay, the join's path
    ``join_delay``. Runs until both ends use generation 2."""
    net = confirmed(established(e_net(server=stingy_server())))
    net.link(0).delay = 0.1
    sid = net.open_subflow(delay=join_delay)
    net.client.request_rotation()
    confirmed(net, 1)
    server_of(net).request_rotation()
    confirmed(net, 2)
    return net, sid


def both_established(net: MemNet, sid: int) -> bool:
    return (
        ev.SubflowEstablished(sid) in net.client_side.events
        and len(net.server_side.of_type(ev.SubflowEstablished)) == 1
    )


def answered_under(net: MemNet, sid: int, keys: KeyMaterial) -> bool:
    """Whether join ``sid``'s SYN|ACK names K = 0 and carries the HMAC
    of ``keys`` (the server's key first) over its SYN's nonce."""
    syn_ack = option_of(net.link(sid).to_client.sent[0], MpJoinSynAck)
    syn = option_of(net.link(sid).to_server.sent[0], MpJoinSyn)
    assert isinstance(syn_ack, MpJoinSynAck) and isinstance(syn, MpJoinSyn)
    expected = join_hmac(keys.key_b, keys.key_a, syn_ack.nonce, syn.nonce)
    return syn_ack.hmac == expected[:8] and syn_ack.key_id == 0


def test_a_join_answered_before_the_slot_is_replaced_completes() -> None:
    # the SYN|ACK (generation 0) leaves before generation 2 takes slot
    # 0 at the server; the third ACK arrives after: it is checked with
    # the keys the SYN|ACK was made with
    net, sid = second_rotation_under_a_join(join_delay=0.12)
    assert net.run(lambda: both_established(net, sid))
    assert answered_under(net, sid, KEYS)
    assert net.client_side.of_type(ev.JoinRefused) == []
    # no failed join was counted: the one the server allows is left
    assert join(net) > sid


def test_a_join_held_through_a_second_rotation_completes() -> None:
    # the SYN reaches the server while generation 2 waits for the
    # client's NEW_KEY in slot 0: held, then answered with generation
    # 2, which the client has too and checks after its own
    net, sid = second_rotation_under_a_join(join_delay=0.35)
    assert net.run(lambda: both_established(net, sid))
    assert answered_under(net, sid, generation_keys(2))
    assert net.client_side.of_type(ev.JoinRefused) == []
    assert join(net) > sid
    net.client.send(b"over the held path")
    assert net.run(has_data(net.server_side, 23))


def hold_a_raw_join_for_generation_2(net: MemNet) -> Link:
    """Generation 1 active; the server's generation 2 waits in slot 0
    for a client that never gets its keys; a raw join naming K = 0
    comes 5 s later and is held."""
    confirmed(established(net))
    net.client.request_rotation()
    confirmed(net, 1)
    net.derive = None
    server_of(net).request_rotation()
    assert server_of(net).install_keys(generation_keys(2))
    run_for(net, 5.0)
    raw = raw_join(net, key_id=0)
    run_for(net, 0.5)
    assert raw.inbox == []
    return raw


def test_a_held_join_with_the_replaced_keys_still_fails() -> None:
    net = e_net()
    raw = hold_a_raw_join_for_generation_2(net)
    assert net.client.install_keys(generation_keys(2))
    confirmed(net, 2)
    net.run(lambda: raw.inbox != [])
    assert syn_ack_matches(raw, generation_keys(2), key_id=0)
    # the third ACK keyed by generation 0, which slot 0 held before
    last = finish_raw_join(net, raw, KEYS)
    assert last.flags == Flag.RST
    assert option_of(last, MpTcpRst) == MpTcpRst(ResetReason.MPTCP_ERROR)
    closed = net.server_side.of_type(ev.SubflowClosed)
    assert [c.reason for c in closed] == ["bad MP_JOIN HMAC in the third ACK"]


def test_a_join_held_for_keys_that_are_dropped_is_refused_at_once() -> None:
    net = e_net(server=stingy_server())
    raw = hold_a_raw_join_for_generation_2(net)
    server = server_of(net)
    # generation 2 is dropped 10 s after it was asked for, before the
    # join's own deadline (15 s): the join cannot succeed from then on
    assert net.run(lambda: raw.inbox != [])
    assert net.server_side.of_type(ev.KeyRotationFailed)
    (reset,) = raw.inbox
    assert reset.flags & Flag.RST
    assert option_of(reset, MpTcpRst) == MpTcpRst(
        ResetReason.MPTCP_ERROR, transient=True
    )
    (closed,) = net.server_side.of_type(ev.SubflowClosed)
    assert closed.reason.startswith("keys rotated while the join waited")
    assert server.key_generation == 1
    # not counted as a failed join: the client's next join, with the
    # keys in use, gets in
    net.derive = generation_keys
    sid = join(net)
    syn = option_of(net.link(sid).to_server.sent[0], MpJoinSyn)
    assert isinstance(syn, MpJoinSyn) and syn.key_id == 1


def test_a_join_two_rotations_behind_is_refused_as_transient() -> None:
    # four rotations while the SYN|ACK is on its way: it is keyed by a
    # generation the client no longer holds. The client refuses it as
    # transient, and the connection, left with no subflow, waits for a
    # new join instead of ending
    net = confirmed(established(e_net()))
    sid = net.open_subflow(delay=1.0)
    for generation in range(1, 5):
        net.client.request_rotation()
        confirmed(net, generation)
    net.kill(0)
    assert net.run(lambda: net.client_side.of_type(ev.JoinRefused))
    (refused,) = net.client_side.of_type(ev.JoinRefused)
    assert refused.subflow_id == sid and refused.transient
    assert refused.reason.startswith("keys rotated while the join waited")
    assert not net.client.closed
    assert join(net) > sid
    net.client.send(b"back on a new path")
    assert net.run(has_data(net.server_side, 23))


def test_a_syn_ack_is_checked_with_the_joins_keys_or_their_successor() -> None:
    # two joins taken with generation 0, then slot 0 gets generation 2:
    # a SYN|ACK under 2 (the server held the SYN for it) is taken; one
    # under any other keys is a bad HMAC, as before
    net = confirmed(established(e_net()))
    nonces = {}
    for _ in range(2):
        sid = net.client.open_subflow(net.now)
        for i, segment in net.client.segments_to_send(net.now):
            syn = option_of(segment, MpJoinSyn)
            if i == sid and isinstance(syn, MpJoinSyn):
                assert syn.key_id == 0
                nonces[sid] = syn.nonce
    for generation in (1, 2):
        net.client.request_rotation()
        confirmed(net, generation)
    results = []
    keyed = (generation_keys(1), generation_keys(2))
    for sid, keys in zip(nonces, keyed, strict=True):
        results.append(answer_join(net, sid, keys, nonces[sid]))
    assert results == ["CLOSED", "PRE_ESTABLISHED"]
    settle(net)
    refused = net.client_side.of_type(ev.JoinRefused)
    assert refused == [
        ev.JoinRefused(
            1,
            "bad MP_JOIN HMAC in the SYN|ACK",
            False,
            ResetReason.MPTCP_ERROR,
        )
    ]


def test_forged_joins_cannot_hold_periodic_rotations_off() -> None:
    # a forger who read the server's token from the MP_CAPABLE sends a
    # join SYN every 5 s and never a third ACK: each join holds keys
    # for join_timeout (10 s), one after the other. The server's 1 s
    # rotations wait for joins at most join_timeout, then go on
    server = ConnectionConfig(
        accept_modes=frozenset({Mode.G, Mode.E}), key_rotation_interval=1.0
    )
    net = confirmed(established(e_net(server=server)))
    start = net.now
    for nonce in range(1, 9):
        raw_join(net, key_id=0, nonce=nonce)
        run_for(net, 5.0)
    assert net.now - start >= 40.0
    generation = server_of(net).key_generation
    assert generation is not None and generation >= 2
