"""Scenario 6: memory per idle connection, both ends, on loopback.

Each sample is a fresh process (``python -m mptls.bench.memory``) that
serves and connects in itself: one warm-up connection, then ``count``
idle connections held open (mptls with two subflows each, from
127.0.0.1 and 127.0.0.2; stdlib ``ssl`` with its one TCP connection).
The figure is the growth of the resident set size divided by
``count``: Python objects and OpenSSL's own allocations both show,
kernel socket buffers do not. A fresh process per sample keeps one
run's freed memory from flattering the next.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

from mptls.bench.common import HOST, PATHS, BenchOptions
from mptls.bench.harness import ScenarioResult, Variant, at_most, interleave
from mptls.bench.peer import read_rss
from mptls.bench.stacks import (
    Pki,
    client_context,
    close_quietly,
    open_stack,
    start_stack_server,
)
from mptls.errors import MptlsError, MptlsTimeoutError

NAME = "memory"
TITLE = "Memory per idle connection (both ends)"
STACKS = ("mptls", "ssl")
DESCRIPTIONS = {
    "mptls": "mptls userspace, two subflows",
    "ssl": "asyncio streams + stdlib ssl, one TCP connection",
}
SUBFLOW_WAIT = 5.0
CHILD_TIMEOUT = 300.0


async def _wait_subflows(writers: Sequence[asyncio.StreamWriter]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SUBFLOW_WAIT
    for writer in writers:
        while True:
            info = writer.get_extra_info("mptcp")
            up = [s for s in info.subflows if s.state.lower() == "established"]
            if len(up) >= len(PATHS):
                break
            if loop.time() > deadline:
                raise MptlsTimeoutError("the second subflows did not join")
            await asyncio.sleep(0.002)


async def _child(stack: str, count: int, pki: Pki) -> dict[str, float]:
    server = await start_stack_server(stack, HOST, pki)
    port = server.sockets[0].getsockname()[1]
    context = client_context(stack, pki)
    paths = PATHS if stack == "mptls" else ()

    async def connect() -> asyncio.StreamWriter:
        _, writer = await open_stack(
            stack, HOST, port, pki, local_addrs=paths, client_context=context
        )
        writer.write(b"E")
        return writer

    warm = await connect()
    if stack == "mptls":
        await _wait_subflows([warm])
    await close_quietly(warm)
    gc.collect()
    before = read_rss()

    writers = [await connect() for _ in range(count)]
    if stack == "mptls":
        await _wait_subflows(writers)
    await asyncio.sleep(0.05)
    gc.collect()
    after = read_rss()

    for writer in writers:
        await close_quietly(writer)
    server.close()
    return {"per_connection": (after - before) / count, "count": count}


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mptls.bench.memory")
    parser.add_argument("--stack", required=True, choices=STACKS)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--pki", required=True)
    args = parser.parse_args(argv)
    _raise_fd_limit()
    pki = Pki.in_directory(Path(args.pki))
    figures = asyncio.run(_child(args.stack, args.count, pki))
    print(json.dumps(figures), flush=True)


async def sample(stack: str, count: int, pki: Pki) -> float:
    """KiB per connection, from a fresh child process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mptls.bench.memory",
        "--stack",
        stack,
        "--count",
        str(count),
        "--pki",
        str(pki.ca.parent),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        stdout, _ = await asyncio.wait_for(
            process.communicate(), CHILD_TIMEOUT
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise MptlsError(f"memory child failed ({process.returncode})")
    return float(json.loads(stdout)["per_connection"]) / 1024


async def run(options: BenchOptions, pki: Pki) -> ScenarioResult:
    count = options.size(200, 20)
    rounds = options.rounds_or(3)
    result = ScenarioResult(
        NAME, TITLE, "KiB/connection", False, rounds, options.quick
    )
    result.details["connections_per_sample"] = count
    variants = [
        Variant(
            stack,
            lambda stack=stack: sample(stack, count, pki),  # type: ignore[misc]
            DESCRIPTIONS[stack],
        )
        for stack in STACKS
    ]
    result.variants = await interleave(variants, rounds, warmup=False)
    goal = result.add_ratio("mptls", "ssl")
    result.goals.append(
        at_most(
            "mptls (two subflows) / asyncio ssl memory per connection",
            goal.spread.median,
            1.5,
            judge=not options.quick,
        )
    )
    return result


if __name__ == "__main__":
    main()
