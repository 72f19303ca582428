"""Byte-exact codec for the MPTCP TCP option (kind 30).

The layouts are those of RFC 8684 section 3, plus the G-mode forms of
draft-paasch-mptcp-application-authentication and the E-mode forms of
draft-baerts-tcpm-mptcpext. G mode puts 64-bit tokens where RFC 8684
puts keys, and its MP_JOIN SYN is 16 bytes long because it carries a
64-bit token. E mode puts 32-bit tokens there, names one of two keys
with a K bit in MP_JOIN, ADD_ADDR and MP_FASTCLOSE, and agrees on each
key with NEW_KEY. Each option is a frozen dataclass.
:func:`encode_option` turns one into the bytes it has in a TCP header,
and :func:`decode_options` turns a TCP option list back into dataclasses.

The codec checks layouts and field ranges, never protocol state. Which
flags were negotiated, whether a token is known and whether an HMAC is
right are questions for the connection. This module does no I/O and
never logs. Some option fields hold keys (the RFC 8684 MP_CAPABLE and
MP_FASTCLOSE), so the reprs leave them out and no error message quotes
a field's bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from mptls.errors import ConfigurationError, OptionError, shown_value

__all__ = [
    "DATA_DSS",
    "DATA_DSS_FIN",
    "DATA_DSS_FLAGS",
    "DATA_DSS_LENGTH",
    "DSS_SUBTYPE_BYTE",
    "MPTCP_KIND",
    "AddAddr",
    "CapableFlag",
    "Dss",
    "DssFlag",
    "MpCapable",
    "MpFail",
    "MpFastclose",
    "MpJoinAck",
    "MpJoinSyn",
    "MpJoinSynAck",
    "MpPrio",
    "MpTcpRst",
    "NewKey",
    "Option",
    "RemoveAddr",
    "ResetReason",
    "Subtype",
    "UnknownMptcpOption",
    "decode_options",
    "encode_option",
    "encode_options",
]

MPTCP_KIND = 30
_END_OF_OPTIONS = 0
_NO_OPERATION = 1
_MAX_OPTION_LENGTH = 255


class Subtype(IntEnum):
    """The MPTCP option subtype: the high nibble of byte 2 (RFC 8684 8.1)."""

    MP_CAPABLE = 0x0
    MP_JOIN = 0x1
    DSS = 0x2
    ADD_ADDR = 0x3
    REMOVE_ADDR = 0x4
    MP_PRIO = 0x5
    MP_FAIL = 0x6
    MP_FASTCLOSE = 0x7
    MP_TCPRST = 0x8
    NEW_KEY = 0x9  # draft-baerts-tcpm-mptcpext (suggested value)
    MP_EXPERIMENTAL = 0xF


class CapableFlag(IntFlag):
    """Byte 3 of MP_CAPABLE (RFC 8684 3.1; G from the Paasch draft)."""

    A = 0x80  # checksum required
    B = 0x40  # extensibility, must be 0
    C = 0x20  # no more subflows to this source address and port
    D = 0x10
    E = 0x08  # external keys (draft-baerts-tcpm-mptcpext)
    F = 0x04
    G = 0x02  # tokens instead of keys, keys from the application
    H = 0x01  # HMAC-SHA256, keys in the clear


class DssFlag(IntFlag):
    """Byte 3 of DSS (RFC 8684 3.3)."""

    DATA_FIN = 0x10  # F
    DSN_64 = 0x08  # m
    MAPPING = 0x04  # M
    DATA_ACK_64 = 0x02  # a
    DATA_ACK = 0x01  # A


class ResetReason(IntEnum):
    """MP_TCPRST reason codes (RFC 8684 section 3.6)."""

    UNSPECIFIED = 0x00
    MPTCP_ERROR = 0x01
    LACK_OF_RESOURCES = 0x02
    ADMINISTRATIVELY_PROHIBITED = 0x03
    TOO_MUCH_OUTSTANDING_DATA = 0x04
    UNACCEPTABLE_PERFORMANCE = 0x05
    MIDDLEBOX_INTERFERENCE = 0x06


# key ids (E mode)


class _KeyIdError(OptionError, ConfigurationError):
    """A key id other than 0 or 1.

    The contract of the E profile calls it a ConfigurationError; it is
    an OptionError too, so that :func:`encode_option` still raises only
    OptionErrors for fields out of range.
    """


def _check_key_id(value: object, what: str) -> None:
    # A bool is refused although it equals 0 or 1: the field names a
    # key slot, and a flag there is more likely a mistake than a choice.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _KeyIdError(f"{what} key id must be the int 0 or 1")
    if value not in (0, 1):
        raise _KeyIdError(
            f"{what} key id must be 0 or 1, got {shown_value(value)}"
        )


# options


@dataclass(frozen=True, slots=True)
class MpCapable:
    """MP_CAPABLE (RFC 8684 3.1; draft-baerts for flag E).

    ``sender_key`` and ``receiver_key`` hold keys in RFC 8684 (H) mode
    and tokens in G and E mode; the codec treats both the same way.
    They are 8 bytes each, or 4 bytes each when ``flags`` has E set.
    Which fields are present sets the length: 4 (SYN), 12 (SYN/ACK),
    20 (third ACK), 22 (with ``data_length``), 24 (with ``checksum`` as
    well); under E 4, 8, 12, 14 and 16.
    """

    flags: CapableFlag
    sender_key: bytes | None = field(default=None, repr=False)
    receiver_key: bytes | None = field(default=None, repr=False)
    data_length: int | None = None
    checksum: int | None = None
    version: int = 1


@dataclass(frozen=True, slots=True)
class MpJoinSyn:
    """MP_JOIN on a SYN: the receiver's token and the sender's nonce.

    A 4-byte token gives the RFC 8684 layout (length 12). An 8-byte
    token gives the G-mode layout (length 16). ``key_id`` is E mode's K
    bit (0x02 of byte 2): which of the two keys the join uses. It is 0
    or 1, checked when the option is built.
    """

    token: bytes
    nonce: int
    address_id: int
    backup: bool = False
    key_id: int = 0

    def __post_init__(self) -> None:
        _check_key_id(self.key_id, "MP_JOIN")


@dataclass(frozen=True, slots=True)
class MpJoinSynAck:
    """MP_JOIN on a SYN/ACK: the leftmost 8 bytes of HMAC-B (length 16).

    ``key_id`` echoes the SYN's K bit, at the same place.
    """

    hmac: bytes
    nonce: int
    address_id: int
    backup: bool = False
    key_id: int = 0

    def __post_init__(self) -> None:
        _check_key_id(self.key_id, "MP_JOIN")


@dataclass(frozen=True, slots=True)
class MpJoinAck:
    """MP_JOIN on the third ACK: the leftmost 20 bytes of HMAC-A."""

    hmac: bytes


@dataclass(frozen=True, slots=True)
class Dss:
    """Data Sequence Signal (RFC 8684 3.3).

    ``data_ack`` present sets A, and ``dsn`` present sets M (a mapping,
    which also needs ``ssn`` and ``data_length``). The ``*_64`` fields
    choose 8-byte or 4-byte fields, and the encoder refuses values that
    do not fit. ``checksum`` is only allowed together with a mapping.
    """

    data_ack: int | None = None
    data_ack_64: bool = True
    dsn: int | None = None
    dsn_64: bool = True
    ssn: int | None = None
    data_length: int | None = None
    checksum: int | None = None
    data_fin: bool = False


@dataclass(frozen=True, slots=True)
class AddAddr:
    """ADD_ADDR (RFC 8684 3.4.1).

    With ``echo`` set, the option carries no HMAC (E=1). Otherwise
    ``hmac`` holds the rightmost 8 bytes of the ADD_ADDR HMAC.
    ``key_id`` is E mode's K bit (0x02 of byte 2): the key of the HMAC.
    """

    address_id: int
    address: IPv4Address | IPv6Address
    port: int | None = None
    hmac: bytes | None = None
    echo: bool = False
    key_id: int = 0

    def __post_init__(self) -> None:
        _check_key_id(self.key_id, "ADD_ADDR")


@dataclass(frozen=True, slots=True)
class RemoveAddr:
    """REMOVE_ADDR (RFC 8684 3.4.2): one or more address ids."""

    address_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MpPrio:
    """MP_PRIO (RFC 8684 3.3.8): the backup flag of this subflow."""

    backup: bool


@dataclass(frozen=True, slots=True)
class MpFail:
    """MP_FAIL (RFC 8684 3.7): the 64-bit DSN where checksums failed."""

    dsn: int


@dataclass(frozen=True, slots=True)
class MpFastclose:
    """MP_FASTCLOSE (RFC 8684 3.5).

    ``key`` is 8 bytes: the receiver's key in RFC 8684 mode, the G-mode
    hash of that key (see :func:`mptls.mptcp.crypto.fastclose_value`),
    or in E mode the tag of :func:`mptls.mptcp.crypto.fastclose_tag`.
    ``key_id`` is E mode's K bit (0x01 of byte 2): the key of that tag.
    """

    key: bytes = field(repr=False)
    key_id: int = 0

    def __post_init__(self) -> None:
        _check_key_id(self.key_id, "MP_FASTCLOSE")


@dataclass(frozen=True, slots=True)
class MpTcpRst:
    """MP_TCPRST (RFC 8684 3.6).

    ``reason`` is a :class:`ResetReason` when the code is known and a
    plain int otherwise. ``flags`` holds the U, V and W bits as a 3-bit
    number (U = 4, V = 2, W = 1). On the wire they sit above T.
    """

    reason: int
    transient: bool = False
    flags: int = 0


@dataclass(frozen=True, slots=True)
class NewKey:
    """NEW_KEY (draft-baerts-tcpm-mptcpext, subtype 0x9, length 12).

    ``key_id`` (0 or 1, the K bit) names the key slot and ``tag`` holds
    the 8 bytes of :func:`mptls.mptcp.crypto.new_key_tag` for that key.
    """

    key_id: int
    tag: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_key_id(self.key_id, "NEW_KEY")


@dataclass(frozen=True, slots=True)
class UnknownMptcpOption:
    """An option with an unassigned or experimental subtype.

    ``data`` is the option from byte 2 (the subtype byte, whose low
    nibble is subtype-specific) to its end. Callers ignore these, as
    RFC 8684 asks. They are kept so that a re-encoded capture gives the
    same bytes.
    """

    subtype: int
    data: bytes


Option = (
    MpCapable
    | MpJoinSyn
    | MpJoinSynAck
    | MpJoinAck
    | Dss
    | AddAddr
    | RemoveAddr
    | MpPrio
    | MpFail
    | MpFastclose
    | MpTcpRst
    | NewKey
    | UnknownMptcpOption
)

# shared helpers

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_JOIN_SYN_SHORT = struct.Struct(">BBBB4sI")
_JOIN_SYN_LONG = struct.Struct(">BBBB8sI")
_JOIN_SYN_ACK = struct.Struct(">BBBB8sI")


def _check_uint(value: int, bits: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise OptionError(f"{what} must be an unsigned {bits}-bit integer")


def _check_bytes(value: object, lengths: tuple[int, ...], what: str) -> None:
    # The message names the length only: the bytes may be a key.
    if not isinstance(value, bytes | bytearray):
        raise OptionError(f"{what} must be bytes")
    if len(value) not in lengths:
        sizes = " or ".join(str(size) for size in lengths)
        raise OptionError(f"{what} must be {sizes} bytes, got {len(value)}")


def _header(subtype: Subtype, length: int, low_nibble: int = 0) -> bytes:
    return bytes((MPTCP_KIND, length, subtype << 4 | low_nibble))


_SEGMENT_KINDS = {
    (True, False): "SYN",
    (True, True): "SYN/ACK",
    (False, True): "ACK",
    (False, False): "non-SYN, non-ACK",
}

# MP_CAPABLE (RFC 8684 3.1; flag E from draft-baerts)

_E = int(CapableFlag.E)


def _capable_lengths(
    field_size: int,
) -> dict[tuple[bool, bool], frozenset[int]]:
    """Which lengths each segment kind allows, for one key/token size.

    The SYN carries no key, the SYN/ACK the sender's, the third ACK
    both, and 2 or 4 more bytes add the data parameters.
    """
    both = 4 + 2 * field_size
    return {
        (True, False): frozenset({4}),
        (True, True): frozenset({4 + field_size}),
        (False, True): frozenset({both, both + 2, both + 4}),
        (False, False): frozenset(),
    }


# By the E bit of the flags byte: 8-byte keys or tokens (RFC 8684, G),
# 4-byte tokens (E, draft-baerts).
_CAPABLE_FIELD_SIZES = {False: 8, True: 4}
_CAPABLE_LENGTHS = {
    external: _capable_lengths(size)
    for external, size in _CAPABLE_FIELD_SIZES.items()
}


def _encode_mp_capable(option: MpCapable) -> bytes:
    _check_uint(option.version, 4, "MP_CAPABLE version")
    _check_uint(int(option.flags), 8, "MP_CAPABLE flags")
    external = bool(int(option.flags) & _E)
    sizes = (_CAPABLE_FIELD_SIZES[external],)
    where = " under flag E" if external else ""
    body = [bytes((int(option.flags),))]
    if option.sender_key is not None:
        _check_bytes(option.sender_key, sizes, f"MP_CAPABLE sender key{where}")
        body.append(option.sender_key)
    if option.receiver_key is not None:
        if option.sender_key is None:
            raise OptionError("MP_CAPABLE receiver key needs a sender key")
        _check_bytes(
            option.receiver_key, sizes, f"MP_CAPABLE receiver key{where}"
        )
        body.append(option.receiver_key)
    if option.data_length is not None:
        if option.receiver_key is None:
            raise OptionError("MP_CAPABLE data length needs both keys")
        _check_uint(option.data_length, 16, "MP_CAPABLE data length")
        body.append(_U16.pack(option.data_length))
    if option.checksum is not None:
        if option.data_length is None:
            raise OptionError("MP_CAPABLE checksum needs a data length")
        _check_uint(option.checksum, 16, "MP_CAPABLE checksum")
        body.append(_U16.pack(option.checksum))
    length = 3 + sum(len(part) for part in body)
    header = _header(Subtype.MP_CAPABLE, length, option.version)
    return header + b"".join(body)


def _decode_mp_capable(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> MpCapable:
    # A length of 3 has no flags byte; it fits no segment either way.
    external = length > 3 and bool(data[start + 3] & _E)
    if length not in _CAPABLE_LENGTHS[external][syn, ack]:
        raise OptionError(
            f"MP_CAPABLE of length {length} on a "
            f"{_SEGMENT_KINDS[syn, ack]} segment"
            + (" with flag E" if external else "")
        )
    size = _CAPABLE_FIELD_SIZES[external]
    receiver_at = start + 4 + size
    data_at = receiver_at + size
    sender_key = receiver_key = data_length = checksum = None
    if length > 4:
        sender_key = bytes(data[start + 4 : receiver_at])
    if length >= data_at - start:
        receiver_key = bytes(data[receiver_at:data_at])
    if length >= data_at - start + 2:
        (data_length,) = _U16.unpack_from(data, data_at)
    if length == data_at - start + 4:
        (checksum,) = _U16.unpack_from(data, data_at + 2)
    return MpCapable(
        flags=CapableFlag(data[start + 3]),
        sender_key=sender_key,
        receiver_key=receiver_key,
        data_length=data_length,
        checksum=checksum,
        version=data[start + 2] & 0x0F,
    )


# MP_JOIN (RFC 8684 3.2; 64-bit token SYN from protocol.md 11 item 2;
# the K bit of draft-baerts on the SYN and, item 13, on the SYN/ACK)

_JOIN_BACKUP = 0x01
_JOIN_KEY_ID_SHIFT = 1  # K: [1:4][rsv:2][K:1][B:1]


def _join_flags(backup: bool, key_id: int) -> int:
    _check_key_id(key_id, "MP_JOIN")
    return (
        Subtype.MP_JOIN << 4
        | key_id << _JOIN_KEY_ID_SHIFT
        | (_JOIN_BACKUP if backup else 0)
    )


def _encode_join_syn(option: MpJoinSyn) -> bytes:
    _check_bytes(option.token, (4, 8), "MP_JOIN token")
    _check_uint(option.nonce, 32, "MP_JOIN nonce")
    _check_uint(option.address_id, 8, "MP_JOIN address id")
    layout = _JOIN_SYN_SHORT if len(option.token) == 4 else _JOIN_SYN_LONG
    return layout.pack(
        MPTCP_KIND,
        layout.size,
        _join_flags(option.backup, option.key_id),
        option.address_id,
        option.token,
        option.nonce,
    )


def _encode_join_syn_ack(option: MpJoinSynAck) -> bytes:
    _check_bytes(option.hmac, (8,), "MP_JOIN SYN/ACK HMAC")
    _check_uint(option.nonce, 32, "MP_JOIN nonce")
    _check_uint(option.address_id, 8, "MP_JOIN address id")
    return _JOIN_SYN_ACK.pack(
        MPTCP_KIND,
        _JOIN_SYN_ACK.size,
        _join_flags(option.backup, option.key_id),
        option.address_id,
        option.hmac,
        option.nonce,
    )


def _encode_join_ack(option: MpJoinAck) -> bytes:
    _check_bytes(option.hmac, (20,), "MP_JOIN ACK HMAC")
    return _header(Subtype.MP_JOIN, 24) + b"\x00" + option.hmac


def _decode_mp_join(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> MpJoinSyn | MpJoinSynAck | MpJoinAck:
    # By segment state first: a 16-byte option is a G-mode SYN on a SYN
    # and the SYN/ACK form on a SYN/ACK (protocol.md 11 item 2).
    if syn and not ack and length in (12, 16):
        layout = _JOIN_SYN_SHORT if length == 12 else _JOIN_SYN_LONG
        _, _, flags, address_id, token, nonce = layout.unpack_from(data, start)
        return MpJoinSyn(
            token,
            nonce,
            address_id,
            bool(flags & _JOIN_BACKUP),
            flags >> _JOIN_KEY_ID_SHIFT & 1,
        )
    if syn and ack and length == 16:
        _, _, flags, address_id, hmac, nonce = _JOIN_SYN_ACK.unpack_from(
            data, start
        )
        return MpJoinSynAck(
            hmac,
            nonce,
            address_id,
            bool(flags & _JOIN_BACKUP),
            flags >> _JOIN_KEY_ID_SHIFT & 1,
        )
    if ack and not syn and length == 24:
        return MpJoinAck(bytes(data[start + 4 : start + 24]))
    raise OptionError(
        f"MP_JOIN of length {length} on a {_SEGMENT_KINDS[syn, ack]} segment"
    )


# DSS (RFC 8684 3.3)


@dataclass(frozen=True, slots=True)
class _DssLayout:
    """Where the fields of one DSS flag combination sit."""

    length: int
    fields: struct.Struct
    has_data_ack: bool
    has_mapping: bool
    has_checksum: bool


def _dss_layouts() -> dict[tuple[int, bool], _DssLayout]:
    """Every DSS layout, keyed by (flags without F, checksum present)."""
    layouts = {}
    for flags in range(16):
        has_data_ack = bool(flags & DssFlag.DATA_ACK)
        has_mapping = bool(flags & DssFlag.MAPPING)
        for has_checksum in (False, True) if has_mapping else (False,):
            codes = ">"
            if has_data_ack:
                codes += "Q" if flags & DssFlag.DATA_ACK_64 else "I"
            if has_mapping:
                codes += "Q" if flags & DssFlag.DSN_64 else "I"
                codes += "IH"
            if has_checksum:
                codes += "H"
            fields = struct.Struct(codes)
            layouts[flags, has_checksum] = _DssLayout(
                4 + fields.size,
                fields,
                has_data_ack,
                has_mapping,
                has_checksum,
            )
    return layouts


_DSS_BY_FLAGS = _dss_layouts()
# The decoder's view: the length tells whether a checksum is present.
_DSS_BY_LENGTH = {
    (flags, layout.length): layout
    for (flags, _), layout in _DSS_BY_FLAGS.items()
}


# The flag bits as plain ints: IntFlag arithmetic builds an enum member
# per operation, and a DSS goes out with every frame.
_A = int(DssFlag.DATA_ACK)
_A64 = int(DssFlag.DATA_ACK_64)
_M = int(DssFlag.MAPPING)
_M64 = int(DssFlag.DSN_64)
_F = int(DssFlag.DATA_FIN)
_DSS_HEAD = Subtype.DSS << 4
# One struct per layout that packs the option whole, head included.
_DSS_PACKERS = {
    key: struct.Struct(">BBBB" + layout.fields.format[1:])
    for key, layout in _DSS_BY_FLAGS.items()
}


# The DSS of a bulk transfer's every frame: a 64-bit Data ACK and a
# 64-bit mapping, no checksum (flags A a M m, and F on the last), whole
# with its kind, length and subtype bytes. The frame codec packs and
# unpacks it together with the frame's header.
DATA_DSS = struct.Struct(">BBBBQQIH")
DATA_DSS_LENGTH = DATA_DSS.size
DATA_DSS_FLAGS = _A | _A64 | _M | _M64
DATA_DSS_FIN = _F
DSS_SUBTYPE_BYTE = _DSS_HEAD


def _encode_dss(option: Dss) -> bytes:
    flags = 0
    values: list[int] = []
    data_ack = option.data_ack
    if data_ack is not None:
        wide = option.data_ack_64
        flags = _A | _A64 if wide else _A
        _check_uint(data_ack, 64 if wide else 32, "DSS data ACK")
        values.append(data_ack)
    dsn = option.dsn
    if dsn is not None:
        wide = option.dsn_64
        flags |= _M | _M64 if wide else _M
        _check_uint(dsn, 64 if wide else 32, "DSS DSN")
        ssn, length = option.ssn, option.data_length
        if ssn is None or length is None:
            raise OptionError("a DSS mapping needs ssn and data_length")
        _check_uint(ssn, 32, "DSS subflow sequence number")
        _check_uint(length, 16, "DSS data-level length")
        values += (dsn, ssn, length)
        if option.checksum is not None:
            _check_uint(option.checksum, 16, "DSS checksum")
            values.append(option.checksum)
    elif (option.ssn, option.data_length, option.checksum) != (None,) * 3:
        raise OptionError("DSS ssn, data_length and checksum need a dsn")
    key = (flags, option.checksum is not None)
    length = _DSS_BY_FLAGS[key].length
    if option.data_fin:
        flags |= _F
    return _DSS_PACKERS[key].pack(
        MPTCP_KIND, length, _DSS_HEAD, flags, *values
    )


def _decode_dss(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> Dss:
    flags = data[start + 3] if length > 3 else 0
    layout = _DSS_BY_LENGTH.get((flags & 0x0F, length))
    if layout is None:
        raise OptionError(
            f"DSS of length {length} does not match its flags {flags:#04x}"
        )
    values = layout.fields.unpack_from(data, start + 4)
    data_ack = dsn = ssn = data_length = checksum = None
    if layout.has_data_ack:
        data_ack = values[0]
    if layout.has_mapping:
        first = 1 if layout.has_data_ack else 0
        dsn, ssn, data_length = values[first : first + 3]
        if layout.has_checksum:
            checksum = values[-1]
    # Without its field, a width bit means nothing: keep the default so
    # that the option compares equal to the one that was encoded. The
    # masks are plain ints: an int & an IntFlag member builds a member
    return Dss(
        data_ack,
        not layout.has_data_ack or bool(flags & _A64),
        dsn,
        not layout.has_mapping or bool(flags & _M64),
        ssn,
        data_length,
        checksum,
        bool(flags & _F),
    )


# ADD_ADDR (RFC 8684 3.4.1)

# (E bit, length) -> (address length, port present): IPv4 is 16/18 with
# an HMAC and 8/10 echoed, IPv6 28/30 and 20/22.
_ADD_ADDR_LAYOUTS: dict[tuple[bool, int], tuple[int, bool]] = {
    (echo, 4 + address + port * 2 + (0 if echo else 8)): (address, port)
    for echo in (False, True)
    for address in (4, 16)
    for port in (False, True)
}
_ADDRESS_TYPES: dict[int, type[IPv4Address] | type[IPv6Address]] = {
    4: IPv4Address,
    16: IPv6Address,
}


_ADD_ADDR_ECHO = 0x01  # E: [3:4][rsv:2][K:1][E:1]
_ADD_ADDR_KEY_ID_SHIFT = 1


def _encode_add_addr(option: AddAddr) -> bytes:
    _check_uint(option.address_id, 8, "ADD_ADDR address id")
    _check_key_id(option.key_id, "ADD_ADDR")
    if not isinstance(option.address, IPv4Address | IPv6Address):
        raise OptionError("ADD_ADDR address must be an IPv4 or IPv6 address")
    body = [bytes((option.address_id,)), option.address.packed]
    if option.port is not None:
        _check_uint(option.port, 16, "ADD_ADDR port")
        body.append(_U16.pack(option.port))
    if option.echo:
        if option.hmac is not None:
            raise OptionError("an echoed ADD_ADDR carries no HMAC")
    else:
        _check_bytes(option.hmac, (8,), "ADD_ADDR HMAC")
        body.append(bytes(option.hmac or b""))
    length = 3 + sum(len(part) for part in body)
    low_nibble = option.key_id << _ADD_ADDR_KEY_ID_SHIFT | (
        _ADD_ADDR_ECHO if option.echo else 0
    )
    header = _header(Subtype.ADD_ADDR, length, low_nibble)
    return header + b"".join(body)


def _decode_add_addr(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> AddAddr:
    echo = bool(data[start + 2] & _ADD_ADDR_ECHO)
    layout = _ADD_ADDR_LAYOUTS.get((echo, length))
    if layout is None:
        raise OptionError(f"ADD_ADDR of length {length} with E={int(echo)}")
    address_length, has_port = layout
    offset = start + 4 + address_length
    address = _ADDRESS_TYPES[address_length](bytes(data[start + 4 : offset]))
    port = None
    if has_port:
        (port,) = _U16.unpack_from(data, offset)
        offset += 2
    hmac = None if echo else bytes(data[offset : offset + 8])
    key_id = data[start + 2] >> _ADD_ADDR_KEY_ID_SHIFT & 1
    return AddAddr(data[start + 3], address, port, hmac, echo, key_id)


# REMOVE_ADDR, MP_PRIO, MP_FAIL, MP_FASTCLOSE, MP_TCPRST, unknown


def _encode_remove_addr(option: RemoveAddr) -> bytes:
    ids = tuple(option.address_ids)
    if not 1 <= len(ids) <= _MAX_OPTION_LENGTH - 3:
        raise OptionError(
            f"REMOVE_ADDR needs 1 to {_MAX_OPTION_LENGTH - 3} address ids"
        )
    for address_id in ids:
        _check_uint(address_id, 8, "REMOVE_ADDR address id")
    return _header(Subtype.REMOVE_ADDR, 3 + len(ids)) + bytes(ids)


def _decode_remove_addr(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> RemoveAddr:
    if length < 4:
        raise OptionError("REMOVE_ADDR without an address id")
    return RemoveAddr(tuple(data[start + 3 : start + length]))


def _encode_mp_prio(option: MpPrio) -> bytes:
    return _header(Subtype.MP_PRIO, 3, int(bool(option.backup)))


def _decode_mp_prio(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> MpPrio:
    # RFC 6824's 4-byte form with an address id is gone in v1.
    if length != 3:
        raise OptionError(f"MP_PRIO of length {length}, expected 3")
    return MpPrio(bool(data[start + 2] & 0x01))


def _encode_mp_fail(option: MpFail) -> bytes:
    _check_uint(option.dsn, 64, "MP_FAIL DSN")
    return _header(Subtype.MP_FAIL, 12) + b"\x00" + _U64.pack(option.dsn)


def _decode_mp_fail(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> MpFail:
    if length != 12:
        raise OptionError(f"MP_FAIL of length {length}, expected 12")
    return MpFail(_U64.unpack_from(data, start + 4)[0])


# MP_FASTCLOSE and NEW_KEY share a shape: [subtype:4][rsv:3][K:1], a
# reserved byte, then 8 bytes (a key, a hash or a truncated HMAC).


def _encode_mp_fastclose(option: MpFastclose) -> bytes:
    _check_bytes(option.key, (8,), "MP_FASTCLOSE key")
    _check_key_id(option.key_id, "MP_FASTCLOSE")
    header = _header(Subtype.MP_FASTCLOSE, 12, option.key_id)
    return header + b"\x00" + option.key


def _decode_mp_fastclose(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> MpFastclose:
    if length != 12:
        raise OptionError(f"MP_FASTCLOSE of length {length}, expected 12")
    return MpFastclose(
        bytes(data[start + 4 : start + 12]), data[start + 2] & 0x01
    )


def _encode_new_key(option: NewKey) -> bytes:
    _check_bytes(option.tag, (8,), "NEW_KEY tag")
    _check_key_id(option.key_id, "NEW_KEY")
    return _header(Subtype.NEW_KEY, 12, option.key_id) + b"\x00" + option.tag


def _decode_new_key(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> NewKey:
    if length != 12:
        raise OptionError(f"NEW_KEY of length {length}, expected 12")
    return NewKey(data[start + 2] & 0x01, bytes(data[start + 4 : start + 12]))


_RESET_REASONS = {int(reason): reason for reason in ResetReason}


def _encode_mp_tcprst(option: MpTcpRst) -> bytes:
    _check_uint(option.reason, 8, "MP_TCPRST reason")
    _check_uint(option.flags, 3, "MP_TCPRST U/V/W flags")
    low_nibble = option.flags << 1 | bool(option.transient)
    return _header(Subtype.MP_TCPRST, 4, low_nibble) + bytes((option.reason,))


def _decode_mp_tcprst(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> MpTcpRst:
    if length != 4:
        raise OptionError(f"MP_TCPRST of length {length}, expected 4")
    low_nibble = data[start + 2] & 0x0F
    reason = data[start + 3]
    return MpTcpRst(
        _RESET_REASONS.get(reason, reason),
        bool(low_nibble & 0x01),
        low_nibble >> 1,
    )


def _encode_unknown(option: UnknownMptcpOption) -> bytes:
    _check_uint(option.subtype, 4, "MPTCP subtype")
    if option.subtype in _ASSIGNED_SUBTYPES:
        raise OptionError(f"subtype {option.subtype:#x} has its own class")
    if not isinstance(option.data, bytes | bytearray) or not option.data:
        raise OptionError("unknown MPTCP option data must start at byte 2")
    if option.data[0] >> 4 != option.subtype:
        raise OptionError("unknown MPTCP option data must hold its subtype")
    if len(option.data) > _MAX_OPTION_LENGTH - 2:
        raise OptionError("unknown MPTCP option too long")
    return bytes((MPTCP_KIND, 2 + len(option.data))) + option.data


def _decode_unknown(
    data: bytes | memoryview, start: int, length: int, syn: bool, ack: bool
) -> UnknownMptcpOption:
    return UnknownMptcpOption(
        data[start + 2] >> 4, bytes(data[start + 2 : start + length])
    )


# dispatch

_Decoder = Callable[[bytes | memoryview, int, int, bool, bool], Option]

_KNOWN_DECODERS: dict[int, _Decoder] = {
    Subtype.MP_CAPABLE: _decode_mp_capable,
    Subtype.MP_JOIN: _decode_mp_join,
    Subtype.DSS: _decode_dss,
    Subtype.ADD_ADDR: _decode_add_addr,
    Subtype.REMOVE_ADDR: _decode_remove_addr,
    Subtype.MP_PRIO: _decode_mp_prio,
    Subtype.MP_FAIL: _decode_mp_fail,
    Subtype.MP_FASTCLOSE: _decode_mp_fastclose,
    Subtype.MP_TCPRST: _decode_mp_tcprst,
    Subtype.NEW_KEY: _decode_new_key,
}
_ASSIGNED_SUBTYPES = frozenset(_KNOWN_DECODERS)
# Indexed by subtype nibble; every nibble has an entry, so the lookup on
# the data path is one tuple index and cannot fail.
_DECODERS: tuple[_Decoder, ...] = tuple(
    _KNOWN_DECODERS.get(subtype, _decode_unknown) for subtype in range(16)
)

_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    MpCapable: _encode_mp_capable,
    MpJoinSyn: _encode_join_syn,
    MpJoinSynAck: _encode_join_syn_ack,
    MpJoinAck: _encode_join_ack,
    Dss: _encode_dss,
    AddAddr: _encode_add_addr,
    RemoveAddr: _encode_remove_addr,
    MpPrio: _encode_mp_prio,
    MpFail: _encode_mp_fail,
    MpFastclose: _encode_mp_fastclose,
    MpTcpRst: _encode_mp_tcprst,
    NewKey: _encode_new_key,
    UnknownMptcpOption: _encode_unknown,
}


def encode_option(option: Option) -> bytes:
    """The bytes of one MPTCP option, kind and length included.

    Raises :class:`~mptls.errors.OptionError` for a field out of range,
    a byte string of the wrong length, or an object that is not an
    option.
    """
    encoder = _ENCODERS.get(type(option))
    if encoder is None:
        raise OptionError(f"{type(option).__name__} is not an MPTCP option")
    return encoder(option)


def encode_options(options: Iterable[Option]) -> bytes:
    """The options one after the other, with no padding."""
    return b"".join([encode_option(option) for option in options])


def decode_options(
    data: bytes | memoryview, *, syn: bool, ack: bool
) -> tuple[Option, ...]:
    """Decode the MPTCP options in a TCP option list.

    ``syn`` and ``ack`` are the segment's TCP flags. MP_CAPABLE and
    MP_JOIN are decoded by them (RFC 8684 3.1 and 3.2). Kind 0 ends the
    list, NOP is skipped, and any other kind is skipped by its length,
    so the options of a captured TCP header decode as they are. Every
    malformed input raises :class:`~mptls.errors.OptionError`.
    """
    options: list[Option] = []
    end = len(data)
    index = 0
    while index < end:
        kind = data[index]
        if kind == _END_OF_OPTIONS:
            break
        if kind == _NO_OPERATION:
            index += 1
            continue
        if index + 1 == end:
            raise OptionError(f"TCP option kind {kind} has no length byte")
        length = data[index + 1]
        if length < 2 or index + length > end:
            raise OptionError(
                f"TCP option kind {kind} has length {length} with "
                f"{end - index} bytes left"
            )
        if kind == MPTCP_KIND:
            if length < 3:
                raise OptionError("MPTCP option too short for a subtype")
            decoder = _DECODERS[data[index + 2] >> 4]
            options.append(decoder(data, index, length, syn, ack))
        index += length
    return tuple(options)
