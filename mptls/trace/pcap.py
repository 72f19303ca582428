"""Packet traces of the userspace wire: every frame as a pcap packet.

The userspace backend carries each subflow's frames (docs/wire.md) over
an ordinary TCP connection, so a capture of the loopback interface shows
only TLS-looking bytes inside TCP. This module writes what MPTCP tools
expect instead: each frame as one IPv4 or IPv6 packet whose TCP header
holds the subflow's real addresses and ports, the frame's flags and
window, and the frame's MPTCP options, so that Wireshark and tshark
decode MP_CAPABLE, MP_JOIN and DSS as they would on a kernel's subflow.

:class:`PcapWriter` turns frames into classic pcap records (link type
LINKTYPE_RAW, microsecond timestamps). :func:`capture` returns a
:class:`Capture`, which records every frame sent or received by every
userspace subflow of this process while it runs. The backend looks at
the module-level :data:`active` once per flush and once per received
batch; with no capture running that is all a trace costs.

A trace holds what crosses the wire and nothing else: tokens, nonces,
truncated HMACs and TLS ciphertext (and the keys the legacy rfc8684
mode sends in the clear), never the TLS exporter output or any key
taken from it. It must never disturb a connection it watches:
a failed write stops the capture with one warning, and the frames go on
as if no capture had run.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import ipaddress
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

from mptls.errors import ConfigurationError
from mptls.mptcp.framing import Flag, Payload, Segment
from mptls.mptcp.options import encode_options

__all__ = [
    "HEADERS_SNAPLEN",
    "LINKTYPE_RAW",
    "SNAPLEN",
    "Capture",
    "PcapWriter",
    "active",
    "capture",
]

logger = logging.getLogger("mptls.trace")

# the pcap file header (draft-ietf-opsawg-pcap, "File Header"): the
# magic for microsecond timestamps, version 2.4
LINKTYPE_RAW = 101
_MAGIC = 0xA1B2C3D4
_VERSION = (2, 4)
# the longest packet written: the IP length fields are 16 bits
SNAPLEN = 65535
# headers only: an IPv6 header (40) and the longest TCP header (60)
HEADERS_SNAPLEN = 100

# the first four bytes of the files a capture may replace: pcap in
# either byte order, with microsecond or nanosecond times, and pcapng
_CAPTURE_MAGICS = frozenset(
    {
        b"\xd4\xc3\xb2\xa1",
        b"\xa1\xb2\xc3\xd4",
        b"\x4d\x3c\xb2\xa1",
        b"\xa1\xb2\x3c\x4d",
        b"\x0a\x0d\x0d\x0a",
    }
)

_FILE_HEADER = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_IPV4 = struct.Struct(">BBHHHBBH4s4s")
_IPV6 = struct.Struct(">IHBB16s16s")
_TCP = struct.Struct(">HHIIBBHHH")
_IPV4_PSEUDO = struct.Struct(">4s4sBBH")
_IPV6_PSEUDO = struct.Struct(">16s16sI3xB")

_TCP_PROTOCOL = 6
_TTL = 64
_DONT_FRAGMENT = 0x4000
_IPV4_HEADER = 20
_IPV6_HEADER = 40
_TCP_HEADER = 20
_NOP = b"\x01"
_SEQ_MOD = 1 << 32
# the TCP window field is 16 bits and the packets carry no window scale
# option (RFC 7323 section 2): larger frame windows show as its maximum
_MAX_WINDOW = 0xFFFF
_LAST_PIECE_FLAGS = Flag.FIN | Flag.PSH
_ENDING_FLAGS = Flag.FIN | Flag.RST

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# an address as sockets give it: (host, port), or None when unknown
SocketAddress = tuple[str, int] | None
_Endpoint = tuple[IPAddress, int]
_DirectionKey = tuple[_Endpoint, _Endpoint]

active: Capture | None = None
"""The running capture, or None. The userspace backend reads it once per
flush and once per received batch, and calls it only when it is set."""

_activation = threading.Lock()


def _checksum(*parts: bytes | memoryview) -> int:
    """The Internet checksum (RFC 1071) of the parts, one after another.

    Every part but the last has an even length. A number's value in
    base 65536 is congruent to the sum of its 16-bit digits modulo
    65535, which is the ones' complement sum (RFC 1071 section 2(1)).
    """
    total = 0
    for part in parts:
        value = int.from_bytes(part, "big")
        total += value << 8 if len(part) % 2 else value
    if not total:
        return 0xFFFF
    return 0xFFFF - (total % 0xFFFF or 0xFFFF)


@functools.lru_cache(maxsize=1024)
def _ip(host: str) -> IPAddress:
    # a dual-stack socket names an IPv4 peer ::ffff:a.b.c.d; the packet
    # and the other end's view of it use the IPv4 address
    address = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _endpoints(
    local: SocketAddress, remote: SocketAddress
) -> tuple[_Endpoint, _Endpoint]:
    """Both ends as addresses of one IP version; unknown ends are the
    unspecified address and port 0."""
    first = _ip(local[0]) if local else None
    second = _ip(remote[0]) if remote else None
    version = (first or second or ipaddress.IPv4Address(0)).version
    unspecified: IPAddress = (
        ipaddress.IPv4Address(0) if version == 4 else ipaddress.IPv6Address(0)
    )
    return (
        (first or unspecified, local[1] if local else 0),
        (second or unspecified, remote[1] if remote else 0),
    )


class _Direction:
    """One direction of one subflow: the next sequence number."""

    __slots__ = ("finished", "next_seq")

    def __init__(self) -> None:
        self.next_seq = 0
        self.finished = False


class PcapWriter:
    """Writes frames of the userspace wire to a classic pcap file.

    Each frame becomes an IPv4 or IPv6 packet with a TCP header whose
    options are the frame's option bytes, NOP-padded to a multiple of
    four. Sequence numbers are made up per direction of each subflow,
    from 0: SYN and FIN count one and each payload byte one, so that
    the relative numbers Wireshark shows are the subflow sequence
    numbers of the DSS mappings. A frame whose packet would not fit the
    16-bit IP length is split: the first packet carries the frame's
    flags and options, the others continue its payload with ACK alone
    (FIN and PSH go on the last one, after the payload they follow).

    With ``payload`` false only headers are recorded; each record's
    original length still counts the payload, as a snap length would.
    The pcap file header is written at once.
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        payload: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._file = file
        self.payload = payload
        self._clock = clock
        self._directions: dict[_DirectionKey, _Direction] = {}
        self._ip_id = 0
        self.packets = 0
        snaplen = SNAPLEN if payload else HEADERS_SNAPLEN
        file.write(
            _FILE_HEADER.pack(_MAGIC, *_VERSION, 0, 0, snaplen, LINKTYPE_RAW)
        )

    def write_frame(
        self,
        source: SocketAddress,
        destination: SocketAddress,
        flags: int,
        window: int,
        options: bytes,
        payload: Payload = b"",
    ) -> int:
        """Write one frame sent from ``source`` to ``destination``.

        ``options`` are the frame's option bytes as framed; returns the
        number of packets written (more than one when it was split).
        """
        src, dst = _endpoints(source, destination)
        key = (src, dst)
        direction = self._directions.get(key)
        if direction is None or flags & Flag.SYN:
            # a SYN starts the direction again: ISN 0, even where a
            # new TCP connection reuses an old one's ports
            direction = self._directions[key] = _Direction()
        reverse = self._directions.get((dst, src))
        ack = reverse.next_seq if reverse is not None else 0
        seq = direction.next_seq
        syn = 1 if flags & Flag.SYN else 0
        fin = 1 if flags & Flag.FIN else 0

        padded = options + _NOP * (-len(options) % 4)
        timestamp = self._clock()
        written = 0
        for start, end, piece_flags in _pieces(
            src[0].version, len(padded), len(payload), Flag(flags)
        ):
            piece_seq = seq if start == 0 else seq + syn + start
            self._write_packet(
                timestamp,
                src,
                dst,
                piece_seq % _SEQ_MOD,
                ack if piece_flags & Flag.ACK else 0,
                piece_flags,
                min(window, _MAX_WINDOW),
                padded if start == 0 else b"",
                memoryview(payload)[start:end],
            )
            written += 1

        direction.next_seq = (seq + syn + len(payload) + fin) % _SEQ_MOD
        self._forget_ended(key, direction, flags)
        return written

    def _forget_ended(
        self, key: _DirectionKey, direction: _Direction, flags: int
    ) -> None:
        # an RST ends both directions, FINs end one each; the other
        # direction's ACKs need this one's last number until it ends too
        if not flags & _ENDING_FLAGS:
            return
        direction.finished = True
        reverse_key = (key[1], key[0])
        reverse = self._directions.get(reverse_key)
        if flags & Flag.RST or reverse is None or reverse.finished:
            self._directions.pop(key, None)
            self._directions.pop(reverse_key, None)

    def _write_packet(
        self,
        timestamp: float,
        src: _Endpoint,
        dst: _Endpoint,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        options: bytes,
        payload: memoryview,
    ) -> None:
        tcp_length = _TCP_HEADER + len(options) + len(payload)
        if src[0].version == 4:
            pseudo = _IPV4_PSEUDO.pack(
                src[0].packed, dst[0].packed, 0, _TCP_PROTOCOL, tcp_length
            )
            ip_header = self._ipv4_header(src[0], dst[0], tcp_length)
        else:
            pseudo = _IPV6_PSEUDO.pack(
                src[0].packed, dst[0].packed, tcp_length, _TCP_PROTOCOL
            )
            ip_header = _IPV6.pack(
                6 << 28,
                tcp_length,
                _TCP_PROTOCOL,
                _TTL,
                src[0].packed,
                dst[0].packed,
            )
        offset_words = (_TCP_HEADER + len(options)) // 4
        fields = (src[1], dst[1], seq, ack, offset_words << 4, flags, window)
        bare = _TCP.pack(*fields, 0, 0) + options
        checksum = _checksum(pseudo, bare, payload)
        tcp_header = _TCP.pack(*fields, checksum, 0) + options

        length = len(ip_header) + tcp_length
        captured = length if self.payload else length - len(payload)
        microseconds = round(timestamp * 1_000_000)
        seconds, fraction = divmod(microseconds, 1_000_000)
        self._file.write(
            _RECORD.pack(seconds, fraction, captured, length)
            + ip_header
            + tcp_header
        )
        if self.payload and payload:
            self._file.write(payload)
        self.packets += 1

    def _ipv4_header(
        self, src: IPAddress, dst: IPAddress, tcp_length: int
    ) -> bytes:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        values = [
            0x45,
            0,
            _IPV4_HEADER + tcp_length,
            self._ip_id,
            _DONT_FRAGMENT,
            _TTL,
            _TCP_PROTOCOL,
            0,
            src.packed,
            dst.packed,
        ]
        values[7] = _checksum(_IPV4.pack(*values))
        return _IPV4.pack(*values)


def _pieces(
    version: int, options_length: int, payload_length: int, flags: Flag
) -> list[tuple[int, int, Flag]]:
    """How one frame's payload is cut into packets: (start, end, flags).

    A packet, IP header included, is at most the snap length: IPv4's
    total length allows no more, and IPv6's payload length, which
    leaves its header out (RFC 8200 section 3), would allow 40 bytes
    more than a reader such as libpcap keeps of a record.
    """
    ip_header = _IPV4_HEADER if version == 4 else _IPV6_HEADER
    room = SNAPLEN - ip_header - _TCP_HEADER
    first_end = min(payload_length, room - options_length)
    if first_end == payload_length:
        return [(0, payload_length, flags)]
    pieces = [(0, first_end, flags & ~_LAST_PIECE_FLAGS)]
    start = first_end
    while start < payload_length:
        end = min(start + room, payload_length)
        last = end == payload_length
        piece_flags = Flag.ACK | (flags & _LAST_PIECE_FLAGS if last else 0)
        pieces.append((start, end, piece_flags))
        start = end
    return pieces


class SubflowLike(Protocol):
    """What a capture asks of a subflow: its TCP connection's ends."""

    def address(self, which: str) -> tuple[str, int] | None: ...


# how many frames one direction may hold for its receiver in this
# process before the oldest are forgotten (and would then be written a
# second time when that receiver reads them)
_PENDING_LIMIT = 4096


class _Pending:
    """Frames an end in this process sent on one direction, not yet read
    by the other end, if that end is in this process too."""

    __slots__ = ("remote_receiver", "sent_here", "signatures")

    def __init__(self) -> None:
        self.signatures: collections.deque[int] = collections.deque(
            maxlen=_PENDING_LIMIT
        )
        self.sent_here = False
        self.remote_receiver = False


def _signature(segment: Segment, options: bytes) -> int:
    return hash((int(segment.flags), options, len(segment.payload)))


class Capture:
    """Records every frame of every userspace subflow of this process.

    Made by :func:`capture`; :meth:`start` opens the file and makes this
    the one running capture, :meth:`stop` ends it (``with`` does both).
    Both ends of a connection may live in this process (a test, or
    ``mptls demo``): a frame one end sent and the other received is
    written once, when it was sent. ``frames`` counts the frames written,
    ``sent`` and ``received`` the frames this process's subflows sent
    and received, and ``seen_twice`` the received ones that an end in
    this process had sent (so were not written again). ``stopped_by``
    says why a capture stopped on its own (a failed write), or is None.

    A capture replaces an existing file only if that file is empty or a
    packet capture itself: anything else (a key, say) is left alone and
    :meth:`start` refuses. Started again after :meth:`stop`, a capture
    begins its file anew.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        payload: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise ConfigurationError(
                "a packet capture needs a file path, got "
                f"{type(path).__name__}"
            )
        if not os.fspath(path):
            raise ConfigurationError("the packet capture's file name is empty")
        if not isinstance(payload, bool):
            raise ConfigurationError("payload must be True or False")
        self.path = Path(path)
        self.payload = payload
        self._clock = clock
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._writer: PcapWriter | None = None
        self._pending: dict[_DirectionKey, _Pending] = {}
        self.frames = 0
        self.sent = 0
        self.received = 0
        self.seen_twice = 0
        self.stopped_by: str | None = None
        # the file's length after the last batch that reached it whole
        self._complete = 0

    @property
    def running(self) -> bool:
        """Whether this capture is recording now."""
        return self._writer is not None

    def start(self) -> Capture:
        """Open the file and start recording; returns this capture.

        Raises :class:`~mptls.errors.ConfigurationError` when another
        capture is running, when the file cannot be written, or when it
        exists and is neither empty nor a packet capture, before
        anything is recorded. A FIFO's open waits for its reader: inside
        an event loop, start it once the reader is there.
        """
        global active
        with _activation:
            if active is not None:
                raise ConfigurationError(
                    f"a packet capture to {active.path} is already "
                    f"running: stop it before starting one to {self.path}"
                )
            file, writer = self._open()
            with self._lock:
                self._file, self._writer = file, writer
                self._pending.clear()
                self.frames = self.sent = self.received = 0
                self.seen_twice = 0
                self.stopped_by = None
                self._complete = _position(file)
            active = self
        return self

    def _open(self) -> tuple[BinaryIO, PcapWriter]:
        existed = self._check_replaceable()
        try:
            file = open(self.path, "wb")  # noqa: SIM115 (kept open)
        except OSError as exc:
            raise self._unwritable(exc) from exc
        try:
            writer = PcapWriter(file, payload=self.payload, clock=self._clock)
            file.flush()
        except OSError as exc:
            _close_quietly(file)
            if not existed:
                # an empty file of ours would only mislead
                with contextlib.suppress(OSError):
                    self.path.unlink()
            raise self._unwritable(exc) from exc
        return file, writer

    def _check_replaceable(self) -> bool:
        """Whether the path exists; refuses a file that is not a capture."""
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                # a FIFO (a live Wireshark) or a device holds nothing to
                # lose, and reading one would wait for a writer
                return True
            with open(self.path, "rb") as existing:
                head = existing.read(4)
        except FileNotFoundError:
            return False
        except OSError:
            # a directory, no permission...: open for writing says why
            return True
        if head and head not in _CAPTURE_MAGICS:
            raise ConfigurationError(
                f"{self.path} exists and is not a packet capture: not "
                "overwritten (remove it, or name another file)"
            )
        return True

    def _unwritable(self, exc: OSError) -> ConfigurationError:
        return ConfigurationError(
            f"cannot write the packet capture {self.path}: "
            f"{exc.strerror or exc}"
        )

    def stop(self) -> None:
        """Stop recording and close the file; nothing if not running.

        A file that fails to close is reported as a failed write is,
        with one warning: the capture may be short, the caller's work
        is done.
        """
        global active
        with self._lock:
            file, self._file, self._writer = self._file, None, None
            self._pending.clear()
            complete = self._complete
        failure: OSError | None = None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                failure = exc
                self._cut_back(complete)
        # only now may another capture start, to this path too: the cut
        # above must not shorten or pad that capture's file
        with _activation:
            if active is self:
                active = None
        if failure is not None:
            self._stopped(failure, complete)

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<mptls.trace.Capture {str(self.path)!r} {state}>"

    # the userspace backend's hooks: never raise into a connection

    def frames_sent(
        self,
        subflows: Mapping[int, SubflowLike],
        sent: Iterable[tuple[int, Segment]],
    ) -> None:
        """One flush of a connection: (subflow id, segment) pairs."""
        try:
            with self._lock:
                if self._writer is None:
                    return
                for subflow_id, segment in sent:
                    subflow = subflows.get(subflow_id)
                    if subflow is not None:
                        self._record_sent(self._writer, subflow, segment)
                self._flush()
        except Exception as exc:  # a trace must never break a connection
            self._fail(exc)

    def frame_sent(self, subflow: SubflowLike, segment: Segment) -> None:
        """A frame written outside a connection's flush (a refusal)."""
        self.frames_sent({0: subflow}, [(0, segment)])

    def frames_received(
        self, subflow: SubflowLike, segments: Iterable[Segment]
    ) -> None:
        """One batch of frames decoded from a subflow's socket."""
        try:
            with self._lock:
                if self._writer is None:
                    return
                for segment in segments:
                    self._record_received(self._writer, subflow, segment)
                self._flush()
        except Exception as exc:  # a trace must never break a connection
            self._fail(exc)

    def _record_sent(
        self, writer: PcapWriter, subflow: SubflowLike, segment: Segment
    ) -> None:
        local, remote, options = _as_framed(subflow, segment)
        self.sent += 1
        self._write(writer, local, remote, segment, options)
        key = _endpoints(local, remote)
        pending = self._pending.get(key)
        if pending is None or (segment.flags & Flag.SYN and pending.sent_here):
            # a SYN after frames sent here: a new TCP connection on the
            # same ports, whose receiver has nothing of the old one left
            pending = self._pending[key] = _Pending()
        pending.sent_here = True
        if pending.remote_receiver:
            if segment.flags & _ENDING_FLAGS:
                del self._pending[key]
            return
        pending.signatures.append(_signature(segment, options))

    def _record_received(
        self, writer: PcapWriter, subflow: SubflowLike, segment: Segment
    ) -> None:
        local, remote, options = _as_framed(subflow, segment)
        self.received += 1
        key = _endpoints(remote, local)
        back_key = (key[1], key[0])
        pending = self._pending.get(key)
        signatures = pending.signatures if pending is not None else None
        if signatures and signatures[0] == _signature(segment, options):
            # its sender is in this process and wrote it already
            signatures.popleft()
            self.seen_twice += 1
            back = self._pending.get(back_key)
            if back is not None:
                back.remote_receiver = False
            if segment.flags & _ENDING_FLAGS and not signatures:
                del self._pending[key]
            return
        self._write(writer, remote, local, segment, options)
        if pending is None or not pending.sent_here:
            # sent by a peer outside this process: what this end sends
            # back is read there, and nobody here takes it from a queue
            back = self._pending.setdefault(back_key, _Pending())
            back.remote_receiver = True
            back.signatures.clear()
            if segment.flags & _ENDING_FLAGS:
                self._pending.pop(key, None)

    def _write(
        self,
        writer: PcapWriter,
        source: SocketAddress,
        destination: SocketAddress,
        segment: Segment,
        options: bytes,
    ) -> None:
        writer.write_frame(
            source,
            destination,
            segment.flags,
            segment.window,
            options,
            segment.payload,
        )
        self.frames += 1

    def _flush(self) -> None:
        # whole batches reach the file at once: a capture read while it
        # runs, or left by a killed process, ends at a packet boundary
        if self._file is not None:
            self._file.flush()
            self._complete = _position(self._file)

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            file, self._file, self._writer = self._file, None, None
            self._pending.clear()
            complete = self._complete
        if file is None:
            return  # stopped meanwhile, or another thread reported it
        _close_quietly(file)
        self._cut_back(complete)
        # only now may another capture start, to this path too: the cut
        # above must not shorten or pad that capture's file
        global active
        with _activation:
            if active is self:
                active = None
        self._stopped(exc, complete)

    def _stopped(self, exc: Exception, complete: int) -> None:
        self.stopped_by = str(getattr(exc, "strerror", None) or exc)
        logger.warning(
            "packet capture to %s stopped: %s (the file ends with the "
            "last whole batch, %d bytes)",
            self.path,
            self.stopped_by,
            complete,
        )

    def _cut_back(self, complete: int) -> None:
        # what a failed batch left of itself would read as a packet cut
        # short: the file ends with the last batch that reached it whole
        # (a FIFO or a device keeps what it was given)
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.stat(self.path).st_mode):
                os.truncate(self.path, complete)


def _as_framed(
    subflow: SubflowLike, segment: Segment
) -> tuple[SocketAddress, SocketAddress, bytes]:
    """The subflow's two ends and the segment's option bytes."""
    return (
        subflow.address("sockname"),
        subflow.address("peername"),
        encode_options(segment.options),
    )


def _position(file: BinaryIO) -> int:
    # a FIFO has no position, and nothing that could be cut back
    return file.tell() if file.seekable() else 0


def _close_quietly(file: BinaryIO) -> None:
    # the file already failed once: what it does on close is no news
    with contextlib.suppress(OSError):
        file.close()


def capture(path: str | os.PathLike[str], *, payload: bool = True) -> Capture:
    """A capture of this process's userspace frames to ``path``.

    Use it as a context manager, or call ``start()`` and ``stop()``::

        with mptls.trace.capture("trace.pcap") as running:
            ...  # open connections, serve, send
        print(running.frames, "frames")

    ``payload=False`` records headers only: small files, no TLS
    ciphertext. The capture is process-wide on purpose: a listener sees
    a subflow's first segment before any connection exists. The kernel
    backend's subflows are real TCP; capture those with tcpdump.
    """
    return Capture(path, payload=payload)
