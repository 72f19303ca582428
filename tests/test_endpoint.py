"""The listener's table: new connections, routed joins and refusals."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from memnet import KEYS, seeded_bytes

from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.connection import Connection
from mptls.mptcp.crypto import rfc8684_token
from mptls.mptcp.endpoint import Accepted, Endpoint, Refused
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import (
    CapableFlag,
    MpCapable,
    MpJoinSyn,
    MpJoinSynAck,
    MpTcpRst,
    ResetReason,
)
from mptls.mptcp.tokens import E_TOKEN_LAYOUT, TokenAllocator, TokenLayout

SYN_G = Segment(Flag.SYN, (MpCapable(CapableFlag.G),), b"hi", window=1 << 20)
SYN_H = Segment(Flag.SYN, (MpCapable(CapableFlag.H),), window=1 << 20)


def endpoint(
    config: ConnectionConfig | None = None,
    random_source: Callable[[int], bytes] | None = None,
) -> tuple[Endpoint, TokenAllocator]:
    tokens = TokenAllocator(bytes(range(32)), server_id=9)
    source = random_source or seeded_bytes(random.Random(3))
    return Endpoint(
        config or ConnectionConfig(), tokens=tokens, random=source
    ), tokens


def reset_reason(result: Accepted | Refused) -> int | None:
    assert isinstance(result, Refused) and result.reply is not None
    assert result.reply.flags == Flag.RST
    (option,) = result.reply.options
    assert isinstance(option, MpTcpRst)
    return option.reason


def complete(server: Connection) -> None:
    """Play the initiator's third ACK so that joins may be routed."""
    ((_, syn_ack),) = server.segments_to_send(0.0)
    (offer,) = syn_ack.options
    assert isinstance(offer, MpCapable)
    third = MpCapable(
        offer.flags, sender_key=b"\x01" * 8, receiver_key=offer.sender_key
    )
    server.receive_segment(0, Segment(Flag.ACK, (third,)), 0.0)


def test_mp_capable_syn_creates_a_responder() -> None:
    table, tokens = endpoint()
    result = table.receive_first(SYN_G, 0.0)
    assert isinstance(result, Accepted) and result.subflow_id == 0
    assert len(table) == 1 and tokens.live == 1
    assert result.connection.mode is Mode.G
    assert not result.connection.is_initiator
    table.remove(result.connection)
    assert len(table) == 0 and tokens.live == 0
    table.remove(result.connection)  # a second remove is harmless


def test_first_segment_must_be_a_syn_with_an_mptcp_option() -> None:
    table, _ = endpoint()
    assert table.receive_first(Segment(Flag.RST), 0.0) == Refused(
        None, "first segment is a RST"
    )
    ack = Segment(Flag.ACK, (MpCapable(CapableFlag.G),))
    assert reset_reason(table.receive_first(ack, 0.0)) == 1
    assert reset_reason(table.receive_first(Segment(Flag.SYN), 0.0)) == 1
    assert len(table) == 0


def test_unsupported_versions_and_features_are_refused() -> None:
    table, _ = endpoint()
    v0 = Segment(Flag.SYN, (MpCapable(CapableFlag.G, version=0),))
    assert reset_reason(table.receive_first(v0, 0.0)) == 1
    checksum = Segment(Flag.SYN, (MpCapable(CapableFlag.G | CapableFlag.A),))
    assert reset_reason(table.receive_first(checksum, 0.0)) == 3
    assert reset_reason(table.receive_first(SYN_H, 0.0)) == 3


def test_g_is_preferred_when_both_modes_are_accepted() -> None:
    both = frozenset({Mode.G, Mode.RFC8684})
    table, _ = endpoint(ConnectionConfig(accept_modes=both))
    offer = Segment(Flag.SYN, (MpCapable(CapableFlag.G | CapableFlag.H),))
    result = table.receive_first(offer, 0.0)
    assert isinstance(result, Accepted) and result.connection.mode is Mode.G
    result = table.receive_first(SYN_H, 0.0)
    assert isinstance(result, Accepted)
    assert result.connection.mode is Mode.RFC8684


def test_rfc8684_keys_are_drawn_until_the_token_is_free() -> None:
    draws = [b"\x11" * 8, b"\x11" * 8, b"\x22" * 8]

    def source(count: int) -> bytes:
        return draws.pop(0) if draws else bytes(count)

    config = ConnectionConfig(accept_modes=frozenset({Mode.RFC8684}))
    table, tokens = endpoint(config, source)
    first = table.receive_first(SYN_H, 0.0)
    second = table.receive_first(SYN_H, 0.0)
    assert isinstance(first, Accepted) and isinstance(second, Accepted)
    assert first.connection.local_token == rfc8684_token(b"\x11" * 8)
    assert second.connection.local_token == rfc8684_token(b"\x22" * 8)
    assert tokens.live == 0  # RFC 8684 tokens come from keys


@pytest.mark.parametrize("mode", [Mode.G, Mode.E])
def test_a_worker_out_of_tokens_refuses_the_syn(mode: Mode) -> None:
    # past the last serial, allocate() raises; the SYN that asked for a
    # token is refused as lack of resources instead of raising into the
    # transport that read it
    layouts = {Mode.G: TokenLayout(), Mode.E: E_TOKEN_LAYOUT}
    spent = TokenAllocator(
        bytes(range(32)),
        layout=layouts[mode],
        start=1 << layouts[mode].serial_bits,
    )
    config = ConnectionConfig(accept_modes=frozenset({mode}))
    if mode is Mode.G:
        table = Endpoint(
            config, tokens=spent, random=seeded_bytes(random.Random(3))
        )
        offer = SYN_G
    else:
        table = Endpoint(
            config,
            tokens=TokenAllocator(bytes(range(32))),
            random=seeded_bytes(random.Random(3)),
            e_tokens=spent,
        )
        offer = Segment(Flag.SYN, (MpCapable(CapableFlag.E),), b"hi")
    result = table.receive_first(offer, 0.0)
    assert reset_reason(result) == ResetReason.LACK_OF_RESOURCES
    assert isinstance(result, Refused) and "no unique token" in result.reason
    assert len(table) == 0


def test_joins_are_routed_by_the_local_token() -> None:
    table, _ = endpoint()
    first = table.receive_first(SYN_G, 0.0)
    assert isinstance(first, Accepted)
    server = first.connection
    token = server.local_token
    assert token is not None
    join = Segment(Flag.SYN, (MpJoinSyn(token, nonce=7, address_id=1),))

    # before the MPTCP handshake is complete a join is held unanswered
    # (its SYN may have overtaken the third ACK on a faster path)
    held = table.receive_first(join, 0.0)
    assert isinstance(held, Accepted)
    assert held.connection is server and held.subflow_id == 1

    complete(server)
    assert server.install_keys(KEYS)
    # the keys release its SYN|ACK
    answers = [
        segment
        for subflow_id, segment in server.segments_to_send(0.0)
        if subflow_id == 1
    ]
    assert [answer.flags for answer in answers] == [Flag.SYN | Flag.ACK]
    assert isinstance(answers[0].options[0], MpJoinSynAck)
    routed = table.receive_first(join, 0.0)
    assert isinstance(routed, Accepted)
    assert routed.connection is server and routed.subflow_id == 2


def test_unknown_token_is_refused() -> None:
    table, _ = endpoint()
    join = Segment(Flag.SYN, (MpJoinSyn(b"\x99" * 8, 1, 0),))
    result = table.receive_first(join, 0.0)
    assert reset_reason(result) == ResetReason.MPTCP_ERROR
    assert "unknown token" in result.reason  # type: ignore[union-attr]


def test_cleartext_joins_are_refused_unless_allowed() -> None:
    config = ConnectionConfig(accept_modes=frozenset({Mode.RFC8684}))
    table, _ = endpoint(config)
    result = table.receive_first(SYN_H, 0.0)
    assert isinstance(result, Accepted)
    complete(result.connection)
    token = result.connection.local_token
    assert token is not None
    join = Segment(Flag.SYN, (MpJoinSyn(token, 1, 0),))
    assert reset_reason(table.receive_first(join, 0.0)) == 3
