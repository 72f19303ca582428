"""The userspace wire of docs/wire.md: preamble, frames, foreign peers."""

from __future__ import annotations

import dataclasses
import random
import struct
from ipaddress import IPv4Address
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptls.errors import (
    FramingError,
    NotMptlsPeerError,
    OptionError,
    ProtocolError,
)
from mptls.mptcp import framing
from mptls.mptcp.framing import (
    FIRST_OPTION_OFFSET,
    HEADER_LENGTH,
    MAX_OPTIONS_LENGTH,
    MAX_PAYLOAD,
    NOT_MPTLS_REPLY,
    PREAMBLE,
    Flag,
    Segment,
    SegmentDecoder,
    describe_foreign_bytes,
    encode_head,
    encode_segment,
)
from mptls.mptcp.options import (
    AddAddr,
    CapableFlag,
    Dss,
    MpCapable,
    MpJoinAck,
    MpJoinSyn,
    MpJoinSynAck,
    MpTcpRst,
    ResetReason,
    decode_options,
    encode_option,
)

deterministic = settings(derandomize=True, database=None, max_examples=200)

TOKEN_B = bytes.fromhex("a1a2a3a4a5a6a7a8")

# A TLS 1.2 fatal alert (unexpected_message), as a plain TLS server
# answers bytes it cannot parse.
TLS_ALERT = bytes.fromhex("1503030002020a")
# The start of a TLS ClientHello record.
CLIENT_HELLO_PREFIX = bytes.fromhex("16030100f8010000f40303") + bytes(21)
HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"


def data_segment(number: int, payload: bytes) -> Segment:
    dss = Dss(data_ack=number, dsn=number, ssn=1, data_length=len(payload))
    return Segment(Flag.ACK, (dss,), payload, window=65536)


def decode_all(decoder: SegmentDecoder, chunks: list[bytes]) -> list[Segment]:
    segments: list[Segment] = []
    for chunk in chunks:
        segments += decoder.feed(chunk)
    return segments


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    starts = [0, *cuts]
    ends = [*cuts, len(stream)]
    return [stream[a:b] for a, b in zip(starts, ends, strict=True)]


# constants and header


def test_constants_match_the_wire_document() -> None:
    assert PREAMBLE == b"MPTLS/1\n"
    assert NOT_MPTLS_REPLY == b"MPTLS/1 ERROR not an mptls client\n"
    assert HEADER_LENGTH == 8
    assert MAX_OPTIONS_LENGTH == 40
    assert MAX_PAYLOAD == 65535
    assert FIRST_OPTION_OFFSET == 16
    assert [int(flag) for flag in Flag] == [0x01, 0x02, 0x04, 0x08, 0x10]


def test_header_layout() -> None:
    segment = Segment(
        Flag.SYN | Flag.ACK,
        (MpCapable(CapableFlag.G, TOKEN_B),),
        b"hello",
        window=0x01020304,
    )
    frame = encode_segment(segment)
    assert frame[:8] == bytes((0x12, 12, 0, 5, 1, 2, 3, 4))
    assert frame[8:20] == bytes.fromhex("1e0c0102a1a2a3a4a5a6a7a8")
    assert frame[20:] == b"hello"


def test_empty_frame_is_eight_bytes() -> None:
    assert encode_segment(Segment(Flag.FIN)) == bytes((1, 0, 0, 0, 0, 0, 0, 0))


# the fixed offset a load balancer reads (docs/wire.md)


def test_join_token_sits_at_bytes_20_to_27() -> None:
    join = MpJoinSyn(TOKEN_B, nonce=0x0BADCAFE, address_id=4)
    stream = PREAMBLE + encode_segment(Segment(Flag.SYN, (join,), b"x"))
    assert stream[16] == 30
    assert stream[17] == 16
    assert stream[18] >> 4 == 0x1
    assert stream[20:28] == TOKEN_B
    assert stream[FIRST_OPTION_OFFSET] == 30


def test_first_mp_capable_sits_at_byte_16() -> None:
    capable = MpCapable(CapableFlag.G)
    stream = PREAMBLE + encode_segment(Segment(Flag.SYN, (capable,), b"hi"))
    assert stream[16:20] == bytes.fromhex("1e040102")
    assert stream[18] >> 4 == 0x0


# round trips


def test_handshake_and_join_segments_roundtrip() -> None:
    segments = [
        Segment(Flag.SYN, (MpCapable(CapableFlag.G),), b"client hello"),
        Segment(
            Flag.SYN | Flag.ACK,
            (MpCapable(CapableFlag.G, TOKEN_B),),
            b"server flight",
            window=1 << 20,
        ),
        Segment(Flag.SYN, (MpJoinSyn(TOKEN_B, 7, 1),)),
        Segment(Flag.SYN | Flag.ACK, (MpJoinSynAck(b"h" * 8, 9, 0),)),
        Segment(Flag.ACK, (MpJoinAck(b"a" * 20),)),
        Segment(Flag.RST, (MpTcpRst(ResetReason.MPTCP_ERROR),)),
        data_segment(5, b"payload"),
        Segment(Flag.FIN | Flag.ACK, (Dss(data_ack=9),)),
    ]
    stream = PREAMBLE + b"".join(map(encode_segment, segments))
    decoder = SegmentDecoder()
    assert decoder.feed(stream) == segments
    assert decoder.buffered == 0


def test_byte_at_a_time_feeding() -> None:
    segments = [data_segment(n, bytes([n]) * n) for n in range(40)]
    stream = PREAMBLE + b"".join(map(encode_segment, segments))
    decoder = SegmentDecoder()
    received = decode_all(
        decoder, [stream[i : i + 1] for i in range(len(stream))]
    )
    assert received == segments
    assert decoder.buffered == 0


def test_random_split_points() -> None:
    rng = random.Random(1234)
    segments = [
        data_segment(n, rng.randbytes(rng.randrange(0, 3000)))
        for n in range(200)
    ]
    stream = PREAMBLE + b"".join(map(encode_segment, segments))
    cuts = sorted(rng.sample(range(1, len(stream)), 300))
    assert decode_all(SegmentDecoder(), split(stream, cuts)) == segments


def test_big_read_with_many_frames_and_a_tail() -> None:
    segment = data_segment(1, b"z" * 16384)
    frame = encode_segment(segment)
    stream = PREAMBLE + frame * 300 + frame[:100]
    decoder = SegmentDecoder()
    assert decoder.feed(stream) == [segment] * 300
    assert decoder.buffered == 100
    assert decoder.feed(frame[100:] + frame) == [segment] * 2
    assert decoder.buffered == 0


def test_buffer_stays_below_one_frame() -> None:
    segment = data_segment(1, b"q" * MAX_PAYLOAD)
    frame = encode_segment(segment)
    decoder = SegmentDecoder(preamble=False)
    rng = random.Random(99)
    stream = frame * 8
    offset = 0
    while offset < len(stream):
        size = rng.randrange(1, 50000)
        decoder.feed(stream[offset : offset + size])
        offset += size
        assert decoder.buffered < len(frame)
    assert decoder.buffered == 0


def test_without_preamble() -> None:
    segment = data_segment(3, b"abc")
    decoder = SegmentDecoder(preamble=False)
    assert decoder.feed(encode_segment(segment)) == [segment]


def test_memoryview_and_bytearray_input() -> None:
    segment = data_segment(3, b"abc")
    stream = PREAMBLE + encode_segment(segment)
    assert SegmentDecoder().feed(memoryview(stream)) == [segment]  # type: ignore[arg-type]
    assert SegmentDecoder().feed(bytearray(stream)) == [segment]  # type: ignore[arg-type]


def test_payload_is_bytes_not_a_view() -> None:
    stream = bytearray(PREAMBLE + encode_segment(data_segment(1, b"keep")))
    (segment,) = SegmentDecoder().feed(stream)  # type: ignore[arg-type]
    stream[-4:] = b"gone"
    assert segment.payload == b"keep"
    assert type(segment.payload) is bytes


@st.composite
def segments(draw: st.DrawFn) -> Segment:
    flags = Flag(draw(st.integers(0, 0x1F)) & ~Flag.SYN)
    options = draw(
        st.sampled_from(
            [
                (),
                (Dss(data_ack=draw(st.integers(0, 2**64 - 1))),),
                (
                    Dss(data_ack=1),
                    AddAddr(1, IPv4Address("192.0.2.9"), echo=True),
                ),
            ]
        )
    )
    payload = draw(st.binary(max_size=300))
    window = draw(st.integers(0, 2**32 - 1))
    return Segment(flags, options, payload, window)


@deterministic
@given(st.lists(segments(), max_size=8), st.data())
def test_property_any_split_gives_the_same_segments(
    sent: list[Segment], data: st.DataObject
) -> None:
    stream = PREAMBLE + b"".join(map(encode_segment, sent))
    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    )
    decoder = SegmentDecoder()
    assert decode_all(decoder, split(stream, cuts)) == sent
    assert decoder.buffered == 0


# encode errors


@pytest.mark.parametrize(
    "segment",
    [
        Segment(Flag(0x20)),
        Segment(Flag.ACK, payload=b"x" * (MAX_PAYLOAD + 1)),
        Segment(Flag.ACK, window=2**32),
        Segment(Flag.ACK, window=-1),
        Segment(Flag.ACK, (Dss(data_ack=1, dsn=2, ssn=3, data_length=4),) * 2),
    ],
)
def test_encode_refuses_what_does_not_fit(segment: Segment) -> None:
    with pytest.raises(FramingError):
        encode_segment(segment)


def test_encode_reports_a_bad_option() -> None:
    with pytest.raises(OptionError):
        encode_segment(Segment(Flag.ACK, (Dss(data_ack=-1),)))


# a data frame's head in one struct: the same bytes and refusals as the
# generic codec


def head_outcome(segment: Segment) -> bytes | tuple[type, str]:
    """encode_head's bytes, or the type and message of its refusal."""
    try:
        return encode_head(segment)
    except ProtocolError as exc:
        return type(exc), str(exc)


def generic_head_outcome(segment: Segment) -> bytes | tuple[type, str]:
    with mock.patch.object(framing, "_encode_data_head", lambda *_: None):
        return head_outcome(segment)


class Seven:
    """Not an int, yet struct packs it as one."""

    def __index__(self) -> int:
        return 7


EDGE_INTS = [0, 1, 2**16 - 1, 2**16, 2**32 - 1, 2**32, 2**64 - 1, 2**64, -1]
ODD_VALUES = [None, True, 1.0, ResetReason.MPTCP_ERROR, Seven()]
field_values = st.one_of(
    st.sampled_from(EDGE_INTS + ODD_VALUES), st.integers(-1, 2**64)
)


@deterministic
@given(
    data_ack=field_values,
    dsn=field_values,
    ssn=field_values,
    data_length=field_values,
    window=field_values,
    wide=st.tuples(st.booleans(), st.booleans()),
    checksum=st.sampled_from([None, 0, 2**16]),
    data_fin=st.booleans(),
    flags=st.sampled_from(
        [Flag.ACK, Flag.ACK | Flag.FIN, Flag(0), 0x1F, 0x20]
    ),
    payload_length=st.sampled_from([0, 1, MAX_PAYLOAD, MAX_PAYLOAD + 1]),
)
def test_data_head_matches_the_generic_codec(
    data_ack: object,
    dsn: object,
    ssn: object,
    data_length: object,
    window: object,
    wide: tuple[bool, bool],
    checksum: int | None,
    data_fin: bool,
    flags: int,
    payload_length: int,
) -> None:
    dss = Dss(
        data_ack,  # type: ignore[arg-type]
        wide[0],
        dsn,  # type: ignore[arg-type]
        wide[1],
        ssn,  # type: ignore[arg-type]
        data_length,  # type: ignore[arg-type]
        checksum,
        data_fin,
    )
    segment = Segment(
        flags,  # type: ignore[arg-type]
        (dss,),
        bytes(payload_length),
        window,  # type: ignore[arg-type]
    )
    assert head_outcome(segment) == generic_head_outcome(segment)


@pytest.mark.parametrize("value", [*EDGE_INTS, *ODD_VALUES])
@pytest.mark.parametrize(
    "name", ["data_ack", "dsn", "ssn", "data_length", "checksum", "window"]
)
def test_one_odd_field_of_a_data_frame_is_judged_as_before(
    name: str, value: object
) -> None:
    # every other field fits: this one alone decides
    dss = Dss(1, True, 2, True, 3, 4, None, False)
    segment = Segment(Flag.ACK, (dss,), b"data", 5)
    if name == "window":
        segment = dataclasses.replace(segment, window=value)
    else:
        segment = dataclasses.replace(
            segment, options=(dataclasses.replace(dss, **{name: value}),)
        )
    assert head_outcome(segment) == generic_head_outcome(segment)


@pytest.mark.parametrize("fin", [False, True])
def test_a_data_frame_head_is_one_pack(fin: bool) -> None:
    dss = Dss(2**64 - 1, True, 0, True, 2**32 - 1, MAX_PAYLOAD, None, fin)
    segment = Segment(Flag.ACK, (dss,), bytes(MAX_PAYLOAD - fin), 2**32 - 1)
    head = framing._encode_data_head(int(Flag.ACK), dss, segment)
    assert head is not None
    assert head == generic_head_outcome(segment)
    (decoded,) = SegmentDecoder(preamble=False).feed(head + segment.payload)
    assert decoded == segment


def generic_decode(frame: bytes) -> list[Segment] | tuple[type, str]:
    try:
        return SegmentDecoder(preamble=False).feed(frame)
    except ProtocolError as exc:
        return type(exc), str(exc)


@deterministic
@given(
    kind=st.sampled_from([30, 29, 1]),
    length=st.sampled_from([26, 24, 27]),
    subtype=st.sampled_from([0x20, 0x2F, 0x30, 0x10, 0xA0]),
    dss_flags=st.sampled_from([0x0F, 0x1F, 0xEF, 0xFF, 0x0E, 0x07, 0x0B]),
    values=st.binary(min_size=22, max_size=22),
)
def test_data_dss_decodes_as_the_generic_decoder(
    kind: int, length: int, subtype: int, dss_flags: int, values: bytes
) -> None:
    options = bytes((kind, length, subtype, dss_flags)) + values
    frame = frame_bytes(0x10, options, b"payload")
    fast = generic_decode(frame)
    with mock.patch.object(framing, "_decode_data_dss", lambda *_: ()):
        assert fast == generic_decode(frame)
    if isinstance(fast, list):
        (segment,) = fast
        assert segment.options == decode_options(options, syn=False, ack=True)


def test_a_data_dss_is_decoded_by_one_unpack() -> None:
    dss = Dss(7, True, 8, True, 9, 3, None, True)
    options = bytearray(encode_option(dss))
    # the reserved bits (low nibble of byte 2, top of byte 3) are ignored
    options[2] |= 0x0F
    options[3] |= 0xE0
    assert framing._decode_data_dss(memoryview(options), 0) == (dss,)


# malformed frames


def frame_bytes(flags: int, options: bytes, payload: bytes = b"") -> bytes:
    header = struct.pack(">BBHI", flags, len(options), len(payload), 0)
    return header + options + payload


@pytest.mark.parametrize(
    ("frame", "error", "message"),
    [
        (frame_bytes(0x20, b""), FramingError, "flags"),
        (frame_bytes(0x80, b""), FramingError, "flags"),
        (bytes((0x10, 41, 0, 0, 0, 0, 0, 0)), FramingError, "41"),
        (frame_bytes(0x10, bytes.fromhex("0204 05b4")), FramingError, "2"),
        (frame_bytes(0x10, b"\x01\x08\x0a" + bytes(8)), FramingError, "8"),
        (frame_bytes(0x10, bytes.fromhex("1e042077")), OptionError, "DSS"),
        (frame_bytes(0x10, bytes.fromhex("1e0c2001")), OptionError, "12"),
        (frame_bytes(0x10, b"\x1e"), OptionError, "length byte"),
        (frame_bytes(0x10, b"\x01\x1e\x01"), OptionError, "length 1"),
    ],
)
def test_malformed_frames(
    frame: bytes, error: type[ProtocolError], message: str
) -> None:
    with pytest.raises(error, match=message):
        SegmentDecoder().feed(PREAMBLE + frame)
    # The same, a byte at a time: the error comes as soon as it can.
    decoder = SegmentDecoder()
    with pytest.raises(error, match=message):
        for index in range(len(PREAMBLE + frame)):
            decoder.feed((PREAMBLE + frame)[index : index + 1])


def test_bad_header_is_caught_before_its_body_arrives() -> None:
    decoder = SegmentDecoder()
    decoder.feed(PREAMBLE)
    with pytest.raises(FramingError):
        decoder.feed(bytes((0x10, 200, 0xFF, 0xFF, 0, 0, 0, 0)))


def test_mp_join_in_a_frame_is_decoded_by_the_frame_flags() -> None:
    option = bytes.fromhex("1e101002a1a2a3a4a5a6a7a800000007")
    (syn,) = SegmentDecoder(preamble=False).feed(frame_bytes(0x02, option))
    (syn_ack,) = SegmentDecoder(preamble=False).feed(frame_bytes(0x12, option))
    assert syn.options == (MpJoinSyn(TOKEN_B, 7, 2),)
    assert syn_ack.options == (MpJoinSynAck(TOKEN_B, 7, 2),)
    with pytest.raises(OptionError, match="MP_JOIN"):
        SegmentDecoder(preamble=False).feed(frame_bytes(0x10, option))


def test_nops_and_end_of_list_are_allowed() -> None:
    options = b"\x01\x01" + bytes.fromhex("1e082001 00000009") + b"\x00\x00"
    (segment,) = SegmentDecoder(preamble=False).feed(
        frame_bytes(0x10, options)
    )
    assert segment.options == (Dss(data_ack=9, data_ack_64=False),)


def test_decoder_stays_broken_after_an_error() -> None:
    decoder = SegmentDecoder()
    with pytest.raises(FramingError):
        decoder.feed(PREAMBLE + frame_bytes(0x40, b""))
    with pytest.raises(FramingError, match="already failed"):
        decoder.feed(encode_segment(Segment(Flag.ACK)))


# foreign peers


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (TLS_ALERT, "a TLS alert record (fatal alert 10, unexpected_message)"),
        (CLIENT_HELLO_PREFIX, "a TLS handshake record (plain TLS?)"),
        (HTTP_400, "an HTTP response: 'HTTP/1.1 400 Bad Request'"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "an HTTP request: 'GET /"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "an SSH banner: 'SSH-2.0-OpenSSH_9.2'"),
        (NOT_MPTLS_REPLY, "an mptls error reply: 'MPTLS/1 ERROR not an"),
        (b"MPTLS/2\n", "another mptls wire version: 'MPTLS/2'"),
    ],
)
def test_foreign_peer_is_named(sent: bytes, expected: str) -> None:
    assert describe_foreign_bytes(sent).startswith(expected)
    with pytest.raises(NotMptlsPeerError) as caught:
        SegmentDecoder().feed(sent)
    assert expected in str(caught.value)
    assert caught.value.reset_reason is None


def test_foreign_peer_fails_on_the_first_wrong_byte() -> None:
    decoder = SegmentDecoder()
    assert decoder.feed(b"MPT") == []
    assert decoder.buffered == 3
    with pytest.raises(NotMptlsPeerError, match="'MPTx'"):
        decoder.feed(b"x")
    with pytest.raises(NotMptlsPeerError):
        decoder.feed(b"LS/1\n")


def test_tls_alert_fed_a_byte_at_a_time_is_still_named() -> None:
    decoder = SegmentDecoder()
    with pytest.raises(NotMptlsPeerError, match="TLS alert record"):
        decoder.feed(TLS_ALERT[:1])


def test_descriptions_are_bounded_and_printable() -> None:
    samples = [
        b"",
        bytes(range(256)) * 40,
        b"A" * 100000,
        b"HTTP/1.1 200 " + b"x" * 5000,
        b"\x16\x03\x03",
        b"\x15\x03\x03\x00\x02\x09\x99",
        b"\xff\xfe",
    ]
    for sample in samples:
        text = describe_foreign_bytes(sample)
        assert len(text) <= 120, text
        assert text.isprintable(), text
    assert describe_foreign_bytes(b"") == "no bytes"
    assert describe_foreign_bytes(b"\xff\xfe") == "bytes ff fe"
    assert describe_foreign_bytes(b"hello\r\nworld") == "text: 'hello'"


def test_payload_views_lend_whole_frames_and_copy_a_split_one() -> None:
    frames = b"".join(
        encode_segment(Segment(Flag.ACK, payload=bytes([n]) * 100))
        for n in (1, 2)
    )
    buffer = bytearray(PREAMBLE + frames)
    decoder = SegmentDecoder()
    decoder.payload_views = True
    # the second frame's last byte comes in the next read
    first = decoder.feed(memoryview(buffer)[:-1])
    assert [type(s.payload) for s in first] == [memoryview]
    buffer[len(PREAMBLE) + 20] = 9  # the owner reuses its buffer
    assert first[0].payload[12] == 9
    (second,) = decoder.feed(memoryview(buffer)[-1:])
    assert second.payload == bytes([2]) * 100
    assert type(second.payload) is bytes


def test_payloads_are_copies_by_default() -> None:
    buffer = bytearray(encode_segment(Segment(Flag.ACK, payload=b"abc")))
    (segment,) = SegmentDecoder(preamble=False).feed(buffer)
    buffer[-1] = 0
    assert segment.payload == b"abc"


def test_an_empty_payload_is_bytes_even_with_views() -> None:
    decoder = SegmentDecoder(preamble=False)
    decoder.payload_views = True
    (segment,) = decoder.feed(encode_segment(Segment(Flag.ACK)))
    assert segment.payload == b"" and type(segment.payload) is bytes
