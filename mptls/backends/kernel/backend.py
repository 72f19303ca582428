"""The kernel backend: TLS over Linux MPTCP sockets.

The kernel runs MPTCP; this backend opens and accepts ``IPPROTO_MPTCP``
sockets, puts them under asyncio's own socket transports, offers the TLS
keys to the kernel through :mod:`mptls.backends.kernel.keys`, and turns
the kernel's MPTCP_INFO and subflow records into an :class:`MptcpInfo`.

It must never hide a fallback to plain TCP, never claim keys are
installed when the kernel did not take them, and never change the
kernel's endpoints unless the caller asked for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar, cast

from mptls.backends.addresses import check_subflow_address
from mptls.backends.base import (
    CONNECT_TIMEOUT,
    AddressRace,
    Backend,
    KeyDerivation,
    KeyInstall,
    MptcpInfo,
    ProtocolFactory,
    Server,
    SubflowInfo,
)
from mptls.backends.kernel import info as kernel_info
from mptls.backends.kernel import keys as kernel_keys
from mptls.backends.kernel import sockets
from mptls.backends.kernel.pathmanager import (
    Endpoint,
    EndpointFlag,
    PathManager,
    run_in_thread,
)
from mptls.backends.kernel.server import MultiServer, StopListener
from mptls.backends.tcpinfo import TCP_INFO_FIELDS, TCP_INFO_STRIDE
from mptls.errors import BackendError, ConfigurationError, shown_value
from mptls.mptcp.config import check_seconds
from mptls.tls.keys import KeyMaterial

logger = logging.getLogger("mptls.backends.kernel")

CONNECTION_OPTIONS = frozenset(
    {"connect_timeout", "manage_paths", "happy_eyeballs_delay", "interleave"}
)
SERVER_OPTIONS = frozenset(
    {"announce", "backlog", "reuse_address", "reuse_port", "start_serving"}
)


# userspace backend options and what stands for them here
_EQUIVALENTS = {
    "close_timeout": "ssl_shutdown_timeout",
    "announce_addrs": "announce=[address, ...] (addresses alone: the "
    "kernel announces each on the server's port)",
}
# userspace backend options with no stand-in: the kernel's MPTCP has
# no mode to choose and no keys of ours to rotate
_USERSPACE_ONLY = frozenset({"mode", "modes", "key_rotation_interval"})


def _check_options(given: dict[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        hints = "".join(
            f"; for {name}, use {_EQUIVALENTS[name]}"
            for name in unknown
            if name in _EQUIVALENTS
        )
        if _USERSPACE_ONLY.intersection(unknown):
            hints += (
                "; the kernel runs its own RFC 8684 MPTCP: for a mode "
                "(E, with key rotation, G or rfc8684) use "
                "backend='userspace'"
            )
        raise ConfigurationError(
            f"the kernel backend does not know option(s) "
            f"{', '.join(unknown)}; beside the keywords of asyncio's call "
            f"it takes {', '.join(sorted(known))}{hints}"
        )


def _check_announce(announce: object) -> list[str]:
    # checked before the listen: a bad entry would otherwise surface as a
    # netlink error after the endpoint table was already half changed
    if announce is None:
        return []
    if isinstance(announce, str | bytes) or not isinstance(announce, Sequence):
        raise ConfigurationError(
            "announce must be a list of IP addresses, got "
            f"{shown_value(announce)}"
        )
    for address in announce:
        try:
            if not isinstance(address, str):
                raise ValueError(address)
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigurationError(
                "announce entry "
                f"{shown_value(address)} is not an IPv4 or IPv6 literal"
            ) from None
        check_subflow_address(address, "announce entry", local=False)
    return list(announce)


def _check_mptcp_socket(first_local: str) -> None:
    """Raise BackendError now if the kernel refuses an MPTCP socket.

    Checked before any endpoint is added, so that a kernel with
    net.mptcp.enabled = 0 leaves the endpoint table as it was.
    """
    family = sockets.numeric_family(first_local.partition("%")[0])
    sockets.mptcp_socket(family or socket.AF_INET).close()


async def _announce(announce: Sequence[str]) -> None:
    """Signal endpoints for ``announce``: all of them, or none added."""
    if not announce:
        return

    def add() -> None:
        with PathManager() as paths:
            paths.ensure_endpoints(announce, EndpointFlag.SIGNAL)

    await run_in_thread(add)


def _transport_socket(transport: asyncio.BaseTransport) -> Any:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return None
    return sock


def _syn_retransmissions(sock: socket.socket) -> int | None:
    """tcpi_total_retrans of a socket just connected: its SYNs sent again."""
    try:
        tcp = sock.getsockopt(
            socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_STRIDE
        )
    except OSError:
        return None
    fields = kernel_info.decode_fields(tcp, TCP_INFO_FIELDS)
    return fields["total_retrans"]


def _fallback_subflow(sock: Any) -> tuple[SubflowInfo, ...]:
    """The one TCP connection of a fallen-back socket, as a subflow."""
    try:
        tcp = sock.getsockopt(
            socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_STRIDE
        )
        local = sock.getsockname()[:2]
        remote = sock.getpeername()[:2]
    except OSError:
        return ()
    subflow = kernel_info.subflow_from_records(0, b"", tcp)
    return (
        SubflowInfo(
            subflow_id=0,
            local_address=(str(local[0]), int(local[1])),
            remote_address=(str(remote[0]), int(remote[1])),
            state=subflow.state,
            bytes_sent=subflow.bytes_sent,
            bytes_received=subflow.bytes_received,
            rtt_ms=subflow.rtt_ms,
        ),
    )


class KernelBackend(Backend):
    """Linux MPTCP (``IPPROTO_MPTCP``) under mptls's TLS layer.

    ``key_hook`` is how TLS keys reach the kernel; by default the hook
    for the running kernel (:func:`keys.detect`), which on every released
    kernel reports that it cannot take them.
    """

    name: ClassVar[str] = "kernel"
    path_control: ClassVar[str] = (
        "the kernel's path manager opens subflows from its endpoints for "
        "every connection; give local_addrs with manage_paths=True"
    )

    def __init__(self, key_hook: kernel_keys.KernelKeyHook | None = None):
        self.key_hook = key_hook or kernel_keys.detect()
        self._installs: weakref.WeakKeyDictionary[
            asyncio.BaseTransport, tuple[KeyInstall, str]
        ] = weakref.WeakKeyDictionary()
        self._snapshots: weakref.WeakKeyDictionary[
            asyncio.BaseTransport, MptcpInfo
        ] = weakref.WeakKeyDictionary()
        self._fallback_reasons: weakref.WeakKeyDictionary[
            asyncio.BaseTransport, str
        ] = weakref.WeakKeyDictionary()

    async def create_connection(
        self,
        protocol_factory: ProtocolFactory,
        host: str,
        port: int,
        *,
        local_addrs: Sequence[str] | None = None,
        **options: Any,
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """Connect an MPTCP socket and run ``protocol_factory()`` on it.

        ``local_addrs[0]`` carries the first subflow. Further addresses
        become kernel ``subflow`` endpoints only with
        ``manage_paths=True`` (needs CAP_NET_ADMIN); otherwise the
        kernel's configured endpoints decide the extra subflows.
        ``connect_timeout`` (30 s, ``None`` for the kernel's SYN retries
        alone) bounds the TCP connect, and ``happy_eyeballs_delay`` and
        ``interleave`` say how the host's addresses are tried, as on the
        userspace backend.
        """
        _check_options(options, CONNECTION_OPTIONS)
        connect_timeout = options.get("connect_timeout", CONNECT_TIMEOUT)
        if connect_timeout is not None:
            check_seconds("connect_timeout", connect_timeout)
        race = AddressRace.from_options(
            options.get("happy_eyeballs_delay"), options.get("interleave")
        )
        loop = asyncio.get_running_loop()
        addrs = list(local_addrs or ())
        if len(addrs) > 1:
            manage = bool(options.get("manage_paths"))
            if manage:
                _check_mptcp_socket(addrs[0])
            await self._subflow_endpoints(addrs[1:], manage)
        # endpoints added stay, after a failure as after a success: by
        # now another connection in the namespace may use them, and
        # removing one would cut that connection's subflows
        sock = await sockets.connect(
            loop,
            host,
            port,
            local_addr=addrs[0] if addrs else None,
            timeout=connect_timeout,
            race=race,
        )
        try:
            state = sockets.connected_fallback_state(
                sock, _syn_retransmissions(sock)
            )
            if state.fallback:
                logger.info(
                    "connection to %s port %d is plain TCP: %s",
                    host,
                    port,
                    state.reason,
                )
            transport, protocol = await loop.create_connection(
                protocol_factory, sock=sock
            )
        except BaseException:
            sock.close()
            raise
        if state.fallback:
            # told at connect: later retransmissions would blur the count
            self._fallback_reasons[transport] = state.reason
        return transport, protocol

    async def _subflow_endpoints(
        self, addresses: Sequence[str], manage: bool
    ) -> tuple[Endpoint, ...]:
        """Subflow endpoints for ``addresses``; returns those added."""
        if not manage:
            logger.info(
                "extra local addresses %s left to the kernel's endpoints "
                "(pass manage_paths=True to add them)",
                list(addresses),
            )
            return ()

        def add() -> tuple[Endpoint, ...]:
            with PathManager() as paths:
                claim = paths.ensure_endpoints(addresses, EndpointFlag.SUBFLOW)
                try:
                    # re-read right before the write: only ever raised
                    paths.raise_limits(subflows=len(claim.endpoints))
                except BaseException:
                    paths.remove_added(claim.added)
                    raise
                return claim.added

        return await run_in_thread(add)

    async def create_server(
        self,
        protocol_factory: ProtocolFactory,
        host: str | Sequence[str] | None,
        port: int,
        **options: Any,
    ) -> Server:
        """Listen on MPTCP sockets; both families when ``host`` is None.

        ``announce``: addresses to add as kernel ``signal`` endpoints
        (ADD_ADDR to every peer; needs CAP_NET_ADMIN). Joins to an
        announced address reach only a listener there: a wildcard one
        (``host=None``) or one on that address, on the same port.
        """
        _check_options(options, SERVER_OPTIONS)
        announce = _check_announce(options.get("announce"))
        loop = asyncio.get_running_loop()
        # the MPTCP sockets first: a kernel that refuses them is found
        # out before the endpoint table changes
        listeners = await sockets.listening_sockets(
            loop,
            host,
            port,
            reuse_address=bool(options.get("reuse_address", True)),
            reuse_port=bool(options.get("reuse_port", False)),
        )
        try:
            await _announce(announce)
        except BaseException:
            for listener in listeners:
                listener.close()
            raise
        # asyncio's server listens, with this backlog, once it serves
        backlog = int(options.get("backlog", 100))
        start_serving = bool(options.get("start_serving", True))
        # the protocols made that want to hear when the server stops
        # (asyncio's own have no weak references, nor anything to hear)
        made: weakref.WeakSet[StopListener] = weakref.WeakSet()

        def tracked_protocol() -> asyncio.Protocol:
            protocol = protocol_factory()
            if hasattr(protocol, "server_stopping"):
                made.add(cast(StopListener, protocol))
            return protocol

        servers: list[asyncio.Server] = []
        try:
            for listener in listeners:
                servers.append(
                    await loop.create_server(
                        tracked_protocol,
                        sock=listener,
                        backlog=backlog,
                        start_serving=start_serving,
                    )
                )
        except BaseException:
            for server in servers:
                server.close()
            for listener in listeners[len(servers) :]:
                listener.close()
            raise
        return MultiServer(loop, servers, made)

    def keys_unavailable(self) -> str | None:
        support = self.key_hook.support()
        return None if support.supported else support.reason

    def install_keys(
        self,
        transport: asyncio.BaseTransport,
        keys: KeyMaterial,
        *,
        derive: KeyDerivation | None = None,
    ) -> KeyInstall:
        """Offer the TLS keys to the kernel; say whether it took them.

        ``derive`` is not kept: the kernel has no key rotation (see
        :meth:`~mptls.backends.base.Backend.rotate_keys`).
        """
        sock = _transport_socket(transport)
        if sock is None:
            result = KeyInstall(False, "the connection is closed")
        elif sockets.fallback_state(sock).fallback:
            result = KeyInstall(
                False, "the connection fell back to TCP: nothing to key"
            )
        else:
            result = self.key_hook.install(sock, keys)
        logger.debug(
            "keys %s offered to the kernel: installed=%s",
            keys.fingerprint(),
            result.installed,
        )
        self._installs[transport] = (result, keys.fingerprint())
        if sock is not None:
            # a first snapshot, so that info() has one to give once the
            # socket is gone, whenever the application first asks
            try:
                self._snapshots[transport] = self._read(transport, sock)
            except (OSError, BackendError) as exc:
                logger.debug("no first snapshot of the connection: %s", exc)
        return result

    def info(self, transport: asyncio.BaseTransport) -> MptcpInfo:
        """The kernel's view of the connection behind ``transport``.

        Once the socket is closed the kernel has nothing left to say: the
        last snapshot taken (the first one at :meth:`install_keys`) is
        returned, without subflows.
        """
        sock = _transport_socket(transport)
        if sock is None:
            last = self._snapshots.get(transport)
            if last is None:
                raise BackendError("the connection is closed: no kernel state")
            return dataclasses.replace(last, subflows=())
        snapshot = self._read(transport, sock)
        self._snapshots[transport] = snapshot
        return snapshot

    def _read(self, transport: asyncio.BaseTransport, sock: Any) -> MptcpInfo:
        install, fingerprint = self._installs.get(transport, (None, None))
        state = sockets.fallback_state(sock)
        if state.fallback:
            return MptcpInfo(
                backend=self.name,
                mode="fallback",
                local_token=None,
                remote_token=None,
                keys_installed=False,
                keys_reason=self._fallback_reasons.get(
                    transport, state.reason
                ),
                key_fingerprint=fingerprint,
                fallback=True,
                subflows=_fallback_subflow(sock),
            )
        try:
            snapshot = kernel_info.read_snapshot(sock)
        except OSError as exc:
            raise BackendError(
                f"the kernel gave no MPTCP state: {exc}"
            ) from exc
        return MptcpInfo(
            backend=self.name,
            mode="kernel",
            local_token=snapshot.mptcp_info.token,
            remote_token=None,
            keys_installed=bool(install and install.installed),
            keys_reason=install.reason
            if install
            else self.key_hook.support().reason,
            key_fingerprint=fingerprint,
            fallback=snapshot.mptcp_info.fallback,
            subflows=snapshot.subflows,
        )
