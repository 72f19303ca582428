"""Path failures, timeouts and forged input against the sans-I/O core.

Everything runs on the in-memory network (tests/memnet.py) with a fake
clock, so the timings asserted here are exact: a blackholed subflow is
found by the data-level retransmission timeout and its data reinjected,
a connection whose paths all die waits ``path_loss_timeout`` for a join
and then fails with :class:`~mptls.errors.MptlsTimeoutError`, a stalled
MP_CAPABLE exchange times out, failed joins are rate-limited, and
10,000 forged joins with a sniffed token all fail. DSS mappings outside
the window, conflicting copies and an early DATA_FIN leave the stream
intact.
"""

from __future__ import annotations

import random

import pytest
from memnet import MemNet, Side, established, has_data, join, stream

from mptls.errors import MptlsError, MptlsTimeoutError, PeerResetError
from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig
from mptls.mptcp.connection import Connection
from mptls.mptcp.crypto import idsn_from_token
from mptls.mptcp.endpoint import Accepted, Refused
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import (
    Dss,
    MpJoinAck,
    MpJoinSyn,
    MpJoinSynAck,
    MpTcpRst,
    ResetReason,
)

SEQ_MOD = 2**64


def slow(net: MemNet, delay: float = 0.005) -> MemNet:
    """Give the first path a one-way delay, so data is really in flight."""
    net.link(0).delay = delay
    return net


def ready(net: MemNet) -> MemNet:
    """Established, and the client holds its keys (joins may start)."""
    established(net)
    assert net.run(lambda: net.client.info().keys_installed)
    return net


def blackhole(net: MemNet, client_id: int) -> None:
    """The path drops everything both ways and nobody is told (no RST)."""
    link = net.link(client_id)
    link.dead = True
    link.to_server.queue.clear()
    link.to_client.queue.clear()


# blackhole detection (RFC 8684 section 3.3.6)


def test_blackholed_subflow_is_detected_and_its_data_reinjected() -> None:
    # a small window keeps data in flight for many round trips
    server = ConnectionConfig(receive_window=256 * 1024)
    net = ready(slow(MemNet(server_config=server, seed=3)))
    second = join(net, delay=0.005)
    size = 2 * 1024 * 1024
    up = stream(size, 11)
    net.client.send(up)
    assert net.run(has_data(net.server_side, size // 4))
    blackhole(net, second)
    lost_at = net.now
    assert net.run(has_data(net.server_side, size + 5))
    assert bytes(net.server_side.data[5:]) == up
    closed = [
        e
        for e in net.client_side.of_type(ev.SubflowClosed)
        if isinstance(e, ev.SubflowClosed) and e.subflow_id == second
    ]
    assert closed and closed[0].reset_reason == (
        ResetReason.UNACCEPTABLE_PERFORMANCE
    )
    # detection takes the data-level RTO: its 1 s floor on a fast path
    recovery = net.now - lost_at
    assert 1.0 <= recovery < 1.5
    assert net.client_side.closed is None


def measured_then_blackholed(net: MemNet, second: int) -> float:
    """Run until subflow ``second`` carried data and has an srtt, then
    blackhole it; returns how long the client took to close it."""
    assert net.run(
        lambda: any(
            s.subflow_id == second and s.srtt is not None and s.bytes_sent
            for s in net.client.info().subflows
        )
    )
    blackhole(net, second)
    lost_at = net.now
    assert net.run(
        lambda: any(
            isinstance(e, ev.SubflowClosed) and e.subflow_id == second
            for e in net.client_side.events
        )
    )
    return net.now - lost_at


def test_rto_follows_a_slow_paths_srtt() -> None:
    # a small in-flight limit per subflow keeps both paths busy
    config = ConnectionConfig(
        min_rto=0.05, rto_srtt_factor=4.0, subflow_inflight_limit=64 * 1024
    )
    server = ConnectionConfig(receive_window=128 * 1024)
    net = ready(
        slow(MemNet(client_config=config, server_config=server, seed=4))
    )
    # 0.2 s each way: srtt about 0.4 s, RTO about 1.6 s
    second = join(net, delay=0.2)
    size = 2 * 1024 * 1024
    net.client.send(stream(size, 12))
    assert 0.8 < measured_then_blackholed(net, second) < 3.5
    assert net.run(has_data(net.server_side, size + 5))


def test_a_slow_path_is_found_dead_before_the_connection_gives_up() -> None:
    # 0.4 s each way: 4 x srtt is past path_loss_timeout; the RTO is
    # held to half of it, so the data moves to the live path in time
    config = ConnectionConfig(
        min_rto=0.05,
        rto_srtt_factor=4.0,
        subflow_inflight_limit=64 * 1024,
        path_loss_timeout=3.0,
    )
    server = ConnectionConfig(receive_window=128 * 1024)
    net = ready(
        slow(MemNet(client_config=config, server_config=server, seed=5))
    )
    second = join(net, delay=0.4)
    size = 2 * 1024 * 1024
    up = stream(size, 13)
    net.client.send(up)
    assert measured_then_blackholed(net, second) <= 1.5 + 0.1
    assert net.run(has_data(net.server_side, size + 5))
    assert bytes(net.server_side.data[5:]) == up


def closed_at(side: Side, subflow_id: int) -> ev.SubflowClosed | None:
    """The SubflowClosed event ``side`` saw for ``subflow_id``, if any."""
    return next(
        (
            e
            for e in side.of_type(ev.SubflowClosed)
            if isinstance(e, ev.SubflowClosed) and e.subflow_id == subflow_id
        ),
        None,
    )


def test_a_path_slower_than_the_initial_rto_is_kept() -> None:
    # the soak's first failure step: a new path whose first round trip
    # takes longer than the 1 s RTO used before any sample (a loaded
    # peer, a link down a moment) was reset at once as a blackhole.
    # Now its data goes out again on the other path at the first
    # expiry, and the path is kept once its Data ACK comes.
    server = ConnectionConfig(receive_window=256 * 1024)
    net = ready(slow(MemNet(server_config=server, seed=5)))
    # 0.6 s each way: the first round trip takes 1.2 s
    second = join(net, delay=0.6)
    size = 1024 * 1024
    up = stream(size, 16)
    net.client.send(up)
    sent_at = net.now
    assert net.run(has_data(net.server_side, size + 5))
    assert bytes(net.server_side.data[5:]) == up
    # the reinjection on path 0 did not wait for the slow path
    assert net.now - sent_at < 1.5
    net.run(max_time=net.now + 5.0)
    assert closed_at(net.client_side, second) is None
    assert closed_at(net.server_side, second) is None
    info = {s.subflow_id: s for s in net.client.info().subflows}
    assert info[second].state == "ESTABLISHED"


def test_a_path_slower_than_the_initial_rto_gets_measured() -> None:
    # the first expiry doubles the path's RTO until a round trip is
    # measured (RFC 6298 section 5.5): at 1 s each time, every probe
    # on a 1.2 s path was cut short by the next expiry, the path never
    # had an srtt, and its data went out twice every second
    server = ConnectionConfig(receive_window=256 * 1024)
    net = ready(slow(MemNet(server_config=server, seed=7)))
    second = join(net, delay=0.6)
    size = 8 * 1024 * 1024
    up = stream(size, 18)
    net.client.send(up)
    assert net.run(has_data(net.server_side, size + 5))
    assert bytes(net.server_side.data[5:]) == up
    info = {s.subflow_id: s for s in net.client.info().subflows}
    assert info[second].state == "ESTABLISHED"
    srtt = info[second].srtt
    assert srtt is not None and srtt == pytest.approx(1.2, abs=0.1)


def test_a_fresh_blackholed_path_is_reset_after_its_second_expiry() -> None:
    # the same first expiry on a path that is really dead: its data is
    # sent again at once, and the path is reset when no Data ACK came
    # on it within twice the RTO after that (1 s + 2 s)
    server = ConnectionConfig(receive_window=256 * 1024)
    net = ready(slow(MemNet(server_config=server, seed=6)))
    second = join(net, delay=0.005)
    blackhole(net, second)
    size = 1024 * 1024
    up = stream(size, 17)
    net.client.send(up)
    sent_at = net.now
    assert net.run(has_data(net.server_side, size + 5))
    assert bytes(net.server_side.data[5:]) == up
    assert net.now - sent_at < 1.5
    assert net.run(lambda: closed_at(net.client_side, second) is not None)
    closed = closed_at(net.client_side, second)
    assert closed is not None
    assert closed.reset_reason == ResetReason.UNACCEPTABLE_PERFORMANCE
    assert net.now - sent_at == pytest.approx(3.0, abs=0.05)
    assert net.client_side.closed is None


def echo_net(seed: int, rate: float, delay: float) -> tuple[MemNet, int]:
    """Two subflows of ``rate`` bytes/s each way; the server echoes."""

    def echo(connection: Connection, event: ev.Event) -> None:
        if connection is not net.server:
            return
        if isinstance(event, ev.DataReceived):
            connection.send(event.data)
        elif isinstance(event, ev.EndOfStream):
            connection.close()

    net = MemNet(seed=seed, on_event=echo)
    net.link(0).delay = delay
    net.set_rate(0, rate)
    ready(net)
    second = join(net, delay=delay)
    net.set_rate(second, rate)
    return net, second


@pytest.mark.parametrize("seed", range(4))
def test_a_short_outage_on_a_busy_path_costs_no_subflow(seed: int) -> None:
    # both directions busy on two slow paths: each end's Data ACKs
    # queue behind its own data on the same subflows. One link is down
    # for 1.5 s (TCP holds its bytes, nothing is lost). The end whose
    # Data ACKs then came late over the path that still worked took
    # that path for a blackhole and reset it; when the other end reset
    # the paused one too, every subflow was gone and the connection
    # failed after path_loss_timeout.
    net, second = echo_net(seed, rate=500_000, delay=0.01)
    size = 1536 * 1024
    up = stream(size, 20 + seed)
    net.client.send(up)
    net.client.close()
    assert net.run(lambda: net.now >= 0.15 + 0.05 * seed)
    net.pause(0, 1.5)
    net.run(lambda: net.client_side.eof or net.client_side.closed is not None)
    assert (
        net.client_side.closed is None or net.client_side.closed.error is None
    )
    assert bytes(net.client_side.data) == b"hello" + up
    resets = [
        (side, e.subflow_id)
        for side, events in (
            ("client", net.client_side.events),
            ("server", net.server_side.events),
        )
        for e in events
        if isinstance(e, ev.SubflowClosed)
    ]
    # the path that kept working is never reset
    assert ("client", second) not in resets
    assert ("server", second) not in resets


def test_a_dead_path_the_peer_is_still_heard_on_is_reset_in_time() -> None:
    # the client's frames on the second path are lost (down one way)
    # while frames towards it still arrive there: bare ACKs every
    # 0.5 s, as a party on that path could send (or the peer's own
    # data would do). The path looked heard for ever, its data never
    # went on the first path, and the connection failed after
    # path_loss_timeout with that path working.
    config = ConnectionConfig(path_loss_timeout=10.0)
    # a small window keeps data in flight for many round trips
    server = ConnectionConfig(
        path_loss_timeout=10.0, receive_window=256 * 1024
    )
    net = ready(slow(MemNet(client_config=config, server_config=server)))
    second = join(net, delay=0.005)
    size = 2 * 1024 * 1024
    up = stream(size, 16)
    net.client.send(up)
    assert net.run(has_data(net.server_side, size // 4))
    link = net.link(second)
    link.to_server.lost = True
    link.to_server.queue.clear()
    lost_at = net.now
    for tick in range(1, 41):
        link.to_client.put(Segment(Flag.ACK), lost_at + 0.5 * tick, net.now)
    net.run(
        lambda: (
            len(net.server_side.data) >= size + 5
            or net.client_side.closed is not None
        ),
        max_time=lost_at + 20.0,
    )
    assert net.client_side.closed is None
    assert bytes(net.server_side.data[5:]) == up
    closed = [
        e
        for e in net.client_side.of_type(ev.SubflowClosed)
        if isinstance(e, ev.SubflowClosed) and e.subflow_id == second
    ]
    assert closed and closed[0].reset_reason == (
        ResetReason.UNACCEPTABLE_PERFORMANCE
    )
    # blamed once half of path_loss_timeout passed without progress
    assert 5.0 <= net.now - lost_at < 6.0


def test_only_path_blackholed_fails_after_path_loss_timeout() -> None:
    config = ConnectionConfig(path_loss_timeout=5.0)
    net = ready(slow(MemNet(client_config=config, server_config=config)))
    size = 512 * 1024
    up = stream(size, 13)
    net.client.send(up)
    assert net.run(has_data(net.server_side, 64 * 1024))
    blackhole(net, 0)
    stalled_at = net.now
    net.run()
    closed = net.client_side.closed
    assert closed is not None
    assert isinstance(closed.error, MptlsTimeoutError)
    assert "path_loss_timeout" in str(closed.error)
    assert 4.9 < net.now - stalled_at <= 5.1
    # nothing corrupt: what arrived is a prefix of what was sent
    got = bytes(net.server_side.data[5:])
    assert up.startswith(got)


# every path lost, then one back


def test_all_paths_lost_then_a_join_resumes_the_transfer() -> None:
    config = ConnectionConfig(path_loss_timeout=10.0)
    net = established(MemNet(client_config=config, server_config=config))
    second = join(net)
    size = 1024 * 1024
    up = stream(size, 14)
    net.client.send(up)
    assert net.run(has_data(net.server_side, size // 3))
    net.kill(0)
    net.kill(second)
    assert net.client.live_subflows == 0
    assert net.client_side.closed is None
    # the client comes back on a new path 4 s later
    net.run(max_time=net.now + 4.0)
    assert net.client_side.closed is None and net.server_side.closed is None
    third = join(net)
    assert net.run(has_data(net.server_side, size + 5))
    assert bytes(net.server_side.data[5:]) == up
    assert ev.SubflowEstablished(third) in net.client_side.events
    assert net.client_side.closed is None


def test_all_paths_lost_for_good_fails_both_ends_in_time() -> None:
    config = ConnectionConfig(path_loss_timeout=3.0)
    net = established(MemNet(client_config=config, server_config=config))
    net.client.send(stream(100_000, 15))
    net.kill(0)
    lost_at = net.now
    net.run()
    for side in (net.client_side, net.server_side):
        assert side.closed is not None
        assert isinstance(side.closed.error, MptlsTimeoutError)
        assert "none came back within 3.0 s" in str(side.closed.error)
    assert net.now == pytest.approx(lost_at + 3.0)


def test_without_join_keys_losing_every_path_ends_at_once() -> None:
    net = established(MemNet(keys=None))
    net.kill(0)
    net.run(max_time=net.now)
    closed = net.client_side.closed
    assert closed is not None and isinstance(closed.error, MptlsError)
    assert not isinstance(closed.error, MptlsTimeoutError)
    # the message says why no join could follow
    assert str(closed.error) == (
        "every subflow of the connection closed before the TLS handshake "
        "gave the keys a join needs"
    )


def test_losing_the_only_path_in_the_mptcp_handshake_says_so() -> None:
    net = slow(MemNet(), 0.01)
    net.client.send(b"ClientHello")
    # the SYN reached the server; the path dies before its SYN|ACK
    assert net.run(lambda: net.server is not None)
    net.kill(0)
    net.run(max_time=net.now)
    closed = net.client_side.closed
    assert closed is not None and isinstance(closed.error, MptlsError)
    assert str(closed.error) == (
        "every subflow of the connection closed before the MPTCP "
        "handshake completed"
    )


# the MPTCP handshake timeout


def test_unanswered_mp_capable_syn_times_out() -> None:
    config = ConnectionConfig(handshake_timeout=2.5)
    net = MemNet(client_config=config)
    blackhole(net, 0)
    net.client.send(b"ClientHello")
    net.run()
    closed = net.client_side.closed
    assert closed is not None
    assert isinstance(closed.error, MptlsTimeoutError)
    assert "MPTCP handshake" in str(closed.error)
    assert net.now == pytest.approx(2.5)


def test_responder_without_a_third_ack_times_out() -> None:
    config = ConnectionConfig(handshake_timeout=4.0)
    net = slow(MemNet(server_config=config), 0.01)
    net.client.send(b"ClientHello")
    # deliver the SYN, then the path dies before the third ACK
    assert net.run(lambda: net.server is not None)
    blackhole(net, 0)
    assert net.run(lambda: net.server_side.closed is not None)
    closed = net.server_side.closed
    assert closed is not None
    assert isinstance(closed.error, MptlsTimeoutError)
    assert net.now == pytest.approx(4.01)


# forged joins (RFC 8684 section 3.2)


def _forged_join(
    net: MemNet, token: bytes, rng: random.Random, now: float
) -> str:
    """One join with a sniffed token and a random HMAC: its outcome."""
    syn = Segment(
        flags=Flag.SYN,
        options=(
            MpJoinSyn(token=token, nonce=rng.getrandbits(32), address_id=0),
        ),
    )
    result = net.endpoint.receive_first(syn, now)
    if isinstance(result, Refused):
        return "refused at SYN"
    assert isinstance(result, Accepted)
    server = result.connection
    answers = [s for sid, s in server.segments_to_send(now)]
    assert any(
        any(isinstance(o, MpJoinSynAck) for o in s.options) for s in answers
    )
    ack = Segment(flags=Flag.ACK, options=(MpJoinAck(hmac=rng.randbytes(20)),))
    server.receive_segment(result.subflow_id, ack, now)
    replies = [s for sid, s in server.segments_to_send(now)]
    resets = [s for s in replies if s.flags & Flag.RST]
    assert resets, "a forged third ACK must be reset"
    return "refused at third ACK"


def test_ten_thousand_forged_joins_are_all_refused() -> None:
    config = ConnectionConfig(join_failure_burst=16, join_failure_rate=2.0)
    net = established(MemNet(server_config=config))
    assert net.server is not None
    token = net.server.local_token
    assert token is not None
    rng = random.Random(99)
    outcomes: dict[str, int] = {}
    start = net.now
    # 10,000 attempts over 10 s of fake time
    for attempt in range(10_000):
        now = start + attempt * 0.001
        outcome = _forged_join(net, token, rng, now)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if attempt % 1000 == 0:
            events = _drain(net.server)
            assert not any(
                isinstance(e, ev.SubflowEstablished) for e in events
            )
    # the bucket: 16 at once, then 2 per second over 10 s
    assert outcomes["refused at third ACK"] <= 16 + 2 * 10 + 1
    assert outcomes["refused at SYN"] >= 10_000 - 37
    assert not any(
        isinstance(e, ev.SubflowEstablished) for e in _drain(net.server)
    )
    # the table of subflows did not grow with the attack
    assert len(net.server.info().subflows) <= 16 + 1
    # the real client is still served, and can join once the bucket
    # has refilled
    net.now = start + 30.0
    net.client.send(b"still here")
    assert net.run(has_data(net.server_side, 15))
    join(net)


def _drain(connection: object) -> list[ev.Event]:
    events: list[ev.Event] = []
    next_event = connection.next_event  # type: ignore[attr-defined]
    while (event := next_event()) is not None:
        events.append(event)
    return events


def test_failed_joins_are_rate_limited_per_connection() -> None:
    config = ConnectionConfig(join_failure_burst=3, join_failure_rate=1.0)
    net = established(MemNet(server_config=config))
    assert net.server is not None
    token = net.server.local_token
    assert token is not None
    rng = random.Random(5)
    now = net.now
    outcomes = [_forged_join(net, token, rng, now) for _ in range(5)]
    assert outcomes == ["refused at third ACK"] * 3 + ["refused at SYN"] * 2
    syn = Segment(
        flags=Flag.SYN,
        options=(MpJoinSyn(token=token, nonce=1, address_id=0),),
    )
    refused = net.endpoint.receive_first(syn, now)
    assert isinstance(refused, Refused) and refused.reply is not None
    # T set (RFC 8684 section 3.6): the client whose genuine join meets
    # a dry bucket tries again later instead of never
    assert (
        MpTcpRst(
            reason=ResetReason.ADMINISTRATIVELY_PROHIBITED, transient=True
        )
        in refused.reply.options
    )
    # one second later one more attempt is allowed
    assert _forged_join(net, token, rng, now + 1.0) == "refused at third ACK"
    assert _forged_join(net, token, rng, now + 1.0) == "refused at SYN"


def test_pending_half_open_joins_stay_bounded() -> None:
    config = ConnectionConfig(max_pending_joins=4)
    net = established(MemNet(server_config=config))
    assert net.server is not None
    token = net.server.local_token
    assert token is not None
    results = []
    for nonce in range(50):
        syn = Segment(
            flags=Flag.SYN,
            options=(MpJoinSyn(token=token, nonce=nonce, address_id=0),),
        )
        results.append(net.endpoint.receive_first(syn, net.now))
    accepted = [r for r in results if isinstance(r, Accepted)]
    assert len(accepted) == 4
    live = [s for s in net.server.info().subflows if s.state != "CLOSED"]
    assert len(live) == 1 + 4


# DSS mappings from a hostile sender (RFC 8684 section 3.3)


def _client_dsn(net: MemNet, offset: int) -> int:
    token = net.client.local_token
    assert token is not None
    return (
        idsn_from_token(token, net.client.config.idsn_rule) + 1 + offset
    ) % SEQ_MOD


def _mapped(dsn: int, payload: bytes, *, fin: bool = False) -> Segment:
    length = len(payload) + (1 if fin else 0)
    return Segment(
        flags=Flag.ACK,
        options=(Dss(dsn=dsn, ssn=1, data_length=length, data_fin=fin),),
        payload=payload,
    )


def test_mappings_outside_the_window_are_dropped() -> None:
    window = 64 * 1024
    net = established(
        MemNet(server_config=ConnectionConfig(receive_window=window))
    )
    # once a mapping fitted (the IDSNs agree), strays are only dropped;
    # a first mapping outside the window fails the connection instead
    # (test_connection: a forged Token-A)
    net.client.send(b"real data")
    assert net.run(has_data(net.server_side, 14))
    sent = 14  # "hello" and "real data"
    far = _mapped(_client_dsn(net, sent + 10 * window), b"X" * 1000)
    behind = _mapped(_client_dsn(net, 0), b"Z" * 5)
    net.inject_to_server(0, far)
    net.inject_to_server(0, behind)
    net.client.send(b" and more")
    assert net.run(has_data(net.server_side, 23))
    net.run()
    assert bytes(net.server_side.data) == b"helloreal data and more"
    assert net.server_side.closed is None


def test_conflicting_copies_never_change_taken_bytes() -> None:
    net = established(MemNet())
    second = join(net)
    payload = stream(4096, 16)
    # a forger maps different bytes onto the same range, first on one
    # subflow, then the real data follows; whichever arrives first wins
    # and the rest is trimmed, so the stream keeps the forged-first
    # bytes only where they came first and never mixes two copies
    net.inject_to_server(
        second, _mapped(_client_dsn(net, 5 + 4096), b"Q" * 100)
    )
    net.client.send(payload + b"tail")
    assert net.run(has_data(net.server_side, 5 + 4096 + 4))
    data = bytes(net.server_side.data)
    assert data[: 5 + 4096] == b"hello" + payload
    # bytes past the real stream are taken as sent: TLS above rejects
    # them; what matters is that no taken byte is ever replaced
    assert data[5 + 4096 : 5 + 4096 + 4] in (b"tail", b"QQQQ")
    assert set(data[5 + 4096 + 4 :]) <= {ord("Q")}


def _server_dsn_ack(net: MemNet, offset: int) -> int:
    """The Data ACK, as the server would write it, for client offset."""
    return _client_dsn(net, offset)


def test_a_hole_that_never_fills_fails_the_receiver_in_time() -> None:
    # a Data ACK forged on the first path frees the client's chunks in
    # flight on the second; that path then dies, so nothing sends them
    # again, and the client has nothing outstanding: no timer of the
    # sender's fires. The server, holding later bytes behind the hole,
    # is the one that can tell
    config = ConnectionConfig(path_loss_timeout=5.0)
    net = established(MemNet(client_config=config, server_config=config))
    second = join(net, delay=0.05)
    up = stream(400_000, 17)
    net.client.send(up)
    assert net.run(
        lambda: net.link(second).to_server.queue != [], max_time=net.now + 1
    )
    mapped = net.client._send.mapped_end
    forged = Dss(data_ack=_server_dsn_ack(net, mapped))
    net.inject(0, Segment(Flag.ACK, (forged,), window=1 << 22))
    assert net.run(
        lambda: net.client._send.acked >= mapped, max_time=net.now + 1
    )
    net.kill(second)
    lost_at = net.now
    assert net.run(
        lambda: net.server_side.closed is not None, max_time=net.now + 600
    )
    assert net.now - lost_at <= 5.0
    closed = net.server_side.closed
    assert closed is not None
    assert isinstance(closed.error, MptlsTimeoutError)
    assert "never came" in str(closed.error)
    # the client hears of it at once (MP_FASTCLOSE), rather than after
    # a path_loss_timeout of its own spent waiting for a join, and what
    # arrived is a prefix
    given_up_at = net.now
    assert net.run(
        lambda: net.client_side.closed is not None, max_time=net.now + 600
    )
    assert net.now - given_up_at < 1.0
    assert net.client_side.closed is not None
    assert isinstance(net.client_side.closed.error, PeerResetError)
    assert up.startswith(bytes(net.server_side.data[5:]))


def test_a_new_path_gives_a_hole_its_full_time_again() -> None:
    # what a lost path carried may come again on the path that joins:
    # the hole's clock starts over when a subflow is established
    config = ConnectionConfig(path_loss_timeout=5.0)
    net = established(MemNet(client_config=config, server_config=config))
    net.inject_to_server(0, _mapped(_client_dsn(net, 5 + 1000), b"later"))
    net.run(max_time=net.now)
    opened = net.server._hole_since
    assert opened is not None
    net.now += 4.0
    net.run(max_time=net.now)
    join(net)
    assert net.run(
        lambda: net.server_side.closed is not None, max_time=net.now + 60
    )
    assert net.now >= opened + 4.0 + 5.0
    closed = net.server_side.closed
    assert closed is not None and "never came" in str(closed.error)


def test_a_hole_that_moves_is_no_failure() -> None:
    # holes open and fill, each for less than the timeout and all of
    # them for more: only a hole that stays where it is counts
    config = ConnectionConfig(path_loss_timeout=1.0)
    net = established(MemNet(client_config=config, server_config=config))
    pieces = [stream(1000, 20 + index) for index in range(8)]
    started = net.now
    for index in range(0, 8, 2):
        first, second = 5 + 1000 * index, 5 + 1000 * (index + 1)
        net.inject_to_server(
            0, _mapped(_client_dsn(net, second), pieces[index + 1])
        )
        net.run(max_time=net.now)
        assert net.server._hole_since is not None
        net.now += 0.8
        net.run(max_time=net.now)
        net.inject_to_server(
            0, _mapped(_client_dsn(net, first), pieces[index])
        )
        net.run(max_time=net.now)
        assert net.server._hole_since is None
    assert net.now - started > config.path_loss_timeout
    assert net.server_side.closed is None
    assert bytes(net.server_side.data) == b"hello" + b"".join(pieces)


def test_early_data_fin_waits_for_the_bytes_before_it() -> None:
    net = established(MemNet())
    assert net.server is not None
    # a DATA_FIN at offset 5 + 20 arrives before bytes 5..25
    net.inject_to_server(0, _mapped(_client_dsn(net, 25), b"", fin=True))
    net.run()
    assert not net.server_side.eof
    net.client.send(stream(20, 17) + b"beyond the fin")
    assert net.run(lambda: net.server_side.eof)
    # RFC 8684 section 3.3.3: the stream ends at the DATA_FIN
    assert bytes(net.server_side.data) == b"hello" + stream(20, 17)
