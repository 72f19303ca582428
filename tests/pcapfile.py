"""A small pcap reader for the tests of mptls.trace: the file format,
IPv4/IPv6 and TCP headers, checksums checked word by word (RFC 1071)
independently of the writer's own method, and the sequence rule every
captured subflow direction must follow."""

from __future__ import annotations

import array
import ipaddress
import struct
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mptls.mptcp.options import Option, decode_options

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
SEQ_MOD = 1 << 32


@dataclass(frozen=True)
class Packet:
    captured: int
    length: int
    version: int
    source: tuple[str, int]
    destination: tuple[str, int]
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes
    payload: bytes
    # None where the record holds headers only
    ip_checksum_ok: bool | None
    tcp_checksum_ok: bool | None

    @property
    def direction(self) -> tuple[tuple[str, int], tuple[str, int]]:
        return (self.source, self.destination)

    def decoded(self) -> tuple[Option, ...]:
        return decode_options(
            self.options,
            syn=bool(self.flags & SYN),
            ack=bool(self.flags & ACK),
        )

    def only(self, kind: type[Option]) -> list[Any]:
        return [
            option for option in self.decoded() if isinstance(option, kind)
        ]


def ones_complement_sum(data: bytes) -> int:
    """RFC 1071 word by word, independent of the writer's own method."""
    if len(data) % 2:
        data += b"\0"
    words = array.array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def read_pcap(path: Path) -> tuple[tuple[int, ...], list[Packet]]:
    data = path.read_bytes()
    header = struct.unpack_from("<IHHiIII", data)
    packets = []
    offset = 24
    while offset < len(data):
        _, _, captured, length = struct.unpack_from("<IIII", data, offset)
        offset += 16
        packets.append(parse_packet(data[offset : offset + captured], length))
        offset += captured
    return header, packets


def parse_packet(record: bytes, length: int) -> Packet:
    if record[0] >> 4 == 4:
        ip_length = (record[0] & 0x0F) * 4
        assert struct.unpack_from(">H", record, 2)[0] == length
        source_ip, destination_ip = record[12:16], record[16:20]
        ip_ok: bool | None = ones_complement_sum(record[:20]) == 0xFFFF
        tcp_length = length - ip_length
        pseudo = struct.pack(">BBH", 0, 6, tcp_length)
    else:
        ip_length = 40
        assert struct.unpack_from(">H", record, 4)[0] == length - 40
        source_ip, destination_ip = record[8:24], record[24:40]
        ip_ok = None  # IPv6 has no header checksum
        tcp_length = length - ip_length
        pseudo = struct.pack(">I3xB", tcp_length, 6)
    tcp = record[ip_length:]
    sport, dport, seq, ack, offset, flags, window = struct.unpack_from(
        ">HHIIBBH", tcp
    )
    tcp_header = (offset >> 4) * 4
    tcp_ok = None
    if len(record) == length:
        whole = source_ip + destination_ip + pseudo + tcp
        tcp_ok = ones_complement_sum(whole) == 0xFFFF
    return Packet(
        captured=len(record),
        length=length,
        version=record[0] >> 4,
        source=(str(ipaddress.ip_address(source_ip)), sport),
        destination=(str(ipaddress.ip_address(destination_ip)), dport),
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        options=tcp[20:tcp_header],
        payload=tcp[tcp_header:],
        ip_checksum_ok=ip_ok,
        tcp_checksum_ok=tcp_ok,
    )


def by_direction(
    packets: list[Packet],
) -> dict[tuple[tuple[str, int], tuple[str, int]], list[Packet]]:
    grouped: dict[Any, list[Packet]] = defaultdict(list)
    for packet in packets:
        grouped[packet.direction].append(packet)
    return grouped


def sequence_check(packets: list[Packet]) -> None:
    """Each direction numbers from 0, each packet where the last ended;
    an ACK names the other direction's next number at that point."""
    next_seq: dict[Any, int] = {}
    for packet in packets:
        if packet.flags & SYN:
            assert packet.seq == 0, packet
        else:
            assert packet.seq == next_seq[packet.direction], packet
        syn, fin = packet.flags & SYN and 1, packet.flags & FIN and 1
        payload = packet.length - packet.captured + len(packet.payload)
        next_seq[packet.direction] = (packet.seq + syn + payload + fin) % (
            SEQ_MOD
        )
        if packet.flags & ACK:
            reverse = (packet.destination, packet.source)
            assert packet.ack == next_seq.get(reverse, 0), packet
