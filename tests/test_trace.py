"""Packet traces of the userspace wire (mptls.trace): real connections on
loopback, captured, and the files read back with a small pcap reader."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pcapfile import (
    ACK,
    FIN,
    RST,
    SYN,
    Packet,
    by_direction,
    read_pcap,
    sequence_check,
)
from pki import Pki
from support import (
    COMMAND_TIMEOUT,
    readline_within,
    reap,
    run_mptls,
    served_by,
    serving,
    skip_without_ipv6,
)

import mptls
from mptls.cli import demo as demo_command
from mptls.cli import main as cli_main
from mptls.errors import ConfigurationError, MptlsError
from mptls.mptcp.crypto import idsn_from_token
from mptls.mptcp.options import (
    Dss,
    MpCapable,
    MpJoinSyn,
    MpJoinSynAck,
    MpTcpRst,
    ResetReason,
)
from mptls.trace import Capture, PcapWriter, capture, pcap

# the answer the server sends; it must never show in a capture
PLAINTEXT = b"the answer, in plaintext, which no capture may show"


# connections to capture


async def answer_after_reading(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while await reader.read(256 * 1024):
        pass
    writer.write(PLAINTEXT)
    writer.write_eof()
    await writer.drain()


@dataclass
class Transfer:
    client: mptls.MptcpInfo
    server: mptls.MptcpInfo
    answer: bytes


async def transfer(
    pki: Pki,
    upload: bytes,
    *,
    host: str = "127.0.0.1",
    join_from: str | None = "127.0.0.2",
    one_write: bool = False,
) -> Transfer:
    """One connection: a join from ``join_from`` (if any), ``upload``
    sent, the server's answer read, both ends closed."""
    ended: asyncio.Future[mptls.MptcpInfo] = (
        asyncio.get_running_loop().create_future()
    )

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await answer_after_reading(reader, writer)
        finally:
            writer.close()
            await writer.wait_closed()
            ended.set_result(writer.get_extra_info("mptcp"))

    server = await mptls.start_server(handle, host, 0, ssl=pki.server())
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await mptls.open_connection(
            host, port, ssl=pki.client(), local_addrs=[host]
        )
        if join_from is not None:
            # the join is established when add_path returns: the data
            # after it may take either path
            await writer.transport.add_path((host, port), local=join_from)
        if one_write:
            writer.write(upload)
        else:
            for start in range(0, len(upload), 64 * 1024):
                writer.write(upload[start : start + 64 * 1024])
                await writer.drain()
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        server_info = await asyncio.wait_for(ended, 10)
        client_info = writer.get_extra_info("mptcp")
    return Transfer(client_info, server_info, answer)


def seeded(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Captured:
    path: Path
    header: tuple[int, ...]
    packets: list[Packet]
    run: Transfer
    capture: Capture


@pytest.fixture(scope="module")
def two_paths(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Captured:
    """A captured connection over 127.0.0.1 with a join from 127.0.0.2."""
    path = tmp_path_factory.mktemp("trace") / "two-paths.pcap"
    with capture(path) as running:
        run = asyncio.run(transfer(pki, seeded(300 * 1024, 1)))
    assert run.answer == PLAINTEXT
    header, packets = read_pcap(path)
    return Captured(path, header, packets, run, running)


# the file


def test_the_file_is_classic_pcap_of_raw_ip(two_paths: Captured) -> None:
    magic, major, minor, zone, sigfigs, snaplen, link = two_paths.header
    assert (magic, major, minor) == (0xA1B2C3D4, 2, 4)
    assert (zone, sigfigs, snaplen) == (0, 0, 65535)
    assert link == 101  # LINKTYPE_RAW
    assert two_paths.packets
    assert all(packet.version == 4 for packet in two_paths.packets)


def test_every_checksum_is_valid(two_paths: Captured) -> None:
    for packet in two_paths.packets:
        assert packet.ip_checksum_ok is True
        assert packet.tcp_checksum_ok is True


def test_the_addresses_are_the_subflows_own(two_paths: Captured) -> None:
    client = two_paths.run.client
    subflows = {
        (sub.local_address, sub.remote_address) for sub in client.subflows
    }
    assert {local[0] for local, _ in subflows} == {"127.0.0.1", "127.0.0.2"}
    both_ways = subflows | {(b, a) for a, b in subflows}
    assert {packet.direction for packet in two_paths.packets} == both_ways
    # the server's own view names the same TCP connections
    server = two_paths.run.server
    assert {
        (sub.remote_address, sub.local_address) for sub in server.subflows
    } == subflows


def test_the_handshakes_decode_on_both_sides(two_paths: Captured) -> None:
    client_addresses = {
        sub.local_address for sub in two_paths.run.client.subflows
    }
    seen: dict[str, set[str]] = {"client": set(), "server": set()}
    for packet in two_paths.packets:
        side = "client" if packet.source in client_addresses else "server"
        flags = packet.flags & (SYN | ACK | FIN | RST)
        for option in packet.decoded():
            name = type(option).__name__
            if isinstance(option, MpCapable | MpJoinSyn | MpJoinSynAck):
                name += {SYN: " SYN", SYN | ACK: " SYN|ACK"}.get(flags, "")
            if isinstance(option, MpCapable) and flags == ACK:
                assert option.receiver_key is not None
                name += " third ACK"
            if isinstance(option, Dss):
                if option.dsn is not None and option.data_length:
                    seen[side].add("DSS mapping")
                if option.data_fin:
                    name = "DATA_FIN"
            seen[side].add(name)
    assert {
        "MpCapable SYN",
        "MpCapable third ACK",
        "MpJoinSyn SYN",
        "MpJoinAck",
        "DSS mapping",
        "DATA_FIN",
    } <= seen["client"]
    assert {
        "MpCapable SYN|ACK",
        "MpJoinSynAck SYN|ACK",
        "DSS mapping",
        "DATA_FIN",
    } <= seen["server"]


def test_sequence_numbers_count_payload_syn_and_fin(
    two_paths: Captured,
) -> None:
    sequence_check(two_paths.packets)
    # every subflow direction starts with its SYN and ends with its FIN
    for packets in by_direction(two_paths.packets).values():
        assert packets[0].flags & SYN
        assert packets[-1].flags & FIN


def test_dss_mappings_carry_the_tcp_sequence_numbers(
    two_paths: Captured,
) -> None:
    mappings = 0
    for packet in two_paths.packets:
        for dss in packet.only(Dss):
            if dss.dsn is None or not packet.payload:
                continue  # a DATA_FIN alone maps no subflow byte
            assert dss.ssn == packet.seq
            mappings += 1
    assert mappings > 4


def data_stream(packets: list[Packet], idsn: int) -> bytes:
    """One direction of the data-level stream, put together from every
    subflow's payload by the DSS mappings (RFC 8684 section 3.3.1); the
    first subflow's bytes before its first mapping map implicitly, from
    IDSN + 1 on (docs/wire.md)."""
    pieces: list[tuple[int, bytes]] = []
    for one_way in by_direction(packets).values():
        stream = b"".join(packet.payload for packet in one_way)
        mapped = [
            dss
            for packet in one_way
            if packet.payload
            for dss in packet.only(Dss)
            if dss.dsn is not None
        ]
        if one_way[0].only(MpCapable):
            first = mapped[0].ssn - 1 if mapped else len(stream)
            pieces.append((0, stream[:first]))
        for dss in mapped:
            start = dss.ssn - 1
            length = dss.data_length - (1 if dss.data_fin else 0)
            offset = (dss.dsn - idsn - 1) % (1 << 64)
            pieces.append((offset, stream[start : start + length]))
    assembled = bytearray()
    for offset, piece in sorted(pieces):
        assert offset <= len(assembled), "a hole in the data-level stream"
        assembled[offset : offset + len(piece)] = piece
    return bytes(assembled)


def tls_records(stream: bytes) -> list[int]:
    """The content types of the whole TLS records ``stream`` holds."""
    types = []
    offset = 0
    while offset < len(stream):
        kind, major, length = struct.unpack_from(">BBxH", stream, offset)
        assert major == 3 and kind in (20, 21, 22, 23), stream[offset:][:8]
        types.append(kind)
        offset += 5 + length
    assert offset == len(stream)
    return types


def test_the_payloads_are_the_tls_stream_and_nothing_else(
    two_paths: Captured,
) -> None:
    client, server = two_paths.run.client, two_paths.run.server
    client_ends = {sub.local_address for sub in client.subflows}
    sent_by_client = [
        packet for packet in two_paths.packets if packet.source in client_ends
    ]
    sent_by_server = [
        packet
        for packet in two_paths.packets
        if packet.source not in client_ends
    ]
    # every payload byte of each side, and only those
    for packets, info in ((sent_by_client, client), (sent_by_server, server)):
        for sub in info.subflows:
            carried = sum(
                len(packet.payload)
                for packet in packets
                if packet.direction == (sub.local_address, sub.remote_address)
            )
            assert carried == sub.bytes_sent
    # the bytes are TLS records, in order: ciphertext from the first
    # record after the handshake, so the application's bytes never show
    assert client.local_token is not None and server.local_token is not None
    upload = data_stream(
        sent_by_client, idsn_from_token(bytes.fromhex(client.local_token))
    )
    answer = data_stream(
        sent_by_server, idsn_from_token(bytes.fromhex(server.local_token))
    )
    assert len(upload) > 300 * 1024
    assert tls_records(upload)[0] == 22  # the ClientHello
    assert tls_records(answer)[0] == 22  # the ServerHello
    assert all(PLAINTEXT not in packet.payload for packet in two_paths.packets)
    assert seeded(300 * 1024, 1)[:64] not in upload


def test_each_frame_is_written_once(two_paths: Captured) -> None:
    # both ends are in this process: each frame sent is also received
    running = two_paths.capture
    assert running.received == running.seen_twice > 0
    assert running.frames == running.sent
    assert len(two_paths.packets) >= running.frames


# tshark, where it is installed


def tshark_fields(
    path: Path, *fields: str, options: tuple[str, ...] = ()
) -> list[str]:
    command = ["tshark", "-r", str(path), *options, "-T", "fields"]
    for field in fields:
        command += ["-e", field]
    result = subprocess.run(
        command, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


@pytest.mark.skipif(
    shutil.which("tshark") is None,
    reason="tshark is not installed (Debian: apt-get install tshark)",
)
def test_tshark_decodes_the_mptcp_options(two_paths: Captured) -> None:
    subtypes = {
        int(value)
        for line in tshark_fields(two_paths.path, "tcp.options.mptcp.subtype")
        for value in line.split(",")
        if value
    }
    assert {0, 1, 2} <= subtypes  # MP_CAPABLE, MP_JOIN, DSS
    # and tshark finds every checksum good (status 1) when asked to check
    statuses = tshark_fields(
        two_paths.path,
        "ip.checksum.status",
        "tcp.checksum.status",
        options=(
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "tcp.check_checksum:TRUE",
        ),
    )
    assert len(statuses) == len(two_paths.packets)
    assert set(statuses) == {"1\t1"}


# what a frame becomes


async def test_a_frame_larger_than_a_packet_is_split(
    pki: Pki, tmp_path: Path
) -> None:
    path = tmp_path / "split.pcap"
    with capture(path):
        run = await transfer(
            pki, seeded(200 * 1024, 2), join_from=None, one_write=True
        )
    assert run.answer == PLAINTEXT
    _, packets = read_pcap(path)
    sequence_check(packets)

    split = 0
    for direction in by_direction(packets).values():
        for index, packet in enumerate(direction):
            mapped = [
                dss.data_length - (1 if dss.data_fin else 0)
                for dss in packet.only(Dss)
                if dss.dsn is not None
            ]
            if not mapped or len(packet.payload) >= mapped[0]:
                continue
            # a full-size first packet, then ACK-only ones without options
            # until the mapping's bytes are all there
            assert packet.length == 65535
            carried = len(packet.payload)
            for rest in direction[index + 1 :]:
                if carried >= mapped[0]:
                    break
                assert (rest.flags, rest.options) == (ACK, b"")
                carried += len(rest.payload)
            assert carried == mapped[0]
            split += 1
    assert split >= 2
    assert all(packet.tcp_checksum_ok for packet in packets)


async def test_headers_only_leave_the_payload_out(
    pki: Pki, tmp_path: Path
) -> None:
    path = tmp_path / "headers.pcap"
    with capture(path, payload=False) as running:
        await transfer(pki, seeded(100 * 1024, 3))
    header, packets = read_pcap(path)
    assert header[5] == 100  # the snap length: IPv6 and TCP headers
    with_payload = [p for p in packets if p.length > 20 + 20 + len(p.options)]
    assert len(with_payload) > 2
    for packet in with_payload:
        assert packet.payload == b""
        assert packet.captured == 20 + 20 + len(packet.options)
        assert packet.captured < packet.length
    # the options are all there, and no TLS byte is
    assert any(packet.only(MpJoinSyn) for packet in packets)
    assert path.stat().st_size < 100 * len(packets) + 24
    assert running.frames == running.sent
    sequence_check(packets)


async def test_ipv6_loopback(pki: Pki, tmp_path: Path) -> None:
    skip_without_ipv6("::1")
    path = tmp_path / "ipv6.pcap"
    with capture(path):
        run = await transfer(
            pki, seeded(50 * 1024, 4), host="::1", join_from=None
        )
    assert run.answer == PLAINTEXT
    _, packets = read_pcap(path)
    assert {packet.version for packet in packets} == {6}
    assert all(packet.tcp_checksum_ok for packet in packets)
    assert packets[0].source[0] == "::1"
    assert packets[0].only(MpCapable)
    sequence_check(packets)


async def test_a_refused_subflow_is_captured(pki: Pki, tmp_path: Path) -> None:
    # a G-only server refuses a client that offers keys in the clear: the
    # listener answers before any connection exists
    server = await mptls.start_server(
        answer_after_reading, "127.0.0.1", 0, ssl=pki.server()
    )
    port = server.sockets[0].getsockname()[1]
    path = tmp_path / "refused.pcap"
    async with server:
        with capture(path), pytest.raises(MptlsError):
            await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), mode="rfc8684"
            )
    _, packets = read_pcap(path)
    assert [packet.flags for packet in packets] == [SYN, RST]
    assert packets[0].only(MpCapable)
    (reset,) = packets[1].only(MpTcpRst)
    assert reset.reason == ResetReason.ADMINISTRATIVELY_PROHIBITED
    assert packets[1].source == packets[0].destination


# starting, stopping, failing


@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_an_unwritable_path_is_refused_before_anything(
    tmp_path: Path, where: str
) -> None:
    path = (
        tmp_path / "missing" / "x.pcap"
        if where == "missing directory"
        else tmp_path
    )
    before = sorted(tmp_path.iterdir())
    running = capture(path)
    with pytest.raises(ConfigurationError, match="packet capture") as info:
        running.start()
    assert str(path) in str(info.value)
    assert pcap.active is None and not running.running
    assert sorted(tmp_path.iterdir()) == before


def test_a_second_capture_is_refused(tmp_path: Path) -> None:
    first, second = tmp_path / "first.pcap", tmp_path / "second.pcap"
    with capture(first) as running:
        with pytest.raises(ConfigurationError, match="already running"):
            capture(second).start()
        assert pcap.active is running
    assert not second.exists()
    assert pcap.active is None
    # once stopped, another may start
    with capture(second):
        assert pcap.active is not None


async def test_no_capture_costs_nothing_visible(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("called with no capture running")

    with capture(tmp_path / "before.pcap") as stopped:
        pass
    for hook in ("frames_sent", "frame_sent", "frames_received"):
        monkeypatch.setattr(Capture, hook, never)
    monkeypatch.setattr(PcapWriter, "write_frame", never)
    run = await transfer(pki, seeded(64 * 1024, 5))
    assert run.answer == PLAINTEXT
    assert (stopped.frames, stopped.sent, stopped.received) == (0, 0, 0)
    assert pcap.active is None


async def test_a_failed_write_stops_the_capture_not_the_connection(
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_frame = PcapWriter.write_frame
    calls = 0

    def disk_full_at_the_tenth(self: PcapWriter, *args: Any) -> int:
        nonlocal calls
        calls += 1
        if calls >= 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_frame(self, *args)

    monkeypatch.setattr(PcapWriter, "write_frame", disk_full_at_the_tenth)
    caplog.set_level(logging.WARNING)
    path = tmp_path / "full.pcap"
    with capture(path) as running:
        run = await transfer(pki, seeded(300 * 1024, 6))
        assert not running.running and pcap.active is None
    assert run.answer == PLAINTEXT
    assert calls == 10
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.getMessage()) for r in warnings] == [
        (
            "mptls.trace",
            f"packet capture to {path} stopped: No space left on device "
            "(the file ends with the last whole batch, "
            f"{path.stat().st_size} bytes)",
        )
    ]
    assert running.stopped_by == "No space left on device"
    # what was written before the failure is a readable file that ends
    # with a whole packet: the batch that failed left nothing behind
    _, packets = read_pcap(path)
    assert 1 <= len(packets) <= 9
    size = 24 + sum(16 + packet.captured for packet in packets)
    assert path.stat().st_size == size


# the command line


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    result = run_mptls("certs", "--dir", str(directory))
    assert result.returncode == 0, result.stderr.decode()
    return directory


def frames_of(packets: list[Packet]) -> dict[Any, list[tuple[Any, ...]]]:
    """Per direction, what both ends of a TCP connection must agree on."""
    return {
        direction: [
            (p.seq, p.flags, p.window, p.options, p.payload) for p in packets
        ]
        for direction, packets in by_direction(packets).items()
    }


def test_serve_and_connect_capture_the_same_frames(
    certs: Path, tmp_path: Path
) -> None:
    server_pcap, client_pcap = tmp_path / "serve.pcap", tmp_path / "conn.pcap"
    with serving(certs, "--echo", "--once", "--pcap", str(server_pcap)) as (
        server,
        port,
    ):
        line = b"hello over two paths\n" * 1000
        client = run_mptls(
            "connect",
            "127.0.0.1",
            port,
            "--cafile",
            str(certs / "ca.pem"),
            "--paths",
            "127.0.0.1,127.0.0.2",
            "--pcap",
            str(client_pcap),
            "-v",
            stdin=line,
        )
        assert client.returncode == 0, client.stderr.decode()
        assert client.stdout == line
        assert server.wait(timeout=COMMAND_TIMEOUT) == 0
    assert b"packet capture: " in client.stderr

    _, at_server = read_pcap(server_pcap)
    _, at_client = read_pcap(client_pcap)
    sequence_check(at_server)
    sequence_check(at_client)
    # each end wrote what it sent and what it read; a frame one end read
    # is the frame the other end sent, byte for byte (the ACK numbers
    # differ: each end acknowledges what it had seen when it wrote)
    server_frames, client_frames = frames_of(at_server), frames_of(at_client)
    first = {
        direction
        for direction in server_frames
        if "127.0.0.2" not in (direction[0][0], direction[1][0])
    }
    assert len(first) == 2
    assert first <= client_frames.keys()
    # an exchange this short can end before the join does: a direction of
    # the join that one end wrote and the other never read holds its SYN
    # or SYN/ACK and at most the subflow's end
    for direction in server_frames.keys() ^ client_frames.keys():
        assert "127.0.0.2" in (direction[0][0], direction[1][0])
        written = server_frames.get(direction) or client_frames[direction]
        assert len(written) <= 2
    for direction in server_frames.keys() & client_frames.keys():
        frames = client_frames[direction]
        shorter = min(len(frames), len(server_frames[direction]))
        assert shorter >= len(frames) - 1  # a last FIN may go unread
        assert frames[:shorter] == server_frames[direction][:shorter]


@pytest.mark.parametrize("command", ["connect", "serve", "demo"])
def test_an_unwritable_pcap_is_one_line_and_exit_2(
    command: str,
    certs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "missing" / "x.pcap"
    argv = {
        "connect": ["connect", "127.0.0.1", "9"],
        "serve": served_by(certs),
        "demo": ["demo"],
    }[command]
    status = cli_main.main([*argv, "--pcap", str(path)])
    assert status == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "mptls: error: cannot write the packet capture "
        f"{path}: No such file or directory"
    ]
    assert pcap.active is None


def test_a_pcap_fifo_says_it_waits_for_its_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a live capture: the command opens the FIFO only once a reader
    # has, and says so first instead of seeming to hang
    fifo = tmp_path / "live"
    os.mkfifo(fifo)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 64)
    got = bytearray()

    def read_all() -> None:
        with open(fifo, "rb") as reader:
            while chunk := reader.read(65536):
                got.extend(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    status = cli_main.main(
        ["demo", "--file", str(payload), "--pcap", str(fifo), "--quiet"]
    )
    reader.join(timeout=30)
    assert status == 0
    assert not reader.is_alive()
    err = capsys.readouterr().err.splitlines()
    assert f"mptls: waiting for a reader of the FIFO {fifo}" in err
    # a whole capture came through: its header, then packets
    assert got[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")
    assert len(got) > len(payload.read_bytes())


@pytest.mark.parametrize("command", ["connect", "serve"])
def test_an_interrupt_ends_the_wait_for_a_pcap_fifo_reader(
    command: str, certs: Path, tmp_path: Path
) -> None:
    # serve and connect opened the capture inside their event loop: the
    # open of a FIFO with no reader blocked the loop, and asyncio's
    # SIGINT handler, which only cancels the command, never ended it
    fifo = tmp_path / "live"
    os.mkfifo(fifo)
    argv = {
        "connect": ["connect", "127.0.0.1", "9"],
        "serve": served_by(certs),
    }[command]
    process = subprocess.Popen(
        [sys.executable, "-m", "mptls", *argv, "--pcap", str(fifo)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        line = readline_within(process.stderr, COMMAND_TIMEOUT).decode()
        assert line == f"mptls: waiting for a reader of the FIFO {fifo}\n"
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=COMMAND_TIMEOUT)
        assert status == cli_main.ExitStatus.INTERRUPTED
    finally:
        reap(process)


@pytest.mark.parametrize("command", ["kernel", "workers"])
def test_pcap_refuses_what_it_cannot_record(
    command: str,
    certs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv, reason = {
        "kernel": (
            ["connect", "127.0.0.1", "9", "--backend", "kernel"],
            "tcpdump",
        ),
        "workers": ([*served_by(certs), "--workers", "2"], "--workers"),
    }[command]
    status = cli_main.main([*argv, "--pcap", str(tmp_path / "x.pcap")])
    assert status == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("mptls: error: --pcap ") and reason in line
    assert not (tmp_path / "x.pcap").exists()


@pytest.mark.parametrize("command", ["serve", "connect", "demo"])
def test_pcap_will_not_overwrite_the_commands_own_files(
    command: str,
    certs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"the demo's input")
    argv, victim, option = {
        "serve": (served_by(certs), certs / "server.key", "--key"),
        "connect": (
            ["connect", "127.0.0.1", "9", "--cafile", str(certs / "ca.pem")],
            certs / "ca.pem",
            "--cafile",
        ),
        "demo": (["demo", "--file", str(payload)], payload, "--file"),
    }[command]
    before = victim.read_bytes()
    assert cli_main.main([*argv, "--pcap", str(victim)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"mptls: error: --pcap {victim} is the {option} file: the capture "
        "would overwrite it"
    )
    assert victim.read_bytes() == before


def test_the_demo_captures_both_of_its_ends(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = seeded(1024 * 1024, 7)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(data)
    path = tmp_path / "demo.pcap"
    started: list[Capture] = []
    pcap_capture: Callable[..., Any] = demo_command.pcap_capture

    def recorded(*args: Any, **kwargs: Any) -> Any:
        made = pcap_capture(*args, **kwargs)
        started.append(made)
        return made

    monkeypatch.setattr(demo_command, "pcap_capture", recorded)
    argv = ["demo", "--file", str(payload), "--json", "--pcap", str(path)]
    assert cli_main.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["sha256"]["client"] == hashlib.sha256(data).hexdigest()

    # every frame one end received, the other end sent in this process
    summary = report["pcap"]
    assert summary["file"] == str(path) and summary["stopped"] is None
    assert summary["received"] == summary["seen_twice"] > 0
    assert summary["frames"] == summary["sent"] == started[0].frames
    _, packets = read_pcap(path)
    sequence_check(packets)
    subflows = {
        sub["local_address"][0] for sub in report["client"]["subflows"]
    }
    assert subflows == {"127.0.0.1", "127.0.0.2"}
    # both directions of both subflows, each opened and closed
    directions = by_direction(packets)
    assert len(directions) == 4
    for packets_one_way in directions.values():
        assert packets_one_way[0].flags & SYN
        assert packets_one_way[-1].flags & FIN


def disk_with_room(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """Captures write to files that take ``room`` bytes, then refuse
    with ENOSPC (a write that does not fit takes what fits first)."""

    class FillingDisk(io.FileIO):
        left = room

        def write(self, data: Any) -> int:
            if not self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            taken = super().write(memoryview(data)[: self.left])
            self.left -= taken
            return taken

    def filling_open(path: Any, mode: str = "r") -> Any:
        if "w" not in mode:
            return open(path, mode)
        return io.BufferedWriter(FillingDisk(path, "w"))

    monkeypatch.setattr(pcap, "open", filling_open, raising=False)


async def test_a_disk_that_fills_mid_packet_leaves_whole_packets(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the disk takes part of a write, then no more: the file must not
    # end with the part, which would read as a packet cut short
    disk_with_room(monkeypatch, 6000)
    path = tmp_path / "filling.pcap"
    with capture(path) as running:
        run = await transfer(pki, seeded(300 * 1024, 7))
    assert run.answer == PLAINTEXT
    assert running.stopped_by == "No space left on device"
    _, packets = read_pcap(path)
    assert packets
    assert path.stat().st_size == 24 + sum(16 + p.captured for p in packets)
    assert path.stat().st_size < 6000


def test_a_file_that_is_not_a_capture_is_not_overwritten(
    tmp_path: Path,
) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ConfigurationError, match="not a packet capture"):
        capture(key).start()
    assert key.read_bytes() == b"-----BEGIN PRIVATE KEY-----\n"
    assert pcap.active is None
    # an earlier capture, or an empty file, is replaced
    earlier = tmp_path / "earlier.pcap"
    with capture(earlier):
        pass
    empty = tmp_path / "empty"
    empty.touch()
    for path in (earlier, empty):
        with capture(path) as running:
            pass
        assert read_pcap(path)[1] == [] and running.stopped_by is None


@pytest.mark.parametrize(
    ("path", "payload", "match"),
    [
        (None, True, "file path"),
        (3, True, "file path"),
        ("", True, "empty"),
        ("x.pcap", "no", "payload"),
    ],
)
def test_bad_capture_arguments_are_refused(
    path: Any, payload: Any, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        capture(path, payload=payload)


def test_a_capture_file_that_cannot_be_started_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_with_room(monkeypatch, 0)
    path = tmp_path / "new.pcap"
    with pytest.raises(ConfigurationError, match="No space left"):
        capture(path).start()
    assert not path.exists()
    assert pcap.active is None
