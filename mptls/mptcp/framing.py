"""The userspace wire: the preamble and the frames of docs/wire.md.

Each subflow of the ``userspace`` backend is one TCP connection. Each end
sends :data:`PREAMBLE` and then frames. A frame is an 8-byte header
(flags, options length, payload length, receive window), then MPTCP
options with the bytes they would have in a TCP header, then payload.
:func:`encode_segment` builds a frame. :class:`SegmentDecoder` turns a
byte stream back into :class:`Segment` objects.

This module is on the data path of every byte. The decoder copies each
payload once, buffers at most one incomplete frame plus the current read,
and never rescans what it has already parsed. It does no I/O and never
logs. A foreign peer is described in an error, bounded in length, and
the description shows only the first bytes it sent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag

from mptls.errors import FramingError, NotMptlsPeerError, ProtocolError
from mptls.mptcp.options import (
    DATA_DSS,
    DATA_DSS_FIN,
    DATA_DSS_FLAGS,
    DATA_DSS_LENGTH,
    DSS_SUBTYPE_BYTE,
    MPTCP_KIND,
    Dss,
    Option,
    decode_options,
    encode_option,
    encode_options,
)

__all__ = [
    "FIRST_OPTION_OFFSET",
    "HEADER_LENGTH",
    "MAX_OPTIONS_LENGTH",
    "MAX_PAYLOAD",
    "NOT_MPTLS_REPLY",
    "PREAMBLE",
    "Flag",
    "Payload",
    "Segment",
    "SegmentDecoder",
    "describe_foreign_bytes",
    "encode_head",
    "encode_segment",
]

PREAMBLE = b"MPTLS/1\n"
NOT_MPTLS_REPLY = b"MPTLS/1 ERROR not an mptls client\n"
MAX_OPTIONS_LENGTH = 40
MAX_PAYLOAD = 65535
HEADER_LENGTH = 8
# The first option of a subflow's first frame: preamble + header. A load
# balancer reads an MP_JOIN token at 20..27 (docs/wire.md).
FIRST_OPTION_OFFSET = len(PREAMBLE) + HEADER_LENGTH
# the frame header carries the receive window in 32 bits
MAX_WINDOW = 0xFFFFFFFF

_HEADER = struct.Struct(">BBHI")
# A data frame's header and its one DSS (options.DATA_DSS) in one
# struct: what every frame of a bulk transfer carries
_DATA_HEAD = struct.Struct(_HEADER.format + DATA_DSS.format[1:])


class Flag(IntFlag):
    """TCP's own flag bits, as the frame's first byte carries them."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10

    # IntFlag's own operators build a member in Python for every test of
    # a bit, and every frame is tested a few times: look members up in
    # the prebuilt table instead
    def __and__(self, other: object) -> Flag:
        value = int.__and__(self, other)  # type: ignore[operator]
        if value is NotImplemented:
            return NotImplemented
        return _FLAGS[value]

    __rand__ = __and__

    def __or__(self, other: object) -> Flag:
        value = int.__or__(self, other)  # type: ignore[operator]
        if value is NotImplemented:
            return NotImplemented
        if 0 <= value <= _ALL_FLAGS:
            return _FLAGS[value]
        return IntFlag.__or__(self, other)  # type: ignore[operator]

    __ror__ = __or__


# A frame's payload: the decoder makes bytes; the sender passes views of
# the application's bytes through to the write without copying them.
Payload = bytes | memoryview

_ALL_FLAGS = 0x1F
# One prebuilt member per flag byte: no enum construction per frame.
_FLAGS = tuple(Flag(value) for value in range(_ALL_FLAGS + 1))
# The flag bits as plain ints, for tests on a frame's path: Flag's own
# operators are Python calls
FIN_BIT = int(Flag.FIN)
SYN_BIT = int(Flag.SYN)
RST_BIT = int(Flag.RST)
ACK_BIT = int(Flag.ACK)


@dataclass(frozen=True, slots=True)
class Segment:
    """One frame: TCP flags, MPTCP options, payload, receive window."""

    flags: Flag
    options: tuple[Option, ...] = ()
    payload: Payload = b""
    window: int = 0


def encode_segment(segment: Segment) -> bytes:
    """The frame for ``segment``: header, options and payload.

    Raises :class:`~mptls.errors.FramingError` when a field does not
    fit the header, or :class:`~mptls.errors.OptionError` when an option
    is malformed.
    """
    head = encode_head(segment)
    return head + segment.payload if segment.payload else head


def encode_head(segment: Segment) -> bytes:
    """The frame for ``segment`` without its payload: header, options.

    A sender that gathers several frames into one write appends the
    payload itself, so that the payload is copied once, by that join.
    Raises as :func:`encode_segment` does.
    """
    flags = int(segment.flags)
    if not 0 <= flags <= _ALL_FLAGS:
        raise FramingError(f"frame flags {flags:#x} outside FIN..ACK")
    options = segment.options
    if len(options) == 1:
        option = options[0]
        if type(option) is Dss:
            head = _encode_data_head(flags, option, segment)
            if head is not None:
                return head
        encoded = encode_option(option)
    else:
        encoded = encode_options(options) if options else b""
    if len(encoded) > MAX_OPTIONS_LENGTH:
        raise FramingError(
            f"{len(encoded)} bytes of options, at most "
            f"{MAX_OPTIONS_LENGTH} fit in a frame"
        )
    length = len(segment.payload)
    if length > MAX_PAYLOAD:
        raise FramingError(f"payload of {length} bytes, at most {MAX_PAYLOAD}")
    window = segment.window
    if not isinstance(window, int) or not 0 <= window <= MAX_WINDOW:
        raise FramingError("receive window must be an unsigned 32-bit int")
    return _HEADER.pack(flags, len(encoded), length, window) + encoded


def _encode_data_head(flags: int, dss: Dss, segment: Segment) -> bytes | None:
    """:func:`encode_head` of a data frame (``dss`` its only option).

    The same bytes as the generic path, in one pack: for the DSS of
    :data:`~mptls.mptcp.options.DATA_DSS`, with plain ints in every
    field. None leaves the frame to the generic path: another layout,
    or a value it may refuse (the struct refuses every int out of its
    field's range, and the generic path then says which one).
    """
    data_ack = dss.data_ack
    dsn = dss.dsn
    ssn = dss.ssn
    length = dss.data_length
    window = segment.window
    if not (
        type(data_ack) is int
        and type(dsn) is int
        and type(ssn) is int
        and type(length) is int
        and type(window) is int
        and dss.data_ack_64
        and dss.dsn_64
        and dss.checksum is None
    ):
        return None
    try:
        return _DATA_HEAD.pack(
            flags,
            DATA_DSS_LENGTH,
            len(segment.payload),
            window,
            MPTCP_KIND,
            DATA_DSS_LENGTH,
            DSS_SUBTYPE_BYTE,
            DATA_DSS_FLAGS | DATA_DSS_FIN if dss.data_fin else DATA_DSS_FLAGS,
            data_ack,
            dsn,
            ssn,
            length,
        )
    except struct.error:
        return None


def _check_option_kinds(options: memoryview) -> None:
    """Only MPTCP, NOP and end-of-list may appear in a frame."""
    index = 0
    end = len(options)
    while index < end:
        kind = options[index]
        if kind == 0:
            return
        if kind == 1:
            index += 1
            continue
        if kind != MPTCP_KIND:
            raise FramingError(f"TCP option kind {kind} in a frame")
        if index + 1 == end:
            return  # decode_options reports the missing length byte
        index += max(options[index + 1], 2)


class SegmentDecoder:
    """Turns the bytes of one subflow into :class:`Segment` objects.

    With ``preamble`` set (the default), the first eight bytes must be
    :data:`PREAMBLE`. The first byte that differs raises
    :class:`~mptls.errors.NotMptlsPeerError`, which says what the peer
    seems to be. After any error the decoder is broken, and every later
    :meth:`feed` raises again.
    """

    __slots__ = ("_error", "_partial", "_preamble_seen", "payload_views")

    def __init__(self, *, preamble: bool = True) -> None:
        # The start of a frame whose end has not arrived yet.
        self._partial = bytearray()
        # Bytes of the preamble matched so far; None once it is done.
        self._preamble_seen: bytes | None = b"" if preamble else None
        self._error: ProtocolError | None = None
        # Payloads of frames that arrived whole are views of the bytes
        # fed, not copies: only for an owner that is done with every
        # segment (or has copied what it keeps) before it reuses them.
        self.payload_views = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as segments."""
        return len(self._partial) + len(self._preamble_seen or b"")

    @property
    def started(self) -> bool:
        """Whether any byte came, the preamble's included (always true
        for a decoder that expects no preamble)."""
        return self._preamble_seen != b"" or bool(self._partial)

    def feed(self, data: bytes | memoryview) -> list[Segment]:
        """Take the next bytes from the subflow; return whole frames.

        Nothing kept refers to ``data``, and nothing returned does
        unless :attr:`payload_views` is set: then the payloads of frames
        that arrived whole are views of ``data``, valid until the caller
        reuses its buffer.
        """
        if self._error is not None:
            raise type(self._error)(
                f"decoder already failed: {self._error}"
            ) from self._error
        try:
            return self._feed(memoryview(data))
        except ProtocolError as exc:
            self._error = exc
            raise

    def _feed(self, view: memoryview) -> list[Segment]:
        if self._preamble_seen is not None:
            view = self._match_preamble(self._preamble_seen, view)
            if self._preamble_seen is not None:
                return []
        segments: list[Segment] = []
        if self._partial:
            view = self._complete_partial(view, segments)
            if self._partial:
                return segments
        # Frames that arrived whole are parsed straight from the read;
        # only an incomplete tail is copied.
        parsed, used = _parse_frames(view, self.payload_views)
        if used < len(view):
            self._partial += view[used:]
        if segments:
            segments += parsed
            return segments
        return parsed

    def _complete_partial(
        self, view: memoryview, segments: list[Segment]
    ) -> memoryview:
        """Top up the buffered frame from ``view``; return what is left."""
        partial = self._partial
        if len(partial) < HEADER_LENGTH:
            taken = HEADER_LENGTH - len(partial)
            partial += view[:taken]
            view = view[taken:]
            if len(partial) < HEADER_LENGTH:
                return view
        flags, options_length, payload_length, _ = _HEADER.unpack_from(partial)
        _check_header(flags, options_length)
        missing = (
            HEADER_LENGTH + options_length + payload_length - len(partial)
        )
        partial += view[:missing]
        if missing > len(view):
            return view[len(view) :]
        # parsed in place (the payload is copied out once); a new buffer
        # for the next frame, since a view of this one was exported
        with memoryview(partial) as whole:
            frame, _ = _parse_frames(whole)
        segments += frame
        self._partial = bytearray()
        return view[missing:]

    def _match_preamble(self, seen: bytes, view: memoryview) -> memoryview:
        wanted = PREAMBLE[len(seen) :]
        head = view[: len(wanted)].tobytes()
        if head != wanted[: len(head)]:
            received = seen + view[:64].tobytes()
            raise NotMptlsPeerError(
                "the peer does not speak the mptls wire: it sent "
                + describe_foreign_bytes(received)
            )
        seen += head
        self._preamble_seen = None if seen == PREAMBLE else seen
        return view[len(head) :]


def _check_header(flags: int, options_length: int) -> None:
    if flags & ~_ALL_FLAGS:
        raise FramingError(f"frame flags {flags:#04x} outside FIN..ACK")
    if options_length > MAX_OPTIONS_LENGTH:
        raise FramingError(
            f"frame options length {options_length} over {MAX_OPTIONS_LENGTH}"
        )


def _decode_frame_options(raw: memoryview, flags: int) -> tuple[Option, ...]:
    # One MPTCP option filling the space (a DSS, usually) needs no walk
    # to check the kinds.
    if len(raw) < 2 or raw[0] != MPTCP_KIND or raw[1] != len(raw):
        _check_option_kinds(raw)
    # ``flags`` is the header's int: int & Flag would build a member
    return decode_options(
        raw, syn=bool(flags & SYN_BIT), ack=bool(flags & ACK_BIT)
    )


def _decode_data_dss(view: memoryview, start: int) -> tuple[Option, ...]:
    """The options of a data frame whose 26 bytes at ``start`` are one
    DSS of the :data:`~mptls.mptcp.options.DATA_DSS` layout, decoded as
    :func:`~mptls.mptcp.options.decode_options` would; () for any other
    option bytes, which the generic decoder takes (and checks)."""
    kind, length, subtype, dss_flags, data_ack, dsn, ssn, data_length = (
        DATA_DSS.unpack_from(view, start)
    )
    # the low nibble of the subtype byte and the top three flag bits
    # are reserved: ignored, as the generic decoder ignores them
    if (
        kind != MPTCP_KIND
        or length != DATA_DSS_LENGTH
        or subtype & 0xF0 != DSS_SUBTYPE_BYTE
        or dss_flags & 0x0F != DATA_DSS_FLAGS
    ):
        return ()
    fin = bool(dss_flags & DATA_DSS_FIN)
    return (Dss(data_ack, True, dsn, True, ssn, data_length, None, fin),)


def _parse_frames(
    view: memoryview, views: bool = False
) -> tuple[list[Segment], int]:
    """Every whole frame at the start of ``view``, and bytes consumed.

    Payloads are copies, or with ``views`` slices of ``view`` itself.
    """
    segments: list[Segment] = []
    offset = 0
    end = len(view)
    unpack_header = _HEADER.unpack_from
    while end - offset >= HEADER_LENGTH:
        flags, options_length, payload_length, window = unpack_header(
            view, offset
        )
        if flags & ~_ALL_FLAGS or options_length > MAX_OPTIONS_LENGTH:
            _check_header(flags, options_length)
        payload_start = offset + HEADER_LENGTH + options_length
        frame_end = payload_start + payload_length
        if frame_end > end:
            break
        options: tuple[Option, ...] = ()
        if options_length == DATA_DSS_LENGTH:
            options = _decode_data_dss(view, offset + HEADER_LENGTH)
        if options_length and not options:
            options = _decode_frame_options(
                view[offset + HEADER_LENGTH : payload_start], flags
            )
        payload = view[payload_start:frame_end]
        segments.append(
            Segment(
                _FLAGS[flags],
                options,
                payload if views and payload_length else payload.tobytes(),
                window,
            )
        )
        offset = frame_end
    return segments, offset


# describing what a foreign peer sent

_PREVIEW_CHARS = 60
_PREVIEW_BYTES = 16
_TLS_CONTENT_TYPES = {
    0x14: "a TLS change_cipher_spec record",
    0x15: "a TLS alert record",
    0x16: "a TLS handshake record (plain TLS?)",
    0x17: "a TLS application data record",
}
_TLS_ALERTS = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    47: "illegal_parameter",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    80: "internal_error",
    86: "inappropriate_fallback",
    109: "missing_extension",
    112: "unrecognized_name",
    116: "certificate_required",
    120: "no_application_protocol",
}
_HTTP_METHODS = (
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"CONNECT ",
    b"PATCH ",
    b"PRI * HTTP/2",
)
_TEXT_PREFIXES = (
    (b"MPTLS/1 ERROR", "an mptls error reply"),
    (b"HTTP/", "an HTTP response"),
    (b"SSH-", "an SSH banner"),
)


def _first_line(data: bytes) -> str:
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    text = line[:_PREVIEW_CHARS].decode("ascii", "backslashreplace")
    return repr(text + ("..." if len(line) > _PREVIEW_CHARS else ""))


def _describe_tls(data: bytes) -> str | None:
    kind = _TLS_CONTENT_TYPES.get(data[0])
    # A record header is type, then version 3.x (x <= 4).
    if kind is None or (len(data) > 1 and data[1] != 0x03):
        return None
    if len(data) > 2 and data[2] > 0x04:
        return None
    if data[0] == 0x15 and len(data) >= 7:
        level = {1: "warning", 2: "fatal"}.get(data[5], f"level {data[5]}")
        name = _TLS_ALERTS.get(data[6], "unknown")
        return f"{kind} ({level} alert {data[6]}, {name})"
    return kind


def describe_foreign_bytes(data: bytes) -> str:
    """What the first bytes from a peer look like, in a few words.

    Recognises TLS records, HTTP requests and responses, SSH banners
    and mptls error replies. Anything else is shown as a short printable
    preview or as hex. The result is always short, whatever ``data`` is.
    """
    data = bytes(data[:512])
    if not data:
        return "no bytes"
    tls = _describe_tls(data)
    if tls is not None:
        return tls
    for prefix, what in _TEXT_PREFIXES:
        if data.startswith(prefix):
            return f"{what}: {_first_line(data)}"
    if data.startswith(b"MPTLS/") and data[6:7] not in (b"", b"1"):
        return f"another mptls wire version: {_first_line(data)}"
    if data.startswith(_HTTP_METHODS):
        return f"an HTTP request: {_first_line(data)}"
    head = data[:_PREVIEW_CHARS]
    if all(32 <= byte < 127 or byte in b"\r\n\t" for byte in head):
        return f"text: {_first_line(data)}"
    more = "..." if len(data) > _PREVIEW_BYTES else ""
    return f"bytes {data[:_PREVIEW_BYTES].hex(' ')}{more}"
