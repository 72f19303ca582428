"""The kernel's MPTCP endpoints and limits through netlink, in namespaces.

Every change happens inside namespaces the tests create, never in the
machine's own. Needs root and kernel MPTCP; skips elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
from support import COMMAND_TIMEOUT, close_pipes, readline_within

from mptls.backends.kernel import KernelBackend
from mptls.backends.kernel.pathmanager import (
    Endpoint,
    EndpointFlag,
    Limits,
    PathManager,
    run_in_thread,
)

pytestmark = [pytest.mark.root, pytest.mark.kernel]

PORT = 4435


def test_endpoints_and_limits_round_trip(topology: netns.Topology) -> None:
    with topology.server.entered():
        paths = PathManager()
    with paths:
        assert paths.endpoints() == ()
        signal = paths.add_endpoint("198.51.100.2", EndpointFlag.SIGNAL)
        assert signal.address == "198.51.100.2"
        assert signal.flags == EndpointFlag.SIGNAL
        backup = paths.add_endpoint(
            "2001:db8:2::2", EndpointFlag.SUBFLOW | EndpointFlag.BACKUP
        )
        assert set(paths.endpoints()) == {signal, backup}
        # an existing endpoint is reused, not added twice
        assert paths.ensure_endpoint("198.51.100.2", EndpointFlag.SIGNAL) == (
            signal
        )
        assert paths.set_limits(subflows=4, add_addr_accepted=3) == Limits(
            4, 3
        )
        paths.remove_endpoint(signal.address_id)
        assert paths.endpoints() == (backup,)

    # the namespace's own tool agrees with what netlink reported
    shown = topology.server.run(["ip", "mptcp", "endpoint", "show"])
    assert "2001:db8:2::2" in shown and "backup" in shown
    assert "198.51.100.2" not in shown
    limits = topology.server.run(["ip", "mptcp", "limits", "show"])
    assert "subflows 4" in limits and "add_addr_accepted 3" in limits


# adds an endpoint and says what came of it, and what probe() said
_TRY_AN_ENDPOINT = (
    "import json\n"
    "from mptls.backends.kernel.pathmanager import PathManager\n"
    "from mptls.backends.kernel.probe import probe\n"
    "from mptls.errors import PathError\n"
    "report = probe()\n"
    "with PathManager() as paths:\n"
    "    try:\n"
    "        paths.add_endpoint('192.0.2.2')\n"
    "        error = None\n"
    "    except PathError as exc:\n"
    "        error = str(exc)\n"
    "    shown = [e.address for e in paths.endpoints()]\n"
    "print(json.dumps({'error': error, 'can': report.can_manage_paths,\n"
    "                  'detail': report.manage_paths_detail,\n"
    "                  'endpoints': shown}))\n"
)


def test_without_net_admin_it_says_what_is_missing(
    topology: netns.Topology,
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop CAP_NET_ADMIN")
    output = topology.server.run(
        [
            "setpriv",
            "--bounding-set=-net_admin",
            sys.executable,
            "-c",
            _TRY_AN_ENDPOINT,
        ]
    )
    result = json.loads(output)
    assert "needs CAP_NET_ADMIN" in result["error"]
    assert result["can"] is False
    assert "CAP_NET_ADMIN" in result["detail"]
    assert result["endpoints"] == []
    assert "192.0.2.2" not in topology.server.run(
        ["ip", "mptcp", "endpoint", "show"]
    )


def _user_namespace(topology: netns.Topology, *options: str) -> list[str]:
    """``unshare`` into a user namespace whose root is this user, or skip."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a user namespace")
    command = ["unshare", "--user", "--map-root-user", *options]
    try:
        topology.server.run([*command, "true"])
    except RuntimeError as exc:
        pytest.skip(f"no user namespace here: {exc}")
    return command


def test_refused_in_a_user_namespace_it_says_why(
    topology: netns.Topology,
) -> None:
    # a user namespace's root has CAP_NET_ADMIN, but not over the
    # network namespace it started in: the probe said it could manage
    # paths, and the kernel's EPERM came back as pyroute2's tuple,
    # "(1, 'Operation not permitted')"
    command = _user_namespace(topology)
    output = topology.server.run(
        [*command, sys.executable, "-c", _TRY_AN_ENDPOINT]
    )
    result = json.loads(output)
    reason = (
        "changing MPTCP endpoints or limits needs CAP_NET_ADMIN in the "
        "user namespace that owns this network namespace; this process "
        "has it only in a user namespace of its own (as under 'unshare "
        "--user'); run it outside that namespace, or configure endpoints "
        "with 'ip mptcp endpoint' beforehand"
    )
    assert result == {
        "error": reason,
        "can": False,
        "detail": reason,
        "endpoints": [],
    }
    assert "192.0.2.2" not in topology.server.ip("mptcp", "endpoint", "show")


def test_a_user_namespace_that_owns_its_network_may_manage_paths(
    topology: netns.Topology,
) -> None:
    # with a network namespace of its own, the user namespace's root
    # holds the capability where the kernel looks for it
    command = _user_namespace(topology, "--net")
    output = topology.server.run(
        [*command, sys.executable, "-c", _TRY_AN_ENDPOINT]
    )
    result = json.loads(output)
    assert result["error"] is None
    assert result["can"] is True
    assert result["endpoints"] == ["192.0.2.2"]
    assert "192.0.2.2" not in topology.server.ip("mptcp", "endpoint", "show")


def list_endpoints() -> tuple[Endpoint, ...]:
    with PathManager() as paths:
        return paths.endpoints()


async def _wait_for_subflows(
    backend: KernelBackend, transport: asyncio.BaseTransport, count: int
) -> None:
    """Re-check the kernel's subflow count until it reaches ``count``."""
    deadline = time.monotonic() + 10.0
    while len(backend.info(transport).subflows) < count:
        assert time.monotonic() < deadline, "the extra subflow never came"
        await asyncio.sleep(0.01)


async def test_managed_paths_announce_and_add_subflows(
    topology: netns.Topology,
) -> None:
    backend = KernelBackend()
    path0, path1 = topology.paths
    with topology.server.entered():
        server = await backend.create_server(
            asyncio.Protocol,
            None,
            PORT,
            announce=[path1.server_address],
        )
        server_endpoints = await run_in_thread(list_endpoints)
    assert [(e.address, e.flags) for e in server_endpoints] == [
        (path1.server_address, EndpointFlag.SIGNAL)
    ]

    with topology.client.entered():
        transport, _ = await backend.create_connection(
            asyncio.Protocol,
            path0.server_address,
            PORT,
            local_addrs=[path0.client_address, path1.client_address],
            manage_paths=True,
        )

        def client_state() -> tuple[tuple[Endpoint, ...], Limits]:
            with PathManager() as paths:
                return paths.endpoints(), paths.limits()

        endpoints, limits = await run_in_thread(client_state)
    assert [(e.address, e.flags) for e in endpoints] == [
        (path1.client_address, EndpointFlag.SUBFLOW)
    ]
    assert limits.subflows >= 1
    await _wait_for_subflows(backend, transport, 2)
    locals_used = {
        subflow.local_address[0]
        for subflow in backend.info(transport).subflows
        if subflow.local_address
    }
    assert locals_used == {path0.client_address, path1.client_address}
    transport.close()
    server.close()
    await server.wait_closed()


async def test_extra_addresses_left_alone_without_manage_paths(
    topology: netns.Topology,
) -> None:
    backend = KernelBackend()
    path0, path1 = topology.paths
    with topology.server.entered():
        server = await backend.create_server(asyncio.Protocol, None, PORT)
    with topology.client.entered():
        transport, _ = await backend.create_connection(
            asyncio.Protocol,
            path0.server_address,
            PORT,
            local_addrs=[path0.client_address, path1.client_address],
        )
        endpoints = await run_in_thread(list_endpoints)
    assert endpoints == ()
    transport.close()
    server.close()
    await server.wait_closed()


def test_serve_announces_on_any_port(
    topology: netns.Topology, tmp_path: Path
) -> None:
    # the kernel announces on each connection's own port, so --port 0
    # needs no port per --announce (the userspace backend's does)
    pki = netns.write_pki(str(tmp_path))
    path1 = topology.paths[1]
    command = [sys.executable, "-m", "mptls", "serve", "--backend", "kernel"]
    command += ["--host", "0.0.0.0", "--port", "0"]
    command += ["--announce", path1.server_address]
    command += ["--cert", pki.server_pem, "--key", pki.server_pem]
    server = topology.server.popen(
        command,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert server.stderr is not None
    try:
        line = readline_within(server.stderr, COMMAND_TIMEOUT).decode()
        assert line.startswith("listening on 0.0.0.0:"), line
        shown = topology.server.ip("mptcp", "endpoint", "show")
        assert f"{path1.server_address} id" in shown and "signal" in shown
    finally:
        topology.server.stop_processes()
        close_pipes(server)


async def test_an_endpoint_bound_to_an_interface_is_read(
    topology: netns.Topology,
) -> None:
    # 'ip mptcp endpoint add ADDRESS dev IFACE', as the kernel's own
    # documentation writes them: reading one failed with a bare
    # ValueError, which took down 'mptls info' and every manage_paths
    # connect or announce in the namespace
    backend = KernelBackend()
    path0, path1 = topology.paths
    topology.client.ip(
        "mptcp", "endpoint", "add", path1.client_address,
        "dev", path1.interface, "subflow",
    )  # fmt: skip
    index = int(
        topology.client.run(
            ["cat", f"/sys/class/net/{path1.interface}/ifindex"]
        )
    )
    with topology.client.entered():
        endpoints = await run_in_thread(list_endpoints)
    assert [(e.address, e.interface) for e in endpoints] == [
        (path1.client_address, index)
    ]

    report = json.loads(
        topology.client.run([sys.executable, "-m", "mptls", "info", "--json"])
    )
    assert report["endpoints"][0]["interface"] == index

    with topology.server.entered():
        server = await backend.create_server(asyncio.Protocol, None, PORT)
    with topology.client.entered():
        transport, _ = await backend.create_connection(
            asyncio.Protocol,
            path0.server_address,
            PORT,
            local_addrs=[path0.client_address, path1.client_address],
            manage_paths=True,
        )
    transport.close()
    server.close()
    await server.wait_closed()


async def test_serve_on_one_address_takes_joins_to_the_announced_one(
    topology: netns.Topology, tmp_path: Path
) -> None:
    # the kernel sends a join to an announced address to a listener
    # there: serve listened on --host alone, so a client that followed
    # the ADD_ADDR had its join refused and kept one subflow
    pki = netns.write_pki(str(tmp_path))
    path0, path1 = topology.paths
    command = [sys.executable, "-m", "mptls", "serve", "--backend", "kernel"]
    command += ["--host", path0.server_address, "--port", str(PORT)]
    command += ["--announce", path1.server_address]
    command += ["--cert", pki.server_pem, "--key", pki.server_pem]
    server = topology.server.popen(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert server.stderr is not None
    # the client follows one ADD_ADDR with one subflow
    topology.client.ip(
        "mptcp", "limits", "set", "add_addr_accepted", "1", "subflows", "1"
    )
    backend = KernelBackend()
    try:
        line = readline_within(server.stderr, COMMAND_TIMEOUT).decode()
        assert line.startswith("listening on"), line
        with topology.client.entered():
            transport, _ = await backend.create_connection(
                asyncio.Protocol, path0.server_address, PORT
            )
        await _wait_for_subflows(backend, transport, 2)
        remotes = {
            subflow.remote_address[0]
            for subflow in backend.info(transport).subflows
        }
        assert remotes == {path0.server_address, path1.server_address}
        transport.close()
    finally:
        topology.server.stop_processes()
        close_pipes(server)
