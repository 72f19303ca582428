"""Load on real loopback sockets: many connections, a slow reader.

1,000 connections run at once, each with two subflows, each echoing a
payload; afterwards the process has the same tasks, (almost) the same
file descriptors and a bounded RSS as before. A reader that takes its
bytes slowly holds back a writer that wants to send 1 GiB: drain()
blocks and the bytes buffered between the two stay bounded.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pki import Pki
from support import (
    EchoServer,
    check_echo,
    file_limit,
    open_fds,
    rss,
    settled_rss,
)

import mptls

CONNECTIONS = 1000
PAYLOAD = 16 * 1024
MIB = 1024 * 1024


async def one_client(pki: Pki, port: int, seed: int) -> int:
    reader, writer = await mptls.open_connection(
        "127.0.0.1",
        port,
        ssl=pki.client(),
        local_addrs=["127.0.0.1"],
        ssl_handshake_timeout=120.0,
    )
    try:
        await writer.transport.add_path(
            ("127.0.0.1", port), local="127.0.0.2", timeout=120.0
        )
        subflows = len(writer.get_extra_info("subflow_transports"))
        await check_echo(reader, writer, seed, PAYLOAD)
    finally:
        writer.close()
        await writer.wait_closed()
    return subflows


async def run_round(pki: Pki, count: int) -> tuple[float, list[int]]:
    echo = EchoServer(count)
    server = await mptls.start_server(
        echo.handle, "127.0.0.1", 0, ssl=pki.server(), backlog=4096
    )
    port = int(server.sockets[0].getsockname()[1])
    started = time.monotonic()
    async with server:
        subflows = await asyncio.wait_for(
            asyncio.gather(
                *(one_client(pki, port, seed) for seed in range(count))
            ),
            240.0,
        )
        await asyncio.wait_for(echo.all_closed.wait(), 60.0)
    elapsed = time.monotonic() - started
    assert not echo.failures, echo.failures[:3]
    # let the loop run the transports' last connection_lost callbacks
    for _ in range(10):
        await asyncio.sleep(0)
    return elapsed, subflows


@pytest.mark.slow
async def test_a_thousand_connections_with_two_subflows(pki: Pki) -> None:
    with file_limit(4 * CONNECTIONS + 1024):
        # warm up caches and the allocator with a small round
        await run_round(pki, 20)
        tasks_before = len(asyncio.all_tasks())
        fds_before = open_fds()
        rss_before = settled_rss()

        elapsed, subflows = await run_round(pki, CONNECTIONS)

        tasks_after = len(asyncio.all_tasks())
        fds_after = open_fds()
        rss_after = settled_rss()
    print(
        f"{CONNECTIONS} connections in {elapsed:.1f} s; fds "
        f"{fds_before} -> {fds_after}; RSS {rss_before / MIB:.0f} -> "
        f"{rss_after / MIB:.0f} MiB; tasks {tasks_before} -> {tasks_after}"
    )
    assert subflows == [2] * CONNECTIONS
    assert tasks_after == tasks_before
    assert fds_after <= fds_before + 2
    # a leak of 32 KiB per connection would show as 32 MiB
    assert rss_after - rss_before < 32 * MIB


@pytest.mark.slow
async def test_slow_reader_bounds_a_one_gib_writer(pki: Pki) -> None:
    target = 1024 * MIB
    written = 0
    drains_blocked = 0
    peak_buffered = 0

    async def flood(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal written, drains_blocked
        chunk = bytes(256 * 1024)
        try:
            while written < target:
                writer.write(chunk)
                written += len(chunk)
                before = time.monotonic()
                await writer.drain()
                if time.monotonic() - before > 0.01:
                    drains_blocked += 1
        except (ConnectionError, mptls.MptlsError):
            pass
        finally:
            writer.close()

    server = await mptls.start_server(flood, "127.0.0.1", 0, ssl=pki.server())
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        reader, writer = await mptls.open_connection(
            "127.0.0.1",
            port,
            ssl=pki.client(),
            local_addrs=["127.0.0.1", "127.0.0.2"],
        )
        rss_before = rss()
        rss_peak = rss_before
        taken = 0
        # about 16 MiB/s: 64 KiB every 4 ms, for 48 MiB
        while taken < 48 * MIB:
            data = await reader.read(64 * 1024)
            assert data
            taken += len(data)
            peak_buffered = max(peak_buffered, written - taken)
            rss_peak = max(rss_peak, rss())
            await asyncio.sleep(0.004)
        writer.transport.abort()
    print(
        f"slow reader took {taken / MIB:.0f} MiB; the writer wanted "
        f"{target / MIB:.0f} MiB, wrote {written / MIB:.0f} MiB; "
        f"at most {peak_buffered / MIB:.1f} MiB in between; drain blocked "
        f"{drains_blocked} times; RSS +{(rss_peak - rss_before) / MIB:.0f} "
        "MiB at peak"
    )
    assert drains_blocked > 0
    assert written < 96 * MIB
    assert peak_buffered < 32 * MIB
    assert rss_peak - rss_before < 128 * MIB
