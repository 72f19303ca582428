"""Scenario 4: connection setup on loopback, and how soon a join sends.

Connections per second, one after the other: mptls (TLS 1.3 handshake,
MP_CAPABLE exchange, key export and install, then close) against
asyncio streams with stdlib ``ssl`` (the goal: at least 0.9x). Then the
time until a second subflow (from 127.0.0.2) carries data, in round
trips of a one-byte echo on the same connection (the goal: one round
trip): from ``open_connection`` returning on the client, and from the
server's handler starting on the server, each end writing a trickle.
On loopback a round trip is mostly Python work, so the figure that is
judged goes through a delay relay (:mod:`mptls.bench.relay`) with a
real round trip. Nothing here connects anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import struct
import time

import mptls
from mptls.backends.base import Server
from mptls.bench.common import HOST, PATHS, BenchOptions, in_fresh_loop
from mptls.bench.harness import (
    ScenarioResult,
    Spread,
    Variant,
    at_least,
    at_most,
    interleave,
)
from mptls.bench.peer import JOIN_STACK, PeerProcess
from mptls.bench.relay import RelayProcess
from mptls.bench.stacks import (
    READ_SIZE,
    STREAM_LIMIT,
    Pki,
    client_context,
    close_quietly,
    open_stack,
)
from mptls.errors import MptlsError, MptlsTimeoutError

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
# the relayed path: 10 ms each way, a 20 ms round trip; the trickle
# writes about once a millisecond there (a twentieth of a round trip)
RELAY_DELAY = 0.010
RELAYED_PAUSE = 0.001
CLIENT_TRIAL = b"C"
SERVER_TRIAL = b"V"
REPORT = b"J"
_SECONDS = struct.Struct("!d")


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


async def _trickle_until_joined(
    writer: asyncio.StreamWriter, started: float, pause: float
) -> float:
    """Write zeros until a second subflow sent some; seconds taken.

    A write reaches the subflows before it returns, so the check right
    after it times the write that a join carried; checked only after
    the pause, the figure would also count the pause.
    """
    while not _second_subflow_sent(writer):
        if time.perf_counter() - started > JOIN_LIMIT:
            raise MptlsTimeoutError("the second subflow never sent")
        writer.write(bytes(PROBE))
        if _second_subflow_sent(writer):
            break
        # bounded by the peer's reading, not only by the time limit
        await writer.drain()
        await asyncio.sleep(pause)
    return time.perf_counter() - started


async def _echo_after_zeros(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    # the peer's trickle is zeros; everything from its first other byte
    # on is pings, echoed
    echoing = False
    while data := await reader.read(READ_SIZE):
        if not echoing:
            data = data.lstrip(b"\0")
            echoing = bool(data)
        if data:
            writer.write(data)


async def _join_probe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The join probe server: ``C`` client trial, ``V`` server trial.

    Its handler starts when its TLS handshake is over: for ``V`` it
    trickles from then until its own second subflow sent data, and
    reports the seconds as ``J`` and a double.
    """
    started = time.perf_counter()
    try:
        command = await reader.readexactly(1)
        if command == SERVER_TRIAL:
            taken = await _trickle_until_joined(writer, started, 0.0)
            writer.write(REPORT + _SECONDS.pack(taken))
        await _echo_after_zeros(reader, writer)
    except (ConnectionError, asyncio.IncompleteReadError, MptlsError):
        return
    finally:
        writer.close()


async def start_join_server(host: str, pki: Pki) -> Server:
    """Listen for join trials on ``host`` (any free port)."""
    return await mptls.start_server(
        _join_probe,
        host,
        0,
        ssl=mptls.TLSConfig(certfile=pki.chain, keyfile=pki.key),
        limit=STREAM_LIMIT,
    )


async def _await_report(reader: asyncio.StreamReader) -> float:
    # zeros, then REPORT and the server's seconds
    while (byte := await reader.readexactly(1)) == b"\0":
        continue
    if byte != REPORT:
        raise MptlsError(f"join probe server sent {byte!r}")
    (taken,) = _SECONDS.unpack(await reader.readexactly(_SECONDS.size))
    return float(taken)


async def join_trial(
    port: int, pki: Pki, *, server_side: bool, pause: float = 0.0
) -> dict[str, float]:
    """Seconds until a second subflow carried data, and one echo RTT.

    ``server_side``: the server's seconds from its handshake end, else
    the client's from ``open_connection`` returning; ``pause`` between
    two writes of the trickle.
    """
    reader, writer = await open_stack(
        "mptls", HOST, port, pki, local_addrs=PATHS
    )
    try:
        started = time.perf_counter()
        if server_side:
            writer.write(SERVER_TRIAL)
            join = await _await_report(reader)
        else:
            writer.write(CLIENT_TRIAL)
            join = await _trickle_until_joined(writer, started, pause)
        rtts = []
        for _ in range(PINGS):
            ping = time.perf_counter()
            writer.write(b"p")
            await reader.readexactly(1)
            rtts.append(time.perf_counter() - ping)
    finally:
        await close_quietly(writer)
    return {"join": join, "rtt": statistics.median(rtts)}


async def _join_trials(
    port: int, pki: Pki, count: int, pause: float
) -> dict[str, list[dict[str, float]]]:
    trials: dict[str, list[dict[str, float]]] = {"client": [], "server": []}
    for _ in range(count):
        for side, server_side in (("client", False), ("server", True)):
            trial = functools.partial(
                join_trial, port, pki, server_side=server_side, pause=pause
            )
            trials[side].append(await in_fresh_loop(trial))
    return trials


async def run(options: BenchOptions, pki: Pki) -> ScenarioResult:
    count = options.size(100, 5)
    rounds = options.rounds_or(5)
    result = ScenarioResult(
        NAME, TITLE, "connections/s", True, rounds, options.quick
    )
    result.details["connections_per_sample"] = count
    judge = not options.quick
    with PeerProcess((*STACKS, JOIN_STACK), HOST, pki) as peer:
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
        join_port = peer.ports[JOIN_STACK]
        loopback = await _join_trials(join_port, pki, rounds * 2, 0.0)
        with RelayProcess((HOST, join_port), delay=RELAY_DELAY) as relay:
            relayed = await _join_trials(
                relay.ports["relay"], pki, rounds * 2, RELAYED_PAUSE
            )
    goal = result.add_ratio("mptls", "ssl")
    result.goals.append(
        at_least(
            "mptls / asyncio+ssl connections per second",
            goal.spread.median,
            0.9,
            judge=not options.quick,
        )
    )
    result.details["relay_one_way_delay_ms"] = RELAY_DELAY * 1000
    for side, trials in relayed.items():
        _join_figures(result, f"{side}, relayed", trials, judge=judge)
    for side, trials in loopback.items():
        _join_figures(result, f"{side}, loopback", trials, judge=False)
    return result


def _join_figures(
    result: ScenarioResult,
    label: str,
    trials: list[dict[str, float]],
    *,
    judge: bool,
) -> None:
    in_rtts = [trial["join"] / trial["rtt"] for trial in trials]
    join_ms = Spread.of([trial["join"] * 1000 for trial in trials])
    rtt_ms = Spread.of([trial["rtt"] * 1000 for trial in trials])
    result.details[f"join ({label})"] = {
        "second_subflow_data_ms": join_ms.as_dict(),
        "echo_rtt_ms": rtt_ms.as_dict(),
        "second_subflow_data_in_rtts": Spread.of(in_rtts).as_dict(),
        "trials": trials,
    }
    result.goals.append(
        at_most(
            f"{label}: second subflow carries data, in echo round trips "
            "after the TLS handshake",
            statistics.median(in_rtts),
            1.0,
            judge=judge,
        )
    )
    result.notes.append(
        f"{label}: second subflow carried data {join_ms.median:.2f} ms "
        f"after the handshake (min {join_ms.low:.2f}, max "
        f"{join_ms.high:.2f}); one echo round trip took "
        f"{rtt_ms.median:.3f} ms"
    )
