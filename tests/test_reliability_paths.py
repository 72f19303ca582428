"""Paths that die mid-transfer, on real sockets (userspace backend).

Each trial opens a connection with two subflows, uploads 1 to 2 MiB of
seeded random bytes and, at a random point of the upload, breaks one
subflow: its TCP connection is closed (FIN), reset (RST), or, in network
namespaces, its veth link is set down so that it blackholes (nothing
arrives, nobody is told). The server answers with the SHA-256 of what it
received and the longest pause between two of its reads, which for a
blackhole is the time the data-level RTO took to notice and reinject.
50 seeded trials per kind run in one event loop; namespace tests skip
with the reason when root or namespaces are missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import statistics
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import netns
import pytest
from pki import Pki
from support import digest_handler

import mptls
from mptls.errors import MptlsTimeoutError

TRIALS = 50
PIECE = 64 * 1024


async def start_digest_server(
    pki: Pki, host: str, **settings: Any
) -> asyncio.AbstractServer:
    return await mptls.start_server(
        digest_handler, host, 0, ssl=pki.server(), **settings
    )


def port_of(server: asyncio.AbstractServer) -> int:
    return int(server.sockets[0].getsockname()[1])


# breaking a subflow

Breaker = Callable[[asyncio.StreamWriter, int], Awaitable[None]]


def subflow_transport(
    writer: asyncio.StreamWriter, subflow_id: int
) -> asyncio.Transport:
    transports = writer.get_extra_info("subflow_transports")
    return transports[subflow_id]


async def close_subflow(writer: asyncio.StreamWriter, subflow_id: int) -> None:
    subflow_transport(writer, subflow_id).close()


async def reset_subflow(writer: asyncio.StreamWriter, subflow_id: int) -> None:
    transport = subflow_transport(writer, subflow_id)
    sock = transport.get_extra_info("socket")
    # SO_LINGER with a zero timeout: close() sends a RST
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    transport.abort()


# one trial


async def upload_trial(
    pki: Pki,
    rng: random.Random,
    connect: tuple[str, int, str],
    second: tuple[str, int, str],
    breaker: Breaker,
    **settings: Any,
) -> float:
    """Upload, break a subflow at a random piece; the server's pause."""
    host, port, local = connect
    reader, writer = await mptls.open_connection(
        host, port, ssl=pki.client(), local_addrs=[local], **settings
    )
    try:
        remote_host, remote_port, second_local = second
        joined = await writer.transport.add_path(
            (remote_host, remote_port), local=second_local, timeout=5.0
        )
        size = rng.randrange(1024 * 1024, 2 * 1024 * 1024)
        payload = rng.randbytes(size)
        victim = rng.choice((0, joined))
        cut = rng.randrange(1, size // PIECE)
        for index, offset in enumerate(range(0, size, PIECE)):
            if index == cut:
                await breaker(writer, victim)
            writer.write(payload[offset : offset + PIECE])
            await writer.drain()
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 30.0)
    finally:
        writer.close()
    digest, received, pause = reply.decode().split()
    assert int(received) == size
    assert digest == hashlib.sha256(payload).hexdigest()
    return float(pause)


def summary(pauses: list[float]) -> str:
    ordered = sorted(pauses)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return (
        f"median {statistics.median(ordered) * 1000:.0f} ms, "
        f"p90 {p90 * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms"
    )


# loopback: close and reset


@pytest.mark.parametrize(
    "breaker", [close_subflow, reset_subflow], ids=["close", "reset"]
)
async def test_fifty_transfers_survive_a_broken_subflow(
    pki: Pki, breaker: Breaker
) -> None:
    server = await start_digest_server(pki, "127.0.0.1")
    async with server:
        port = port_of(server)
        rng = random.Random(f"loopback-{breaker.__name__}")
        pauses = [
            await upload_trial(
                pki,
                rng,
                ("127.0.0.1", port, "127.0.0.1"),
                ("127.0.0.1", port, "127.0.0.2"),
                breaker,
            )
            for _ in range(TRIALS)
        ]
    # a closed or reset subflow is known at once: no timeout involved
    print(f"{breaker.__name__}: longest read pause {summary(pauses)}")
    assert max(pauses) < 1.0


async def test_every_path_lost_then_a_new_address_joins(pki: Pki) -> None:
    server = await start_digest_server(pki, "127.0.0.1")
    async with server:
        port = port_of(server)
        reader, writer = await mptls.open_connection(
            "127.0.0.1",
            port,
            ssl=pki.client(),
            local_addrs=["127.0.0.1"],
            path_loss_timeout=10.0,
        )
        joined = await writer.transport.add_path(
            ("127.0.0.1", port), local="127.0.0.2"
        )
        payload = random.Random(1).randbytes(1024 * 1024)
        writer.write(payload[: len(payload) // 2])
        await writer.drain()
        await reset_subflow(writer, 0)
        await reset_subflow(writer, joined)
        # a path on a new local address comes back and joins
        await writer.transport.add_path(
            ("127.0.0.1", port), local="127.0.0.3", timeout=5.0
        )
        writer.write(payload[len(payload) // 2 :])
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 20.0)
        writer.close()
    digest, received, _ = reply.decode().split()
    assert int(received) == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()
    locals_ = {
        s.local_address[0]
        for s in writer.get_extra_info("mptcp").subflows
        if s.local_address
    }
    assert "127.0.0.3" in locals_


async def test_lost_paths_are_joined_again_by_the_client(pki: Pki) -> None:
    server = await start_digest_server(pki, "127.0.0.1")
    async with server:
        port = port_of(server)
        reader, writer = await mptls.open_connection(
            "127.0.0.1",
            port,
            ssl=pki.client(),
            local_addrs=["127.0.0.1", "127.0.0.2"],
            path_loss_timeout=10.0,
        )
        payload = random.Random(2).randbytes(512 * 1024)
        writer.write(payload[:1000])
        await writer.drain()
        for subflow_id in list(writer.get_extra_info("subflow_transports")):
            await close_subflow(writer, subflow_id)
        # the client rejoins by itself from its local addresses
        writer.write(payload[1000:])
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 20.0)
        writer.close()
    digest, received, _ = reply.decode().split()
    assert int(received) == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()


# namespaces: a veth link set down blackholes a path

NETNS_REASON = netns.unavailable_reason()
needs_netns = pytest.mark.skipif(
    NETNS_REASON is not None, reason=NETNS_REASON or ""
)


def run_in_namespace(
    namespace: netns.Namespace,
    main: Callable[[], Awaitable[Any]],
    *,
    timeout: float,
) -> Any:
    """Run ``main()`` on a new event loop in a thread inside the netns."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            with namespace.entered():
                outcome["value"] = asyncio.run(main())
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"namespace work took over {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class NamespaceServer:
    """The digest server on its own loop, in a thread in the server netns."""

    def __init__(self, pki: Pki, namespace: netns.Namespace, **kw: Any):
        self._pki = pki
        self._namespace = namespace
        self._settings = kw
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def _run(self) -> None:
        with self._namespace.entered():
            asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await start_digest_server(
            self._pki, "0.0.0.0", **self._settings
        )
        self.port = port_of(server)
        self._ready.set()
        async with server:
            await self._stop.wait()

    def __enter__(self) -> NamespaceServer:
        self._thread.start()
        if not self._ready.wait(10.0):
            raise AssertionError("the namespace server did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10.0)


@pytest.fixture(scope="module")
def lab() -> Iterator[netns.Topology]:
    if NETNS_REASON is not None:
        pytest.skip(NETNS_REASON)
    with netns.topology(2) as topology:
        yield topology


def set_link(topology: netns.Topology, index: int, up: bool) -> None:
    interface = topology.paths[index].interface
    topology.client.ip("link", "set", interface, "up" if up else "down")


# short timeouts keep 50 trials fast; the default floor is 1 s
FAST = {"min_rto": 0.25}
# the test certificate names loopback only
NAMED = {"server_hostname": "localhost"}


async def blackhole_trials(
    pki: Pki,
    lab: netns.Topology,
    port: int,
    blackhole: Breaker,
    count: int,
    seed: str,
    **options: Any,
) -> list[float]:
    """``count`` seeded upload trials over both paths, each breaking one
    with ``blackhole``; every link is up again after each trial."""
    first, second = lab.paths
    rng = random.Random(seed)
    pauses = []
    for _ in range(count):
        try:
            pauses.append(
                await upload_trial(
                    pki,
                    rng,
                    (first.server_address, port, first.client_address),
                    (second.server_address, port, second.client_address),
                    blackhole,
                    **options,
                    **NAMED,
                )
            )
        finally:
            set_link(lab, 0, True)
            set_link(lab, 1, True)
    return pauses


@needs_netns
@pytest.mark.root
def test_fifty_transfers_survive_a_blackholed_subflow(
    pki: Pki, lab: netns.Topology
) -> None:
    with NamespaceServer(pki, lab.server, **FAST) as server:

        async def blackhole(writer: asyncio.StreamWriter, victim: int) -> None:
            index = 0 if victim == 0 else 1
            set_link(lab, index, False)

        pauses = run_in_namespace(
            lab.client,
            lambda: blackhole_trials(
                pki, lab, server.port, blackhole, TRIALS, "blackhole", **FAST
            ),
            timeout=180.0,
        )
    print(f"blackhole (min_rto 0.25 s): longest read pause {summary(pauses)}")
    # found by the data-level RTO (at least its floor), never by TCP
    assert statistics.median(pauses) >= 0.2
    assert max(pauses) < 3.0


@needs_netns
@pytest.mark.root
def test_blackhole_recovery_with_the_default_rto(
    pki: Pki, lab: netns.Topology
) -> None:
    with NamespaceServer(pki, lab.server) as server:

        async def blackhole(writer: asyncio.StreamWriter, victim: int) -> None:
            set_link(lab, 1, False)

        pauses = run_in_namespace(
            lab.client,
            lambda: blackhole_trials(
                pki, lab, server.port, blackhole, 3, "default-rto"
            ),
            timeout=60.0,
        )
    print(f"blackhole (default RTO): longest read pause {summary(pauses)}")
    assert all(0.9 <= pause < 4.0 for pause in pauses)


async def _stalled_upload(
    pki: Pki,
    lab: netns.Topology,
    port: int,
    outage: float | None,
    payload: bytes,
) -> bytes:
    """Both links go down mid-upload; path 0 returns after ``outage``."""
    first, second = lab.paths
    reader, writer = await mptls.open_connection(
        first.server_address,
        port,
        ssl=pki.client(),
        local_addrs=[first.client_address],
        path_loss_timeout=3.0,
        **FAST,
        **NAMED,
    )
    try:
        await writer.transport.add_path(
            (second.server_address, port), local=second.client_address
        )
        writer.write(payload[: len(payload) // 2])
        await writer.drain()
        set_link(lab, 0, False)
        set_link(lab, 1, False)
        writer.write(payload[len(payload) // 2 :])
        writer.write_eof()
        if outage is not None:
            asyncio.get_running_loop().call_later(
                outage, set_link, lab, 0, True
            )
        return await asyncio.wait_for(reader.read(), 20.0)
    finally:
        writer.close()
        set_link(lab, 0, True)
        set_link(lab, 1, True)


@needs_netns
@pytest.mark.root
def test_all_paths_down_then_one_back_resumes(
    pki: Pki, lab: netns.Topology
) -> None:
    payload = random.Random(3).randbytes(1024 * 1024)
    with NamespaceServer(pki, lab.server, **FAST) as server:
        reply = run_in_namespace(
            lab.client,
            lambda: _stalled_upload(pki, lab, server.port, 1.0, payload),
            timeout=60.0,
        )
    digest, received, pause = reply.decode().split()
    assert int(received) == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()
    assert float(pause) >= 0.9


@needs_netns
@pytest.mark.root
def test_all_paths_down_for_good_fails_with_a_timeout(
    pki: Pki, lab: netns.Topology
) -> None:
    payload = random.Random(4).randbytes(1024 * 1024)
    with NamespaceServer(pki, lab.server, **FAST) as server:
        started = time.monotonic()
        with pytest.raises(MptlsTimeoutError, match="path_loss_timeout"):
            run_in_namespace(
                lab.client,
                lambda: _stalled_upload(pki, lab, server.port, None, payload),
                timeout=60.0,
            )
        elapsed = time.monotonic() - started
    # path_loss_timeout is 3 s: never a hang
    assert elapsed < 10.0
