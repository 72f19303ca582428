"""The kernel's MPTCP endpoints and limits, through generic netlink.

An endpoint tells the in-kernel path manager what to do with a local
address: announce it to peers (``signal``), open subflows from it
(``subflow``), keep it as a backup. Limits cap the subflows per
connection and the addresses accepted from a peer. Both are per network
namespace and shared by every connection in it.

Reading needs no privilege; changing needs CAP_NET_ADMIN, and without it
this module says what is missing rather than trying and failing deep in
netlink. It talks netlink through pyroute2 and never runs ``ip``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag
from types import TracebackType
from typing import Any, TypeVar

from mptls.backends.kernel.sockets import numeric_family
from mptls.errors import PathError

logger = logging.getLogger("mptls.backends.kernel.paths")

T = TypeVar("T")

# include/uapi/linux/capability.h
CAP_NET_ADMIN = 12


class EndpointFlag(IntFlag):
    """MPTCP_PM_ADDR_FLAG_* (include/uapi/linux/mptcp.h)."""

    SIGNAL = 0x01
    SUBFLOW = 0x02
    BACKUP = 0x04
    FULLMESH = 0x08
    IMPLICIT = 0x10
    LAMINAR = 0x20


def flag_names(flags: int) -> tuple[str, ...]:
    """Lower-case names of the known bits, ``0x..`` for any others."""
    names = [
        member.name.lower()
        for member in EndpointFlag
        if member.name and flags & member
    ]
    unknown = flags & ~sum(EndpointFlag)
    if unknown:
        names.append(f"0x{unknown:x}")
    return tuple(names)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One MPTCP endpoint of the in-kernel path manager."""

    address_id: int
    address: str
    flags: int
    port: int | None = None
    interface: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "address_id": self.address_id,
            "address": self.address,
            "flags": list(flag_names(self.flags)),
            "port": self.port,
            "interface": self.interface,
        }


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits of the in-kernel path manager."""

    subflows: int
    add_addr_accepted: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "subflows": self.subflows,
            "add_addr_accepted": self.add_addr_accepted,
        }


def effective_capabilities(status_text: str) -> int:
    """The CapEff mask from the text of /proc/<pid>/status."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_net_admin() -> bool:
    """Whether this process may change endpoints and limits."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            mask = effective_capabilities(status.read())
    except OSError:
        return False
    return bool(mask & (1 << CAP_NET_ADMIN))


def missing_capability_reason() -> str:
    return (
        "changing MPTCP endpoints or limits needs CAP_NET_ADMIN, which "
        "this process does not have; run it with that capability or "
        "configure endpoints with 'ip mptcp endpoint' beforehand"
    )


def _endpoint_from_message(message: Any) -> Endpoint | None:
    attrs = message.get_attr("MPTCP_PM_ATTR_ADDR")
    if attrs is None:
        return None
    address = attrs.get_attr("MPTCP_PM_ADDR_ATTR_ADDR4") or attrs.get_attr(
        "MPTCP_PM_ADDR_ATTR_ADDR6"
    )
    interface = attrs.get_attr("MPTCP_PM_ADDR_ATTR_IF_IDX")
    return Endpoint(
        address_id=int(attrs.get_attr("MPTCP_PM_ADDR_ATTR_ID") or 0),
        address=str(address),
        flags=int(attrs.get_attr("MPTCP_PM_ADDR_ATTR_FLAGS") or 0),
        port=attrs.get_attr("MPTCP_PM_ADDR_ATTR_PORT") or None,
        interface=int(interface, 16)
        if isinstance(interface, str)
        else interface or None,
    )


class PathManager:
    """Endpoints and limits of one network namespace.

    The netlink socket opens here, in the network namespace the calling
    thread is in, and stays bound to it whatever the thread does later.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self) -> None:
        try:
            # pyroute2 ships neither stubs nor a py.typed marker
            from pyroute2 import MPTCP  # type: ignore[import-untyped]

            self._netlink: Any = MPTCP()
        except Exception as exc:
            raise PathError(
                f"cannot open the kernel's mptcp_pm netlink family: {exc}"
            ) from exc

    def __enter__(self) -> PathManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None

    def _mptcp(self) -> Any:
        if self._netlink is None:
            raise PathError("this path manager is closed")
        return self._netlink

    def _request(self, what: str, call: Any, *args: Any, **kw: Any) -> Any:
        try:
            return call(*args, **kw)
        except PathError:
            raise
        except Exception as exc:
            raise PathError(f"netlink refused to {what}: {exc}") from exc

    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every endpoint configured in this namespace."""
        messages = self._request(
            "list endpoints", self._mptcp().endpoint, "show"
        )
        found = (_endpoint_from_message(message) for message in messages)
        return tuple(endpoint for endpoint in found if endpoint is not None)

    def limits(self) -> Limits:
        """The subflow and accepted-address limits."""
        messages = self._request("read limits", self._mptcp().limits, "show")
        message = messages[0]
        return Limits(
            subflows=int(message.get_attr("MPTCP_PM_ATTR_SUBFLOWS") or 0),
            add_addr_accepted=int(
                message.get_attr("MPTCP_PM_ATTR_RCV_ADD_ADDRS") or 0
            ),
        )

    def _require_capability(self) -> None:
        if not has_net_admin():
            raise PathError(missing_capability_reason())

    def add_endpoint(
        self,
        address: str,
        flags: int = EndpointFlag.SIGNAL,
        *,
        address_id: int | None = None,
        port: int | None = None,
    ) -> Endpoint:
        """Add an endpoint and return it as the kernel recorded it."""
        self._require_capability()
        family = _family(address)
        fields: dict[str, Any] = {
            "addr4" if family == socket.AF_INET else "addr6": address,
            "flags": int(flags),
        }
        if address_id is not None:
            fields["id"] = address_id
        if port is not None:
            fields["port"] = port
        self._request(
            f"add endpoint {address}", self._mptcp().endpoint, "add", **fields
        )
        logger.debug("added endpoint %s %s", address, flag_names(flags))
        for endpoint in self.endpoints():
            if endpoint.address == address and endpoint.port == port:
                return endpoint
        raise PathError(f"endpoint {address} vanished after it was added")

    def ensure_endpoint(self, address: str, flags: int) -> Endpoint:
        """The endpoint for ``address``, added if there is none yet."""
        for endpoint in self.endpoints():
            if endpoint.address == address and endpoint.port is None:
                return endpoint
        return self.add_endpoint(address, flags)

    def remove_endpoint(self, address_id: int) -> None:
        """Remove the endpoint with this address id."""
        self._require_capability()
        self._request(
            f"remove endpoint id {address_id}",
            self._mptcp().endpoint,
            "del",
            id=address_id,
        )
        logger.debug("removed endpoint id %d", address_id)

    def set_limits(
        self,
        *,
        subflows: int | None = None,
        add_addr_accepted: int | None = None,
    ) -> Limits:
        """Change one or both limits (0 to 8 each); returns the new ones."""
        self._require_capability()
        current = self.limits()
        wanted = Limits(
            subflows=current.subflows if subflows is None else subflows,
            add_addr_accepted=current.add_addr_accepted
            if add_addr_accepted is None
            else add_addr_accepted,
        )
        self._request(
            "set limits",
            self._mptcp().limits,
            "set",
            subflows=wanted.subflows,
            rcv_add_addrs=wanted.add_addr_accepted,
        )
        return self.limits()


def _family(address: str) -> int:
    family = numeric_family(address)
    if family is None:
        raise PathError(f"not a numeric IPv4 or IPv6 address: {address!r}")
    return family


async def run_in_thread(work: Callable[[], T]) -> T:
    """Run blocking path-manager ``work`` without blocking the loop.

    pyroute2's synchronous sockets refuse to run inside a running event
    loop, so ``work`` runs on a new thread. A new thread starts in the
    network namespace of the thread that creates it, so the endpoints
    changed are those of the caller's namespace (a pooled executor
    thread may sit in another one).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def succeed(result: T) -> None:
        if not done.done():
            done.set_result(result)

    def fail(error: BaseException) -> None:
        if not done.done():
            done.set_exception(error)

    def body() -> None:
        try:
            result = work()
        except BaseException as exc:
            loop.call_soon_threadsafe(fail, exc)
        else:
            loop.call_soon_threadsafe(succeed, result)

    worker = threading.Thread(target=body, name="mptls-paths", daemon=True)
    worker.start()
    return await done
