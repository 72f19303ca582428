"""What this machine's kernel offers for MPTCP, for ``mptls info``.

:func:`probe` gathers, without changing anything: whether the kernel
hands out MPTCP sockets, the ``net.mptcp`` sysctls (enabled, path
manager, scheduler), the path manager's endpoints and limits (netlink),
which SOL_MPTCP getsockopts answer on a live connection, whether this
process may change paths, and whether external keys can be installed.

The getsockopt test opens one MPTCP connection over 127.0.0.1 in the
current network namespace and closes it; the probe sends nothing
anywhere else and never sets an MPTCP option.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mptls.backends.kernel import info, keys, pathmanager
from mptls.backends.kernel.sockets import (
    IPPROTO_MPTCP,
    SOL_MPTCP,
    TCP_IS_MPTCP,
    MptcpSockopt,
)
from mptls.backends.tcpinfo import TCP_INFO_STRIDE
from mptls.errors import PathError

SYSCTL_DIR = "/proc/sys/net/mptcp"
PROBE_TIMEOUT = 2.0
# net.mptcp.pm_type before the path manager got a name (6.15)
PM_TYPES = {"0": "kernel", "1": "userspace"}


@dataclass(frozen=True, slots=True)
class SockoptReport:
    """Whether one getsockopt answered on a live MPTCP connection."""

    name: str
    works: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class KernelReport:
    """Everything the running kernel offers mptls's kernel backend."""

    kernel_release: str
    mptcp_socket: bool
    mptcp_socket_detail: str
    enabled: bool | None
    path_manager: str | None
    scheduler: str | None
    sysctls: tuple[tuple[str, str], ...]
    endpoints: tuple[pathmanager.Endpoint, ...]
    limits: pathmanager.Limits | None
    netlink_detail: str
    getsockopts: tuple[SockoptReport, ...]
    can_manage_paths: bool
    manage_paths_detail: str
    external_keys: bool
    external_keys_detail: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: lists, dicts, strings, numbers."""
        return {
            "kernel_release": self.kernel_release,
            "mptcp_socket": self.mptcp_socket,
            "mptcp_socket_detail": self.mptcp_socket_detail,
            "enabled": self.enabled,
            "path_manager": self.path_manager,
            "scheduler": self.scheduler,
            "sysctls": dict(self.sysctls),
            "endpoints": [endpoint.as_dict() for endpoint in self.endpoints],
            "limits": None if self.limits is None else self.limits.as_dict(),
            "netlink_detail": self.netlink_detail,
            "getsockopts": [
                {"name": item.name, "works": item.works, "detail": item.detail}
                for item in self.getsockopts
            ],
            "can_manage_paths": self.can_manage_paths,
            "manage_paths_detail": self.manage_paths_detail,
            "external_keys": self.external_keys,
            "external_keys_detail": self.external_keys_detail,
            "notes": list(self.notes),
        }


def read_sysctls(directory: str = SYSCTL_DIR) -> tuple[tuple[str, str], ...]:
    """Every readable ``net.mptcp.*`` sysctl, sorted by name."""
    values = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return ()
    for name in names:
        try:
            with open(os.path.join(directory, name), encoding="ascii") as f:
                values.append((f"net.mptcp.{name}", f.read().strip()))
        except OSError:
            continue
    return tuple(values)


def path_manager_name(sysctls: dict[str, str]) -> str | None:
    named = sysctls.get("net.mptcp.path_manager")
    if named:
        return named
    return PM_TYPES.get(sysctls.get("net.mptcp.pm_type", ""))


def _check_socket() -> tuple[bool, str]:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    except OSError as exc:
        return False, f"socket(IPPROTO_MPTCP) failed: {_errno_name(exc)}"
    sock.close()
    return True, "socket(IPPROTO_MPTCP) works"


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


@contextlib.contextmanager
def _loopback_pair() -> Iterator[socket.socket]:
    """A connected MPTCP client socket over 127.0.0.1, closed after."""
    opened: list[socket.socket] = []
    try:
        listener = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP
        )
        opened.append(listener)
        listener.settimeout(PROBE_TIMEOUT)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP
        )
        opened.append(client)
        client.settimeout(PROBE_TIMEOUT)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        opened.append(accepted)
        client.sendall(b"\x00")
        accepted.recv(1)
        yield client
    finally:
        for sock in reversed(opened):
            sock.close()


def _try(name: str, call: Callable[[], object]) -> SockoptReport:
    try:
        call()
    except OSError as exc:
        return SockoptReport(name, False, _errno_name(exc))
    except Exception as exc:
        return SockoptReport(name, False, str(exc))
    return SockoptReport(name, True)


def check_getsockopts() -> tuple[SockoptReport, ...]:
    """Try each SOL_MPTCP getsockopt (and TCP_IS_MPTCP) on a live pair."""
    names = [option.name for option in MptcpSockopt] + ["TCP_IS_MPTCP"]
    try:
        with _loopback_pair() as client:
            fd = client.fileno()
            return (
                _try(
                    "MPTCP_INFO",
                    lambda: client.getsockopt(
                        SOL_MPTCP,
                        MptcpSockopt.MPTCP_INFO,
                        info.MPTCP_INFO_SIZE,
                    ),
                ),
                _try(
                    "MPTCP_TCPINFO",
                    lambda: info.read_subflow_array(
                        fd, MptcpSockopt.MPTCP_TCPINFO, TCP_INFO_STRIDE
                    ),
                ),
                _try(
                    "MPTCP_SUBFLOW_ADDRS",
                    lambda: info.read_subflow_array(
                        fd,
                        MptcpSockopt.MPTCP_SUBFLOW_ADDRS,
                        info.SUBFLOW_ADDRS_SIZE,
                    ),
                ),
                _try("MPTCP_FULL_INFO", lambda: info.read_full_info(fd)),
                _try(
                    "TCP_IS_MPTCP",
                    lambda: client.getsockopt(socket.SOL_TCP, TCP_IS_MPTCP),
                ),
            )
    except OSError as exc:
        detail = f"no loopback MPTCP connection: {_errno_name(exc)}"
        return tuple(SockoptReport(name, False, detail) for name in names)


def _read_paths() -> tuple[
    tuple[pathmanager.Endpoint, ...], pathmanager.Limits | None, str
]:
    try:
        with pathmanager.PathManager() as paths:
            return paths.endpoints(), paths.limits(), "mptcp_pm netlink works"
    except PathError as exc:
        return (), None, str(exc)


def probe() -> KernelReport:
    """Look at the running kernel's MPTCP support; changes nothing."""
    sysctls = read_sysctls()
    by_name = dict(sysctls)
    enabled_text = by_name.get("net.mptcp.enabled")
    socket_works, socket_detail = _check_socket()
    endpoints, limits, netlink_detail = _read_paths()
    can_manage = pathmanager.has_net_admin()
    key_support = keys.detect().support()
    notes = []
    if not sysctls:
        notes.append(f"{SYSCTL_DIR} is missing: no MPTCP in this kernel")
    return KernelReport(
        kernel_release=platform.release(),
        mptcp_socket=socket_works,
        mptcp_socket_detail=socket_detail,
        enabled=None if enabled_text is None else enabled_text == "1",
        path_manager=path_manager_name(by_name),
        scheduler=by_name.get("net.mptcp.scheduler"),
        sysctls=sysctls,
        endpoints=endpoints,
        limits=limits,
        netlink_detail=netlink_detail,
        getsockopts=check_getsockopts() if socket_works else (),
        can_manage_paths=can_manage,
        manage_paths_detail="CAP_NET_ADMIN present"
        if can_manage
        else pathmanager.missing_capability_reason(),
        external_keys=key_support.supported,
        external_keys_detail=key_support.reason,
        notes=tuple(notes),
    )
