"""Scenario 4: connection setup on loopback.

Connections per second, one after the other: mptls (TLS 1.3 handshake,
MP_CAPABLE exchange, key export and install, then close) against
asyncio streams with stdlib ``ssl`` (the goal: at least 0.9x). Then the
time from the end of the TLS handshake until a second subflow (from
127.0.0.2) carries data, set against one application-level round trip
of the same connection (a one-byte echo): the goal is one round trip.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from typing import Any

from mptls.bench.common import HOST, PATHS, BenchOptions, in_fresh_loop
from mptls.bench.harness import (
    ScenarioResult,
    Spread,
    Variant,
    at_least,
    at_most,
    interleave,
)
from mptls.bench.peer import PeerProcess
from mptls.bench.stacks import Pki, client_context, close_quietly, open_stack
from mptls.errors import MptlsTimeoutError

NAME = "connect"
TITLE = "Connection setup, loopback"
STACKS = ("mptls", "ssl")
DESCRIPTIONS = {
    "mptls": "mptls userspace: TLS 1.3 + MP_CAPABLE + key export",
    "ssl": "asyncio streams + stdlib ssl, TLS 1.3",
}
JOIN_LIMIT = 5.0
PROBE = 1024
PINGS = 5


async def connections_per_second(
    stack: str, port: int, pki: Pki, count: int
) -> float:
    """``count`` connections one after the other, each closed."""
    context = client_context(stack, pki)
    started = time.perf_counter()
    for _ in range(count):
        _, writer = await open_stack(
            stack, HOST, port, pki, client_context=context
        )
        await close_quietly(writer)
    return count / (time.perf_counter() - started)


def _second_subflow_sent(writer: asyncio.StreamWriter) -> bool:
    info = writer.get_extra_info("mptcp")
    return any(sub.bytes_sent > 0 for sub in info.subflows[1:])


async def join_trial(port: int, pki: Pki) -> dict[str, float]:
    """Seconds until the second subflow carried data, and one echo RTT."""
    reader, writer = await open_stack(
        "mptls", HOST, port, pki, local_addrs=PATHS
    )
    try:
        # the handshake is over: keep a trickle of data going and look
        # at the subflows after every step of the event loop
        started = time.perf_counter()
        writer.write(b"E")
        written = 0
        while not _second_subflow_sent(writer):
            if time.perf_counter() - started > JOIN_LIMIT:
                raise MptlsTimeoutError("the second subflow never sent")
            writer.write(bytes(PROBE))
            written += PROBE
            await asyncio.sleep(0)
        join = time.perf_counter() - started
        await reader.readexactly(written)

        rtts = []
        for _ in range(PINGS):
            ping = time.perf_counter()
            writer.write(b"p")
            await reader.readexactly(1)
            rtts.append(time.perf_counter() - ping)
    finally:
        await close_quietly(writer)
    return {"join": join, "rtt": statistics.median(rtts)}


async def run(options: BenchOptions, pki: Pki) -> ScenarioResult:
    count = options.size(100, 5)
    rounds = options.rounds_or(5)
    result = ScenarioResult(
        NAME, TITLE, "connections/s", True, rounds, options.quick
    )
    result.details["connections_per_sample"] = count
    with PeerProcess(STACKS, HOST, pki) as peer:
        variants = [
            Variant(
                stack,
                functools.partial(
                    in_fresh_loop,
                    functools.partial(
                        connections_per_second,
                        stack,
                        peer.ports[stack],
                        pki,
                        count,
                    ),
                ),
                DESCRIPTIONS[stack],
            )
            for stack in STACKS
        ]
        result.variants = await interleave(variants, rounds)
        trials = [
            await in_fresh_loop(
                functools.partial(join_trial, peer.ports["mptls"], pki)
            )
            for _ in range(rounds * 2)
        ]
    goal = result.add_ratio("mptls", "ssl")
    result.goals.append(
        at_least(
            "mptls / asyncio+ssl connections per second",
            goal.spread.median,
            0.9,
            judge=not options.quick,
        )
    )
    _join_figures(result, trials, judge=not options.quick)
    return result


def _join_figures(
    result: ScenarioResult, trials: list[dict[str, float]], *, judge: bool
) -> None:
    in_rtts = [trial["join"] / trial["rtt"] for trial in trials]
    join_ms = Spread.of([trial["join"] * 1000 for trial in trials])
    rtt_ms = Spread.of([trial["rtt"] * 1000 for trial in trials])
    details: dict[str, Any] = {
        "second_subflow_data_ms": join_ms.as_dict(),
        "echo_rtt_ms": rtt_ms.as_dict(),
        "second_subflow_data_in_rtts": Spread.of(in_rtts).as_dict(),
        "trials": trials,
    }
    result.details["join"] = details
    goal = at_most(
        "second subflow carries data, in echo round trips after the "
        "TLS handshake",
        statistics.median(in_rtts),
        1.0,
        judge=judge,
    )
    result.goals.append(goal)
    result.notes.append(
        f"second subflow carried data {join_ms.median:.2f} ms after the "
        f"handshake (min {join_ms.low:.2f}, max {join_ms.high:.2f}); one "
        f"echo round trip took {rtt_ms.median:.3f} ms"
    )
