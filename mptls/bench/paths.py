"""Scenario 2: aggregation over two real, shaped paths.

Two network namespaces joined by two veth pairs (documentation-range
addresses, :mod:`mptls.bench.netns`); the client's end of each path is
shaped with a token bucket (``tc ... tbf``), 100+100 Mbit/s and then
100+50 Mbit/s. The client sends; the server, in its own process inside
the server namespace, confirms. Contenders: mptls userspace over both
paths, the kernel's MPTCP over the same paths (asyncio over an
``IPPROTO_MPTCP`` socket, the in-kernel path manager adding the second
subflow), and mptls over one path alone. The figure is Mbit/s of
application data, also given as a share of the sum of the two rates.

Needs root. The namespaces, and so every veth, policy rule and qdisc,
are removed in a ``finally``; the server process is stopped by PID.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from mptls.bench import netns
from mptls.bench.bulk import transfer
from mptls.bench.common import (
    MIB,
    BenchOptions,
    in_fresh_loop,
    namespaces_reason,
)
from mptls.bench.harness import (
    ScenarioResult,
    Variant,
    VariantResult,
    at_least,
    interleave,
)
from mptls.bench.peer import PeerProcess
from mptls.bench.stacks import Pki

NAME = "paths"
TITLE = "Aggregation over two shaped paths"
RATES = ((100, 100), (100, 50))
SOURCE_TABLE = 101
QUICK_SHARES_NOTE = (
    "quick run: the shares of the sum of the rates are not shown; so small "
    "a transfer ends within the shapers' bursts and can even pass 100%"
)


def _configure(topology: netns.Topology) -> None:
    """Route path 1's source out of path 1; kernel MPTCP endpoints."""
    client, server = topology.client, topology.server
    second = topology.paths[1]
    netns.route_source(
        client, second.client_address, second.interface, SOURCE_TABLE
    )
    client.ip(
        "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "0"
    )
    server.ip(
        "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "0"
    )
    client.ip(
        "mptcp", "endpoint", "add", second.client_address,
        "dev", second.interface, "subflow",
    )  # fmt: skip


def _variants(
    topology: netns.Topology,
    ports: dict[str, int],
    pki: Pki,
    size: int,
    tag: str,
) -> list[Variant]:
    host = topology.paths[0].server_address
    both = tuple(path.client_address for path in topology.paths)
    chosen = {
        "mptls": ("mptls", both, "mptls userspace, both paths"),
        "kernel-mptcp": ("mptcp", both[:1], "kernel MPTCP, both paths"),
        "one-path": ("mptls", both[:1], "mptls userspace, path 0 only"),
    }
    variants = []
    for name, (stack, local, description) in chosen.items():
        factory = functools.partial(
            transfer, stack, host, ports[stack], pki, size, local_addrs=local
        )
        variants.append(
            Variant(
                f"{name}@{tag}",
                functools.partial(_mbit, factory, namespace=topology.client),
                description,
            )
        )
    return variants


async def _mbit(
    factory: Callable[[], Awaitable[float]], *, namespace: netns.Namespace
) -> float:
    megabytes = await in_fresh_loop(factory, namespace=namespace)
    return megabytes * 8


async def run(options: BenchOptions, pki: Pki) -> ScenarioResult:
    rounds = options.rounds_or(3)
    size = options.size(48 * MIB, 2 * MIB)
    result = ScenarioResult(NAME, TITLE, "Mbit/s", True, rounds, options.quick)
    reason = namespaces_reason()
    if reason is not None:
        result.skipped = reason
        return result
    result.details["bytes_per_transfer"] = size
    with netns.topology(2) as topology:
        _configure(topology)
        prefix = ["ip", "netns", "exec", topology.server.name]
        host = topology.paths[0].server_address
        with PeerProcess(("mptls", "mptcp"), host, pki, prefix=prefix) as peer:
            for first, second in RATES:
                for path, rate in zip(
                    topology.paths, (first, second), strict=True
                ):
                    netns.shape(topology.client, path.interface, rate)
                tag = f"{first}+{second}"
                variants = _variants(topology, peer.ports, pki, size, tag)
                measured = await interleave(variants, rounds)
                result.variants += measured
                _judge(result, measured, tag, first + second, options.quick)
    return result


def _judge(
    result: ScenarioResult,
    measured: list[VariantResult],
    tag: str,
    total: int,
    quick: bool,
) -> None:
    mptls = measured[0].spread.median
    share = mptls / total
    result.details[f"share_of_sum@{tag}"] = {
        variant.name: variant.spread.median / total for variant in measured
    }
    result.add_ratio(f"mptls@{tag}", f"kernel-mptcp@{tag}")
    result.add_ratio(f"mptls@{tag}", f"one-path@{tag}")
    versus_kernel = result.ratio(f"mptls@{tag}", f"kernel-mptcp@{tag}")
    if quick:
        # a quick transfer ends inside the shapers' bursts, so a share
        # can pass 1.0: no figure at all rather than a wrong one
        result.goals.append(
            at_least(f"mptls share of {tag} Mbit/s", None, 0.95)
        )
        if QUICK_SHARES_NOTE not in result.notes:
            result.notes.append(QUICK_SHARES_NOTE)
    else:
        result.goals.append(
            at_least(f"mptls share of {tag} Mbit/s", share, 0.95)
        )
    result.goals.append(
        at_least(
            f"mptls / kernel MPTCP at {tag} Mbit/s",
            versus_kernel.spread.median,
            1.0,
            judge=not quick,
        )
    )
