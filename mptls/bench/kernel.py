"""Scenario 3: the kernel backend, TLS over kernel MPTCP.

mptls's kernel backend (its TLS engine over an ``IPPROTO_MPTCP``
socket) against TLS over plain TCP (asyncio streams with stdlib
``ssl``: the goal, at least 0.95x), with stdlib ``ssl`` over a kernel
MPTCP socket as a third figure that separates what MPTCP costs from
what the TLS layer costs. Kernel MPTCP on loopback is slow in itself,
so the judged figures come from one unshaped veth pair between two
network namespaces (:mod:`mptls.bench.netns`, documentation-range
addresses), the server in its own process in one of them and the
client in the other; loopback is measured too, as a second line. Needs
Linux with MPTCP enabled, and root for the veth path; the namespaces
and the server process are removed and stopped afterwards.
"""

from __future__ import annotations

import functools
import socket

from mptls.bench import netns
from mptls.bench.bulk import transfer
from mptls.bench.common import HOST, MIB, BenchOptions, in_fresh_loop
from mptls.bench.harness import (
    ScenarioResult,
    Variant,
    VariantResult,
    at_least,
    interleave,
)
from mptls.bench.peer import PeerProcess
from mptls.bench.stacks import IPPROTO_MPTCP, Pki

NAME = "kernel"
TITLE = "Kernel backend: TLS over kernel MPTCP, one veth path and loopback"
LOOPBACK_NOTE = (
    "loopback is shown, not judged: there kernel MPTCP itself is the "
    "limit (see ssl-mptcp / ssl), and it stalls for about 200 ms "
    "whenever the reader falls behind (README, Limitations)"
)
STACKS = ("mptls-kernel", "ssl", "ssl-mptcp")
DESCRIPTIONS = {
    "mptls-kernel": "mptls kernel backend (pyOpenSSL TLS over MPTCP)",
    "ssl": "asyncio + stdlib ssl over plain TCP",
    "ssl-mptcp": "asyncio + stdlib ssl over a kernel MPTCP socket",
}
VETH = "veth"
LOOPBACK = "loopback"


def unavailable_reason() -> str | None:
    try:
        probe = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP
        )
    except OSError as exc:
        return f"the kernel refuses IPPROTO_MPTCP: {exc}"
    probe.close()
    return None


def _variants(
    tag: str,
    host: str,
    ports: dict[str, int],
    pki: Pki,
    size: int,
    namespace: netns.Namespace | None = None,
) -> list[Variant]:
    return [
        Variant(
            f"{stack}@{tag}",
            functools.partial(
                in_fresh_loop,
                functools.partial(
                    transfer, stack, host, ports[stack], pki, size
                ),
                namespace=namespace,
            ),
            f"{DESCRIPTIONS[stack]}, {tag}",
        )
        for stack in STACKS
    ]


async def _on_veth(pki: Pki, size: int, rounds: int) -> list[VariantResult]:
    with netns.topology(1) as topology:
        path = topology.paths[0]
        prefix = ["ip", "netns", "exec", topology.server.name]
        with PeerProcess(
            STACKS, path.server_address, pki, prefix=prefix
        ) as peer:
            variants = _variants(
                VETH,
                path.server_address,
                peer.ports,
                pki,
                size,
                topology.client,
            )
            return await interleave(variants, rounds)


async def _on_loopback(
    pki: Pki, size: int, rounds: int
) -> list[VariantResult]:
    with PeerProcess(STACKS, HOST, pki) as peer:
        variants = _variants(LOOPBACK, HOST, peer.ports, pki, size)
        return await interleave(variants, rounds)


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
    tags = [LOOPBACK]
    veth_reason = netns.unavailable_reason()
    if veth_reason is None:
        result.variants += await _on_veth(pki, size, rounds)
        tags.insert(0, VETH)
    else:
        result.details["veth_skipped"] = veth_reason
        result.notes.append(f"no veth path: {veth_reason}")
    result.variants += await _on_loopback(pki, size, rounds)
    for tag in tags:
        goal = result.add_ratio(f"mptls-kernel@{tag}", f"ssl@{tag}")
        result.add_ratio(f"mptls-kernel@{tag}", f"ssl-mptcp@{tag}")
        result.add_ratio(f"ssl-mptcp@{tag}", f"ssl@{tag}")
        # judged on the veth path: on loopback kernel MPTCP itself is
        # the limit (stdlib ssl over MPTCP gets about 0.3x of TCP there)
        result.goals.append(
            at_least(
                f"mptls kernel / TLS over plain TCP, {tag}",
                goal.spread.median,
                0.95,
                judge=not options.quick and tag == VETH,
            )
        )
    result.notes.append(LOOPBACK_NOTE)
    return result
