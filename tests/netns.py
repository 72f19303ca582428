"""Network namespaces for tests and benchmarks: build, enter, tear down.

A :class:`Topology` is two namespaces, ``client`` and ``server``, joined
by one veth pair per path; path ``n`` has its own subnet from the
documentation ranges (RFC 5737, RFC 3849), so traffic never leaves the
machine. Names carry the PID, everything is torn down in a ``finally``
(also after failures), every command has a timeout, and processes
started in a namespace are killed by PID.

Sockets can be made inside a namespace without a child process:
:meth:`Namespace.entered` moves the calling thread into it (``setns``),
and a socket keeps the namespace it was created in after the thread
leaves. Nothing here shapes traffic.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

COMMAND_TIMEOUT = 10.0
CLONE_NEWNET = 0x40000000
NAME_PREFIX = "mptlst"

# One subnet per path: (client address, server address, prefix length).
IPV4_PATHS = (
    ("192.0.2.1", "192.0.2.2", 24),
    ("198.51.100.1", "198.51.100.2", 24),
    ("203.0.113.1", "203.0.113.2", 24),
)
IPV6_PATHS = (
    ("2001:db8:1::1", "2001:db8:1::2", 64),
    ("2001:db8:2::1", "2001:db8:2::2", 64),
    ("2001:db8:3::1", "2001:db8:3::2", 64),
)

_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or ``None`` if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    except OSError as exc:
        return f"the kernel refuses IPPROTO_MPTCP: {exc}"
    probe.close()
    return None


def run(args: Sequence[str], *, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a command, raise with its stderr if it fails; its stdout."""
    done = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({done.returncode}): "
            f"{done.stderr.strip()}"
        )
    return done.stdout


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {path}: {errno.errorcode.get(code)}")
    finally:
        os.close(fd)


@dataclass
class Namespace:
    """One network namespace this process created."""

    name: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args])

    def run(self, args: Sequence[str], *, timeout: float = 30.0) -> str:
        """Run a command inside the namespace and wait for it."""
        return run(["ip", "netns", "exec", self.name, *args], timeout=timeout)

    def popen(
        self, args: Sequence[str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start a command inside the namespace; killed at teardown."""
        process: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *args], **kwargs
        )
        self.processes.append(process)
        return process

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into the namespace for the block.

        Sockets and netlink handles created inside stay in the namespace.
        """
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(self.path)
            try:
                yield
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back failed")
        finally:
            os.close(home)

    def stop_processes(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=COMMAND_TIMEOUT)
        self.processes.clear()


@dataclass(frozen=True)
class Path:
    """One veth pair: its interface name and the two ends' addresses."""

    index: int
    interface: str
    client_address: str
    server_address: str
    prefix: int


@dataclass
class Topology:
    """Two namespaces joined by one veth pair per path."""

    client: Namespace
    server: Namespace
    paths: list[Path] = field(default_factory=list)

    def namespaces(self) -> tuple[Namespace, Namespace]:
        return self.client, self.server


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> None:
    """Delete namespaces left by earlier runs of this helper that died."""
    for line in run(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != NAME_PREFIX:
            continue
        if parts[1].isdigit() and not _pid_alive(int(parts[1])):
            run(["ip", "netns", "del", name])


def new_namespace(role: str) -> Namespace:
    name = f"{NAME_PREFIX}-{os.getpid()}-{next(_counter)}{role}"
    run(["ip", "netns", "add", name])
    namespace = Namespace(name)
    namespace.ip("link", "set", "lo", "up")
    return namespace


def _add_path(topology: Topology, index: int, ipv6: bool) -> Path:
    table = IPV6_PATHS if ipv6 else IPV4_PATHS
    client_address, server_address, prefix = table[index]
    interface = f"p{index}"
    run(
        [
            "ip", "link", "add", interface,
            "netns", topology.client.name,
            "type", "veth", "peer", "name", interface,
            "netns", topology.server.name,
        ]
    )  # fmt: skip
    for namespace, address in (
        (topology.client, client_address),
        (topology.server, server_address),
    ):
        extra = ["nodad"] if ipv6 else []
        namespace.ip(
            "address", "add", f"{address}/{prefix}", "dev", interface, *extra
        )
        namespace.ip("link", "set", interface, "up")
    return Path(index, interface, client_address, server_address, prefix)


def teardown(topology: Topology) -> None:
    """Stop processes and delete both namespaces (and so every veth)."""
    for namespace in topology.namespaces():
        namespace.stop_processes()
    for namespace in topology.namespaces():
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            run(["ip", "netns", "del", namespace.name])


@contextlib.contextmanager
def topology(paths: int = 2, *, ipv6: bool = False) -> Iterator[Topology]:
    """Build a client/server topology with ``paths`` paths, then remove it.

    Path 0 carries the first subflow; the MPTCP endpoints and limits of
    both namespaces start empty (the kernel's defaults).
    """
    remove_stale_namespaces()
    client = new_namespace("c")
    try:
        server = new_namespace("s")
    except BaseException:
        run(["ip", "netns", "del", client.name])
        raise
    built = Topology(client, server)
    try:
        for index in range(paths):
            built.paths.append(_add_path(built, index, ipv6))
        yield built
    finally:
        teardown(built)
