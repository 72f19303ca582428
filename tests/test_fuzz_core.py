"""Hostile frames against the decoder and a live connection (hypothesis).

Two properties, several thousand cases each:

- any byte stream after the preamble either decodes or raises the
  project's :class:`~mptls.errors.ProtocolError` (a framing or option
  error); the decoder never buffers more than one frame;
- any frame a peer can send to an established connection, on either
  end, with well-formed but hostile options (mappings anywhere, forged
  join ACKs, fast close, ADD_ADDR, NEW_KEY, resets) and any flags, in
  G mode or mode E, raises
  nothing, and leaves the connection's memory bounded: out-of-order data
  within the receive window and a bounded subflow table (addresses are
  keyed by their 8-bit id, so that table is bounded by construction).

The option codec's own properties live in tests/test_options.py and the
framing's in tests/test_framing.py.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memnet import MemNet, established

from mptls.errors import OptionError, ProtocolError
from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.framing import (
    MAX_OPTIONS_LENGTH,
    PREAMBLE,
    Segment,
    SegmentDecoder,
)
from mptls.mptcp.options import (
    AddAddr,
    Dss,
    MpCapable,
    MpFastclose,
    MpJoinAck,
    MpJoinSyn,
    MpPrio,
    MpTcpRst,
    NewKey,
    RemoveAddr,
    encode_option,
)

WINDOW = 64 * 1024
FRAME_HEADER = struct.Struct("!BBHI")

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
key_ids = st.integers(0, 1)

options = st.one_of(
    st.tuples(st.none() | u64, u64, st.integers(0, 2048), st.booleans()).map(
        lambda t: Dss(
            data_ack=t[0], dsn=t[1], ssn=1, data_length=t[2], data_fin=t[3]
        )
    ),
    st.builds(Dss, data_ack=u32, data_ack_64=st.just(False)),
    st.builds(MpJoinAck, hmac=st.binary(min_size=20, max_size=20)),
    st.builds(
        MpJoinSyn,
        token=st.binary(min_size=8, max_size=8)
        | st.binary(min_size=4, max_size=4),
        nonce=u32,
        address_id=st.integers(0, 255),
        key_id=key_ids,
    ),
    st.builds(
        MpFastclose, key=st.binary(min_size=8, max_size=8), key_id=key_ids
    ),
    st.builds(NewKey, key_id=key_ids, tag=st.binary(min_size=8, max_size=8)),
    st.builds(MpTcpRst, reason=st.integers(0, 255)),
    st.builds(MpPrio, backup=st.booleans()),
    st.builds(
        RemoveAddr,
        address_ids=st.lists(st.integers(0, 255), min_size=1, max_size=8).map(
            tuple
        ),
    ),
    st.builds(
        AddAddr,
        address_id=st.integers(0, 255),
        address=st.builds(IPv4Address, u32),
        port=st.none() | st.integers(1, 65535),
        hmac=st.binary(min_size=8, max_size=8),
        key_id=key_ids,
    ),
    st.builds(
        AddAddr,
        address_id=st.integers(0, 255),
        address=st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
        hmac=st.binary(min_size=8, max_size=8),
    ),
    st.builds(
        MpCapable,
        flags=st.sampled_from([0x01, 0x02, 0x81]),
        sender_key=st.binary(min_size=8, max_size=8),
        receiver_key=st.binary(min_size=8, max_size=8),
    ),
    st.builds(
        MpCapable,
        flags=st.just(0x08),
        sender_key=st.binary(min_size=4, max_size=4),
        receiver_key=st.binary(min_size=4, max_size=4),
    ),
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame with random flags, window and hostile options."""
    chosen = draw(st.lists(options, max_size=3))
    raw = b""
    for option in chosen:
        try:
            encoded = encode_option(option)
        except OptionError:
            continue
        if len(raw) + len(encoded) <= MAX_OPTIONS_LENGTH:
            raw += encoded
    payload = draw(st.binary(max_size=2048))
    # a Dss that maps payload must say how long it is: lengths that do
    # not match are part of the attack
    flags = draw(st.integers(0, 0x1F))
    window = draw(u32)
    return (
        FRAME_HEADER.pack(flags, len(raw), len(payload), window)
        + raw
        + payload
    )


@settings(max_examples=4000, deadline=None)
@given(st.binary(max_size=4096), st.integers(1, 64))
def test_any_bytes_decode_or_raise_a_protocol_error(
    data: bytes, step: int
) -> None:
    decoder = SegmentDecoder(preamble=True)
    stream = PREAMBLE + data
    try:
        for start in range(0, len(stream), step):
            decoder.feed(stream[start : start + step])
            # never more than one frame (header + 40 + 65,535) held
            assert decoder.buffered < 8 + 40 + 65536
    except ProtocolError:
        return


def _decoded(frame: bytes) -> list[Segment]:
    try:
        return SegmentDecoder(preamble=False).feed(frame)
    except ProtocolError:
        return []


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(frames(), min_size=1, max_size=12),
    st.booleans(),
    st.sampled_from([Mode.G, Mode.E]),
)
def test_hostile_frames_never_escape_or_grow_memory(
    batch: list[bytes], to_server: bool, mode: Mode
) -> None:
    config = ConnectionConfig(
        mode=mode, accept_modes=frozenset({mode}), receive_window=WINDOW
    )
    net = established(MemNet(client_config=config, server_config=config))
    target = net.server if to_server else net.client
    assert target is not None
    for frame in batch:
        for segment in _decoded(frame):
            target.receive_segment(0, segment, net.now)
            target.segments_to_send(net.now)
            while target.next_event() is not None:
                pass
        net.now += 0.01
        target.handle_timer(net.now)
    info = target.info()
    assert len(info.subflows) <= 17
    assert target.receive_buffered <= WINDOW
