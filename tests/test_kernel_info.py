"""Decoding the kernel's MPTCP structs, from older (shorter) and newer
(longer) kernels alike. Synthetic structs; no sockets needed."""

from __future__ import annotations

import socket
import struct

import pytest

from mptls.backends.kernel.info import (
    MPTCP_INFO_SIZE,
    decode_mptcp_info,
    decode_sockaddr,
    decode_subflow_addrs,
    subflow_from_records,
)


def _mptcp_info(size: int = MPTCP_INFO_SIZE) -> bytes:
    data = bytearray(max(size, MPTCP_INFO_SIZE))
    struct.pack_into("=BBBBBB", data, 0, 1, 1, 0, 8, 1, 2)
    struct.pack_into("=II", data, 8, 0x2, 0x0A0B0C0D)
    struct.pack_into("=QQQ", data, 16, 1000, 900, 5000)
    struct.pack_into("=BBB", data, 40, 1, 2, 0)
    struct.pack_into("=IQQQQ", data, 44, 3, 30, 4000, 5000, 3900)
    struct.pack_into("=B", data, 80, 2)
    struct.pack_into("=III", data, 84, 10, 20, 30)
    return bytes(data[:size])


def test_full_size_mptcp_info() -> None:
    info = decode_mptcp_info(_mptcp_info())
    assert info.token == "0a0b0c0d"
    assert info.fallback is False
    assert info.fields["subflows"] == 1
    assert info.fields["subflows_max"] == 8
    assert info.fields["bytes_sent"] == 4000
    assert info.fields["subflows_total"] == 2
    assert info.fields["last_ack_recv"] == 30


def test_oldest_mptcp_info_leaves_newer_fields_out() -> None:
    # 5.9 kernels fill up to mptcpi_rcv_nxt: 40 bytes
    info = decode_mptcp_info(_mptcp_info(40))
    assert info.token == "0a0b0c0d"
    assert info.fields["rcv_nxt"] == 5000
    assert info.fields["local_addr_used"] is None
    assert info.fields["bytes_sent"] is None
    assert info.fields["subflows_total"] is None


def test_longer_mptcp_info_from_a_newer_kernel_is_accepted() -> None:
    info = decode_mptcp_info(_mptcp_info(MPTCP_INFO_SIZE + 32))
    assert info.fields == decode_mptcp_info(_mptcp_info()).fields


def test_fallback_flag_and_empty_info() -> None:
    data = bytearray(_mptcp_info())
    struct.pack_into("=I", data, 8, 0x1)
    assert decode_mptcp_info(bytes(data)).fallback is True
    empty = decode_mptcp_info(b"")
    assert empty.token is None
    assert empty.fallback is False


def _sockaddr_in(address: str, port: int) -> bytes:
    data = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
    return data + socket.inet_pton(socket.AF_INET, address) + bytes(8)


def _sockaddr_in6(address: str, port: int) -> bytes:
    data = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port)
    data += bytes(4) + socket.inet_pton(socket.AF_INET6, address)
    return data + bytes(4)


def test_sockaddrs_both_families() -> None:
    assert decode_sockaddr(_sockaddr_in("192.0.2.1", 443)) == (
        "192.0.2.1",
        443,
    )
    assert decode_sockaddr(_sockaddr_in6("2001:db8::1", 8443)) == (
        "2001:db8::1",
        8443,
    )
    assert decode_sockaddr(bytes(16)) is None
    assert decode_sockaddr(b"\x02") is None


def test_subflow_addrs_record() -> None:
    local = _sockaddr_in("192.0.2.1", 50000).ljust(128, b"\0")
    remote = _sockaddr_in("192.0.2.2", 443).ljust(128, b"\0")
    assert decode_subflow_addrs(local + remote) == (
        ("192.0.2.1", 50000),
        ("192.0.2.2", 443),
    )


def _tcp_info(size: int) -> bytes:
    data = bytearray(280)
    struct.pack_into("=B", data, 0, 1)
    struct.pack_into("=I", data, 68, 2500)
    struct.pack_into("=QQ", data, 120, 111, 222)
    struct.pack_into("=Q", data, 200, 333)
    return bytes(data[:size])


def test_subflow_from_full_tcp_info() -> None:
    local = _sockaddr_in("198.51.100.1", 40000).ljust(128, b"\0")
    remote = _sockaddr_in("198.51.100.2", 443).ljust(128, b"\0")
    subflow = subflow_from_records(7, local + remote, _tcp_info(280))
    assert subflow.subflow_id == 7
    assert subflow.local_address == ("198.51.100.1", 40000)
    assert subflow.state == "ESTABLISHED"
    assert subflow.rtt_ms == pytest.approx(2.5)
    assert subflow.bytes_sent == 333
    assert subflow.bytes_received == 222


def test_subflow_from_pre_4_19_tcp_info_counts_acked_bytes() -> None:
    subflow = subflow_from_records(0, b"", _tcp_info(192))
    assert subflow.bytes_sent == 111
    assert subflow.local_address is None


def test_subflow_from_empty_tcp_info() -> None:
    subflow = subflow_from_records(0, b"", b"")
    assert subflow.bytes_sent == 0
    assert subflow.rtt_ms is None
    assert subflow.state == "UNKNOWN(None)"
