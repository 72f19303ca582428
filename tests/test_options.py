"""The MPTCP option codec: layouts, state rules, errors and round trips."""

from __future__ import annotations

import contextlib
import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptls.errors import ConfigurationError, OptionError
from mptls.mptcp.options import (
    MPTCP_KIND,
    AddAddr,
    CapableFlag,
    Dss,
    MpCapable,
    MpFail,
    MpFastclose,
    MpJoinAck,
    MpJoinSyn,
    MpJoinSynAck,
    MpPrio,
    MpTcpRst,
    NewKey,
    Option,
    RemoveAddr,
    ResetReason,
    Subtype,
    UnknownMptcpOption,
    decode_options,
    encode_option,
    encode_options,
)

# Fixed seed and no example database: the same examples on every run.
deterministic = settings(derandomize=True, database=None, max_examples=300)

SYN = {"syn": True, "ack": False}
SYN_ACK = {"syn": True, "ack": True}
ACK = {"syn": False, "ack": True}
NEITHER = {"syn": False, "ack": False}
STATES = [SYN, SYN_ACK, ACK, NEITHER]

TOKEN_A = bytes(range(1, 9))
TOKEN_B = bytes(range(0xA1, 0xA9))


def roundtrip(option: Option, state: dict[str, bool]) -> bytes:
    wire = encode_option(option)
    assert wire[0] == MPTCP_KIND
    assert wire[1] == len(wire)
    assert decode_options(wire, **state) == (option,)
    return wire


# enums


def test_wire_values() -> None:
    assert MPTCP_KIND == 30
    assert [int(subtype) for subtype in Subtype] == [*range(10), 0xF]
    assert int(Subtype.NEW_KEY) == 0x9
    assert int(CapableFlag.A) == 0x80
    assert int(CapableFlag.E) == 0x08
    assert int(CapableFlag.G) == 0x02
    assert int(CapableFlag.H) == 0x01
    assert int(ResetReason.ADMINISTRATIVELY_PROHIBITED) == 3
    assert int(ResetReason.MIDDLEBOX_INTERFERENCE) == 6


# MP_CAPABLE (RFC 8684 3.1, G mode)


def test_mp_capable_forms_and_lengths() -> None:
    flags = CapableFlag.G
    assert len(roundtrip(MpCapable(flags), SYN)) == 4
    assert len(roundtrip(MpCapable(flags, TOKEN_B), SYN_ACK)) == 12
    assert len(roundtrip(MpCapable(flags, TOKEN_A, TOKEN_B), ACK)) == 20
    with_length = MpCapable(flags, TOKEN_A, TOKEN_B, data_length=517)
    assert roundtrip(with_length, ACK)[-2:] == b"\x02\x05"
    with_checksum = MpCapable(
        CapableFlag.A | flags, TOKEN_A, TOKEN_B, 517, 0xBEEF
    )
    assert roundtrip(with_checksum, ACK) == bytes.fromhex(
        "1e1801820102030405060708a1a2a3a4a5a6a7a80205beef"
    )


def test_mp_capable_carries_its_version() -> None:
    wire = roundtrip(MpCapable(CapableFlag.H, version=0), SYN)
    assert wire == bytes.fromhex("1e040001")


@pytest.mark.parametrize(
    ("length", "allowed"),
    [(4, [SYN]), (12, [SYN_ACK]), (20, [ACK]), (22, [ACK]), (24, [ACK])],
)
def test_mp_capable_length_must_fit_the_segment(
    length: int, allowed: list[dict[str, bool]]
) -> None:
    wire = bytes((30, length, 0x01, 0x02)) + bytes(length - 4)
    for state in STATES:
        if state in allowed:
            (option,) = decode_options(wire, **state)
            assert isinstance(option, MpCapable)
        else:
            with pytest.raises(OptionError, match="MP_CAPABLE"):
                decode_options(wire, **state)


@pytest.mark.parametrize("length", [3, 5, 8, 16, 21, 23, 25, 40])
def test_mp_capable_odd_lengths_are_errors(length: int) -> None:
    wire = bytes((30, length, 0x01)) + bytes(length - 3)
    for state in STATES:
        with pytest.raises(OptionError):
            decode_options(wire, **state)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (MpCapable(CapableFlag.G, version=16), "version"),
        (MpCapable(CapableFlag.G, b"short"), "sender key"),
        (MpCapable(CapableFlag.G, None, TOKEN_B), "needs a sender key"),
        (MpCapable(CapableFlag.G, TOKEN_A, None, 5), "needs both keys"),
        (MpCapable(CapableFlag.G, TOKEN_A, TOKEN_B, None, 1), "checksum"),
        (MpCapable(CapableFlag.G, TOKEN_A, TOKEN_B, 65536), "length"),
        (MpCapable(256), "flags"),  # type: ignore[arg-type]
    ],
)
def test_mp_capable_encode_checks(option: MpCapable, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        encode_option(option)


def test_keys_stay_out_of_reprs() -> None:
    key = b"\x5a" * 8
    texts = [
        repr(MpCapable(CapableFlag.H, key, key, 10)),
        repr(MpFastclose(key)),
    ]
    for text in texts:
        assert "Z" not in text
        assert "5a5a" not in text
        assert "\\x5a" not in text


# MP_JOIN: by segment state, never by length alone (RFC 8684 3.2)


def test_join_syn_with_a_64_bit_token_is_16_bytes() -> None:
    option = MpJoinSyn(TOKEN_B, nonce=0xDEADBEEF, address_id=3, backup=True)
    wire = roundtrip(option, SYN)
    assert wire == bytes.fromhex("1e101103a1a2a3a4a5a6a7a8deadbeef")


def test_join_syn_with_a_32_bit_token_is_12_bytes() -> None:
    option = MpJoinSyn(b"\x8d\x8b\xaf\x4d", nonce=0x7C9685D5, address_id=1)
    assert roundtrip(option, SYN) == bytes.fromhex("1e0c10018d8baf4d7c9685d5")


def test_sixteen_bytes_are_decoded_by_the_flags() -> None:
    wire = bytes.fromhex("1e101002a1a2a3a4a5a6a7a800000007")
    (on_syn,) = decode_options(wire, **SYN)
    (on_syn_ack,) = decode_options(wire, **SYN_ACK)
    assert on_syn == MpJoinSyn(TOKEN_B, 7, 2)
    assert on_syn_ack == MpJoinSynAck(TOKEN_B, 7, 2)
    for state in (ACK, NEITHER):
        with pytest.raises(OptionError, match="MP_JOIN"):
            decode_options(wire, **state)


def test_join_syn_ack_and_ack() -> None:
    syn_ack = MpJoinSynAck(b"\xac" * 8, nonce=0x376288F1, address_id=0)
    assert roundtrip(syn_ack, SYN_ACK)[:4] == bytes.fromhex("1e101000")
    ack = MpJoinAck(bytes(range(20)))
    assert roundtrip(ack, ACK)[:4] == bytes.fromhex("1e181000")


@pytest.mark.parametrize(
    ("length", "state"),
    [(12, SYN_ACK), (12, ACK), (24, SYN), (24, SYN_ACK), (20, ACK)],
)
def test_join_length_wrong_for_the_state(
    length: int, state: dict[str, bool]
) -> None:
    wire = bytes((30, length, 0x10, 0)) + bytes(length - 4)
    with pytest.raises(OptionError, match="MP_JOIN"):
        decode_options(wire, **state)


@pytest.mark.parametrize(
    "option",
    [
        MpJoinSyn(b"123456", 1, 1),
        MpJoinSyn(TOKEN_B, 2**32, 1),
        MpJoinSyn(TOKEN_B, 1, 256),
        MpJoinSynAck(b"1234", 1, 1),
        MpJoinAck(bytes(32)),
    ],
)
def test_join_encode_checks(option: Option) -> None:
    with pytest.raises(OptionError):
        encode_option(option)


# DSS (RFC 8684 3.3)


def test_dss_data_ack_only() -> None:
    assert roundtrip(Dss(data_ack=2**40), ACK) == bytes.fromhex(
        "1e0c20030000010000000000"
    )
    assert roundtrip(Dss(data_ack=7, data_ack_64=False), ACK) == bytes(
        (30, 8, 0x20, 0x01, 0, 0, 0, 7)
    )


def test_dss_full_mapping_with_checksum_is_28_bytes() -> None:
    option = Dss(
        data_ack=1,
        dsn=2**63,
        ssn=0xFFFFFFFF,
        data_length=65535,
        checksum=0x1234,
        data_fin=True,
    )
    wire = roundtrip(option, ACK)
    assert len(wire) == 28
    assert wire[3] == 0x1F


def test_dss_data_fin_without_payload() -> None:
    option = Dss(data_ack=5, dsn=9, ssn=0, data_length=1, data_fin=True)
    wire = roundtrip(option, ACK)
    assert wire[:4] == bytes.fromhex("1e1a201f")


def test_dss_lengths_follow_the_flags() -> None:
    for flags in range(32):
        valid = []
        for length in range(4, 41):
            wire = bytes((30, length, 0x20, flags)) + bytes(length - 4)
            try:
                (option,) = decode_options(wire, **ACK)
            except OptionError:
                continue
            valid.append(length)
            assert isinstance(option, Dss)
            assert option.data_fin == bool(flags & 0x10)
        ack_size = (8 if flags & 0x02 else 4) if flags & 0x01 else 0
        map_size = (14 if flags & 0x08 else 10) if flags & 0x04 else 0
        expected = [4 + ack_size + map_size]
        if flags & 0x04:
            expected.append(expected[0] + 2)
        assert valid == expected, flags


@pytest.mark.parametrize(
    "option",
    [
        Dss(data_ack=2**32, data_ack_64=False),
        Dss(data_ack=2**64),
        Dss(data_ack=-1),
        Dss(dsn=2**32, dsn_64=False, ssn=1, data_length=1),
        Dss(dsn=1, ssn=2**32, data_length=1),
        Dss(dsn=1, ssn=1, data_length=65536),
        Dss(dsn=1, ssn=1),
        Dss(dsn=1, data_length=1),
        Dss(ssn=1, data_length=1),
        Dss(checksum=1),
        Dss(dsn=1, ssn=1, data_length=1, checksum=65536),
    ],
)
def test_dss_encode_refuses_what_does_not_fit(option: Dss) -> None:
    with pytest.raises(OptionError):
        encode_option(option)


def test_dss_width_bits_without_their_field_keep_the_default() -> None:
    # a and m set but A and M clear: a non-canonical capture.
    (option,) = decode_options(bytes((30, 4, 0x20, 0x0A)), **ACK)
    assert option == Dss()
    assert encode_option(option) == bytes((30, 4, 0x20, 0x00))


# ADD_ADDR (RFC 8684 3.4.1)


@pytest.mark.parametrize(
    ("option", "length"),
    [
        (AddAddr(1, IPv4Address("192.0.2.1"), None, b"h" * 8), 16),
        (AddAddr(1, IPv4Address("192.0.2.1"), 443, b"h" * 8), 18),
        (AddAddr(1, IPv4Address("192.0.2.1"), echo=True), 8),
        (AddAddr(1, IPv4Address("192.0.2.1"), 443, echo=True), 10),
        (AddAddr(9, IPv6Address("2001:db8::1"), None, b"h" * 8), 28),
        (AddAddr(9, IPv6Address("2001:db8::1"), 0, b"h" * 8), 30),
        (AddAddr(9, IPv6Address("2001:db8::1"), echo=True), 20),
        (AddAddr(9, IPv6Address("2001:db8::1"), 80, echo=True), 22),
    ],
)
def test_add_addr_lengths(option: AddAddr, length: int) -> None:
    assert len(roundtrip(option, ACK)) == length


@pytest.mark.parametrize(
    ("echo", "length"),
    [(False, 8), (False, 10), (False, 20), (True, 16), (True, 28), (1, 12)],
)
def test_add_addr_length_must_match_the_echo_bit(
    echo: bool, length: int
) -> None:
    wire = bytes((30, length, 0x30 | int(echo), 1)) + bytes(length - 4)
    with pytest.raises(OptionError, match="ADD_ADDR"):
        decode_options(wire, **ACK)


@pytest.mark.parametrize(
    "option",
    [
        AddAddr(1, IPv4Address("192.0.2.1")),
        AddAddr(1, IPv4Address("192.0.2.1"), None, b"h" * 8, echo=True),
        AddAddr(1, IPv4Address("192.0.2.1"), None, b"h" * 7),
        AddAddr(256, IPv4Address("192.0.2.1"), echo=True),
        AddAddr(1, IPv4Address("192.0.2.1"), 65536, echo=True),
        AddAddr(1, "192.0.2.1", echo=True),  # type: ignore[arg-type]
    ],
)
def test_add_addr_encode_checks(option: AddAddr) -> None:
    with pytest.raises(OptionError):
        encode_option(option)


# REMOVE_ADDR, MP_PRIO, MP_FAIL, MP_FASTCLOSE, MP_TCPRST


def test_small_options() -> None:
    assert roundtrip(RemoveAddr((1, 2, 255)), ACK) == bytes.fromhex(
        "1e06400102ff"
    )
    assert roundtrip(MpPrio(True), ACK) == bytes.fromhex("1e0351")
    assert roundtrip(MpPrio(False), ACK) == bytes.fromhex("1e0350")
    assert roundtrip(MpFail(2**64 - 1), ACK) == bytes.fromhex(
        "1e0c6000ffffffffffffffff"
    )
    assert roundtrip(MpFastclose(TOKEN_A), ACK) == bytes.fromhex(
        "1e0c70000102030405060708"
    )
    reset = MpTcpRst(ResetReason.ADMINISTRATIVELY_PROHIBITED, transient=True)
    assert roundtrip(reset, {"syn": False, "ack": True}) == bytes.fromhex(
        "1e048103"
    )
    assert roundtrip(MpTcpRst(0x42, flags=0b101), ACK) == bytes.fromhex(
        "1e048a42"
    )


def test_tcprst_reason_is_an_enum_when_known() -> None:
    (known,) = decode_options(bytes.fromhex("1e048001"), **ACK)
    (unknown,) = decode_options(bytes.fromhex("1e048077"), **ACK)
    assert isinstance(known, MpTcpRst)
    assert known.reason is ResetReason.MPTCP_ERROR
    assert isinstance(unknown, MpTcpRst)
    assert unknown.reason == 0x77


@pytest.mark.parametrize(
    "hex_wire",
    [
        "1e0340",  # REMOVE_ADDR without an id
        "1e045100",  # MP_PRIO with RFC 6824's address id
        "1e0b6000ffffffffffffff",  # MP_FAIL one byte short
        "1e0d7000000000000000000000",  # MP_FASTCLOSE one byte long
        "1e058000ff",  # MP_TCPRST one byte long
    ],
)
def test_small_option_length_errors(hex_wire: str) -> None:
    with pytest.raises(OptionError):
        decode_options(bytes.fromhex(hex_wire), **ACK)


@pytest.mark.parametrize(
    "option",
    [
        RemoveAddr(()),
        RemoveAddr((256,)),
        RemoveAddr(tuple(range(253))),
        MpFail(2**64),
        MpFastclose(b"1234"),
        MpTcpRst(256),
        MpTcpRst(1, flags=8),
    ],
)
def test_small_option_encode_checks(option: Option) -> None:
    with pytest.raises(OptionError):
        encode_option(option)


# E mode (draft-baerts-tcpm-mptcpext): 32-bit tokens, K bits, NEW_KEY

TOKEN_A4 = bytes.fromhex("01020304")
TOKEN_B4 = bytes.fromhex("a1a2a3a4")
TAG = bytes.fromhex("0011223344556677")
E = CapableFlag.E


def test_e_mode_mp_capable_forms_and_lengths() -> None:
    head = struct.Struct(">BBBB")  # kind, length, subtype|version, flags
    assert roundtrip(MpCapable(E), SYN) == head.pack(30, 4, 0x01, 0x08)
    assert roundtrip(MpCapable(E, TOKEN_B4), SYN_ACK) == (
        head.pack(30, 8, 0x01, 0x08) + TOKEN_B4
    )
    assert roundtrip(MpCapable(E, TOKEN_A4, TOKEN_B4), ACK) == (
        head.pack(30, 12, 0x01, 0x08) + TOKEN_A4 + TOKEN_B4
    )
    with_length = MpCapable(E, TOKEN_A4, TOKEN_B4, data_length=517)
    assert roundtrip(with_length, ACK) == (
        head.pack(30, 14, 0x01, 0x08) + TOKEN_A4 + TOKEN_B4 + b"\x02\x05"
    )
    with_checksum = MpCapable(
        CapableFlag.A | E, TOKEN_A4, TOKEN_B4, 517, 0xBEEF
    )
    assert roundtrip(with_checksum, ACK) == bytes.fromhex(
        "1e10018801020304a1a2a3a40205beef"
    )


@pytest.mark.parametrize(
    ("length", "allowed"),
    [(4, [SYN]), (8, [SYN_ACK]), (12, [ACK]), (14, [ACK]), (16, [ACK])],
)
def test_e_mode_mp_capable_length_must_fit_the_segment(
    length: int, allowed: list[dict[str, bool]]
) -> None:
    wire = bytes((30, length, 0x01, 0x08)) + bytes(range(length - 4))
    for state in STATES:
        if state in allowed:
            (option,) = decode_options(wire, **state)
            assert isinstance(option, MpCapable)
            assert encode_option(option) == wire
        else:
            with pytest.raises(OptionError, match="MP_CAPABLE"):
                decode_options(wire, **state)


def test_the_e_bit_picks_the_field_size() -> None:
    fields = bytes(range(1, 9))
    # Twelve bytes: both E tokens on a third ACK, one 8-byte field on a
    # SYN/ACK, and never the other way round.
    with_e = bytes((30, 12, 0x01, 0x08)) + fields
    without_e = bytes((30, 12, 0x01, 0x02)) + fields
    assert decode_options(with_e, **ACK) == (
        MpCapable(E, fields[:4], fields[4:]),
    )
    assert decode_options(without_e, **SYN_ACK) == (
        MpCapable(CapableFlag.G, fields),
    )
    with pytest.raises(OptionError, match="with flag E"):
        decode_options(with_e, **SYN_ACK)
    with pytest.raises(OptionError, match="MP_CAPABLE"):
        decode_options(without_e, **ACK)
    # E wins over G and H set beside it: the size follows the E bit.
    mixed = bytes((30, 8, 0x01, 0x0B)) + fields[:4]
    (option,) = decode_options(mixed, **SYN_ACK)
    assert isinstance(option, MpCapable)
    assert option.sender_key == fields[:4]
    # RFC 8684 lengths under E are errors.
    for length, state in ((12, SYN_ACK), (20, ACK), (22, ACK), (24, ACK)):
        wire = bytes((30, length, 0x01, 0x08)) + bytes(length - 4)
        with pytest.raises(OptionError, match="with flag E"):
            decode_options(wire, **state)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (MpCapable(E, TOKEN_B), "sender key under flag E must be 4"),
        (MpCapable(E, TOKEN_A4, TOKEN_B), "receiver key under flag E"),
        (MpCapable(CapableFlag.G, TOKEN_B4), "sender key must be 8"),
        (MpCapable(CapableFlag.H, TOKEN_A, TOKEN_B4), "receiver key must"),
        (MpCapable(E, None, TOKEN_B4), "needs a sender key"),
        (MpCapable(E, TOKEN_A4, None, 5), "needs both keys"),
        (MpCapable(E, TOKEN_A4, TOKEN_B4, None, 1), "checksum"),
    ],
)
def test_e_mode_mp_capable_encode_checks(
    option: MpCapable, message: str
) -> None:
    with pytest.raises(OptionError, match=message):
        encode_option(option)


def test_mp_capable_hostile_flags_and_lengths() -> None:
    # Every flags byte at every length a TCP header can hold: an
    # OptionError or an option that re-encodes to the same bytes.
    for flags in range(256):
        for length in range(3, 41):
            body = bytes((flags,)) + bytes(range(length - 4))
            wire = bytes((30, length, 0x01)) + body[: length - 3]
            for state in STATES:
                try:
                    (option,) = decode_options(wire, **state)
                except OptionError:
                    continue
                assert encode_option(option) == wire


def test_join_key_id_is_bit_0x02_of_byte_2() -> None:
    syn_layout = struct.Struct(">BBBB4sI")
    syn = MpJoinSyn(TOKEN_B4, 0xDEADBEEF, 3, backup=True, key_id=1)
    assert roundtrip(syn, SYN) == syn_layout.pack(
        30, 12, 0x10 | 1 << 1 | 1, 3, TOKEN_B4, 0xDEADBEEF
    )
    long_syn = MpJoinSyn(TOKEN_B, 7, 2, key_id=1)
    assert roundtrip(long_syn, SYN)[:4] == bytes.fromhex("1e101202")
    syn_ack_layout = struct.Struct(">BBBB8sI")
    syn_ack = MpJoinSynAck(TAG, 0x376288F1, 0, key_id=1)
    assert roundtrip(syn_ack, SYN_ACK) == syn_ack_layout.pack(
        30, 16, 0x10 | 1 << 1, 0, TAG, 0x376288F1
    )
    # key_id 0 is what the option always sent.
    assert encode_option(MpJoinSyn(TOKEN_B4, 1, 1, key_id=0)) == (
        encode_option(MpJoinSyn(TOKEN_B4, 1, 1))
    )


def test_join_decoders_read_k_and_b_from_any_byte_2() -> None:
    for low in range(16):
        syn = bytes((30, 12, 0x10 | low, 5)) + TOKEN_B4 + bytes(4)
        long_syn = bytes((30, 16, 0x10 | low, 5)) + TOKEN_B + bytes(4)
        for wire, state in ((syn, SYN), (long_syn, SYN), (long_syn, SYN_ACK)):
            (option,) = decode_options(wire, **state)
            assert isinstance(option, MpJoinSyn | MpJoinSynAck)
            assert option.key_id == (low >> 1) & 1
            assert option.backup == bool(low & 1)
            # the reserved bits (0x0c) are not kept
            assert encode_option(option)[2] == 0x10 | (low & 0x03)


def test_add_addr_key_id_is_bit_0x02_of_byte_2() -> None:
    address = IPv4Address("192.0.2.1")
    signed = AddAddr(1, address, 443, TAG, key_id=1)
    assert roundtrip(signed, ACK) == (
        bytes((30, 18, 0x30 | 1 << 1, 1))
        + address.packed
        + struct.pack(">H", 443)
        + TAG
    )
    echoed = AddAddr(1, address, echo=True, key_id=1)
    assert roundtrip(echoed, ACK)[:4] == bytes((30, 8, 0x33, 1))
    for low in range(16):
        wire = bytes((30, 16, 0x30 | low, 1)) + address.packed + TAG
        if low & 1:
            continue  # E=1 at length 16 is malformed (tested above)
        (option,) = decode_options(wire, **ACK)
        assert isinstance(option, AddAddr)
        assert option.key_id == (low >> 1) & 1


def test_fastclose_key_id_is_bit_0x01_of_byte_2() -> None:
    assert roundtrip(MpFastclose(TAG, key_id=1), ACK) == (
        bytes.fromhex("1e0c7100") + TAG
    )
    assert roundtrip(MpFastclose(TAG, key_id=0), ACK) == (
        bytes.fromhex("1e0c7000") + TAG
    )
    # reserved bits and byte 3 are read past, not kept
    (option,) = decode_options(bytes.fromhex("1e0c7fff") + TAG, **ACK)
    assert option == MpFastclose(TAG, key_id=1)


def test_new_key_layout() -> None:
    for key_id in (0, 1):
        option = NewKey(key_id, TAG)
        expected = struct.pack(">BBBB8s", 30, 12, 0x9 << 4 | key_id, 0, TAG)
        for state in STATES:
            assert roundtrip(option, state) == expected
    (option,) = decode_options(bytes.fromhex("1e0c9eff") + TAG, **ACK)
    assert option == NewKey(0, TAG)
    assert encode_option(option) == bytes.fromhex("1e0c9000") + TAG


@pytest.mark.parametrize("length", [3, 4, 11, 13, 20, 40])
def test_new_key_of_another_length_is_malformed(length: int) -> None:
    wire = bytes((30, length, 0x91)) + bytes(length - 3)
    for state in STATES:
        with pytest.raises(OptionError, match=f"NEW_KEY of length {length}"):
            decode_options(wire, **state)


@pytest.mark.parametrize("tag", [b"", TAG[:7], TAG + b"\x00", "0" * 8, None])
def test_new_key_encode_checks_the_tag(tag: object) -> None:
    with pytest.raises(OptionError, match="NEW_KEY tag"):
        encode_option(NewKey(0, tag))  # type: ignore[arg-type]


def test_new_key_tag_stays_out_of_the_repr() -> None:
    text = repr(NewKey(1, b"\x5a" * 8))
    assert "key_id=1" in text
    assert "Z" not in text
    assert "5a" not in text
    assert "tag" not in text


KEY_ID_OPTIONS = [
    lambda key_id: MpJoinSyn(TOKEN_B4, 1, 1, key_id=key_id),
    lambda key_id: MpJoinSynAck(TAG, 1, 1, key_id=key_id),
    lambda key_id: AddAddr(
        1, IPv4Address("192.0.2.1"), None, TAG, False, key_id
    ),
    lambda key_id: MpFastclose(TAG, key_id=key_id),
    lambda key_id: NewKey(key_id, TAG),
]


@pytest.mark.parametrize("build", KEY_ID_OPTIONS)
# 10**5000 has more digits than Python turns into a string
@pytest.mark.parametrize(
    "key_id",
    [
        2,
        -1,
        255,
        pytest.param(10**5000, id="10**5000"),
        True,
        False,
        "1",
        1.0,
        None,
    ],
)
def test_bad_key_ids_are_refused_when_built(build: Any, key_id: Any) -> None:
    with pytest.raises(ConfigurationError, match="key id must be") as caught:
        build(key_id)
    # also an OptionError, like every other field the codec refuses
    assert isinstance(caught.value, OptionError)


@pytest.mark.parametrize("build", KEY_ID_OPTIONS)
@pytest.mark.parametrize("key_id", [2, True])
def test_bad_key_ids_are_refused_when_encoded(build: Any, key_id: Any) -> None:
    option = build(0)
    object.__setattr__(option, "key_id", key_id)  # past the build check
    with pytest.raises(OptionError, match="key id must be") as caught:
        encode_option(option)
    assert isinstance(caught.value, ConfigurationError)


# unassigned and experimental subtypes


def test_unknown_subtypes_are_kept_byte_for_byte() -> None:
    unassigned = bytes.fromhex("1e0ca100") + bytes(range(8))
    (option,) = decode_options(unassigned, **ACK)
    assert option == UnknownMptcpOption(0xA, unassigned[2:])
    assert encode_option(option) == unassigned
    experimental = bytes.fromhex("1e03f7")
    (option,) = decode_options(experimental, **SYN)
    assert option == UnknownMptcpOption(0xF, b"\xf7")
    assert encode_option(option) == experimental


@pytest.mark.parametrize(
    "option",
    [
        UnknownMptcpOption(0x2, b"\x20"),  # DSS has its own class
        UnknownMptcpOption(0x9, b"\x91\x00" + bytes(8)),  # NEW_KEY has too
        UnknownMptcpOption(0xA, b""),
        UnknownMptcpOption(0xA, b"\xb0"),  # subtype nibble disagrees
        UnknownMptcpOption(0x10, b"\x00"),
        UnknownMptcpOption(0xA, b"\xa0" * 254),
    ],
)
def test_unknown_encode_checks(option: UnknownMptcpOption) -> None:
    with pytest.raises(OptionError):
        encode_option(option)


def test_encode_refuses_what_is_not_an_option() -> None:
    with pytest.raises(OptionError, match="not an MPTCP option"):
        encode_option(b"\x1e\x03\x50")  # type: ignore[arg-type]


# walking a TCP option list

# Option lists of a Linux 6.18 kernel's MPTCP connection over loopback
# (RFC 8684 mode): MSS, SACK-permitted, timestamps, NOPs, window scale
# and MPTCP, as they were on the wire.
KERNEL_SYN = bytes.fromhex("0204ffd70402080a160fb33b000000000103030a1e040101")
KERNEL_THIRD_ACK_WITH_DATA = bytes.fromhex(
    "0101080a160fb33be937194e1e160101ceac9086177dd4f1763e81010c95706500040101"
)
KERNEL_DSS = bytes.fromhex(
    "0101080ae937194e160fb33b"
    "1e1a200f2de4f035c8517c823cfff8b411e01bc7000000010009"
    "0101"
)
KERNEL_JOIN_SYN_ACK = bytes.fromhex(
    "0204ffd70402080a8ea160918ff894a00103030a1e101000ac7b80229c8d8eaa376288f1"
)
KERNEL_ADD_ADDR = bytes.fromhex(
    "0101080aaf613872ed8045b41e1030027f0000039260dbd231decacc"
)


def test_kernel_option_lists_decode() -> None:
    assert decode_options(KERNEL_SYN, **SYN) == (MpCapable(CapableFlag.H),)
    (capable,) = decode_options(KERNEL_THIRD_ACK_WITH_DATA, **ACK)
    assert capable == MpCapable(
        CapableFlag.H,
        bytes.fromhex("ceac9086177dd4f1"),
        bytes.fromhex("763e81010c957065"),
        data_length=4,
    )
    (dss,) = decode_options(KERNEL_DSS, **ACK)
    assert dss == Dss(
        data_ack=0x2DE4F035C8517C82,
        dsn=0x3CFFF8B411E01BC7,
        ssn=1,
        data_length=9,
    )
    (join,) = decode_options(KERNEL_JOIN_SYN_ACK, **SYN_ACK)
    assert join == MpJoinSynAck(
        bytes.fromhex("ac7b80229c8d8eaa"), 0x376288F1, 0
    )
    (add_addr,) = decode_options(KERNEL_ADD_ADDR, **ACK)
    assert add_addr == AddAddr(
        2, IPv4Address("127.0.0.3"), None, bytes.fromhex("9260dbd231decacc")
    )


@pytest.mark.parametrize(
    ("wire", "state"),
    [
        (KERNEL_SYN, SYN),
        (KERNEL_THIRD_ACK_WITH_DATA, ACK),
        (KERNEL_DSS, ACK),
        (KERNEL_JOIN_SYN_ACK, SYN_ACK),
        (KERNEL_ADD_ADDR, ACK),
    ],
)
def test_kernel_options_reencode_byte_exact(
    wire: bytes, state: dict[str, bool]
) -> None:
    (option,) = decode_options(wire, **state)
    assert encode_option(option) == mptcp_option_bytes(wire)


def mptcp_option_bytes(wire: bytes) -> bytes:
    """The one kind-30 option in a TCP option list, walked by hand."""
    index = 0
    while wire[index] != MPTCP_KIND:
        index += 1 if wire[index] == 1 else wire[index + 1]
    return wire[index : index + wire[index + 1]]


def test_end_of_list_stops_the_walk() -> None:
    wire = encode_option(MpPrio(True)) + b"\x00" + b"\x1e\x02garbage"
    assert decode_options(wire, **ACK) == (MpPrio(True),)


def test_memoryview_input() -> None:
    wire = b"\x01\x01" + encode_option(Dss(data_ack=3))
    assert decode_options(memoryview(wire), **ACK) == (Dss(data_ack=3),)


def test_several_options_in_order() -> None:
    options: list[Option] = [Dss(data_ack=1), MpPrio(False), MpFail(3)]
    wire = encode_options(options)
    assert decode_options(wire, **ACK) == tuple(options)
    assert encode_options([]) == b""


@pytest.mark.parametrize(
    ("hex_wire", "message"),
    [
        ("02", "no length byte"),
        ("0101 1e", "no length byte"),
        ("0201", "length 1"),
        ("0200", "length 0"),
        ("080a0000", "length 10"),
        ("1e0c2003000000", "length 12"),
        ("1e02", "too short for a subtype"),
    ],
)
def test_truncated_lists(hex_wire: str, message: str) -> None:
    wire = bytes.fromhex(hex_wire.replace(" ", ""))
    with pytest.raises(OptionError, match=message):
        decode_options(wire, **ACK)


# properties


@st.composite
def options_with_state(draw: st.DrawFn) -> tuple[Option, dict[str, bool]]:
    u8 = st.integers(0, 255)
    u16 = st.integers(0, 0xFFFF)
    u32 = st.integers(0, 0xFFFFFFFF)
    u64 = st.integers(0, 2**64 - 1)
    key = st.binary(min_size=8, max_size=8)
    key_id = st.integers(0, 1)
    kind = draw(st.sampled_from(range(15)))
    if kind == 0:
        flags = CapableFlag(draw(u8))
        version = draw(st.integers(0, 15))
        form = draw(st.integers(0, 4))
        # flag E: 4-byte tokens where the others have 8-byte fields
        size = 4 if flags & CapableFlag.E else 8
        fields = st.binary(min_size=size, max_size=size)
        keys = [draw(fields) if form >= 1 else None]
        keys.append(draw(fields) if form >= 2 else None)
        data_length = draw(u16) if form >= 3 else None
        checksum = draw(u16) if form >= 4 else None
        state = [SYN, SYN_ACK, ACK, ACK, ACK][form]
        return MpCapable(flags, *keys, data_length, checksum, version), state
    if kind == 1:
        token = draw(st.binary(min_size=4, max_size=4) | key)
        join = MpJoinSyn(
            token, draw(u32), draw(u8), draw(st.booleans()), draw(key_id)
        )
        return join, SYN
    if kind == 2:
        option = MpJoinSynAck(
            draw(key), draw(u32), draw(u8), draw(st.booleans()), draw(key_id)
        )
        return option, SYN_ACK
    if kind == 3:
        return MpJoinAck(draw(st.binary(min_size=20, max_size=20))), ACK
    if kind in (4, 5, 6):
        return draw(dss_options()), ACK
    if kind == 7:
        return draw(add_addr_options()), ACK
    if kind == 8:
        ids = draw(st.lists(u8, min_size=1, max_size=36))
        return RemoveAddr(tuple(ids)), ACK
    if kind == 9:
        return MpPrio(draw(st.booleans())), ACK
    if kind == 10:
        return MpFail(draw(u64)), ACK
    if kind == 11:
        return MpFastclose(draw(key), draw(key_id)), ACK
    if kind == 12:
        reset = MpTcpRst(
            draw(u8), draw(st.booleans()), draw(st.integers(0, 7))
        )
        return reset, ACK
    if kind == 13:
        return NewKey(draw(key_id), draw(key)), ACK
    subtype = draw(st.sampled_from([10, 11, 12, 13, 14, 15]))
    low = draw(st.integers(0, 15))
    rest = draw(st.binary(max_size=20))
    return UnknownMptcpOption(subtype, bytes((subtype << 4 | low,)) + rest), (
        draw(st.sampled_from(STATES))
    )


@st.composite
def dss_options(draw: st.DrawFn) -> Dss:
    data_ack = data_ack_64 = None
    if draw(st.booleans()):
        data_ack_64 = draw(st.booleans())
        data_ack = draw(st.integers(0, 2 ** (64 if data_ack_64 else 32) - 1))
    if not draw(st.booleans()):
        return Dss(
            data_ack,
            True if data_ack_64 is None else data_ack_64,
            data_fin=draw(st.booleans()),
        )
    dsn_64 = draw(st.booleans())
    return Dss(
        data_ack,
        True if data_ack_64 is None else data_ack_64,
        draw(st.integers(0, 2 ** (64 if dsn_64 else 32) - 1)),
        dsn_64,
        draw(st.integers(0, 0xFFFFFFFF)),
        draw(st.integers(0, 0xFFFF)),
        draw(st.none() | st.integers(0, 0xFFFF)),
        draw(st.booleans()),
    )


@st.composite
def add_addr_options(draw: st.DrawFn) -> AddAddr:
    address: IPv4Address | IPv6Address
    if draw(st.booleans()):
        address = IPv4Address(draw(st.integers(0, 2**32 - 1)))
    else:
        address = IPv6Address(draw(st.integers(0, 2**128 - 1)))
    echo = draw(st.booleans())
    hmac = None if echo else draw(st.binary(min_size=8, max_size=8))
    return AddAddr(
        draw(st.integers(0, 255)),
        address,
        draw(st.none() | st.integers(0, 0xFFFF)),
        hmac,
        echo,
        draw(st.integers(0, 1)),
    )


@deterministic
@given(options_with_state())
def test_property_encode_decode_roundtrip(
    case: tuple[Option, dict[str, bool]],
) -> None:
    option, state = case
    wire = encode_option(option)
    decoded = decode_options(wire, **state)
    assert decoded == (option,)
    assert encode_option(decoded[0]) == wire


@deterministic
@given(
    st.lists(options_with_state(), min_size=1, max_size=4),
    st.lists(st.sampled_from([b"\x01", b"\x04\x02", b"\x02\x04\x05\xb4"])),
)
def test_property_lists_with_foreign_options(
    cases: list[tuple[Option, dict[str, bool]]], foreign: list[bytes]
) -> None:
    # Options valid for the first case's state only, so that one state
    # decodes the whole list.
    state = cases[0][1]
    options = [option for option, other in cases if other == state]
    parts = [encode_option(option) for option in options]
    wire = b"".join(f + p for f, p in zip(foreign, parts, strict=False))
    wire += b"".join(parts[len(foreign) :])
    assert decode_options(wire, **state) == tuple(options)


@deterministic
@given(st.binary(max_size=48), st.booleans(), st.booleans())
def test_property_any_bytes_decode_or_raise_option_error(
    data: bytes, syn: bool, ack: bool
) -> None:
    try:
        options = decode_options(data, syn=syn, ack=ack)
    except OptionError:
        return
    # Whatever decodes re-encodes to something that decodes the same.
    for option in options:
        again = decode_options(encode_option(option), syn=syn, ack=ack)
        assert again == (option,)


@deterministic
@given(st.integers(0, 15), st.integers(0, 255), st.binary(max_size=40))
def test_property_mptcp_bodies_raise_nothing_but_option_error(
    subtype: int, low_and_length: int, body: bytes
) -> None:
    length = 3 + len(body)
    wire = bytes((30, length, subtype << 4 | (low_and_length & 0xF))) + body
    for state in STATES:
        with contextlib.suppress(OptionError):
            decode_options(wire, **state)


def test_decode_errors_are_option_errors_only() -> None:
    # Every 3-byte MPTCP option head, bodies of every small length.
    for subtype in range(16):
        for length in range(2, 32):
            wire = bytes((30, length, subtype << 4)) + bytes(
                max(length - 3, 0)
            )
            for state in STATES:
                with contextlib.suppress(OptionError):
                    decode_options(wire, **state)
