"""The backend interface: what the TLS and stream layers ask of MPTCP.

A backend opens and accepts byte-stream connections the way asyncio's
``loop.create_connection`` and ``loop.create_server`` do, installs the
TLS-derived keys on a connection, and reports its state. The TLS layer
is an ordinary ``asyncio.Protocol`` on top of the transport a backend
returns; it knows nothing else about the backend. A new backend (a
patched kernel, say) implements this class and touches nothing above it.
"""

from __future__ import annotations

import abc
import array
import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import os
import socket
import struct
import termios
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar, cast

from mptls.backends.addresses import check_subflow_address
from mptls.errors import (
    BackendError,
    ConfigurationError,
    MptlsTimeoutError,
    PathError,
    shown_value,
)
from mptls.mptcp.config import check_seconds
from mptls.tls.keys import KeyMaterial

ProtocolFactory = Callable[[], asyncio.Protocol]

_T = TypeVar("_T")
# exports key generation n from the connection's TLS session: what a
# backend that rotates keys calls when it needs the next generation
KeyDerivation = Callable[[int], KeyMaterial]


class Server(asyncio.AbstractServer):
    """What a backend's ``create_server`` returns: an asyncio server
    that also lists its listening sockets, as ``asyncio.Server`` does."""

    @property
    @abc.abstractmethod
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets, one per address listened on."""


@dataclass(frozen=True, slots=True)
class KeyInstall:
    """The outcome of offering TLS-derived keys to a backend."""

    installed: bool
    reason: str = ""


# how long a connect waits for the first subflow's TCP connection, on
# both backends (asyncio has no such limit; the kernel alone would retry
# its SYNs for about two minutes)
CONNECT_TIMEOUT = 30.0

# SO_LINGER on, with a zero timeout: close() sends a TCP reset
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


def reset_on_close(transport: asyncio.BaseTransport) -> None:
    """Make the socket under ``transport`` end with a TCP reset when it
    closes, rather than with a FIN that unsent data would go before."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # a socket closed already: asyncio's refuses with an OSError,
        # uvloop's with a ValueError ("negative file descriptor")
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE
            )


def unacknowledged(transport: asyncio.BaseTransport) -> int | None:
    """Bytes written to the socket under ``transport`` that the peer has
    not acknowledged yet (Linux ``SIOCOUTQ``, at the data level on an
    MPTCP socket); ``None`` where the system does not say."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count)
    except (OSError, ValueError):
        return None
    return count[0]


def closed_server_error(server: object) -> RuntimeError:
    """What ``start_serving()`` raises on a server that was closed.

    asyncio's own raises a bare ``TypeError`` ("'NoneType' object is not
    iterable") there, up to Python 3.13, and then reports itself serving;
    its ``serve_forever()`` says this instead.
    """
    return RuntimeError(f"server {server!r} is closed")


def format_address(address: tuple[Any, ...] | None) -> str:
    """``host:port``, with brackets around an IPv6 host; ``-`` for None."""
    if address is None:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def numeric_address(
    host: str, port: int, family: int = socket.AF_UNSPEC
) -> tuple[int, tuple[Any, ...]] | None:
    """``(family, sockaddr)`` for an IP literal ``host``, else ``None``.

    The connect path asks ``getaddrinfo`` only for names: asyncio's loop
    runs it in a thread, a hop that costs about 0.1 ms of CPU per
    connection for an address that needs no lookup. A literal with a
    scope id (``fe80::1%eth0``), or of another family than ``family``,
    is left to :func:`host_addresses`.
    """
    for literal_family in (socket.AF_INET, socket.AF_INET6):
        if family not in (socket.AF_UNSPEC, literal_family):
            continue
        try:
            socket.inet_pton(literal_family, host)
        except (OSError, TypeError):
            continue
        if literal_family == socket.AF_INET:
            return literal_family, (host, port)
        return literal_family, (host, port, 0, 0)
    return None


def check_local_scope(address: str, what: str) -> None:
    """Refuse a local IPv6 literal whose scope id this host cannot use.

    ``ipaddress`` takes any scope (``::1%lo``, ``fe80::1%nosuchif``);
    the system maps it to an interface only on a link-local address and
    for an interface it has. Found at the connect, the failure was a
    ``HostLookupError`` that named the remote host, which resolves
    fine. ``AI_NUMERICHOST`` keeps this lookup off the network.
    """
    if "%" not in address:
        return
    try:
        socket.getaddrinfo(
            address, 0, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        # the system's reason is "Name or service not known": no help
        raise ConfigurationError(
            f"{what} {shown_value(address)} has a scope id this host "
            "cannot use: a scope id names an interface of this host, on "
            "a link-local address (fe80::/10)"
        ) from None


def check_local_address(address: str, what: str) -> None:
    """Refuse an IP literal that cannot be a subflow's local end: one no
    subflow can run from (:func:`check_subflow_address`), or whose scope
    id this host cannot use (:func:`check_local_scope`)."""
    check_subflow_address(address, what, local=True)
    check_local_scope(address, what)


async def host_addresses(
    loop: asyncio.AbstractEventLoop,
    host: str | None,
    port: int,
    family: int = socket.AF_UNSPEC,
    *,
    flags: int = 0,
    family_keyword: bool = False,
) -> list[tuple[int, tuple[Any, ...]]]:
    """``(family, sockaddr)`` pairs of ``host`` to try, in order.

    An IP literal needs no lookup (:func:`numeric_address`). One with a
    scope id goes to ``getaddrinfo``, which maps the interface name,
    with ``AI_NUMERICHOST``: a scope it cannot use made it look the
    whole string up as a name, on the network. A literal of the other
    family than ``family`` (the local address's, or with
    ``family_keyword`` the one asyncio's ``family=`` asked for) is an
    error that says so, unless it is an IPv4-mapped IPv6 one, which is
    its IPv4 address.
    A name gets ``getaddrinfo``'s TCP stream addresses, IPv4 and IPv6
    ones, each once; its errors (``socket.gaierror``) are the caller's.
    """
    if host is not None:
        numeric = numeric_address(host, port, family)
        if numeric is not None:
            return [numeric]
        literal = _ip_literal(host)
        if literal is not None:
            if (
                family == socket.AF_INET
                and isinstance(literal, ipaddress.IPv6Address)
                and literal.ipv4_mapped is not None
            ):
                return [(socket.AF_INET, (str(literal.ipv4_mapped), port))]
            if family not in (socket.AF_UNSPEC, _FAMILIES[literal.version]):
                raise _other_family(
                    host, port, literal.version, family_keyword
                )
            flags |= socket.AI_NUMERICHOST
    infos = await loop.getaddrinfo(
        host,
        port,
        family=family,
        type=socket.SOCK_STREAM,
        proto=socket.IPPROTO_TCP,
        flags=flags,
    )
    pairs: list[tuple[int, tuple[Any, ...]]] = []
    for info_family, _, _, _, address in infos:
        if info_family not in _FAMILIES.values():
            continue
        # the whole sockaddr: an IPv6 one ends with the scope id that a
        # link-local address ("fe80::1%eth0") cannot be used without
        pair = (int(info_family), tuple(address))
        if pair not in pairs:
            pairs.append(pair)
    return pairs


# an IP address's version, as ipaddress numbers it, and its family
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _ip_literal(
    host: str,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _other_family(
    host: str, port: int, version: int, family_keyword: bool
) -> BackendError:
    """A host literal of IP ``version`` from a local address of the
    other, or where ``family=`` asked for the other: the errno stays
    getaddrinfo's for it, EAI_ADDRFAMILY, which the streams layer gives
    its ConnectError."""
    if family_keyword:
        other = "AF_INET" if version == 6 else "AF_INET6"
        why = f"with family={other}"
    else:
        why = f"from an IPv{6 if version == 4 else 4} local address"
    failure = BackendError(
        f"cannot connect to {format_address((host, port))} {why}: "
        f"the host is an IPv{version} address"
    )
    failure.__cause__ = socket.gaierror(
        socket.EAI_ADDRFAMILY, "Address family for hostname not supported"
    )
    return failure


async def within_connect_timeout(
    connecting: Awaitable[_T],
    host: str,
    port: int,
    timeout: float | None,
) -> _T:
    """``connecting`` (a backend's whole connect to ``host``, resolution
    and every address included), ended at ``connect_timeout``.

    Both backends bound their connect here, so that the limit ends in
    the same :class:`MptlsTimeoutError` on either; ``None`` leaves the
    wait to the kernel's SYN retries. ``connecting`` runs in the
    caller's task: a cancel that comes as it completes lands at the
    caller's next wait, with the socket in the caller's hands to close.
    (Python 3.11's ``wait_for`` ran it as a task of its own and, in
    that case, returned its result and lost the cancel.)
    """
    try:
        async with asyncio.timeout(timeout):
            return await connecting
    except MptlsTimeoutError:
        raise  # the kernel gave up on its SYNs, to every address
    except TimeoutError as exc:
        limit = "" if timeout is None else f" after {timeout:g} s"
        raise MptlsTimeoutError(
            f"TCP connect to {format_address((host, port))} timed out"
            f"{limit} (connect_timeout)"
        ) from exc


@dataclass(frozen=True, slots=True)
class AddressRace:
    """How a connect tries a host's addresses (RFC 8305, as asyncio's
    ``happy_eyeballs_delay`` and ``interleave`` keywords have it).

    ``delay`` None tries one address after the other, each until it
    fails. A number starts the next address's attempt once the one
    before has had that many seconds (or at once when it fails), the
    earlier ones still running; the first to connect wins and the
    others are closed. ``interleave`` reorders the addresses by family:
    that many of the first family, then one of each in turn; 0 keeps
    the resolver's order. It is 1 when only ``delay`` is given.
    """

    delay: float | None = None
    interleave: int = 0

    @classmethod
    def from_options(
        cls, delay: object = None, interleave: object = None
    ) -> AddressRace:
        """From the keywords, each checked: a clear error for bad ones."""
        if delay is not None:
            check_seconds("happy_eyeballs_delay", delay, zero=True)
        if interleave is None:
            interleave = 0 if delay is None else 1
        if (
            isinstance(interleave, bool)
            or not isinstance(interleave, int)
            or interleave < 0
        ):
            raise ConfigurationError(
                "interleave must be an int >= 0, got "
                f"{shown_value(interleave)}"
            )
        seconds = None if delay is None else float(cast(float, delay))
        return cls(seconds, interleave)

    def order(
        self, addresses: Sequence[tuple[int, tuple[Any, ...]]]
    ) -> list[tuple[int, tuple[Any, ...]]]:
        """``addresses`` in the order to try them."""
        if not self.interleave or not addresses:
            return list(addresses)
        by_family: dict[int, list[tuple[int, tuple[Any, ...]]]] = {}
        for pair in addresses:
            by_family.setdefault(pair[0], []).append(pair)
        queues = list(by_family.values())
        ordered = queues[0][: self.interleave - 1]
        queues[0] = queues[0][self.interleave - 1 :]
        for turn in range(max(len(queue) for queue in queues)):
            ordered.extend(
                queue[turn] for queue in queues if turn < len(queue)
            )
        return ordered


# every address in turn, each until it fails: asyncio's default too
ONE_BY_ONE = AddressRace()


async def connect_any(
    host: str,
    port: int,
    addresses: Sequence[tuple[int, tuple[Any, ...]]],
    *,
    local: tuple[Any, ...] | None,
    new_socket: Callable[[int], socket.socket],
    connect: Callable[[socket.socket, tuple[Any, ...]], Awaitable[None]],
    race: AddressRace = ONE_BY_ONE,
) -> socket.socket:
    """A socket connected to the first of ``addresses`` that answers.

    ``addresses`` are ``(family, sockaddr)`` pairs of ``host`` in the
    resolver's order; ``race`` says in which order and how far apart
    they are tried. Each gets a socket of its own from ``new_socket``,
    bound to ``local`` if given. Both backends connect through here, so
    that a host whose every address fails ends in the same error on
    either (see :func:`connect_failure`).
    """
    failures: list[tuple[tuple[Any, ...], OSError]] = []

    async def attempt(family: int, address: tuple[Any, ...]) -> socket.socket:
        try:
            sock = new_socket(family)
        except OSError as exc:
            # a family this machine makes no sockets of (IPv6 disabled:
            # EAFNOSUPPORT) fails this address, not the others
            failures.append((address, exc))
            raise
        try:
            if local is not None:
                sock.bind(local)
            await connect(sock, address)
        except OSError as exc:
            sock.close()
            failures.append((address, exc))
            raise
        except BaseException:
            sock.close()
            raise
        return sock

    ordered = race.order(addresses)
    if race.delay is None:
        for family, address in ordered:
            with contextlib.suppress(OSError):
                return await attempt(family, address)
    else:
        winner = await _staggered(
            [functools.partial(attempt, *pair) for pair in ordered],
            race.delay,
        )
        if winner is not None:
            return winner
    raise connect_failure(host, port, failures)


async def _staggered(
    attempts: Sequence[Callable[[], Awaitable[socket.socket]]],
    delay: float,
) -> socket.socket | None:
    """The first of ``attempts`` to connect, or None when all failed.

    The next attempt starts ``delay`` seconds after the one before, or
    at once when a running one fails. The losers are cancelled (an
    attempt closes its socket then) and a socket that connected too
    late is closed; so is every socket when the caller is cancelled,
    the winner's too when that happens while the losers are ending.
    An error other than an ``OSError`` is a bug, and propagates.
    """
    waiting = list(attempts)
    running: set[asyncio.Task[socket.socket]] = set()
    winner: socket.socket | None = None

    def start_next() -> None:
        running.add(asyncio.ensure_future(waiting.pop(0)()))

    try:
        while winner is None and (waiting or running):
            if not running:
                start_next()
                continue
            done, _ = await asyncio.wait(
                running,
                timeout=delay if waiting else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            # the delay passed, or an attempt failed: the next one starts
            due = not done
            for task in done:
                running.discard(task)
                error = task.exception()
                if isinstance(error, OSError):
                    due = True  # recorded by the attempt itself
                elif error is not None:
                    raise error
                elif winner is None:
                    winner = task.result()
                else:
                    _close_if_connected(task)
            if due and waiting and winner is None:
                start_next()
    except BaseException:
        if winner is not None:
            winner.close()
            winner = None
        raise
    finally:
        try:
            await _end_attempts(running)
        except BaseException:
            # cancelled while the losers ended: the winner was never
            # handed over, and nothing else would close it
            if winner is not None:
                winner.close()
            raise
    return winner


async def _end_attempts(running: set[asyncio.Task[socket.socket]]) -> None:
    """Cancel the attempts still ``running`` and wait for them to end.

    A socket that one of them connected all the same is closed when it
    ends, also if this wait is itself cancelled first.
    """
    for task in running:
        task.cancel()
        task.add_done_callback(_close_if_connected)
    if running:
        await asyncio.wait(running)


def _close_if_connected(task: asyncio.Task[socket.socket]) -> None:
    """Close the socket of an attempt that connected after it lost; its
    error, if it failed, is taken (the attempt recorded it)."""
    if not task.cancelled() and task.exception() is None:
        task.result().close()


def connect_failure(
    host: str,
    port: int,
    failures: Sequence[tuple[tuple[Any, ...], OSError]],
) -> MptlsTimeoutError | BackendError:
    """The error for a connect to ``host`` whose every address failed.

    The last address's error decides the kind: a timeout (the kernel
    gave up on its SYNs, net.ipv4.tcp_syn_retries) is an
    :class:`MptlsTimeoutError`, as a ``connect_timeout`` is; anything
    else a ``BackendError`` with the OS error as its cause, which the
    streams layer turns into a ``ConnectError`` with that errno
    (``ConnectRefusedError`` for a refusal). Every address's own error
    is named when there were several.
    """
    where = format_address((host, port))
    if not failures:
        return BackendError(f"cannot connect to {where}: no address to try")
    last = failures[-1][1]
    if len(failures) == 1:
        # one address: the host and port are said once
        detail = os_reason(last)
    else:
        detail = "; ".join(
            f"{address[0]} port {address[1]}: {os_reason(exc)}"
            for address, exc in failures
        )
    if isinstance(last, TimeoutError):
        several = f" ({detail})" if len(failures) > 1 else ""
        timeout = MptlsTimeoutError(
            f"TCP connect to {where} timed out{several}"
        )
        timeout.__cause__ = last
        return timeout
    failure = BackendError(f"cannot connect to {where}: {detail}")
    failure.__cause__ = last
    return failure


def os_reason(exc: OSError) -> str:
    """The system's words for ``exc``: asyncio's own text ("Connect call
    failed (...)") repeats the address the message names already.
    A lookup's errno is getaddrinfo's, which strerror does not know."""
    if exc.errno and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class SubflowInfo:
    """One subflow as a backend sees it. Never holds key material.

    ``address_id`` is the id this end gives the subflow's local address
    in its MP_JOIN (RFC 8684 section 3.2; 0 on the first subflow), and
    ``remote_address_id`` the id the peer gave its own, None where it
    is not known (a join not answered yet, or a backend that cannot
    tell).
    """

    subflow_id: int
    local_address: tuple[str, int] | None
    remote_address: tuple[str, int] | None
    state: str
    bytes_sent: int = 0
    bytes_received: int = 0
    rtt_ms: float | None = None
    backup: bool = False
    address_id: int | None = None
    remote_address_id: int | None = None


@dataclass(frozen=True, slots=True)
class MptcpInfo:
    """A snapshot of one MPTCP connection, for ``get_extra_info("mptcp")``.

    ``mode`` is ``"G"`` (token-only MP_CAPABLE, keys from TLS), ``"E"``
    (the rotation profile: 32-bit tokens, keys from TLS confirmed with
    NEW_KEY and rotated), ``"rfc8684"`` (keys in the clear), ``"kernel"``
    (the kernel's own RFC 8684 keys) or ``"fallback"`` (plain TCP).
    Tokens are hex strings. ``key_generation`` is the generation of the
    keys in use where the backend rotates them (E mode: 0 for the
    handshake's keys once the peer confirmed them), else None.
    """

    backend: str
    mode: str
    local_token: str | None
    remote_token: str | None
    keys_installed: bool
    keys_reason: str = ""
    key_fingerprint: str | None = None
    fallback: bool = False
    subflows: tuple[SubflowInfo, ...] = field(default_factory=tuple)
    key_generation: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(abc.ABC):
    """One way of carrying MPTCP: userspace frames or kernel sockets."""

    name: ClassVar[str]
    # why add_path/remove_path are not offered, for a backend that has
    # no subflow control of its own; shown in the PathError
    path_control: ClassVar[str] = "no per-connection subflow control"

    @abc.abstractmethod
    async def create_connection(
        self,
        protocol_factory: ProtocolFactory,
        host: str,
        port: int,
        *,
        local_addrs: Sequence[str] | None = None,
        **options: Any,
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """Open an MPTCP connection; like ``loop.create_connection``.

        The first local address (if any) carries the first subflow; the
        others become extra subflows once keys are installed.
        """

    @abc.abstractmethod
    async def create_server(
        self,
        protocol_factory: ProtocolFactory,
        host: str | Sequence[str] | None,
        port: int,
        **options: Any,
    ) -> Server:
        """Listen for MPTCP connections; like ``loop.create_server``."""

    def keys_unavailable(self) -> str | None:
        """Why this backend can install TLS-derived keys on no
        connection at all, or ``None`` when it may on some.

        ``require_app_keys=True`` is refused up front with this reason,
        before any connection is tried or accepted.
        """
        return None

    @abc.abstractmethod
    def install_keys(
        self,
        transport: asyncio.BaseTransport,
        keys: KeyMaterial,
        *,
        derive: KeyDerivation | None = None,
    ) -> KeyInstall:
        """Hand the TLS-derived keys to the connection behind ``transport``.

        Called once, when the TLS handshake is complete and the peer
        verified. Returns whether the keys now protect joins (or, where
        the peer must confirm them first, will once it has).
        ``derive(n)`` exports key generation ``n`` from the same TLS
        session: a backend that rotates keys keeps it for later
        generations; others ignore it.
        """

    async def rotate_keys(self, transport: asyncio.BaseTransport) -> int:
        """Move the connection behind ``transport`` to its next keys.

        Returns the new key generation once this end uses it, which is
        only after the peer confirmed it (the peer may take one more
        NEW_KEY to follow when it started the rotation itself). Raises
        :class:`~mptls.errors.ConfigurationError` where the connection
        or the backend cannot rotate keys,
        :class:`~mptls.errors.KeysUnavailableError` before the first
        keys are in use, :class:`~mptls.errors.MptlsTimeoutError` when
        the peer never confirms the new ones.
        """
        raise ConfigurationError(f"the {self.name} backend cannot rotate keys")

    def abandon(self, transport: asyncio.Transport) -> None:
        """End a connection that failed before its caller had it.

        Left as ``loop.create_connection`` leaves one when it raises
        (a cancel included): none of its sockets watched by the loop any
        more, each closed by the next loop step at the latest. A socket
        transport's abort does that; a backend whose abort keeps a
        socket open a while (for a last frame to reach the peer) ends
        it at once here.
        """
        transport.abort()

    @abc.abstractmethod
    def info(self, transport: asyncio.BaseTransport) -> MptcpInfo:
        """A snapshot of the connection behind ``transport``."""

    async def add_path(
        self,
        transport: asyncio.BaseTransport,
        remote: tuple[str, int],
        *,
        local: str | None = None,
        backup: bool = False,
        timeout: float = 10.0,
    ) -> int:
        """Open one more subflow of the connection behind ``transport``.

        The subflow goes from ``local`` (any local address if ``None``)
        to ``remote``, an (address, port) pair: a second server address,
        or a second load balancer that routes the join by its token.
        Returns the new subflow's id once the join is established.
        Raises :class:`~mptls.errors.JoinRefusedError` when the far end
        refuses the join or this end refuses its answer (the error says
        why), :class:`~mptls.errors.PathError` when the path cannot be
        opened or :meth:`remove_path` closed it before its join was
        established, :class:`~mptls.errors.MptlsTimeoutError` after
        ``timeout`` seconds. A backend that cannot open a subflow on
        demand raises :class:`~mptls.errors.PathError`.
        """
        raise PathError(
            f"the {self.name} backend cannot open a subflow on demand: "
            f"{self.path_control}"
        )

    async def remove_path(
        self, transport: asyncio.BaseTransport, subflow_id: int
    ) -> None:
        """Close one subflow; the connection carries on over the others.

        Data sent on it and not yet acknowledged is sent again on another
        subflow. Raises :class:`~mptls.errors.PathError` if there is no
        such subflow, if it is the last one, or if the backend cannot
        close a single subflow.
        """
        raise PathError(
            f"the {self.name} backend cannot close a single subflow: "
            f"{self.path_control}"
        )
