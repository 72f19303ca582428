"""The kernel backend across two namespaces joined by two paths, with
and without mptls's TLS layer on top.

Path 0 (192.0.2.0/24) carries the first subflow; the server announces
its path-1 address (198.51.100.2) with a ``signal`` endpoint and the
client accepts one announced address, so the kernel joins a second
subflow over path 1. Needs root and kernel MPTCP; skips elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path
from typing import Any

import netns
import pytest
from support import open_fds

import mptls
from mptls.backends.kernel import KernelBackend
from mptls.backends.kernel.pathmanager import (
    EndpointFlag,
    PathManager,
    run_in_thread,
)
from mptls.tls.config import TLSConfig

pytestmark = [pytest.mark.root, pytest.mark.kernel]

PORT = 4433
MIB = 1 << 20
TRANSFER = 64 * MIB
CHUNK = 256 * 1024


class Sink(asyncio.Protocol):
    """Hashes what it receives; done once ``expected`` bytes are in."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.digest = hashlib.sha256()
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)
        if self.count >= self.expected and not self.done.done():
            self.done.set_result(self.digest.hexdigest())


class Source(asyncio.Protocol):
    """Writes a payload in chunks, honouring pause and resume."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.closed = loop.create_future()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


async def _send(
    transport: asyncio.WriteTransport, source: Source, data: bytes
) -> None:
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        await source.can_write.wait()
        transport.write(view[start : start + CHUNK])


async def _configure_paths(topology: netns.Topology) -> None:
    """Server announces its path-1 address; client accepts one."""

    def server_side() -> None:
        with PathManager() as paths:
            paths.add_endpoint(
                topology.paths[1].server_address, EndpointFlag.SIGNAL
            )
            paths.set_limits(subflows=2, add_addr_accepted=0)

    def client_side() -> None:
        with PathManager() as paths:
            paths.set_limits(subflows=2, add_addr_accepted=1)

    with topology.server.entered():
        await run_in_thread(server_side)
    with topology.client.entered():
        await run_in_thread(client_side)


@pytest.mark.slow
async def test_64_mib_over_two_subflows(topology: netns.Topology) -> None:
    await _configure_paths(topology)
    backend = KernelBackend()
    payload = random.Random(2024).randbytes(TRANSFER)
    sinks: list[Sink] = []

    def make_sink() -> Sink:
        sinks.append(Sink(TRANSFER))
        return sinks[-1]

    # joins to the announced address reach only a wildcard listener
    with topology.server.entered():
        server = await backend.create_server(make_sink, "0.0.0.0", PORT)
    with topology.client.entered():
        transport, source = await backend.create_connection(
            Source, topology.paths[0].server_address, PORT
        )
    assert isinstance(transport, asyncio.WriteTransport)
    assert isinstance(source, Source)

    await asyncio.wait_for(_send(transport, source, payload), 60)
    received = await asyncio.wait_for(sinks[0].done, 60)
    assert received == hashlib.sha256(payload).hexdigest()

    report = backend.info(transport)
    assert report.mode == "kernel"
    assert len(report.subflows) == 2
    remotes = {subflow.remote_address[0] for subflow in report.subflows}
    assert remotes == {path.server_address for path in topology.paths}
    for subflow in report.subflows:
        assert subflow.bytes_sent > 0, subflow
    assert sum(s.bytes_sent for s in report.subflows) >= TRANSFER
    transport.close()
    server.close()
    await server.wait_closed()


@pytest.mark.slow
async def test_64_mib_with_tls_over_two_subflows(
    topology: netns.Topology, tmp_path: Path
) -> None:
    await _configure_paths(topology)
    pki = netns.write_pki(str(tmp_path))
    payload = random.Random(2025).randbytes(TRANSFER)
    done = asyncio.get_running_loop().create_future()

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        digest = hashlib.sha256()
        count = 0
        while count < TRANSFER:
            data = await reader.read(MIB)
            if not data:
                break
            digest.update(data)
            count += len(data)
        writer.write(digest.hexdigest().encode() + b"\n")
        await writer.drain()
        done.set_result(writer.get_extra_info("mptcp"))
        writer.close()

    with topology.server.entered():
        server = await mptls.start_server(
            handle,
            "0.0.0.0",
            PORT,
            ssl=TLSConfig(certfile=pki.server_pem),
            backend="kernel",
        )
    with topology.client.entered():
        reader, writer = await mptls.open_connection(
            topology.paths[0].server_address,
            PORT,
            ssl=TLSConfig(cafile=pki.ca_pem),
            backend="kernel",
        )
    view = memoryview(payload)
    for start in range(0, TRANSFER, MIB):
        writer.write(view[start : start + MIB])
        await asyncio.wait_for(writer.drain(), 30)
    answer = await asyncio.wait_for(reader.readline(), 60)
    assert answer.decode().strip() == hashlib.sha256(payload).hexdigest()

    for report in (writer.get_extra_info("mptcp"), await done):
        assert report.mode == "kernel"
        assert report.keys_installed is False
        assert len(report.subflows) == 2
        for subflow in report.subflows:
            assert subflow.bytes_sent + subflow.bytes_received > 0, subflow
    sent = writer.get_extra_info("mptcp").subflows
    assert all(subflow.bytes_sent > 0 for subflow in sent)
    assert sum(subflow.bytes_sent for subflow in sent) >= TRANSFER
    writer.close()
    server.close()
    await server.wait_closed()


class Accepted(asyncio.Protocol):
    """Resolves ``made`` with its transport when a connection arrives."""

    def __init__(self) -> None:
        self.made = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.made.done():
            self.made.set_result(transport)


async def test_a_kernel_syn_fallback_is_named_as_such(
    topology: netns.Topology,
) -> None:
    """A connect whose MPTCP SYNs go unanswered falls back to TCP in the
    kernel (net.mptcp.syn_retrans_before_tcp_fallback): the reason says
    that, not that the peer did not answer with MPTCP. A soak that flaps
    links met it; the peer here is an MPTCP listener throughout."""
    backend = KernelBackend()
    path = topology.paths[0]
    accepted: list[Accepted] = []

    def make_accepted() -> Accepted:
        accepted.append(Accepted())
        return accepted[-1]

    with topology.server.entered():
        server = await backend.create_server(make_accepted, "0.0.0.0", PORT)
    mac = topology.server.run(
        ["cat", f"/sys/class/net/{path.interface}/address"]
    ).strip()
    # the client keeps sending SYNs into the link (no ARP to fail on)
    topology.client.ip(
        "neigh", "replace", path.server_address, "lladdr", mac,
        "dev", path.interface, "nud", "permanent",
    )  # fmt: skip
    topology.server.ip("link", "set", path.interface, "down")
    loop = asyncio.get_running_loop()
    # the kernel's first SYN retransmissions come at 1 s and 3 s
    link_up = loop.call_later(
        4.0, topology.server.ip, "link", "set", path.interface, "up"
    )
    transport: asyncio.BaseTransport | None = None
    try:
        with topology.client.entered():
            transport, _ = await asyncio.wait_for(
                backend.create_connection(
                    asyncio.Protocol, path.server_address, PORT
                ),
                30,
            )
        report = backend.info(transport)
        assert report.mode == "fallback"
        assert "syn_retrans_before_tcp_fallback" in report.keys_reason
        assert "did not answer" not in report.keys_reason
        server_side = await asyncio.wait_for(accepted[0].made, 10)
        assert backend.info(server_side).keys_reason == (
            "the peer did not ask for MPTCP"
        )
    finally:
        link_up.cancel()
        if transport is not None:
            transport.close()
        server.close()
        await server.wait_closed()


def _silent_first_path(topology: netns.Topology) -> netns.Path:
    """The first path, with SYNs sent into a link whose far end is
    down: nothing answers them, not even with a reset."""
    path = topology.paths[0]
    topology.client.ip(
        "neigh", "replace", path.server_address, "lladdr",
        "02:00:00:00:00:02", "dev", path.interface, "nud", "permanent",
    )  # fmt: skip
    topology.server.ip("link", "set", path.interface, "down")
    return path


async def _kernel_connect(path: netns.Path, **options: Any) -> None:
    await asyncio.wait_for(
        mptls.open_connection(
            path.server_address,
            PORT,
            ssl=TLSConfig(check_hostname=False),
            backend="kernel",
            local_addrs=[path.client_address],
            **options,
        ),
        30,
    )


async def test_a_kernel_connect_the_kernel_gives_up_on_is_a_timeout(
    topology: netns.Topology,
) -> None:
    """SYNs that nothing answers end in the kernel's ETIMEDOUT: an
    MptlsTimeoutError (a TimeoutError and an OSError), as on the
    userspace backend and as asyncio raises TimeoutError, not a bare
    BackendError that code written for asyncio does not catch."""
    path = _silent_first_path(topology)
    # one retransmission: the kernel gives up after about 3 s
    topology.client.run(["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with (
        topology.client.entered(),
        pytest.raises(mptls.MptlsTimeoutError, match="timed out") as caught,
    ):
        await _kernel_connect(path, connect_timeout=None)
    assert loop.time() - started < 20
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, OSError)


async def test_a_kernel_connect_ends_at_connect_timeout(
    topology: netns.Topology,
) -> None:
    """connect_timeout bounds the kernel backend's connect as it does
    the userspace backend's: SYNs that nothing answers end at the limit
    with MptlsTimeoutError, not after the kernel's two minutes of SYN
    retries, and the socket is closed."""
    path = _silent_first_path(topology)
    loop = asyncio.get_running_loop()
    with topology.client.entered():
        before = open_fds()
        started = loop.time()
        with pytest.raises(
            mptls.MptlsTimeoutError, match=r"timed out after 0\.5 s"
        ):
            await _kernel_connect(path, connect_timeout=0.5)
        elapsed = loop.time() - started
        assert open_fds() == before
    # the kernel's first SYN retransmission comes after 1 s, its last
    # after about two minutes: the limit, not the kernel, ended this
    assert 0.5 <= elapsed < 5
