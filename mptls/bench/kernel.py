"""Scenario 3: the kernel backend, TLS over kernel MPTCP on loopback.

mptls's kernel backend (its TLS engine over an ``IPPROTO_MPTCP``
socket) against TLS over plain TCP (asyncio streams with stdlib
``ssl``: the goal, at least 0.95x), with stdlib ``ssl`` over a kernel
MPTCP socket as a third figure that separates what MPTCP costs from
what the TLS layer costs. Needs Linux with MPTCP enabled.
"""

from __future__ import annotations

import functools
import socket

from mptls.bench.bulk import transfer
from mptls.bench.common import HOST, MIB, BenchOptions, in_fresh_loop
from mptls.bench.harness import ScenarioResult, Variant, at_least, interleave
from mptls.bench.peer import PeerProcess
from mptls.bench.stacks import IPPROTO_MPTCP, Pki

NAME = "kernel"
TITLE = "Kernel backend: TLS over kernel MPTCP, one loopback path"
STACKS = ("mptls-kernel", "ssl", "ssl-mptcp")
DESCRIPTIONS = {
    "mptls-kernel": "mptls kernel backend (pyOpenSSL TLS over MPTCP)",
    "ssl": "asyncio + stdlib ssl over plain TCP",
    "ssl-mptcp": "asyncio + stdlib ssl over a kernel MPTCP socket",
}


def unavailable_reason() -> str | None:
    try:
        probe = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP
        )
    except OSError as exc:
        return f"the kernel refuses IPPROTO_MPTCP: {exc}"
    probe.close()
    return None


async def run(options: BenchOptions, pki: Pki) -> ScenarioResult:
    # kernel MPTCP over loopback is far slower than TCP here: a smaller
    # transfer keeps a full run within minutes
    size = options.size(64 * MIB, 4 * MIB)
    rounds = options.rounds_or(5)
    result = ScenarioResult(NAME, TITLE, "MB/s", True, rounds, options.quick)
    reason = unavailable_reason()
    if reason is not None:
        result.skipped = reason
        return result
    result.details["bytes_per_transfer"] = size
    with PeerProcess(STACKS, HOST, pki) as peer:
        variants = [
            Variant(
                stack,
                functools.partial(
                    in_fresh_loop,
                    functools.partial(
                        transfer, stack, HOST, peer.ports[stack], pki, size
                    ),
                ),
                DESCRIPTIONS[stack],
            )
            for stack in STACKS
        ]
        result.variants = await interleave(variants, rounds)
    goal = result.add_ratio("mptls-kernel", "ssl")
    result.add_ratio("mptls-kernel", "ssl-mptcp")
    result.add_ratio("ssl-mptcp", "ssl")
    result.goals.append(
        at_least(
            "mptls kernel / TLS over plain TCP",
            goal.spread.median,
            0.95,
            judge=not options.quick,
        )
    )
    return result
