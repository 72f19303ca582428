"""A subflow's gathered writes keep the stream whole and in order.

On asyncio's own socket transport (before Python 3.12) a subflow sends
the pieces of a flush with one ``writev`` while the transport holds
nothing, and hands the transport whatever the socket did not take. A
small send buffer makes the socket take part of a flush, so the
remainder, and every later flush, must queue behind it.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import sys

import pytest

from mptls.backends.tcpinfo import packed
from mptls.backends.userspace import subflow as subflow_module
from mptls.backends.userspace.subflow import SubflowProtocol
from mptls.mptcp.framing import PREAMBLE, Payload


class _Sink:
    def segments_received(self, subflow: object, segments: object) -> None:
        pass

    def subflow_lost(self, subflow: object, exc: object) -> None:
        pass

    def subflow_writable(self, subflow: object, writable: bool) -> None:
        pass


async def _read_all(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while len(received) < size:
        chunk = await loop.sock_recv(sock, 256 * 1024)
        if not chunk:
            break
        received += chunk
    return bytes(received)


async def test_flushes_arrive_whole_and_in_order() -> None:
    rng = random.Random(11)
    near, far = socket.socketpair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    far.setblocking(False)
    loop = asyncio.get_running_loop()
    subflow = SubflowProtocol(_Sink(), initiator=True)  # type: ignore[arg-type]
    transport, _ = await loop.connect_accepted_socket(lambda: subflow, near)
    flushes: list[list[Payload]] = []
    for _ in range(6):
        parts: list[Payload] = []
        for _ in range(rng.randrange(1, 9)):
            parts.append(rng.randbytes(rng.randrange(1, 40)))
            parts.append(memoryview(rng.randbytes(rng.randrange(1, 65536))))
        flushes.append(parts)
    expected = PREAMBLE + b"".join(
        bytes(part) for parts in flushes for part in parts
    )
    try:
        reader = asyncio.ensure_future(_read_all(far, len(expected)))
        for parts in flushes:
            subflow.send(list(parts))
        assert await asyncio.wait_for(reader, 10) == expected
    finally:
        transport.close()
        far.close()


class _Watched(SubflowProtocol):
    """Resolves ``lost`` when its TCP connection is gone."""

    def __init__(self) -> None:
        super().__init__(_Sink(), initiator=True)  # type: ignore[arg-type]
        self.lost: asyncio.Future[None] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one TCP connection on loopback: (near, far)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


async def test_a_subflow_closed_with_frames_its_path_never_takes_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a path that takes nothing more (a blackhole, a peer that stopped
    # reading): asyncio's close() would wait for the socket to drain,
    # which holds the fd and the frames until TCP gives up, minutes on;
    # after CLOSE_LINGER the connection is reset instead
    monkeypatch.setattr(subflow_module, "CLOSE_LINGER", 0.05)
    near, far = _tcp_pair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    loop = asyncio.get_running_loop()
    subflow = _Watched()
    transport, _ = await loop.connect_accepted_socket(lambda: subflow, near)
    try:
        while not transport.get_write_buffer_size():
            subflow.send([bytes(256 * 1024)])
        subflow.close()
        await asyncio.wait_for(subflow.lost, 10)
        assert near.fileno() == -1
        # the far end hears a reset, not an end it would wait on
        far.settimeout(10)
        with pytest.raises(ConnectionResetError):
            while far.recv(1 << 20):
                pass
    finally:
        if not subflow.lost.done():
            transport.abort()
        far.close()


async def test_a_subflow_closed_on_a_live_path_sends_what_it_held() -> None:
    # the last frames (a FIN, an RST with its reason) still go out
    near, far = socket.socketpair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    far.setblocking(False)
    loop = asyncio.get_running_loop()
    subflow = _Watched()
    transport, _ = await loop.connect_accepted_socket(lambda: subflow, near)
    payload = random.Random(5).randbytes(1 << 20)
    try:
        subflow.send([payload])
        assert transport.get_write_buffer_size()
        subflow.close()
        received = await asyncio.wait_for(
            _read_all(far, len(PREAMBLE) + len(payload)), 10
        )
        assert received == PREAMBLE + payload
        await asyncio.wait_for(subflow.lost, 10)
    finally:
        if not subflow.lost.done():
            transport.abort()
        far.close()


def test_tcp_queue_reads_the_fields_of_linux_tcp_info() -> None:
    raw = bytearray(subflow_module._TCP_INFO.size)
    for offset, value, fmt in (
        (16, 1448, "=I"),  # tcpi_snd_mss
        (68, 200_000, "=I"),  # tcpi_rtt: 200 ms
        (80, 10, "=I"),  # tcpi_snd_cwnd
        (144, 12_345, "=I"),  # tcpi_notsent_bytes
        (160, 50_000, "=Q"),  # tcpi_delivery_rate
    ):
        struct.pack_into(fmt, raw, offset, value)
    # the window carries 72,400 B/s, more than the last sample's 50,000
    assert subflow_module.tcp_queue(bytes(raw)) == (12_345, 72_400.0)
    struct.pack_into("=Q", raw, 160, 90_000)
    assert subflow_module.tcp_queue(bytes(raw)) == (12_345, 90_000.0)
    # a kernel before 4.9 stops short of the delivery rate
    assert subflow_module.tcp_queue(bytes(raw[:104])) is None


def test_packed_reads_named_tcp_info_fields_in_offset_order() -> None:
    # the order names are given in does not matter: the struct follows
    # the offsets, with the bytes between them skipped
    layout = packed(("rtt_us", "state"))
    assert layout.format == "=B67xI"
    with pytest.raises(ValueError, match="unknown tcp_info fields"):
        packed(("state", "no_such_field"))


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="TCP_INFO is Linux's"
)
async def test_queue_state_counts_what_the_kernel_has_not_sent() -> None:
    # a peer that reads nothing: its window closes and the kernel holds
    # the rest unsent, which the ioctl and TCP_INFO must count alike
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    near.setblocking(False)
    loop = asyncio.get_running_loop()
    subflow = SubflowProtocol(_Sink(), initiator=True)  # type: ignore[arg-type]
    transport, _ = await loop.connect_accepted_socket(lambda: subflow, near)
    try:
        for _ in range(100):
            subflow.send(b"x" * 65536)
            if transport.get_write_buffer_size():
                break
        for _ in range(50):
            # until the kernel's unsent count stops moving
            before = subflow.unsent()
            await asyncio.sleep(0.02)
            if subflow.unsent() == before:
                break
        unsent, rate = subflow.queue_state()
        assert unsent == subflow.unsent() > 0
        assert rate > 0
    finally:
        transport.abort()
        far.close()
