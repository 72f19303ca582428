"""The sans-I/O MPTCP connection, end to end over the in-memory network.

Every segment crosses the real wire codec (tests/memnet.py). Covered:
the G-mode and RFC 8684 handshakes with data in every flight, downgrade
refusals, joins (good, bad HMACs, before keys, unknown token, replay,
limits, timeout), multi-subflow transfers with reordering and a dead
path, DATA_FIN and half-close, receive-window backpressure, ADD_ADDR,
fast close, and the hijack that G mode prevents and RFC 8684 allows.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from memnet import (
    KEYS,
    MemNet,
    both_have,
    established,
    has_data,
    join,
    seeded_bytes,
    stream,
)

from mptls.errors import (
    ConfigurationError,
    KeysUnavailableError,
    MptlsError,
    PeerResetError,
    ProtocolError,
)
from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.connection import Connection
from mptls.mptcp.crypto import (
    add_addr_hmac,
    idsn_from_token,
    join_hmac,
    rfc8684_idsn,
    rfc8684_token,
)
from mptls.mptcp.endpoint import Accepted, Endpoint, Refused
from mptls.mptcp.framing import (
    PREAMBLE,
    Flag,
    Segment,
    encode_segment,
)
from mptls.mptcp.options import (
    AddAddr,
    CapableFlag,
    Dss,
    MpCapable,
    MpFastclose,
    MpJoinAck,
    MpJoinSyn,
    MpJoinSynAck,
    MpTcpRst,
    ResetReason,
    encode_option,
)
from mptls.mptcp.reassembly import (
    MAX_HELD_PIECES,
    SINGLE_PATH_MAX_HELD_PIECES,
    SINGLE_PATH_REORDER_LIMIT,
)
from mptls.mptcp.tokens import TokenAllocator

RFC8684_CLIENT = ConnectionConfig(mode=Mode.RFC8684, allow_cleartext_keys=True)
RFC8684_SERVER = ConnectionConfig(
    mode=Mode.RFC8684,
    accept_modes=frozenset({Mode.RFC8684}),
    allow_cleartext_keys=True,
)


def option_of(segment: Segment, kind: type) -> object | None:
    return next((o for o in segment.options if isinstance(o, kind)), None)


# handshake


def test_g_handshake_carries_data_in_every_flight() -> None:
    def on_accept(server: Connection) -> None:
        server.send(b"ServerHello..Finished")

    def on_event(connection: Connection, event: ev.Event) -> None:
        if connection is net.client and isinstance(event, ev.DataReceived):
            connection.send(b"client Finished")

    net = MemNet(on_accept=on_accept, on_event=on_event)
    net.client.send(b"ClientHello")
    assert net.run(has_data(net.server_side, 26))

    up, down = net.link(0).to_server.sent, net.link(0).to_client.sent
    syn, third = up[0], up[1]
    assert syn.flags == Flag.SYN and syn.payload == b"ClientHello"
    assert syn.options == (MpCapable(flags=CapableFlag.G),)
    assert len(encode_option(syn.options[0])) == 4

    syn_ack = down[0]
    assert syn_ack.flags == Flag.SYN | Flag.ACK
    assert syn_ack.payload == b"ServerHello..Finished"
    offer = option_of(syn_ack, MpCapable)
    assert isinstance(offer, MpCapable)
    assert offer.flags == CapableFlag.G
    token_b = offer.sender_key
    assert net.server is not None and token_b == net.server.local_token

    assert third.flags == Flag.ACK and third.payload == b"client Finished"
    echo = option_of(third, MpCapable)
    assert isinstance(echo, MpCapable)
    assert echo.sender_key == net.client.local_token
    assert echo.receiver_key == token_b
    assert echo.data_length == len(b"client Finished")
    assert len(encode_option(echo)) == 22

    assert bytes(net.server_side.data) == b"ClientHello" + b"client Finished"
    assert bytes(net.client_side.data) == b"ServerHello..Finished"
    done = net.client_side.of_type(ev.HandshakeComplete)
    assert done == [
        ev.HandshakeComplete(Mode.G, net.client.local_token, token_b)
    ]
    assert net.server_side.of_type(ev.HandshakeComplete)[0].mode is Mode.G


def test_first_option_sits_at_the_documented_offset() -> None:
    net = established(MemNet())
    sid = join(net)
    syn = net.link(sid).to_server.sent[0]
    wire = PREAMBLE + encode_segment(syn)
    assert wire[16] == 30 and wire[17] == 16
    assert wire[18] >> 4 == 1
    assert net.server is not None
    assert wire[20:28] == net.server.local_token
    first = PREAMBLE + encode_segment(net.link(0).to_server.sent[0])
    assert first[16:19] == bytes([30, 4, 0x01])


def test_dss_uses_idsn_from_tokens_after_the_handshake() -> None:
    net = established(MemNet())
    net.client.send(b"x" * 10)
    assert net.run(has_data(net.server_side, 15))
    frame = net.link(0).to_server.sent[-1]
    dss = option_of(frame, Dss)
    assert isinstance(dss, Dss)
    token_a = net.client.local_token
    assert token_a is not None
    # "hello" took offsets 0-4 implicitly; this frame starts at offset 5
    assert dss.dsn == (idsn_from_token(token_a) + 1 + 5) % 2**64
    assert dss.ssn == 6 and dss.data_length == 10
    assert net.server is not None and net.server.local_token is not None
    server_idsn = idsn_from_token(net.server.local_token)
    assert dss.data_ack == (server_idsn + 1) % 2**64


def test_a_dss_checksum_that_was_not_negotiated_resets_the_subflow() -> None:
    # RFC 8684 section 3.3 (protocol.md 2.4): a checksum present but not
    # negotiated gets a RST with MP_TCPRST 0x01. mptls negotiates none,
    # so the mapping's bytes must not reach the application
    net = established(MemNet())
    sid = join(net)
    server = net.server
    assert server is not None and server._remote_idsn is not None
    offset = server._receive.next_offset
    mapping = Dss(
        data_ack=None,
        dsn=(server._remote_idsn + 1 + offset) % 2**64,
        ssn=1,
        data_length=3,
        checksum=0x1234,
    )
    net.inject_to_server(sid, Segment(Flag.ACK, (mapping,), b"abc"))
    net.run(lambda: bool(net.link(sid).to_client.sent[-1].flags & Flag.RST))
    reset = net.link(sid).to_client.sent[-1]
    assert option_of(reset, MpTcpRst) == MpTcpRst(ResetReason.MPTCP_ERROR)
    assert bytes(net.server_side.data) == b"hello"
    (closed,) = net.server_side.of_type(ev.SubflowClosed)
    assert "checksum" in closed.reason
    assert not server.closed


def test_subflow_sequence_numbers_wrap_after_4_gib_on_a_subflow() -> None:
    # the DSS field is 32 bits: a subflow that has sent 4 GiB starts
    # over at 0 (RFC 8684 section 3.3), where a larger number would
    # fail the encoder and the connection with it
    net = established(MemNet())
    net.client._subflows[0].bytes_sent = 2**32 - 3
    net.client.send(b"x" * 10)
    assert net.run(has_data(net.server_side, 15))
    net.client.send(b"y" * 10)
    assert net.run(has_data(net.server_side, 25))
    mappings = [option_of(frame, Dss) for frame in net.link(0).to_server.sent]
    ssns = [
        dss.ssn
        for dss in mappings
        if isinstance(dss, Dss) and dss.data_length == 10
    ]
    assert ssns == [2**32 - 2, 8]
    assert bytes(net.server_side.data) == b"hello" + b"x" * 10 + b"y" * 10


@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize("data", [5, 10**12, "text", [104, 105]])
def test_send_takes_only_bytes_like_data(data: object, owned: bool) -> None:
    # bytes() of an int is that many zero bytes: send(5) queued five of
    # them for the peer, and send(10**12) asked for a terabyte
    net = established(MemNet())
    with pytest.raises(ConfigurationError, match="bytes-like"):
        net.client.send(data, owned=owned)  # type: ignore[arg-type]
    assert net.client.send_pending == 0
    net.client.send(bytearray(b"ok"), owned=owned)
    assert net.run(has_data(net.server_side, 7))
    assert bytes(net.server_side.data) == b"hellook"


def test_rfc8684_handshake_sends_keys_and_derives_tokens() -> None:
    net = established(MemNet(RFC8684_CLIENT, RFC8684_SERVER))
    syn, third = net.link(0).to_server.sent[:2]
    assert option_of(syn, MpCapable) == MpCapable(flags=CapableFlag.H)
    syn_ack = option_of(net.link(0).to_client.sent[0], MpCapable)
    assert isinstance(syn_ack, MpCapable) and syn_ack.flags == CapableFlag.H
    key_b = syn_ack.sender_key
    assert key_b is not None
    assert net.server is not None
    assert net.server.local_token == rfc8684_token(key_b)
    echo = option_of(third, MpCapable)
    assert isinstance(echo, MpCapable) and echo.receiver_key == key_b
    assert echo.sender_key is not None
    assert net.client.local_token == rfc8684_token(echo.sender_key)
    assert net.client.info().mode == "rfc8684"

    net.client.send(b"abc")
    assert net.run(has_data(net.server_side, 8))
    dss = option_of(net.link(0).to_server.sent[-1], Dss)
    assert isinstance(dss, Dss)
    assert dss.dsn == (rfc8684_idsn(echo.sender_key) + 1 + 5) % 2**64
    # TLS keys have no place in RFC 8684 mode
    assert net.client.install_keys(KEYS) is False
    assert net.client.info().keys_installed is False


def test_responder_refuses_a_mode_it_does_not_accept() -> None:
    net = MemNet(server_config=RFC8684_SERVER)
    net.client.send(b"hello")
    net.run()
    assert net.server is None
    (refusal,) = net.refusals
    assert refusal.reply is not None
    assert option_of(refusal.reply, MpTcpRst) == MpTcpRst(
        reason=ResetReason.ADMINISTRATIVELY_PROHIBITED
    )
    closed = net.client_side.closed
    assert closed is not None and isinstance(closed.error, PeerResetError)


def test_legacy_fallback_works_but_refuses_cleartext_joins() -> None:
    client = ConnectionConfig(allow_legacy_fallback=True)
    net = established(MemNet(client, RFC8684_SERVER))
    assert option_of(net.link(0).to_server.sent[0], MpCapable) == MpCapable(
        flags=CapableFlag.G | CapableFlag.H
    )
    assert net.client.info().mode == "rfc8684"
    assert net.client_tokens.live == 0  # the unused G token went back
    with pytest.raises(KeysUnavailableError):
        net.client.open_subflow(net.now)
    net.client.send(b"still fine")
    assert net.run(has_data(net.server_side, 15))


def fresh_client(config: ConnectionConfig | None = None) -> Connection:
    return Connection.initiator(
        config or ConnectionConfig(),
        tokens=TokenAllocator(bytes(32)),
        random=seeded_bytes(random.Random(1)),
        now=0.0,
    )


def syn_ack(option: MpCapable | None) -> Segment:
    options = () if option is None else (option,)
    return Segment(flags=Flag.SYN | Flag.ACK, options=options, window=65536)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (MpCapable(CapableFlag.H, sender_key=bytes(8)), "downgrade"),
        (None, "no MP_CAPABLE"),
        (MpCapable(CapableFlag.G, bytes(8), version=0), "version"),
        (MpCapable(CapableFlag.G | CapableFlag.H, bytes(8)), "exactly one"),
        (MpCapable(CapableFlag.C, bytes(8)), "exactly one"),
        # RFC 8684 section 3.1: A in either SYN makes checksums
        # mandatory, and mptls has none (a server refuses a SYN with A)
        (MpCapable(CapableFlag.G | CapableFlag.A, bytes(8)), "checksums"),
        # B may change the layout the option was decoded with
        (MpCapable(CapableFlag.G | CapableFlag.B, bytes(8)), "flag B"),
    ],
)
def test_initiator_fails_a_bad_syn_ack(
    reply: MpCapable | None, why: str
) -> None:
    client = fresh_client()
    assert len(client.segments_to_send(0.0)) == 1
    client.receive_segment(0, syn_ack(reply), 0.01)
    closed = client.next_event()
    assert isinstance(closed, ev.ConnectionClosed)
    assert isinstance(closed.error, ProtocolError)
    assert why in str(closed.error)
    ((sid, rst),) = client.segments_to_send(0.02)
    assert sid == 0 and rst.flags == Flag.RST
    assert option_of(rst, MpTcpRst) == MpTcpRst(reason=ResetReason.MPTCP_ERROR)
    assert client.closed
    with pytest.raises(MptlsError):
        client.send(b"late")


def test_responder_fails_a_third_ack_with_a_foreign_token() -> None:
    net = MemNet()
    client = net.client
    (syn,) = [s for _, s in client.segments_to_send(0.0)]
    accepted = net.endpoint.receive_first(syn, 0.0)
    server = accepted.connection  # type: ignore[union-attr]
    server.segments_to_send(0.0)
    forged = MpCapable(
        CapableFlag.G, sender_key=bytes(8), receiver_key=b"\x02" * 8
    )
    server.receive_segment(0, Segment(Flag.ACK, (forged,)), 0.01)
    closed = server.next_event()
    assert isinstance(closed, ev.ConnectionClosed)
    assert isinstance(closed.error, ProtocolError)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"data_length": 0, "checksum": 0x55}, "checksum"),
        ({"flags": CapableFlag.G | CapableFlag.A}, "checksum"),
    ],
)
def test_responder_fails_a_third_ack_that_asks_for_checksums(
    changes: dict[str, object], why: str
) -> None:
    # nobody negotiated checksums (the server refuses a SYN with A):
    # a third ACK that carries one, or sets A, is not what was agreed
    net = MemNet()
    client = net.client
    (syn,) = [s for _, s in client.segments_to_send(0.0)]
    accepted = net.endpoint.receive_first(syn, 0.0)
    server = accepted.connection  # type: ignore[union-attr]
    (reply,) = [s for _, s in server.segments_to_send(0.0)]
    client.receive_segment(0, reply, 0.01)
    (third,) = [s for _, s in client.segments_to_send(0.01)]
    echo = option_of(third, MpCapable)
    assert isinstance(echo, MpCapable)
    forged = dataclasses.replace(echo, **changes)  # type: ignore[arg-type]
    server.receive_segment(
        0, dataclasses.replace(third, options=(forged,)), 0.02
    )
    events = drain(server)
    (closed,) = [e for e in events if isinstance(e, ev.ConnectionClosed)]
    assert isinstance(closed.error, ProtocolError)
    assert why in str(closed.error)
    assert not any(isinstance(e, ev.HandshakeComplete) for e in events)


def drain(connection: Connection) -> list[ev.Event]:
    events = []
    while (event := connection.next_event()) is not None:
        events.append(event)
    return events


def test_a_forged_token_a_fails_at_the_first_mapped_frame() -> None:
    # G-mode tokens are not authenticated: a rewritten Token-A in the
    # third ACK gives the server a wrong IDSN for the client's data. One
    # mapped frame must be enough to catch it: its bytes were delivered
    # by the subflow and will not come again.
    net = MemNet()
    client = net.client
    client.send(b"ClientHello")
    (syn,) = [s for _, s in client.segments_to_send(0.0)]
    accepted = net.endpoint.receive_first(syn, 0.0)
    server = accepted.connection  # type: ignore[union-attr]
    server.send(b"ServerHello..Finished")
    (reply,) = [s for _, s in server.segments_to_send(0.0)]
    client.receive_segment(0, reply, 0.01)
    client.send(b"client Finished")
    for _, segment in client.segments_to_send(0.01):
        echo = option_of(segment, MpCapable)
        if isinstance(echo, MpCapable):
            forged = dataclasses.replace(echo, sender_key=b"\x42" * 8)
            segment = dataclasses.replace(segment, options=(forged,))
        server.receive_segment(0, segment, 0.02)
    assert not any(isinstance(e, ev.ConnectionClosed) for e in drain(server))

    client.send(b"application data")
    (mapped,) = [s for _, s in client.segments_to_send(0.03)]
    assert isinstance(option_of(mapped, Dss), Dss)
    server.receive_segment(0, mapped, 0.04)
    events = drain(server)
    (closed,) = [e for e in events if isinstance(e, ev.ConnectionClosed)]
    assert isinstance(closed.error, ProtocolError)
    assert "changed on the way" in str(closed.error)
    received = b"".join(
        e.data for e in events if isinstance(e, ev.DataReceived)
    )
    assert b"application" not in received


# joins


def test_join_hmacs_use_tls_keys_in_g_mode() -> None:
    net = established(MemNet())
    sid = join(net)
    link = net.link(sid)
    syn, third = link.to_server.sent[0], link.to_server.sent[1]
    reply = link.to_client.sent[0]
    syn_option = option_of(syn, MpJoinSyn)
    reply_option = option_of(reply, MpJoinSynAck)
    third_option = option_of(third, MpJoinAck)
    assert isinstance(syn_option, MpJoinSyn)
    assert isinstance(reply_option, MpJoinSynAck)
    assert isinstance(third_option, MpJoinAck)
    r_a, r_b = syn_option.nonce, reply_option.nonce
    hmac_b = join_hmac(KEYS.key_b, KEYS.key_a, r_b, r_a)
    hmac_a = join_hmac(KEYS.key_a, KEYS.key_b, r_a, r_b)
    assert reply_option.hmac == hmac_b[:8]
    assert third_option.hmac == hmac_a[:20]
    # the responder's ACK frame ends PRE_ESTABLISHED
    assert option_of(link.to_client.sent[1], Dss) is not None
    assert net.server is not None
    assert ev.SubflowEstablished(link.server_id) in net.server_side.events


@pytest.mark.parametrize("mode", [Mode.G, Mode.E])
def test_install_keys_takes_only_key_material(mode: Mode) -> None:
    # a str was taken as the keys: the first join then failed with an
    # AttributeError from deep inside, or the INFO log line did at once
    config = ConnectionConfig(mode=mode, accept_modes=frozenset({mode}))
    net = established(MemNet(config, config, keys=None, derive=None))
    with pytest.raises(ConfigurationError, match="KeyMaterial"):
        net.client.install_keys(KEYS.key_a + KEYS.key_b)  # type: ignore[arg-type]
    assert not net.client.info().keys_installed
    assert net.client.install_keys(KEYS)


def test_open_subflow_needs_keys() -> None:
    net = established(MemNet(keys=None))
    with pytest.raises(KeysUnavailableError):
        net.client.open_subflow(net.now)
    with pytest.raises(KeysUnavailableError):
        net.client.announce(1, IPv4Address("192.0.2.1"), None)


def test_join_before_server_keys_is_held_until_they_come() -> None:
    net = established(MemNet(server_keys_at=0.3))
    start = net.now
    sid = net.open_subflow()
    link = net.link(sid)
    assert net.run(lambda: net.now >= start + 0.25, max_time=0.29) is False
    # the SYN went out twice (RTO 0.2) and got no answer at all: no RST
    assert len(link.to_server.sent) == 2
    assert link.to_client.sent == []
    assert net.refusals == []
    assert net.run(
        lambda: ev.SubflowEstablished(sid) in net.client_side.events
    )
    # answered when the keys came, not at the third SYN (0.2 + 0.4)
    assert len([s for s in link.to_server.sent if s.flags == Flag.SYN]) == 2
    assert net.now == pytest.approx(start + 0.3)


@pytest.mark.parametrize(
    "configs",
    [(None, None), (RFC8684_CLIENT, RFC8684_SERVER)],
    ids=["g", "rfc8684"],
)
def test_join_that_overtakes_the_handshake_is_held_not_refused(
    configs: tuple[ConnectionConfig | None, ConnectionConfig | None],
) -> None:
    # the first path is slow, the second fast: the join SYN, sent when
    # the client's handshake ends, reaches the server before the third
    # ACK (and the Finished) that end the server's
    net = MemNet(*configs)
    net.links[0].delay = 0.05
    net.client.send(b"hello")
    assert net.run(lambda: net.client.handshake_complete)
    assert net.server is not None and not net.server.handshake_complete
    sid = net.open_subflow(delay=0.001)
    assert net.run(
        lambda: ev.SubflowEstablished(sid) in net.client_side.events
    )
    assert net.refusals == []
    assert net.client_side.of_type(ev.JoinRefused) == []
    # answered as the third ACK arrived, one way of the slow path after
    # the SYN: no retransmission of the SYN was needed
    link = net.link(sid)
    assert len([s for s in link.to_server.sent if s.flags == Flag.SYN]) == 1
    net.client.send(stream(300_000))
    assert net.run(has_data(net.server_side, 300_000 + len(b"hello")))
    assert bytes(net.server_side.data) == b"hello" + stream(300_000)


def test_join_times_out_when_keys_never_come() -> None:
    config = ConnectionConfig(join_timeout=1.0)
    net = established(MemNet(config, server_keys_at=1e9))
    sid = net.open_subflow()
    assert net.run(lambda: net.client_side.of_type(ev.SubflowClosed) != [])
    (closed,) = net.client_side.of_type(ev.SubflowClosed)
    assert closed.subflow_id == sid and "timed out" in closed.reason
    assert net.now == pytest.approx(1.0, abs=0.01)
    assert net.link(sid).to_server.sent[-1].flags == Flag.RST
    assert net.client_side.closed is None


def test_bad_syn_ack_hmac_is_refused_by_the_initiator() -> None:
    net = established(MemNet())
    sid = net.client.open_subflow(net.now)
    net.run(max_time=net.now + 0.1)
    (syn,) = [s for i, s in net.unrouted if i == sid]
    option = option_of(syn, MpJoinSyn)
    assert isinstance(option, MpJoinSyn)
    forged = MpJoinSynAck(hmac=bytes(8), nonce=5, address_id=0)
    net.client.receive_segment(
        sid, Segment(Flag.SYN | Flag.ACK, (forged,)), net.now
    )
    net.run()
    rst = net.unrouted[-1][1]
    assert rst.flags == Flag.RST
    assert option_of(rst, MpTcpRst) == MpTcpRst(reason=ResetReason.MPTCP_ERROR)
    refused = net.client_side.of_type(ev.JoinRefused)
    assert [r.subflow_id for r in refused] == [sid]
    closed = net.client_side.of_type(ev.SubflowClosed)
    assert closed[-1] == ev.SubflowClosed(sid, closed[-1].reason, 1)
    assert net.client_side.closed is None


def test_syn_ack_without_mp_join_is_refused() -> None:
    net = established(MemNet())
    sid = net.client.open_subflow(net.now)
    net.run(max_time=net.now + 0.1)
    net.client.receive_segment(sid, Segment(Flag.SYN | Flag.ACK), net.now)
    net.run()
    assert net.client_side.of_type(ev.JoinRefused)[0].subflow_id == sid


def test_unknown_token_gets_a_reset() -> None:
    net = established(MemNet())
    raw = net.open_raw()
    net.raw_send(raw, Segment(Flag.SYN, (MpJoinSyn(b"\xaa" * 8, 1, 0),)))
    net.run()
    (reply,) = raw.inbox
    assert reply.flags == Flag.RST
    assert option_of(reply, MpTcpRst) == MpTcpRst(
        reason=ResetReason.MPTCP_ERROR
    )


def test_replayed_third_ack_is_refused_and_the_connection_goes_on() -> None:
    net = established(MemNet())
    sid = join(net)
    third = net.link(sid).to_server.sent[1]
    assert option_of(third, MpJoinAck) is not None
    net.inject_to_server(sid, third)
    assert net.run(lambda: net.server_side.of_type(ev.SubflowClosed) != [])
    (closed,) = net.server_side.of_type(ev.SubflowClosed)
    assert closed.reset_reason == ResetReason.MPTCP_ERROR
    resets = [s for s in net.link(sid).to_client.sent if s.flags & Flag.RST]
    assert option_of(resets[0], MpTcpRst) == MpTcpRst(reason=1)
    net.client.send(b"more")
    assert net.run(has_data(net.server_side, 9))


def test_a_join_left_without_its_third_ack_is_refused() -> None:
    quick = ConnectionConfig(join_timeout=1.0)
    net = established(MemNet(quick, quick))
    token_b = sniffed_capable(net)[-1].receiver_key
    assert token_b is not None
    raw = net.open_raw()
    net.raw_send(raw, Segment(Flag.SYN, (MpJoinSyn(token_b, 7, 0),)))
    # answered with a SYN|ACK; the third ACK never comes
    assert net.run(lambda: net.server_side.of_type(ev.PeerJoinRefused))
    (refused,) = net.server_side.of_type(ev.PeerJoinRefused)
    # no library keyword: the line reaches the command line's user too
    assert refused.reason == "join not completed within 1 s"
    assert raw.inbox[-1].flags == Flag.RST
    assert net.server_side.closed is None


def test_too_many_subflows_gets_lack_of_resources() -> None:
    server = ConnectionConfig(max_subflows=2)
    net = established(MemNet(server_config=server))
    join(net)
    sid = net.open_subflow()
    assert net.run(lambda: net.client_side.of_type(ev.JoinRefused) != [])
    (refusal,) = net.refusals
    assert refusal.reply is not None
    # T set (RFC 8684 section 3.6): a subflow that ends makes room
    assert option_of(refusal.reply, MpTcpRst) == MpTcpRst(
        reason=ResetReason.LACK_OF_RESOURCES, transient=True
    )
    (refused,) = net.client_side.of_type(ev.JoinRefused)
    assert refused.subflow_id == sid and refused.transient
    assert refused.reset_reason == ResetReason.LACK_OF_RESOURCES
    assert "may take a join later" in refused.reason
    closed = net.client_side.of_type(ev.SubflowClosed)
    assert closed[-1].subflow_id == sid
    assert closed[-1].reset_reason == ResetReason.LACK_OF_RESOURCES


def test_too_many_pending_joins_gets_lack_of_resources() -> None:
    server = ConnectionConfig(max_pending_joins=1)
    net = established(MemNet(server_config=server, server_keys_at=1e9))
    net.open_subflow()
    net.open_subflow()
    net.run(lambda: len(net.refusals) == 1, max_time=0.1)
    (refusal,) = net.refusals
    assert refusal.reply is not None
    assert option_of(refusal.reply, MpTcpRst) == MpTcpRst(
        reason=2, transient=True
    )


def cleartext_join_net() -> MemNet:
    """An RFC 8684 connection to a server that takes no cleartext joins."""
    client = ConnectionConfig(allow_legacy_fallback=True)
    server = dataclasses.replace(RFC8684_SERVER, allow_cleartext_keys=False)
    return established(MemNet(client, server))


def closed_server_net() -> MemNet:
    """A G connection whose server end has aborted."""
    net = established(MemNet())
    assert net.server is not None
    net.server.abort()
    return net


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (cleartext_join_net, ResetReason.ADMINISTRATIVELY_PROHIBITED),
        (closed_server_net, ResetReason.MPTCP_ERROR),
    ],
    ids=["cleartext-keys", "closed"],
)
def test_a_refusal_of_policy_is_final(
    make: Callable[[], MemNet], code: int
) -> None:
    net = make()
    assert net.server is not None
    token = net.server.local_token
    assert token is not None
    syn = Segment(Flag.SYN, (MpJoinSyn(token, 1, 0),))
    refused = net.endpoint.receive_first(syn, net.now)
    assert isinstance(refused, Refused) and refused.reply is not None
    # no T: a new join would fare no better
    assert option_of(refused.reply, MpTcpRst) == MpTcpRst(reason=code)


# data transfer


def transfer(net: MemNet, size: int) -> tuple[bytes, bytes]:
    up, down = stream(size, 1), stream(size, 2)
    assert net.server is not None
    base = len(net.server_side.data)
    net.client.send(up)
    net.server.send(down)
    assert net.run(
        lambda: (
            len(net.server_side.data) >= base + size
            and len(net.client_side.data) >= size
        )
    )
    return bytes(net.server_side.data[base:]), bytes(net.client_side.data)


def test_transfer_over_three_subflows_with_reordering() -> None:
    net = established(MemNet(reorder=True, seed=11))
    join(net, delay=0.004)
    join(net, delay=0.009)
    up, down = transfer(net, 3 * 1024 * 1024)
    assert up == stream(3 * 1024 * 1024, 1)
    assert down == stream(3 * 1024 * 1024, 2)
    used = [s for s in net.client.info().subflows if s.bytes_sent > 0]
    assert len(used) == 3


def test_transfer_survives_a_subflow_killed_midway() -> None:
    net = established(MemNet(reorder=True, seed=5))
    first = join(net, delay=0.002)
    join(net, delay=0.006)
    size = 4 * 1024 * 1024
    up, down = stream(size, 1), stream(size, 2)
    assert net.server is not None
    net.client.send(up)
    net.server.send(down)
    assert net.run(has_data(net.server_side, size // 3))
    net.kill(first)
    assert net.run(both_have(net, size + 5, size))
    assert bytes(net.server_side.data[5:]) == up
    assert bytes(net.client_side.data) == down
    assert ev.SubflowClosed(first, "subflow lost") in net.client_side.events
    assert net.client_side.closed is None


def test_losing_every_subflow_closes_with_an_error() -> None:
    net = established(MemNet())
    net.kill(0)
    net.run()
    closed = net.client_side.closed
    assert closed is not None and isinstance(closed.error, MptlsError)


def test_receive_window_stalls_and_resumes_the_sender() -> None:
    window = 256 * 1024
    server = ConnectionConfig(receive_window=window)
    net = established(MemNet(server_config=server, auto_consume=False))
    assert net.server is not None
    net.consume(net.server, net.server_side)
    size = 1024 * 1024
    net.client.send(stream(size))
    assert not net.client.peer_window_closed
    net.run()
    # idle: the receiver holds exactly a window and the sender waits
    assert net.server_side.unconsumed == window
    assert net.client.send_buffer_size == size - window
    # on the receiver's reader, not on a path: a close's limit tells
    # the two apart
    assert net.client.peer_window_closed
    last = net.link(0).to_client.sent[-1]
    assert last.window == 0
    while len(net.server_side.data) < size + 5:
        net.consume(net.server, net.server_side)
        net.run()
    assert bytes(net.server_side.data[5:]) == stream(size)


def test_a_window_update_rides_the_data_frame_that_leaves_with_it() -> None:
    # the receiver's application takes a full window and answers in the
    # same step: the answer's frame carries the Data ACK and the opened
    # window, so no frame of its own goes behind it for the update
    window = 256 * 1024
    server = ConnectionConfig(receive_window=window)
    net = established(MemNet(server_config=server, auto_consume=False))
    assert net.server is not None
    net.consume(net.server, net.server_side)
    net.client.send(stream(window))
    net.run()
    assert net.server_side.unconsumed == window
    to_client = net.link(0).to_client
    before = len(to_client.sent)

    net.consume(net.server, net.server_side)
    net.server.send(b"answer")
    assert net.run(has_data(net.client_side, 6))
    sent = to_client.sent[before:]
    assert [bytes(segment.payload) for segment in sent] == [b"answer"]
    assert sent[0].window >= window // 4


def test_backup_subflow_is_used_only_when_alone() -> None:
    net = established(MemNet())
    backup = join(net, backup=True)
    net.client.send(stream(200_000))
    assert net.run(has_data(net.server_side, 200_005))
    status = {s.subflow_id: s for s in net.client.info().subflows}
    assert status[backup].bytes_sent == 0 and status[backup].backup
    net.kill(0)
    net.client.send(stream(100_000, 3))
    assert net.run(has_data(net.server_side, 300_005))
    status = {s.subflow_id: s for s in net.client.info().subflows}
    assert status[0].state == "CLOSED"
    assert status[backup].bytes_sent == 100_000


# closing


def test_data_fin_both_ways_with_half_close() -> None:
    net = established(MemNet())
    join(net)
    assert net.server is not None
    net.client.send(b"request")
    net.client.close()
    assert net.run(lambda: net.server_side.eof)
    # the client's direction is closed; the server's still flows
    assert net.client_side.eof is False and net.client_side.closed is None
    net.server.send(b"response after the peer's DATA_FIN")
    assert net.run(has_data(net.client_side, 34))
    net.server.close()
    assert net.run(lambda: net.client_side.closed is not None)
    net.run()
    assert net.client_side.closed == ev.ConnectionClosed(None)
    assert net.server_side.closed == ev.ConnectionClosed(None)
    assert net.client_side.eof
    assert bytes(net.server_side.data) == b"hellorequest"
    for link in net.links:
        assert link.to_server.sent[-1].flags & Flag.FIN
        assert link.to_client.sent[-1].flags & Flag.FIN
    assert net.client_tokens.live == 0


def test_data_fin_alone_has_ssn_zero_and_length_one() -> None:
    net = established(MemNet())
    net.client.send(b"data")
    net.run()
    net.client.close()
    net.run()
    fins = [
        option_of(s, Dss)
        for s in net.link(0).to_server.sent
        if isinstance(option_of(s, Dss), Dss) and option_of(s, Dss).data_fin  # type: ignore[union-attr]
    ]
    (fin,) = fins
    assert isinstance(fin, Dss)
    assert fin.ssn == 0 and fin.data_length == 1
    assert net.server_side.eof


def test_data_fin_rides_the_last_data_frame() -> None:
    net = established(MemNet())
    net.client.send(b"last words")
    net.client.close()
    net.run()
    frame = net.link(0).to_server.sent[-1]
    dss = option_of(frame, Dss)
    assert isinstance(dss, Dss) and dss.data_fin
    assert frame.payload == b"last words" and dss.data_length == 11


def test_subflow_fin_closes_only_that_subflow() -> None:
    net = established(MemNet())
    sid = join(net)
    net.inject_to_server(sid, Segment(Flag.FIN | Flag.ACK))
    assert net.run(lambda: net.server_side.of_type(ev.SubflowClosed) != [])
    assert net.server_side.closed is None
    net.client.send(b"go on")
    assert net.run(has_data(net.server_side, 10))


# addresses


def test_add_addr_with_good_hmac_is_announced_and_echoed() -> None:
    net = established(MemNet())
    assert net.server is not None
    address = IPv4Address("192.0.2.7")
    net.server.announce(3, address, 8443)
    assert net.run(lambda: net.client_side.of_type(ev.AddressAnnounced) != [])
    assert net.client_side.of_type(ev.AddressAnnounced) == [
        ev.AddressAnnounced(3, address, 8443)
    ]
    sent = [option_of(s, AddAddr) for s in net.link(0).to_client.sent]
    (announced,) = [a for a in sent if a is not None]
    assert isinstance(announced, AddAddr)
    expected = add_addr_hmac(KEYS.key_b, KEYS.key_a, 3, address, 8443)
    assert announced.hmac == expected
    net.run()
    echoes = [option_of(s, AddAddr) for s in net.link(0).to_server.sent]
    assert AddAddr(3, address, 8443, echo=True) in echoes


def test_add_addr_ipv6_goes_on_its_own_frame() -> None:
    net = established(MemNet())
    assert net.server is not None
    address = IPv6Address("2001:db8::5")
    net.server.announce(4, address, 443)
    assert net.run(lambda: net.client_side.of_type(ev.AddressAnnounced) != [])


def test_add_addr_with_bad_hmac_is_ignored() -> None:
    net = established(MemNet())
    forged = AddAddr(9, IPv4Address("198.51.100.9"), None, hmac=bytes(8))
    net.inject(0, Segment(Flag.ACK, (forged,)))
    net.run()
    assert net.client_side.of_type(ev.AddressAnnounced) == []
    echoes = [option_of(s, AddAddr) for s in net.link(0).to_server.sent]
    assert all(e is None for e in echoes)


# fast close


def test_abort_sends_fastclose_and_the_peer_resets() -> None:
    net = established(MemNet())
    sid = join(net)
    net.client.abort()
    net.run()
    for link in (net.link(0), net.link(sid)):
        last = link.to_server.sent[-1]
        assert last.flags == Flag.RST
        assert isinstance(option_of(last, MpFastclose), MpFastclose)
    assert net.client_side.closed == ev.ConnectionClosed(None)
    closed = net.server_side.closed
    assert closed is not None and isinstance(closed.error, PeerResetError)


def test_fastclose_with_a_wrong_value_is_ignored() -> None:
    net = established(MemNet())
    sid = join(net)
    forged = Segment(Flag.ACK, (MpFastclose(key=bytes(8)),))
    net.inject_to_server(sid, forged)
    net.run()
    assert net.server_side.closed is None
    reset = Segment(Flag.RST, (MpFastclose(key=bytes(8)),))
    net.inject_to_server(sid, reset)
    net.run()
    # the RST ends that subflow, the wrong key does not end the connection
    assert net.server_side.closed is None
    net.client.send(b"alive")
    assert net.run(has_data(net.server_side, 10))


def test_abort_before_keys_is_a_plain_reset() -> None:
    net = established(MemNet(keys=None))
    net.client.abort()
    net.run()
    last = net.link(0).to_server.sent[-1]
    assert last == Segment(Flag.RST)
    closed = net.server_side.closed
    assert closed is not None and closed.error is not None


def test_rfc8684_fastclose_carries_the_receivers_key() -> None:
    net = established(MemNet(RFC8684_CLIENT, RFC8684_SERVER))
    key_b = option_of(net.link(0).to_client.sent[0], MpCapable).sender_key  # type: ignore[union-attr]
    net.client.abort()
    net.run()
    assert option_of(net.link(0).to_server.sent[-1], MpFastclose) == (
        MpFastclose(key=key_b)
    )
    closed = net.server_side.closed
    assert closed is not None and isinstance(closed.error, PeerResetError)


# the hijack


def sniffed_capable(net: MemNet) -> list[MpCapable]:
    """Every MP_CAPABLE an observer of the first subflow saw, the third
    ACK (which names both ends) last."""
    frames = net.link(0).to_client.sent + net.link(0).to_server.sent
    seen = [o for s in frames for o in s.options if isinstance(o, MpCapable)]
    return sorted(seen, key=lambda o: o.receiver_key is not None)


def hijack(
    net: MemNet, token: bytes, third_hmac: Callable[[int, int], bytes]
) -> list[Segment]:
    """An observer's join: SYN, then a third ACK with the given HMAC."""
    raw = net.open_raw()
    nonce = 0x01020304
    net.raw_send(raw, Segment(Flag.SYN, (MpJoinSyn(token, nonce, 0),)))
    net.run(lambda: raw.inbox != [])
    reply = option_of(raw.inbox[0], MpJoinSynAck)
    assert isinstance(reply, MpJoinSynAck)
    mac = third_hmac(nonce, reply.nonce)
    net.raw_send(raw, Segment(Flag.ACK, (MpJoinAck(mac),)))
    net.run(lambda: len(raw.inbox) > 1)
    return raw.inbox


def test_hijack_fails_in_g_mode() -> None:
    net = established(MemNet())
    seen = sniffed_capable(net)
    # the wire showed tokens only; the observer tries what it has
    token_a, token_b = seen[-1].sender_key, seen[-1].receiver_key
    assert token_b is not None and token_a is not None

    def guess(r_a: int, r_b: int) -> bytes:
        return join_hmac(token_a, token_b, r_a, r_b)[:20]

    inbox = hijack(net, token_b, guess)
    assert inbox[-1].flags == Flag.RST
    assert option_of(inbox[-1], MpTcpRst) == MpTcpRst(reason=1)
    assert net.server_side.of_type(ev.SubflowEstablished) == []
    # the adapter hears of the refusal, to tell the operator who it was
    (refused,) = net.server_side.of_type(ev.PeerJoinRefused)
    assert refused.reason == "bad MP_JOIN HMAC in the third ACK"
    net.client.send(b"carry on")
    assert net.run(has_data(net.server_side, 13))


def test_hijack_succeeds_in_rfc8684_mode() -> None:
    net = established(MemNet(RFC8684_CLIENT, RFC8684_SERVER))
    seen = sniffed_capable(net)
    key_a, key_b = seen[-1].sender_key, seen[-1].receiver_key
    assert key_a is not None and key_b is not None

    def forge(r_a: int, r_b: int) -> bytes:
        return join_hmac(key_a, key_b, r_a, r_b)[:20]

    inbox = hijack(net, rfc8684_token(key_b), forge)
    # the server took the stranger's subflow into the connection
    assert inbox[-1].flags == Flag.ACK
    assert isinstance(option_of(inbox[-1], Dss), Dss)
    assert len(net.server_side.of_type(ev.SubflowEstablished)) == 1


# secrets stay out of reprs, events and info


def test_no_key_material_in_repr_events_or_info() -> None:
    net = established(MemNet(RFC8684_CLIENT, RFC8684_SERVER))
    seen = sniffed_capable(net)
    key_b = seen[-1].receiver_key
    assert key_b is not None
    assert net.server is not None
    texts = [repr(net.client), repr(net.server), repr(net.server.info())]
    texts += [repr(e) for e in net.client_side.events + net.server_side.events]
    texts += [repr(o) for o in seen]
    for text in texts:
        assert key_b.hex() not in text
        assert KEYS.key_a.hex() not in text
    assert "initiator" in repr(net.client)


# configuration


@pytest.mark.parametrize(
    "settings",
    [
        {"max_payload": 0},
        {"max_payload": 65535},
        {"receive_window": 1000},
        {"subflow_inflight_limit": 10},
        {"join_rto": 0.0},
        {"join_rto": 20.0},
        {"max_subflows": 0},
        {"ack_threshold": 0},
        {"accept_modes": frozenset()},
        {"mode": "G"},
        {"max_payload": True},
        # every wait has a limit, a join's too
        {"join_timeout": float("inf")},
        {"join_timeout": float("nan")},
        {"join_timeout": "5"},
        {"join_timeout": True},
        {"join_timeout": 10**30},
        {"join_rto": "0.2"},
        # each was compared with its range as given: a bare TypeError
        {"rto_srtt_factor": "4"},
        {"rto_srtt_factor": None},
        {"join_failure_rate": "2"},
        {"join_failure_rate": None},
        {"ack_delay": "0.02"},
        {"ack_delay": [0.02]},
        {"rto_srtt_factor": True},
        # not a collection of modes at all
        {"accept_modes": None},
        {"accept_modes": 5},
        # each opts out of a protection: a truthy "no" turned it off
        {"allow_legacy_fallback": "no"},
        {"allow_cleartext_keys": "false"},
        {"allow_cleartext_keys": 1},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        ConnectionConfig(**settings)  # type: ignore[arg-type]


def test_a_peer_that_leaves_too_many_holes_is_reset() -> None:
    # one-byte pieces, a hole before each, in the window: the server
    # keeps MAX_HELD_PIECES of them, then ends the connection as out of
    # resources rather than hold a window's worth at 100 bytes a piece
    net = established(MemNet())
    join(net)
    leave_holes(net, MAX_HELD_PIECES + 1)


def test_one_path_that_leaves_a_few_holes_is_reset() -> None:
    # before a join may carry data, holes are a peer's doing alone: a
    # few hundred of them end the connection, where a window's worth of
    # one-byte pieces fit in the reorder limit
    net = established(MemNet())
    leave_holes(net, SINGLE_PATH_MAX_HELD_PIECES + 1)


def mapped_frames(
    net: MemNet,
) -> tuple[Segment, Callable[[int, bytes], Segment]]:
    """The client's frame of one byte "a" (not delivered), and a forger
    of frames like it: ``payload`` mapped ``offset`` bytes past it."""
    net.client.send(b"a")
    ((_, template),) = net.client.segments_to_send(net.now)
    dss = option_of(template, Dss)
    assert isinstance(dss, Dss) and dss.dsn is not None
    first = dss.dsn

    def forge(offset: int, payload: bytes) -> Segment:
        mapping = dataclasses.replace(
            dss, dsn=first + offset, data_length=len(payload)
        )
        return dataclasses.replace(
            template, options=(mapping,), payload=payload
        )

    return template, forge


def leave_holes(net: MemNet, count: int) -> None:
    """Send ``count`` one-byte pieces with a hole before each; check
    that the server ends the connection as out of resources."""
    _, forge = mapped_frames(net)
    server = net.server
    assert server is not None
    for index in range(count):
        server.receive_segment(0, forge(2 * (index + 1), b"x"), net.now)
    events = drain(server)
    (closed,) = [e for e in events if isinstance(e, ev.ConnectionClosed)]
    assert isinstance(closed.error, ProtocolError)
    assert f"more than {count - 1} pieces" in str(closed.error)
    assert not any(isinstance(e, ev.DataReceived) for e in events)
    resets = [s for _, s in server.segments_to_send(net.now)]
    assert resets and all(reset.flags == Flag.RST for reset in resets)
    assert option_of(resets[0], MpTcpRst) == MpTcpRst(
        reason=ResetReason.LACK_OF_RESOURCES
    )


def held_behind_one_hole(net: MemNet, size: int) -> bytes:
    """What the server hands on of ``size`` bytes sent past a one-byte
    hole, in frames of 50,000, once the hole is filled."""
    template, forge = mapped_frames(net)
    server = net.server
    assert server is not None
    drain(server)
    for start in range(1, size + 1, 50_000):
        payload = b"x" * min(50_000, size + 1 - start)
        server.receive_segment(0, forge(start, payload), net.now)
    server.receive_segment(0, template, net.now)
    events = drain(server)
    assert not any(isinstance(e, ev.ConnectionClosed) for e in events)
    return b"".join(e.data for e in events if isinstance(e, ev.DataReceived))


def test_one_path_holds_little_out_of_order() -> None:
    # one subflow is one TCP connection: it leaves no hole, so data past
    # one is a peer's doing, and a peer that never finishes TLS (no join
    # without its keys) made the server hold a 4 MiB window of it
    net = established(MemNet())
    delivered = held_behind_one_hole(net, 1_000_000)
    assert delivered == b"a" + b"x" * (SINGLE_PATH_REORDER_LIMIT - 1)


def test_a_join_lets_the_whole_window_be_held_out_of_order() -> None:
    net = established(MemNet())
    join(net)
    delivered = held_behind_one_hole(net, 1_000_000)
    assert delivered == b"a" + b"x" * 1_000_000


def test_a_flood_on_a_dead_subflow_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a raw client sent an MP_CAPABLE SYN, then a burst of bare ACKs:
    # the first failed the handshake, and each of the rest (thousands,
    # read in one go) was a DEBUG line of its own
    server = Endpoint(
        ConnectionConfig(),
        tokens=TokenAllocator(bytes(range(32))),
        random=seeded_bytes(random.Random(7)),
    )
    syn = Segment(Flag.SYN, (MpCapable(CapableFlag.G),), window=1 << 20)
    accepted = server.receive_first(syn, 0.0)
    assert isinstance(accepted, Accepted)
    connection = accepted.connection
    caplog.set_level(logging.DEBUG, logger="mptls.mptcp")
    for _ in range(100):
        connection.receive_segment(0, Segment(Flag.ACK, window=1 << 20), 0.0)
    assert connection.closed
    ignored = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert len(ignored) == 1, ignored
