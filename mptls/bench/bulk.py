"""Scenario 1: bulk throughput over one loopback path.

mptls (userspace backend, one subflow) against asyncio streams with the
standard library's ``ssl`` (the goal: at least 1.0x) and plain asyncio
TCP (the ceiling: no encryption at all), each also on uvloop when it is
installed. The server runs in its own process; connection setup is not
timed, only the transfer and the server's confirmation.
"""

from __future__ import annotations

import functools
import time

from mptls.bench.common import (
    HOST,
    MB,
    MIB,
    BenchOptions,
    in_fresh_loop,
    uvloop_available,
)
from mptls.bench.harness import ScenarioResult, Variant, at_least, interleave
from mptls.bench.peer import PeerProcess
from mptls.bench.stacks import Pki, close_quietly, open_stack, send_bulk

NAME = "bulk"
TITLE = "Bulk throughput, one loopback path"
STACKS = ("mptls", "ssl", "tcp")
DESCRIPTIONS = {
    "mptls": "mptls userspace, one subflow, TLS 1.3",
    "ssl": "asyncio streams + stdlib ssl, TLS 1.3",
    "tcp": "asyncio streams, plain TCP (no encryption)",
}


async def transfer(
    stack: str, host: str, port: int, pki: Pki, size: int, **kwargs: object
) -> float:
    """One connection, ``size`` bytes; MB/s of the transfer alone."""
    reader, writer = await open_stack(stack, host, port, pki, **kwargs)  # type: ignore[arg-type]
    try:
        started = time.perf_counter()
        await send_bulk(reader, writer, size)
        seconds = time.perf_counter() - started
    finally:
        await close_quietly(writer)
    return size / seconds / MB


def _variant(stack: str, loop: str, port: int, pki: Pki, size: int) -> Variant:
    name = stack if loop == "asyncio" else f"{stack}+uvloop"
    factory = functools.partial(transfer, stack, HOST, port, pki, size)
    return Variant(
        name,
        functools.partial(in_fresh_loop, factory, loop=loop),
        DESCRIPTIONS[stack] + ("" if loop == "asyncio" else ", uvloop"),
    )


async def run(options: BenchOptions, pki: Pki) -> ScenarioResult:
    size = options.size(256 * MIB, 4 * MIB)
    rounds = options.rounds_or(5)
    result = ScenarioResult(NAME, TITLE, "MB/s", True, rounds, options.quick)
    result.details["bytes_per_transfer"] = size
    loops = ["asyncio"] + (["uvloop"] if uvloop_available() else [])
    # on uvloop both ends run on it: the client's loop and the peer's
    peers = {loop: PeerProcess(STACKS, HOST, pki, loop=loop) for loop in loops}
    try:
        ports = {loop: peer.wait_ready() for loop, peer in peers.items()}
        variants = [
            _variant(stack, loop, port, pki, size)
            for loop in loops
            for stack, port in ports[loop].items()
        ]
        result.variants = await interleave(variants, rounds)
    finally:
        for peer in peers.values():
            peer.stop()

    goal = result.add_ratio("mptls", "ssl")
    result.add_ratio("ssl", "tcp")
    result.add_ratio("mptls", "tcp")
    if "uvloop" in loops:
        result.add_ratio("mptls", "ssl+uvloop")
        result.add_ratio("mptls+uvloop", "ssl+uvloop")
        result.add_ratio("mptls+uvloop", "mptls")
    else:
        result.notes.append("uvloop is not installed: no uvloop variants")
    result.goals.append(
        at_least(
            "mptls / asyncio+ssl, one path",
            goal.spread.median,
            1.0,
            judge=not options.quick,
        )
    )
    return result
