"""What a packet capture does with the file it writes: a FIFO read live,
records within the snap length on IPv6, and a failed capture that must
not touch the file of the next capture to the same path.

A stand-in subflow (:class:`Ends`) gives the addresses; no socket is
opened.
"""

from __future__ import annotations

import errno
import io
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from pcapfile import SYN, read_pcap

from mptls.mptcp.framing import Flag, Segment
from mptls.trace import Capture, PcapWriter, pcap


class Ends:
    """Just what a capture asks of a subflow: its two addresses."""

    def __init__(self, local: tuple[str, int], remote: tuple[str, int]):
        self.ends = {"sockname": local, "peername": remote}

    def address(self, which: str) -> tuple[str, int] | None:
        return self.ends[which]


CLIENT = Ends(("127.0.0.1", 40000), ("127.0.0.1", 443))
SYN_SEGMENT = Segment(Flag.SYN, ())


def test_a_fifo_is_written_as_it_runs(tmp_path: Path) -> None:
    # a live reader (Wireshark, tshark -i -) takes a capture through a
    # FIFO: starting must not wait for a writer, nor the capture stop
    # because a pipe has no position
    fifo = tmp_path / "live"
    os.mkfifo(fifo)
    # the reader's end, holding bytes of its own first: a capture that
    # read the FIFO to judge its contents would take them, not hang
    reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    os.write(reader, b"....")
    try:
        running = Capture(fifo, payload=False, clock=lambda: 1.0).start()
        try:
            running.frames_sent({0: CLIENT}, [(0, SYN_SEGMENT)])
        finally:
            running.stop()
        data = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert running.stopped_by is None and running.frames == 1
    assert data.startswith(b"....")
    copy = tmp_path / "copy.pcap"
    copy.write_bytes(data[4:])
    _, packets = read_pcap(copy)
    assert [packet.flags for packet in packets] == [SYN]


def test_an_ipv6_packet_fits_the_snap_length() -> None:
    # IPv6's payload length leaves its own header out: a frame as big as
    # IPv4 allows would make a record longer than the file's snap length,
    # which libpcap cuts
    file = io.BytesIO()
    writer = PcapWriter(file)
    writer.write_frame(
        ("::1", 40000), ("::1", 443), Flag.ACK, 65535, b"", bytes(65535)
    )
    data = file.getvalue()
    (snaplen,) = struct.unpack_from("<I", data, 16)
    offset, carried = 24, 0
    while offset < len(data):
        _, _, captured, length = struct.unpack_from("<IIII", data, offset)
        assert captured == length <= snaplen
        carried += length - 40 - 20
        offset += 16 + captured
    assert carried == 65535


def test_a_capture_started_as_a_failed_one_ends_is_left_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a capture that fails cuts its file back to its last whole batch;
    # a capture started on the same path meanwhile must not be cut
    path = tmp_path / "same.pcap"
    write_frame = PcapWriter.write_frame
    writes = 0

    def full_at_the_third(self: PcapWriter, *args: Any) -> int:
        nonlocal writes
        writes += 1
        if writes == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_frame(self, *args)

    monkeypatch.setattr(PcapWriter, "write_frame", full_at_the_third)
    stopped = Capture._stopped
    later: list[Capture] = []

    def start_another(self: Capture, *args: Any) -> None:
        # the first moment another capture may start: as late as the
        # failed one lets it, which must be after its cut
        if pcap.active is None and not later:
            second = Capture(path, clock=lambda: 2.0).start()
            second.frames_sent({0: CLIENT}, [(0, SYN_SEGMENT)])
            second.stop()
            later.append(second)
        stopped(self, *args)

    monkeypatch.setattr(Capture, "_stopped", start_another)
    first = Capture(path, clock=lambda: 1.0).start()
    ack = Segment(Flag.ACK, (), b"x" * 100)
    for _ in range(3):
        first.frames_sent({0: CLIENT}, [(0, ack)])
    assert first.stopped_by == "No space left on device"
    assert later and later[0].frames == 1
    _, packets = read_pcap(path)
    assert [packet.flags for packet in packets] == [SYN]
    assert path.stat().st_size == 24 + 16 + 40
