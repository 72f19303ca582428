"""The kernel's MPTCP state, read with SOL_MPTCP getsockopts and decoded.

``struct mptcp_info``, ``struct tcp_info`` and the subflow address
records grow with kernel releases, and the kernel copies at most the
size either side knows. Every decoder here therefore reads fields by
offset and leaves out (``None``) whatever a shorter struct does not hold,
and ignores whatever a longer one adds. Offsets follow
include/uapi/linux/mptcp.h and include/uapi/linux/tcp.h.

The getsockopts that take an input header (MPTCP_TCPINFO,
MPTCP_SUBFLOW_ADDRS, MPTCP_FULL_INFO) cannot go through
``socket.getsockopt``, which hands the kernel a zeroed buffer, so they
are made through the C library's ``getsockopt``.

This module only reads. It never sets a socket option, and it never sees
key material: the kernel exposes none.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mptls.backends.base import SubflowInfo
from mptls.backends.kernel.sockets import SOL_MPTCP, MptcpSockopt
from mptls.backends.tcpinfo import TCP_INFO_FIELDS, TCP_INFO_STRIDE
from mptls.errors import BackendError

# struct mptcp_info: (field, offset, struct format). The release that
# added each group is noted; a field past the returned length is None.
MPTCP_INFO_FIELDS: tuple[tuple[str, int, str], ...] = (
    # 5.9
    ("subflows", 0, "B"),
    ("add_addr_signal", 1, "B"),
    ("add_addr_accepted", 2, "B"),
    ("subflows_max", 3, "B"),
    ("add_addr_signal_max", 4, "B"),
    ("add_addr_accepted_max", 5, "B"),
    ("flags", 8, "I"),
    ("token", 12, "I"),
    ("write_seq", 16, "Q"),
    ("snd_una", 24, "Q"),
    ("rcv_nxt", 32, "Q"),
    # 5.12, 5.14
    ("local_addr_used", 40, "B"),
    ("local_addr_max", 41, "B"),
    ("csum_enabled", 42, "B"),
    # 6.5
    ("retransmits", 44, "I"),
    ("bytes_retrans", 48, "Q"),
    ("bytes_sent", 56, "Q"),
    ("bytes_received", 64, "Q"),
    ("bytes_acked", 72, "Q"),
    # 6.8, 6.10
    ("subflows_total", 80, "B"),
    ("last_data_sent", 84, "I"),
    ("last_data_recv", 88, "I"),
    ("last_ack_recv", 92, "I"),
)
MPTCP_INFO_SIZE = 96


# MPTCP_INFO_FLAG_* (include/uapi/linux/mptcp.h)
FLAG_FALLBACK = 0x1
FLAG_REMOTE_KEY_RECEIVED = 0x2

# include/net/tcp_states.h
TCP_STATES: Mapping[int, str] = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}

# struct mptcp_subflow_data: size_subflow_data, num_subflows,
# size_kernel, size_user.
SUBFLOW_DATA = struct.Struct("=IIII")
# struct mptcp_subflow_addrs: two sockaddr_storage unions.
SUBFLOW_ADDRS_SIZE = 256
# struct mptcp_subflow_info: u32 id, then the (8-aligned) addresses.
SUBFLOW_INFO_SIZE = 264
# struct mptcp_full_info up to mptcp_info: six u32 sizes and counts,
# then two u64 user pointers.
FULL_INFO_HEADER = struct.Struct("=IIIIIIQQ")
MAX_SUBFLOWS = 16


def decode_fields(
    data: bytes, fields: tuple[tuple[str, int, str], ...]
) -> dict[str, int | None]:
    """Each field read in host byte order, ``None`` past ``data``'s end."""
    values: dict[str, int | None] = {}
    for name, offset, fmt in fields:
        layout = struct.Struct("=" + fmt)
        if offset + layout.size <= len(data):
            values[name] = layout.unpack_from(data, offset)[0]
        else:
            values[name] = None
    return values


@dataclass(frozen=True, slots=True)
class KernelMptcpInfo:
    """``struct mptcp_info`` as far as the running kernel filled it."""

    fields: Mapping[str, int | None]

    @property
    def token(self) -> str | None:
        """The local token as 8 hex digits (``mptcpi_token``)."""
        token = self.fields.get("token")
        return None if token is None else f"{token:08x}"

    @property
    def fallback(self) -> bool:
        return bool((self.fields.get("flags") or 0) & FLAG_FALLBACK)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.fields)


def decode_mptcp_info(data: bytes) -> KernelMptcpInfo:
    """Decode ``struct mptcp_info`` of any length a kernel returns."""
    return KernelMptcpInfo(decode_fields(data, MPTCP_INFO_FIELDS))


def decode_sockaddr(data: bytes) -> tuple[str, int] | None:
    """``(address, port)`` from a sockaddr_in/_in6, ``None`` if empty."""
    if len(data) < 2:
        return None
    family = struct.unpack_from("=H", data, 0)[0]
    if family == socket.AF_INET and len(data) >= 8:
        port = struct.unpack_from("!H", data, 2)[0]
        return socket.inet_ntop(socket.AF_INET, data[4:8]), port
    if family == socket.AF_INET6 and len(data) >= 24:
        port = struct.unpack_from("!H", data, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


def decode_subflow_addrs(
    data: bytes,
) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """Local and remote address of one ``struct mptcp_subflow_addrs``."""
    half = SUBFLOW_ADDRS_SIZE // 2
    return decode_sockaddr(data[:half]), decode_sockaddr(data[half:])


def subflow_from_records(
    subflow_id: int, addrs: bytes, tcp_info: bytes
) -> SubflowInfo:
    """One :class:`SubflowInfo` from its address record and tcp_info."""
    local, remote = decode_subflow_addrs(addrs)
    tcp = decode_fields(tcp_info, TCP_INFO_FIELDS)
    state = tcp["state"]
    rtt_us = tcp["rtt_us"]
    # tcpi_bytes_sent (4.19) counts retransmissions too; older kernels
    # only have tcpi_bytes_acked.
    sent = tcp["bytes_sent"]
    if sent is None:
        sent = tcp["bytes_acked"]
    return SubflowInfo(
        subflow_id=subflow_id,
        local_address=local,
        remote_address=remote,
        state=TCP_STATES.get(state or 0, f"UNKNOWN({state})"),
        bytes_sent=sent or 0,
        bytes_received=tcp["bytes_received"] or 0,
        rtt_ms=None if rtt_us is None else rtt_us / 1000.0,
    )


@dataclass(frozen=True, slots=True)
class KernelSnapshot:
    """What the kernel said about one MPTCP connection."""

    mptcp_info: KernelMptcpInfo
    subflows: tuple[SubflowInfo, ...]
    source: str


_libc = ctypes.CDLL(None, use_errno=True)


def raw_getsockopt(fd: int, level: int, name: int, buffer: Any) -> int:
    """The C library's getsockopt on a prepared buffer; returns optlen.

    Raises OSError with the kernel's errno.
    """
    optlen = ctypes.c_uint32(len(buffer))
    result = _libc.getsockopt(
        fd, level, int(name), buffer, ctypes.byref(optlen)
    )
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, errno.errorcode.get(code, str(code)))
    return optlen.value


def read_mptcp_info(sock: socket.socket) -> KernelMptcpInfo:
    """MPTCP_INFO for ``sock`` (OSError as the kernel gave it)."""
    data = sock.getsockopt(SOL_MPTCP, MptcpSockopt.MPTCP_INFO, MPTCP_INFO_SIZE)
    return decode_mptcp_info(data)


def read_full_info(fd: int) -> KernelSnapshot:
    """MPTCP_FULL_INFO (6.5+): connection and subflows in one call."""
    subflow_buffer = ctypes.create_string_buffer(
        SUBFLOW_INFO_SIZE * MAX_SUBFLOWS
    )
    tcp_buffer = ctypes.create_string_buffer(TCP_INFO_STRIDE * MAX_SUBFLOWS)
    header = ctypes.create_string_buffer(
        FULL_INFO_HEADER.size + MPTCP_INFO_SIZE
    )
    FULL_INFO_HEADER.pack_into(
        header,
        0,
        0,
        TCP_INFO_STRIDE,
        0,
        SUBFLOW_INFO_SIZE,
        0,
        MAX_SUBFLOWS,
        ctypes.addressof(subflow_buffer),
        ctypes.addressof(tcp_buffer),
    )
    length = raw_getsockopt(
        fd, SOL_MPTCP, MptcpSockopt.MPTCP_FULL_INFO, header
    )
    raw = header.raw[:length]
    if length < FULL_INFO_HEADER.size:
        raise BackendError("MPTCP_FULL_INFO returned a short header")
    # The kernel shrinks each *_user size to what it copied per record,
    # and steps through the arrays by that size.
    _, tcp_stride, _, subflow_stride, count, _, _, _ = (
        FULL_INFO_HEADER.unpack_from(raw, 0)
    )
    subflows = []
    for index in range(min(count, MAX_SUBFLOWS)):
        record = _record(subflow_buffer.raw, index, subflow_stride)
        subflow_id = struct.unpack_from("=I", record, 0)[0]
        subflows.append(
            subflow_from_records(
                subflow_id,
                record[8:],
                _record(tcp_buffer.raw, index, tcp_stride),
            )
        )
    info = decode_mptcp_info(raw[FULL_INFO_HEADER.size :])
    return KernelSnapshot(info, tuple(subflows), "MPTCP_FULL_INFO")


def _record(data: bytes, index: int, stride: int) -> bytes:
    return data[index * stride : (index + 1) * stride]


def read_subflow_array(
    fd: int, name: MptcpSockopt, stride: int
) -> list[bytes]:
    """One record per subflow from MPTCP_SUBFLOW_ADDRS or MPTCP_TCPINFO."""
    buffer = ctypes.create_string_buffer(
        SUBFLOW_DATA.size + stride * MAX_SUBFLOWS
    )
    SUBFLOW_DATA.pack_into(buffer, 0, SUBFLOW_DATA.size, 0, 0, stride)
    raw_getsockopt(fd, SOL_MPTCP, name, buffer)
    # size_user comes back as the size the kernel copied per record,
    # which is also its step through the array.
    header_size, count, _, copied = SUBFLOW_DATA.unpack_from(buffer.raw, 0)
    records = buffer.raw[header_size:]
    return [
        _record(records, index, copied)
        for index in range(min(count, MAX_SUBFLOWS))
    ]


def read_split_info(sock: socket.socket) -> KernelSnapshot:
    """MPTCP_INFO, MPTCP_SUBFLOW_ADDRS and MPTCP_TCPINFO (5.16 to 6.4).

    The two arrays come from two calls, so a subflow that opens or closes
    in between shifts them; records are paired only when the counts
    agree, and otherwise the subflows go without byte counts.
    """
    info = read_mptcp_info(sock)
    fd = sock.fileno()
    addrs = read_subflow_array(
        fd, MptcpSockopt.MPTCP_SUBFLOW_ADDRS, SUBFLOW_ADDRS_SIZE
    )
    tcp_infos = read_subflow_array(
        fd, MptcpSockopt.MPTCP_TCPINFO, TCP_INFO_STRIDE
    )
    if len(tcp_infos) != len(addrs):
        tcp_infos = [b""] * len(addrs)
    subflows = tuple(
        subflow_from_records(index, addr, tcp)
        for index, (addr, tcp) in enumerate(zip(addrs, tcp_infos, strict=True))
    )
    return KernelSnapshot(info, subflows, "MPTCP_SUBFLOW_ADDRS+MPTCP_TCPINFO")


def read_snapshot(sock: socket.socket) -> KernelSnapshot:
    """The fullest snapshot this kernel gives for a connected socket.

    Raises OSError as the kernel gave it (EOPNOTSUPP or ENOPROTOOPT
    after a fallback to TCP).
    """
    try:
        return read_full_info(sock.fileno())
    except OSError as exc:
        # Kernels before 6.5 do not know MPTCP_FULL_INFO: EOPNOTSUPP.
        # A fallen-back socket gives the same errors, which MPTCP_INFO
        # in read_split_info then repeats to the caller.
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            raise
    return read_split_info(sock)
