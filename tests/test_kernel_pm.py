"""Path management under the kernel backend: spelling, races, undo.

Each test gets namespaces of its own (``tests/netns.py``) and changes
endpoints and limits only there. The races are made deterministic by
running another writer (``ip mptcp``) at a chosen point of mptls's own
sequence, through a wrapped PathManager method. Needs root and kernel
MPTCP; skips elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import netns
import pytest

from mptls.backends.kernel import KernelBackend
from mptls.backends.kernel.pathmanager import (
    MAX_ENDPOINTS,
    Endpoint,
    EndpointFlag,
    Limits,
    PathManager,
    run_in_thread,
)
from mptls.errors import BackendError, PathError

pytestmark = [pytest.mark.root, pytest.mark.kernel]

PORT = 4437
# extra client addresses, on the client namespace's loopback
EXTRAS = tuple(f"203.0.113.{host}" for host in range(10, 20))


@pytest.fixture
def topology6() -> Iterator[netns.Topology]:
    """Two IPv6 paths, or a skip where namespaces cannot be made."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.topology(2, ipv6=True) as built:
        yield built


def add_extras(namespace: netns.Namespace, count: int) -> list[str]:
    for address in EXTRAS[:count]:
        namespace.ip("address", "add", f"{address}/32", "dev", "lo")
    return list(EXTRAS[:count])


async def state(namespace: netns.Namespace) -> tuple[list[str], Limits]:
    """The namespace's endpoint addresses and limits, read by netlink."""

    def read() -> tuple[list[str], Limits]:
        with PathManager() as paths:
            return [e.address for e in paths.endpoints()], paths.limits()

    with namespace.entered():
        return await run_in_thread(read)


def after_first_call(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    other_writer: Callable[[], object],
) -> None:
    """Run ``other_writer`` once, right after the first ``name`` call."""
    original = getattr(PathManager, name)
    calls: list[None] = []

    def wrapped(self: PathManager, *args: Any, **kw: Any) -> Any:
        result = original(self, *args, **kw)
        if not calls:
            calls.append(None)
            other_writer()
        return result

    monkeypatch.setattr(PathManager, name, wrapped)


# 1. addresses are compared as values, not as text


async def test_noncanonical_ipv6_endpoint_is_found(
    topology6: netns.Topology,
) -> None:
    def work() -> tuple[Endpoint, Endpoint, tuple[Endpoint, ...]]:
        with PathManager() as paths:
            first = paths.add_endpoint("2001:DB8:2:0::1", EndpointFlag.SUBFLOW)
            again = paths.ensure_endpoint(
                "2001:db8:2:0:0::1", EndpointFlag.SUBFLOW
            )
            return first, again, paths.endpoints()

    with topology6.client.entered():
        first, again, endpoints = await run_in_thread(work)
    assert first.address == "2001:db8:2::1"
    assert again == first
    assert endpoints == (first,)


async def test_noncanonical_ipv6_manage_paths_connects_every_time(
    topology6: netns.Topology,
) -> None:
    backend = KernelBackend()
    path0 = topology6.paths[0]
    with topology6.server.entered():
        server = await backend.create_server(asyncio.Protocol, None, PORT)
    try:
        for _ in range(2):
            with topology6.client.entered():
                transport, _ = await backend.create_connection(
                    asyncio.Protocol,
                    path0.server_address,
                    PORT,
                    local_addrs=[path0.client_address, "2001:DB8:2:0::1"],
                    manage_paths=True,
                )
            transport.close()
            endpoints, _ = await state(topology6.client)
            assert endpoints == ["2001:db8:2::1"]
    finally:
        server.close()
        await server.wait_closed()


# 2. an add that meets an endpoint already there (EEXIST) is not an error


async def test_add_of_an_existing_endpoint_returns_it(
    topology: netns.Topology,
) -> None:
    address = topology.paths[1].client_address
    topology.client.ip("mptcp", "endpoint", "add", address, "subflow")

    def work() -> Endpoint:
        with PathManager() as paths:
            return paths.add_endpoint(address, EndpointFlag.SUBFLOW)

    with topology.client.entered():
        endpoint = await run_in_thread(work)
    assert endpoint.address == address
    assert endpoint.flags == EndpointFlag.SUBFLOW
    assert (await state(topology.client))[0] == [address]


async def test_endpoint_added_by_another_process_meanwhile(
    topology: netns.Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    # another process adds the endpoint between mptls's look and its add
    address = topology.paths[1].client_address
    after_first_call(
        monkeypatch,
        "endpoints",
        lambda: topology.client.ip(
            "mptcp", "endpoint", "add", address, "subflow"
        ),
    )
    with topology.client.entered():
        added = await KernelBackend()._subflow_endpoints([address], True)
    assert added == ()
    assert (await state(topology.client))[0] == [address]


# 3. limits: only raised, only the one raised is written


async def test_set_limits_keeps_a_limit_it_was_not_given(
    topology: netns.Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    # another process raises add_addr_accepted after mptls read limits
    after_first_call(
        monkeypatch,
        "limits",
        lambda: topology.client.ip(
            "mptcp", "limits", "set", "add_addr_accepted", "3"
        ),
    )

    def work() -> None:
        with PathManager() as paths:
            paths.set_limits(subflows=4)

    with topology.client.entered():
        await run_in_thread(work)
    assert (await state(topology.client))[1] == Limits(4, 3)


class _LowerAfterSet:
    """A netlink handle whose first limit write another writer undoes."""

    def __init__(self, real: Any, undo: Callable[[], object]) -> None:
        self.real = real
        self.undo: Callable[[], object] | None = undo

    def endpoint(self, *args: Any, **kw: Any) -> Any:
        return self.real.endpoint(*args, **kw)

    def limits(self, command: str, **kw: Any) -> Any:
        result = self.real.limits(command, **kw)
        if command == "set" and self.undo is not None:
            undo, self.undo = self.undo, None
            undo()
        return result


async def test_raised_limit_undone_by_a_stale_writer_is_raised_again(
    topology: netns.Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    extras = add_extras(topology.client, 3)
    lower = lambda: topology.client.ip(  # noqa: E731
        "mptcp", "limits", "set", "subflows", "1"
    )
    original = PathManager._mptcp
    handles: dict[int, _LowerAfterSet] = {}

    def wrapped(self: PathManager) -> Any:
        handle = handles.setdefault(
            id(self), _LowerAfterSet(original(self), lower)
        )
        return handle

    monkeypatch.setattr(PathManager, "_mptcp", wrapped)
    with topology.client.entered():
        await KernelBackend()._subflow_endpoints(extras, True)
    endpoints, limits = await state(topology.client)
    assert sorted(endpoints) == extras
    assert limits.subflows == 3


async def test_manage_paths_never_lowers_a_limit(
    topology: netns.Topology,
) -> None:
    topology.client.ip(
        "mptcp", "limits", "set", "subflows", "5", "add_addr_accepted", "2"
    )
    with topology.client.entered():
        await KernelBackend()._subflow_endpoints(
            [topology.paths[1].client_address], True
        )
    assert (await state(topology.client))[1] == Limits(5, 2)


def test_limits_out_of_range_are_refused_before_writing(
    topology: netns.Topology,
) -> None:
    with topology.client.entered():
        paths = PathManager()
    with paths:
        with pytest.raises(PathError, match="0 to 8"):
            paths.raise_limits(subflows=9)
        assert paths.limits().subflows != 9


# 4. checked before changing; a failed call takes back what it added


async def test_too_many_addresses_change_nothing(
    topology: netns.Topology,
) -> None:
    backend = KernelBackend()
    path0 = topology.paths[0]
    extras = add_extras(topology.client, MAX_ENDPOINTS + 1)
    with topology.client.entered(), pytest.raises(PathError, match="at most"):
        await backend.create_connection(
            asyncio.Protocol,
            path0.server_address,
            PORT,
            local_addrs=[path0.client_address, *extras],
            manage_paths=True,
        )
    assert (await state(topology.client))[0] == []


@pytest.mark.parametrize(
    "address", ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"]
)
async def test_no_endpoint_for_an_address_no_subflow_can_use(
    topology: netns.Topology, address: str
) -> None:
    # the kernel takes them: a subflow endpoint that opens nothing, or a
    # signal endpoint that announces 0.0.0.0, kept in the namespace
    path0, path1 = topology.paths
    with topology.client.entered(), pytest.raises(PathError, match=address):
        await KernelBackend().create_connection(
            asyncio.Protocol,
            path0.server_address,
            PORT,
            local_addrs=[path0.client_address, path1.client_address, address],
            manage_paths=True,
        )
    with topology.server.entered(), pytest.raises(PathError, match=address):
        await KernelBackend().create_server(
            asyncio.Protocol, None, PORT, announce=[address]
        )
    assert (await state(topology.client))[0] == []
    assert (await state(topology.server))[0] == []


async def test_a_scoped_address_is_named_as_such(
    topology: netns.Topology,
) -> None:
    # local_addrs take a link-local address with its scope id; as an
    # extra path it was refused as "not a numeric IPv4 or IPv6 address"
    path0 = topology.paths[0]
    with (
        topology.client.entered(),
        pytest.raises(PathError, match="has a scope id") as caught,
    ):
        await KernelBackend().create_connection(
            asyncio.Protocol,
            path0.server_address,
            PORT,
            local_addrs=[path0.client_address, "fe80::1%lo"],
            manage_paths=True,
        )
    assert "'ip mptcp endpoint add fe80::1 dev lo subflow'" in str(
        caught.value
    )
    assert (await state(topology.client))[0] == []


async def test_count_includes_endpoints_already_there(
    topology: netns.Topology,
) -> None:
    extras = add_extras(topology.client, 9)
    for address in extras[:6]:
        topology.client.ip("mptcp", "endpoint", "add", address, "signal")
    with topology.client.entered(), pytest.raises(PathError, match="at most"):
        await KernelBackend()._subflow_endpoints(extras[6:], True)
    assert (await state(topology.client))[0] == extras[:6]


async def test_add_refused_midway_takes_back_only_its_own(
    topology: netns.Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    # after mptls counted, another process fills the table to 7 of 8:
    # mptls's first add takes the last place, its second is refused
    extras = add_extras(topology.client, 9)

    def fill() -> None:
        for address in extras[2:]:
            topology.client.ip("mptcp", "endpoint", "add", address, "signal")

    after_first_call(monkeypatch, "endpoints", fill)
    with topology.client.entered(), pytest.raises(PathError):
        await KernelBackend()._subflow_endpoints(extras[:2], True)
    assert (await state(topology.client))[0] == extras[2:]


async def test_a_failed_connect_leaves_its_endpoints_for_others(
    topology: netns.Topology,
) -> None:
    # once added, an endpoint may carry another connection's subflows:
    # a failed connect keeps what it added, as a successful one does
    path0, path1 = topology.paths
    extras = add_extras(topology.client, 1)
    topology.client.ip("mptcp", "endpoint", "add", extras[0], "subflow")
    # nothing listens on PORT: the connection is refused
    with topology.client.entered(), pytest.raises(BackendError):
        await KernelBackend().create_connection(
            asyncio.Protocol,
            path0.server_address,
            PORT,
            local_addrs=[
                path0.client_address,
                extras[0],
                path1.client_address,
            ],
            manage_paths=True,
        )
    endpoints = (await state(topology.client))[0]
    assert sorted(endpoints) == sorted([extras[0], path1.client_address])


async def test_mptcp_disabled_changes_no_endpoint(
    topology: netns.Topology,
) -> None:
    backend = KernelBackend()
    path0, path1 = topology.paths
    for namespace in topology.namespaces():
        namespace.run(["sysctl", "-qw", "net.mptcp.enabled=0"])
    with topology.client.entered(), pytest.raises(BackendError):
        await backend.create_connection(
            asyncio.Protocol,
            path0.server_address,
            PORT,
            local_addrs=[path0.client_address, path1.client_address],
            manage_paths=True,
        )
    with topology.server.entered(), pytest.raises(BackendError):
        await backend.create_server(
            asyncio.Protocol, None, PORT, announce=[path1.server_address]
        )
    assert (await state(topology.client))[0] == []
    assert (await state(topology.server))[0] == []
