"""Network namespaces for tests and benchmarks: build, enter, tear down.

A :class:`Topology` is two namespaces, ``client`` and ``server``, joined
by one veth pair per path; path ``n`` has its own subnet from the
documentation ranges (RFC 5737, RFC 3849), so traffic never leaves the
machine. Names carry the PID, everything is torn down in a ``finally``
(also after failures), every command has a timeout, and processes
started in a namespace are killed by PID.

:func:`shape` puts a token bucket (``tc ... tbf``) on one end of a path,
and :func:`route_source` sends what leaves from an address out of its
own path, so that a subflow bound to a path's address really uses it.

Sockets can be made inside a namespace without a child process:
:meth:`Namespace.entered` moves the calling thread into it (``setns``),
and a socket keeps the namespace it was created in after the thread
leaves. This module must never touch a namespace it did not create.
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
    return mptcp_unavailable_reason()


def mptcp_unavailable_reason() -> str | None:
    """Why this kernel opens no MPTCP socket, or ``None`` if it does."""
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


# Packet capture with a raw AF_PACKET socket: no tcpdump needed.

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_TCP = 6
CAPTURE_BUFFER = 8 << 20


@dataclass(frozen=True)
class TcpSegment:
    """The parts of one captured TCP segment that MPTCP tests look at."""

    source: tuple[str, int]
    destination: tuple[str, int]
    flags: int
    options: bytes
    payload_length: int

    @property
    def syn(self) -> bool:
        return bool(self.flags & 0x02)

    @property
    def ack(self) -> bool:
        return bool(self.flags & 0x10)


def parse_frame(frame: bytes) -> TcpSegment | None:
    """The TCP segment in an Ethernet frame, ``None`` for anything else."""
    if len(frame) < 14:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    packet = frame[14:]
    if ethertype == ETH_P_IP and len(packet) >= 20:
        header_length = (packet[0] & 0x0F) * 4
        total_length = int.from_bytes(packet[2:4], "big")
        if packet[9] != IPPROTO_TCP:
            return None
        family, source, destination = (
            socket.AF_INET,
            packet[12:16],
            packet[16:20],
        )
        segment = packet[header_length:total_length]
    elif ethertype == ETH_P_IPV6 and len(packet) >= 40:
        if packet[6] != IPPROTO_TCP:
            return None
        payload_length = int.from_bytes(packet[4:6], "big")
        family, source, destination = (
            socket.AF_INET6,
            packet[8:24],
            packet[24:40],
        )
        segment = packet[40 : 40 + payload_length]
    else:
        return None
    if len(segment) < 20:
        return None
    data_offset = (segment[12] >> 4) * 4
    return TcpSegment(
        source=(
            socket.inet_ntop(family, source),
            int.from_bytes(segment[0:2], "big"),
        ),
        destination=(
            socket.inet_ntop(family, destination),
            int.from_bytes(segment[2:4], "big"),
        ),
        flags=segment[13],
        options=bytes(segment[20:data_offset]),
        payload_length=len(segment) - data_offset,
    )


class PacketCapture:
    """Every frame on every interface of one namespace, while open.

    Open it with the thread inside the namespace (``Namespace.entered``);
    the socket stays there. Frames queue in the kernel until
    :meth:`segments` drains them.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
        )
        self._sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, CAPTURE_BUFFER
        )
        self._sock.setblocking(False)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PacketCapture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def segments(self, port: int) -> list[TcpSegment]:
        """The TCP segments to or from ``port`` captured so far."""
        found: list[TcpSegment] = []
        while True:
            try:
                frame = self._sock.recv(65535)
            except BlockingIOError:
                return found
            segment = parse_frame(frame)
            if segment is None:
                continue
            if port in (segment.source[1], segment.destination[1]):
                found.append(segment)


# Certificates for servers in a topology or on loopback.

CERT_NAMES = (
    "localhost",
    "127.0.0.1",
    "::1",
    *(server for _, server, _ in IPV4_PATHS),
    *(server for _, server, _ in IPV6_PATHS),
)


@dataclass(frozen=True)
class ServerPki:
    """A throwaway CA and one server certificate for every test address."""

    ca_pem: str
    server_pem: str


def write_pki(directory: str) -> ServerPki:
    """Write ``ca.pem`` and ``server.pem`` (certificate chain and key)."""
    import trustme

    ca = trustme.CA()
    certificate = ca.issue_cert(*CERT_NAMES)
    pki = ServerPki(
        ca_pem=os.path.join(directory, "ca.pem"),
        server_pem=os.path.join(directory, "server.pem"),
    )
    ca.cert_pem.write_to_path(pki.ca_pem)
    certificate.private_key_and_cert_chain_pem.write_to_path(pki.server_pem)
    return pki


# Shaping and routing, for the benchmarks' paths.


def shape(namespace: Namespace, interface: str, rate_mbit: float) -> None:
    """Limit what ``interface`` sends to ``rate_mbit`` with a token bucket.

    The bucket holds a few milliseconds of traffic at the rate (never less
    than a few 64 KiB segments, which TSO makes on veth), and the queue
    behind it 20 ms: deep enough for TCP to fill the path, shallow enough
    to keep the round trip short.
    """
    bytes_per_second = rate_mbit * 1e6 / 8
    burst = max(int(bytes_per_second * 0.004), 4 * 65536)
    run(
        [
            "tc", "-n", namespace.name, "qdisc", "replace", "dev", interface,
            "root", "tbf", "rate", f"{rate_mbit:g}mbit",
            "burst", str(burst), "latency", "20ms",
        ]
    )  # fmt: skip


def route_source(
    namespace: Namespace, address: str, interface: str, table: int
) -> None:
    """Send every packet from ``address`` out of ``interface``.

    A policy rule picks a table of its own for that source, whose default
    route is the path's interface: the peer answers on the same path
    (its route back to ``address`` is the path's subnet). Linux deletes
    that route when ``interface`` goes down and does not restore it when
    the link comes back: whoever flaps the link adds it again, or the
    source's packets take the main table's route.
    """
    family = "-6" if ":" in address else "-4"
    namespace.ip(family, "rule", "add", "from", address, "table", str(table))
    namespace.ip(
        family, "route", "add", "default", "dev", interface,
        "table", str(table),
    )  # fmt: skip
