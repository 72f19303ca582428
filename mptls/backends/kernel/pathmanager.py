"""The kernel's MPTCP endpoints and limits, through generic netlink.

An endpoint tells the in-kernel path manager what to do with a local
address: announce it to peers (``signal``), open subflows from it
(``subflow``), keep it as a backup. Limits cap the subflows per
connection and the addresses accepted from a peer. Both are per network
namespace and shared by every connection in it.

Reading needs no privilege; changing needs CAP_NET_ADMIN, and without it
this module says what is missing rather than trying and failing deep in
netlink. It talks netlink through pyroute2 and never runs ``ip``. It
must never lower a limit it was asked to raise, compare addresses as
text, or remove an endpoint it did not add.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntFlag
from types import TracebackType
from typing import Any, TypeVar

from mptls.backends.addresses import unusable_reason
from mptls.backends.kernel.sockets import numeric_family
from mptls.errors import AddressError, PathError

logger = logging.getLogger("mptls.backends.kernel.paths")

T = TypeVar("T")

# include/uapi/linux/capability.h
CAP_NET_ADMIN = 12
# include/uapi/linux/nsfs.h: _IO(0xb7, 1) and _IO(0xb7, 2)
NS_GET_USERNS = 0xB701
NS_GET_PARENT = 0xB702
# user namespaces nest at most 32 deep
_USER_NAMESPACE_DEPTH = 33

# net/mptcp: MPTCP_PM_ADDR_MAX (8; MPTCP_SUBFLOWS_MAX in later kernels)
# caps the endpoints of a namespace and each of the two limits
MAX_ENDPOINTS = 8
MAX_LIMIT = 8

# a limit written, then found lower (another writer), is written again
# this many times at most
RAISE_ATTEMPTS = 3

# raises from threads of this process run one at a time: between them
# the read-then-write window is closed (across processes it is not)
_LIMIT_WRITES = threading.Lock()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
class EndpointClaim:
    """Endpoints one call needed: all of them, and those it added."""

    endpoints: tuple[Endpoint, ...]
    added: tuple[Endpoint, ...]


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
    """Whether this process may change endpoints and limits.

    The kernel asks for CAP_NET_ADMIN in the user namespace that owns
    the network namespace: root of a user namespace made on its own
    (``unshare --user --map-root-user``) has the capability, but not
    over the network namespace it was started in.
    """
    return _has_capability() and _capability_reaches_network()


def _has_capability() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            mask = effective_capabilities(status.read())
    except OSError:
        return False
    return bool(mask & (1 << CAP_NET_ADMIN))


def _capability_reaches_network() -> bool:
    """Whether this process's user namespace owns its network namespace,
    or is an ancestor of the one that does.

    Where the kernel cannot say (no namespace files or ioctls), the
    capability alone is taken, and netlink has the last word.
    """
    try:
        own = os.stat("/proc/self/ns/user")
        network = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        owner = fcntl.ioctl(network, NS_GET_USERNS)
    except OSError as exc:
        # EPERM: the owner lies above this process's own namespace
        return exc.errno != errno.EPERM
    finally:
        os.close(network)
    for _ in range(_USER_NAMESPACE_DEPTH):
        try:
            found = os.fstat(owner)
            if (found.st_dev, found.st_ino) == (own.st_dev, own.st_ino):
                return True
            # EPERM: the parent lies above this process's own namespace
            parent = fcntl.ioctl(owner, NS_GET_PARENT)
        except OSError:
            return False
        finally:
            os.close(owner)
        owner = parent
    os.close(owner)
    return False


def missing_capability_reason() -> str:
    if _has_capability():
        return (
            "changing MPTCP endpoints or limits needs CAP_NET_ADMIN in "
            "the user namespace that owns this network namespace; this "
            "process has it only in a user namespace of its own (as "
            "under 'unshare --user'); run it outside that namespace, or "
            "configure endpoints with 'ip mptcp endpoint' beforehand"
        )
    return (
        "changing MPTCP endpoints or limits needs CAP_NET_ADMIN, which "
        "this process does not have; run it with that capability or "
        "configure endpoints with 'ip mptcp endpoint' beforehand"
    )


def netlink_reason(exc: Exception) -> str:
    """The system's words for a netlink error, where pyroute2's own
    text is a tuple (``(1, 'Operation not permitted')``)."""
    code = getattr(exc, "code", None)
    if not isinstance(code, int) or code <= 0:
        return str(exc)
    reason = os.strerror(code)
    if code == errno.EPERM and _has_capability():
        # the capability counts in the user namespace that owns the
        # network namespace, which a user namespace's root is not in
        reason += (
            " (this process has CAP_NET_ADMIN, but not in the user "
            "namespace that owns this network namespace)"
        )
    return reason


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
        interface=_interface_index(interface),
    )


def _interface_index(value: object) -> int | None:
    """MPTCP_PM_ADDR_ATTR_IF_IDX, which pyroute2 hands over as a hex
    dump of the attribute's bytes (``08:00:00:00``): a host-order s32,
    0 or absent for an endpoint with no ``dev``."""
    if isinstance(value, str):
        try:
            raw = bytes.fromhex(value.replace(":", ""))
        except ValueError:
            raise PathError(
                f"netlink gave an endpoint interface index mptls cannot "
                f"read: {value!r}"
            ) from None
        value = int.from_bytes(raw, sys.byteorder, signed=True)
    if isinstance(value, int) and value > 0:
        return value
    return None


class PathManager:
    """Endpoints and limits of one network namespace.

    The netlink socket opens here, in the network namespace the calling
    thread is in, and stays bound to it whatever the thread does later.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self) -> None:
        _refuse_running_loop()
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
            raise PathError(
                f"netlink refused to {what}: {netlink_reason(exc)}"
            ) from exc

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

    def find_endpoint(
        self, address: str, port: int | None = None
    ) -> Endpoint | None:
        """The endpoint for ``address`` (and ``port``), if there is one.

        Addresses are compared as values: the kernel writes its own
        spelling (``2001:db8:2::1``), which the caller's need not be.
        """
        wanted = parse_address(address)
        return _find(self.endpoints(), wanted, port)

    def add_endpoint(
        self,
        address: str,
        flags: int = EndpointFlag.SIGNAL,
        *,
        address_id: int | None = None,
        port: int | None = None,
    ) -> Endpoint:
        """Add an endpoint and return it as the kernel recorded it.

        An endpoint already there for the address (another process may
        have added it a moment ago) is returned as it is.
        """
        return self._add(address, flags, address_id=address_id, port=port)[0]

    def _add(
        self,
        address: str,
        flags: int,
        *,
        address_id: int | None = None,
        port: int | None = None,
    ) -> tuple[Endpoint, bool]:
        """The endpoint, and whether this call is what added it."""
        self._require_capability()
        wanted = endpoint_address(address)
        fields: dict[str, Any] = {
            "addr4" if wanted.version == 4 else "addr6": str(wanted),
            "flags": int(flags),
        }
        if address_id is not None:
            fields["id"] = address_id
        if port is not None:
            fields["port"] = port
        added = True
        try:
            self._mptcp().endpoint("add", **fields)
        except PathError:
            raise
        except Exception as exc:
            if getattr(exc, "code", None) != errno.EEXIST:
                raise PathError(
                    f"netlink refused to add endpoint {address}: "
                    f"{netlink_reason(exc)}"
                ) from exc
            # the kernel has this address (and port) already: a
            # concurrent add won, which is what this call wanted
            added = False
        found = _find(self.endpoints(), wanted, port)
        if found is None:
            verb = "was added" if added else "was reported to exist"
            raise PathError(f"endpoint {address} vanished after it {verb}")
        if added:
            logger.debug(
                "added endpoint %s %s", found.address, flag_names(flags)
            )
        return found, added

    def ensure_endpoint(self, address: str, flags: int) -> Endpoint:
        """The endpoint for ``address``, added if there is none yet."""
        return self.ensure_endpoints([address], flags).endpoints[0]

    def ensure_endpoints(
        self, addresses: Sequence[str], flags: int
    ) -> EndpointClaim:
        """Endpoints for every address: all of them, or none added.

        Every address is checked, and the namespace's endpoint count
        against the kernel's maximum, before anything changes; when an
        add still fails, the endpoints this call added are removed.
        An endpoint already there is kept as it is, whatever its flags.
        """
        self._require_capability()
        wanted = _distinct(addresses)
        existing = self.endpoints()
        missing = [a for a in wanted if _find(existing, a, None) is None]
        if len(existing) + len(missing) > MAX_ENDPOINTS:
            raise PathError(
                f"{len(missing)} more endpoint(s) would make "
                f"{len(existing) + len(missing)} in this namespace; the "
                f"kernel takes at most {MAX_ENDPOINTS}"
            )
        endpoints: list[Endpoint] = []
        added: list[Endpoint] = []
        try:
            for address in wanted:
                endpoint, new = self._add(str(address), flags)
                endpoints.append(endpoint)
                if new:
                    added.append(endpoint)
        except BaseException:
            self.remove_added(added)
            raise
        return EndpointClaim(tuple(endpoints), tuple(added))

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

    def remove_added(self, added: Sequence[Endpoint]) -> None:
        """Take back endpoints this process added, if still as recorded.

        An id that now names another address, or an endpoint someone
        already removed, is left alone: it is no longer the one added.
        """
        if not added:
            return
        current = set(self.endpoints())
        failures: list[str] = []
        for endpoint in added:
            if endpoint not in current:
                continue
            try:
                self.remove_endpoint(endpoint.address_id)
            except PathError as exc:
                failures.append(str(exc))
        if failures:
            raise PathError("; ".join(failures))

    def set_limits(
        self,
        *,
        subflows: int | None = None,
        add_addr_accepted: int | None = None,
    ) -> Limits:
        """Write the limits given (0 to 8 each); returns the new ones.

        A limit not given is not written, so a change another process
        makes to it meanwhile stays.
        """
        self._require_capability()
        fields = _limit_fields(subflows, add_addr_accepted)
        if fields:
            self._request("set limits", self._mptcp().limits, "set", **fields)
        return self.limits()

    def raise_limits(
        self,
        *,
        subflows: int | None = None,
        add_addr_accepted: int | None = None,
    ) -> Limits:
        """Raise each limit given to at least that value; never lower one.

        The limits are read right before each write and only a limit
        below its wanted value is written. Netlink has no compare and
        set, so a writer between that read and the write can still be
        overwritten; a limit found lower after the write is written
        again, a few times at most.
        """
        self._require_capability()
        _limit_fields(subflows, add_addr_accepted)
        with _LIMIT_WRITES:
            current = self.limits()
            for _ in range(RAISE_ATTEMPTS):
                fields = _below(current, subflows, add_addr_accepted)
                if not fields:
                    return current
                self._request(
                    "raise limits", self._mptcp().limits, "set", **fields
                )
                logger.debug("raised limits %s", fields)
                current = self.limits()
        if _below(current, subflows, add_addr_accepted):
            logger.warning(
                "MPTCP limits keep falling back to %s: another process "
                "lowers them",
                current.as_dict(),
            )
        return current


def _refuse_running_loop() -> None:
    """Raise :class:`PathError` in a thread that runs an event loop.

    pyroute2's synchronous calls run a loop of their own, which asyncio
    refuses inside a running one; they fail then with a bare "This
    event loop is already running" and leave a coroutine never awaited.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise PathError(
        "PathManager cannot run in a thread with a running event loop "
        "(its netlink calls block); from async code, call it through "
        "mptls.backends.kernel.pathmanager.run_in_thread"
    )


def parse_address(address: str) -> IPAddress:
    """``address`` as a value; :class:`PathError` if not numeric."""
    bare, percent, scope = address.partition("%")
    if percent and numeric_family(bare) == socket.AF_INET6:
        # a link-local address is an endpoint only with its interface
        # (MPTCP_PM_ADDR_ATTR_IF_IDX), which mptls does not set
        raise PathError(
            f"{address} has a scope id, and mptls makes no endpoint for "
            f"a scoped address; add it with 'ip mptcp endpoint add {bare} "
            f"dev {scope} subflow' (or signal)"
        )
    _family(address)
    return ipaddress.ip_address(address)


def endpoint_address(address: str) -> IPAddress:
    """``address`` as a value that can be an endpoint, else
    :class:`~mptls.errors.AddressError` (a :class:`PathError`).

    The kernel takes any address as an endpoint, also one that can be
    no subflow's source nor anyone's destination: it would announce
    ``0.0.0.0`` with ADD_ADDR, and the endpoint stays in the namespace.
    """
    value = parse_address(address)
    # an endpoint is a local address, but an unspecified one is no
    # address of this host: checked as a remote end is
    what = unusable_reason(value, local=False)
    if what is None:
        return value
    raise AddressError(
        f"{address} cannot be an MPTCP endpoint: it is {what}, and an "
        "endpoint is a unicast address of this host"
    )


def _distinct(addresses: Sequence[str]) -> list[IPAddress]:
    # every address is parsed before any is added: a bad one later in
    # the list must not leave the earlier ones behind
    wanted: list[IPAddress] = []
    for address in addresses:
        value = endpoint_address(address)
        if value not in wanted:
            wanted.append(value)
    return wanted


def _find(
    endpoints: Sequence[Endpoint], wanted: IPAddress, port: int | None
) -> Endpoint | None:
    for endpoint in endpoints:
        if endpoint.port != port:
            continue
        try:
            if ipaddress.ip_address(endpoint.address) == wanted:
                return endpoint
        except ValueError:
            continue
    return None


def _limit_fields(
    subflows: int | None, add_addr_accepted: int | None
) -> dict[str, int]:
    fields = {
        name: value
        for name, value in (
            ("subflows", subflows),
            ("rcv_add_addrs", add_addr_accepted),
        )
        if value is not None
    }
    for name, value in fields.items():
        if not 0 <= value <= MAX_LIMIT:
            raise PathError(
                f"MPTCP limit {name}={value} is out of range: the kernel "
                f"takes 0 to {MAX_LIMIT}"
            )
    return fields


def _below(
    current: Limits, subflows: int | None, add_addr_accepted: int | None
) -> dict[str, int]:
    """The fields to write: only the limits below what is wanted."""
    fields: dict[str, int] = {}
    if subflows is not None and current.subflows < subflows:
        fields["subflows"] = subflows
    if add_addr_accepted is not None and (
        current.add_addr_accepted < add_addr_accepted
    ):
        fields["rcv_add_addrs"] = add_addr_accepted
    return fields


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
            report(fail, exc)
        else:
            report(succeed, result)

    def report(outcome: Callable[[Any], None], value: Any) -> None:
        try:
            loop.call_soon_threadsafe(outcome, value)
        except RuntimeError:
            # the caller gave up (a cancelled connect) and its loop is
            # closed: nobody is left to tell, and a traceback from this
            # thread would only puzzle the program that goes on
            logger.debug("path work ended after its event loop closed")

    worker = threading.Thread(target=body, name="mptls-paths", daemon=True)
    worker.start()
    return await done
