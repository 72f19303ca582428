"""The ``userspace`` backend: MPTCP in this process, one TCP per subflow.

Works on any OS with TCP. The MPTCP options travel in-band, byte-exact
to RFC 8684 layouts, in the framing of docs/wire.md; the protocol itself
is the sans-I/O core in :mod:`mptls.mptcp`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import ipaddress
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any

from mptls.backends.addresses import check_subflow_address
from mptls.backends.base import (
    CONNECT_TIMEOUT,
    AddressRace,
    Backend,
    KeyDerivation,
    KeyInstall,
    MptcpInfo,
    Server,
    check_local_address,
    closed_server_error,
    format_address,
    within_connect_timeout,
)
from mptls.backends.userspace.connect import connect_subflow, connect_tcp
from mptls.backends.userspace.listener import Handoff, Listener
from mptls.backends.userspace.subflow import SubflowProtocol
from mptls.backends.userspace.transport import MultipathTransport
from mptls.errors import (
    BackendError,
    ConfigurationError,
    JoinRefusedError,
    JoinTimeoutError,
    KeysUnavailableError,
    MptlsError,
    MptlsTimeoutError,
    NotMptlsPeerError,
    PathError,
    PeerResetError,
    ProtocolError,
    SocketInUseError,
    shown_value,
)
from mptls.mptcp.config import (
    RESPONDER_PREFERENCE,
    ConnectionConfig,
    Mode,
    check_bool,
    check_seconds,
)
from mptls.mptcp.connection import JOIN_TIMED_OUT, Connection
from mptls.mptcp.endpoint import Endpoint
from mptls.mptcp.framing import PREAMBLE
from mptls.mptcp.scheduler import SubflowState
from mptls.mptcp.tokens import E_TOKEN_LAYOUT, TokenAllocator, TokenLayout
from mptls.tls.keys import KeyMaterial

_MODES = {"g": Mode.G, "e": Mode.E, "rfc8684": Mode.RFC8684}


class _SharedTokens(TokenAllocator):
    """A token allocator for event loops in several threads at once.

    A plain allocator's batch, counter and AES contexts belong to one
    thread: two at once would hand out the same token, and a cipher
    context refuses a second caller while the first is in it.
    """

    __slots__ = ("_lock",)

    def __init__(
        self, secret: bytes, *, layout: TokenLayout | None = None
    ) -> None:
        super().__init__(secret, layout=layout or TokenLayout())
        self._lock = threading.Lock()

    def allocate(self) -> bytes:
        with self._lock:
            return super().allocate()

    def release(self, token: bytes) -> None:
        with self._lock:
            super().release(token)


_client_tokens: TokenAllocator | None = None
_client_e_tokens: TokenAllocator | None = None
_client_tokens_lock = threading.Lock()


def _shared_client_tokens() -> TokenAllocator:
    # Token-A must be unique among this host's connections: one allocator
    # for every client connection of the process, whichever thread's
    # event loop opens it
    global _client_tokens
    with _client_tokens_lock:
        if _client_tokens is None:
            _client_tokens = _SharedTokens(secrets.token_bytes(32))
        return _client_tokens


def _shared_client_e_tokens() -> TokenAllocator:
    # E mode's 4-byte Token-A, unique among the process's E connections
    # as the 8-byte ones are among G's
    global _client_e_tokens
    with _client_tokens_lock:
        if _client_e_tokens is None:
            _client_e_tokens = _SharedTokens(
                secrets.token_bytes(32), layout=E_TOKEN_LAYOUT
            )
        return _client_e_tokens


def _client_tokens_for(config: ConnectionConfig) -> TokenAllocator:
    """The allocator of Token-A for the mode a client offers."""
    if config.mode is Mode.E:
        return _shared_client_e_tokens()
    return _shared_client_tokens()


class MptlsServer(Server):
    """The loop's server with the mptls listener beside it.

    Every call goes to the loop's own server (asyncio's or uvloop's,
    which takes no new attributes); ``mptls_listener`` is the
    :class:`~mptls.backends.userspace.listener.Listener` that owns the
    accepted subflows, for workers and diagnostics.
    """

    def __init__(self, server: asyncio.AbstractServer, listener: Listener):
        self._server = server
        self.mptls_listener = listener
        self._closed = False

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets, as the loop's server gives them."""
        return tuple(getattr(self._server, "sockets", ()) or ())

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def close_clients(self) -> None:
        """Close every connection accepted, as Python 3.13's servers do.

        Each closes as its application's ``close()`` would: TLS
        close_notify, then DATA_FIN, waiting up to ``close_timeout`` for
        the peer's end. (asyncio closes a TLS server's socket transports
        under the TLS layer, which its peers see as a truncation.) A
        client in its handshake is not refused by this.
        """
        self.mptls_listener.end_connections(abort=False)

    def abort_clients(self) -> None:
        """Reset every connection accepted (MP_FASTCLOSE), as Python
        3.13's servers abort theirs; a client in its handshake is not
        refused by this."""
        self.mptls_listener.end_connections(abort=True)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server.is_serving()

    async def start_serving(self) -> None:
        if self._closed:
            raise closed_server_error(self)
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    def __repr__(self) -> str:
        return f"<MptlsServer {self._server!r}>"


def parse_mode(mode: str | Mode) -> Mode:
    """``"G"``, ``"E"`` or ``"rfc8684"`` (any case), or a :class:`Mode`."""
    if isinstance(mode, Mode):
        return mode
    try:
        return _MODES[mode.lower()]
    except (KeyError, AttributeError):
        raise ConfigurationError(
            "unknown MPTCP mode "
            f"{shown_value(mode)}; choose 'G', 'E' or 'rfc8684'"
        ) from None


def _check_port(port: object, what: str, *, low: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigurationError(
            f"{what} must be an int, got {shown_value(port)}"
        )
    if not low <= port <= 65535:
        raise ConfigurationError(
            f"{what} must be between {low} and 65535, got {shown_value(port)}"
        )
    return port


# the states in which a subflow carries data (SubflowInfo.state)
_CARRIES_DATA = frozenset(
    {SubflowState.PRE_ESTABLISHED.value, SubflowState.ESTABLISHED.value}
)


def _check_path(remote: object, local: object) -> None:
    """``add_path``'s addresses, checked before any socket is made.

    A string is a sequence too: read as a pair it named a host "1" and
    a port "2", which the resolver took for an address elsewhere.
    """
    if (
        isinstance(remote, str | bytes)
        or not isinstance(remote, Sequence)
        or len(remote) != 2
        or not isinstance(remote[0], str)
    ):
        raise ConfigurationError(
            f"remote must be a (host, port) pair, got {shown_value(remote)}"
        )
    _check_port(remote[1], "remote port", low=1)
    check_subflow_address(remote[0], "remote address", local=False)
    if local is None:
        return
    address = local if isinstance(local, str) else ""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigurationError(
            f"local must be an IPv4 or IPv6 literal, got {shown_value(local)}"
        ) from None
    check_local_address(address, "local")


def check_announce(announce_addrs: object) -> list[tuple[str, int]]:
    """``announce_addrs`` as (IP literal, port) pairs, checked up front.

    A bad entry found only when keys exist would fail every connection;
    port 0 announces the address alone (the peer keeps the port it used).
    """
    if announce_addrs is None:
        return []
    if isinstance(announce_addrs, str | bytes) or not isinstance(
        announce_addrs, Sequence
    ):
        raise ConfigurationError(
            "announce_addrs must be a list of (address, port) pairs, "
            f"got {shown_value(announce_addrs)}"
        )
    checked = []
    for item in announce_addrs:
        if (
            isinstance(item, str | bytes)
            or not isinstance(item, Sequence)
            or len(item) != 2
        ):
            raise ConfigurationError(
                "announce_addrs entry "
                f"{shown_value(item)} is not an (address, port) pair"
            )
        host, port = item
        try:
            if not isinstance(host, str):
                raise ValueError(host)
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigurationError(
                "announce_addrs address "
                f"{shown_value(host)} is not an IPv4 or IPv6 "
                "literal"
            ) from None
        check_subflow_address(host, "announce_addrs address", local=False)
        _check_port(port, "announce_addrs port", low=0)
        if (str(address), port) in checked:
            # each would be joined: two subflows on one path
            raise ConfigurationError(
                f"announce_addrs lists {host} port {port} twice"
            )
        checked.append((str(address), port))
    return checked


def server_modes(
    mode: str | Mode | None, modes: str | Mode | Sequence[str | Mode] | None
) -> tuple[str | Mode, ...]:
    """The modes a server accepts from ``mode=`` (one) or ``modes=``.

    A single string given as ``modes`` is one mode, never its letters.
    """
    if mode is not None and modes is not None:
        raise ConfigurationError(
            "give mode= (one mode) or modes= (a list of modes), not both"
        )
    if mode is not None:
        return (parse_mode(mode),)
    if modes is None:
        return ("G",)
    if isinstance(modes, str | Mode):
        return (parse_mode(modes),)
    # bytes are a Sequence too, of ints: b"E" would read as mode 69
    if not isinstance(modes, Sequence | frozenset | set) or isinstance(
        modes, bytes | bytearray
    ):
        raise ConfigurationError(
            "modes must be a mode or a list of modes, got "
            f"{shown_value(modes)}"
        )
    return tuple(parse_mode(one) for one in modes)


def accepted_modes(options: Mapping[str, Any]) -> frozenset[Mode]:
    """The modes a server given ``options`` (``create_server``'s
    keywords: ``config``, ``mode`` or ``modes``) accepts."""
    config = options.get("config")
    if isinstance(config, ConnectionConfig):
        return config.accept_modes
    accepted = server_modes(options.get("mode"), options.get("modes"))
    return frozenset(parse_mode(mode) for mode in accepted)


def check_e_server(
    accepted: frozenset[Mode],
    *,
    server_id: int = 0,
    worker_id: int = 0,
    workers: int = 1,
) -> None:
    """Refuse E mode where a join must be routed by its token.

    E mode's tokens are 32 bits with no server or worker id in them
    (draft-baerts-tcpm-mptcpext): a load balancer, or a sibling worker,
    could not tell from a join's token who owns its connection.
    """
    if Mode.E not in accepted:
        return
    if workers > 1 or worker_id:
        raise ConfigurationError(
            "E mode cannot be served by several workers: its 32-bit "
            "tokens carry no worker id, so a join could not reach the "
            "worker that owns its connection; serve E with one worker"
        )
    if server_id:
        raise ConfigurationError(
            "E mode cannot go with a server_id: its 32-bit tokens have "
            "no room for one, so a load balancer could not route joins "
            "by it; leave server_id (--server-id) at 0 or do not accept E"
        )


def check_token_layout(layout: object) -> TokenLayout:
    """A server's ``token_layout``: the layout of its 64-bit tokens.

    G and rfc8684 tokens have 64 bits, and an endpoint that accepts E
    makes its own 32-bit allocator; a 32-bit layout here made every
    SYN|ACK fail to encode, which asyncio logged as a fatal error while
    the client heard of no mptls server at all.
    """
    if layout is None:
        return TokenLayout()
    if not isinstance(layout, TokenLayout):
        raise ConfigurationError(
            f"token_layout must be a TokenLayout, got {type(layout).__name__}"
        )
    if layout.token_bits != TokenLayout().token_bits:
        raise ConfigurationError(
            f"token_layout must have token_bits=64, not {layout.token_bits}: "
            "it lays out the 64-bit tokens of G and rfc8684 connections "
            "(E connections take 32-bit tokens of their own)"
        )
    return layout


_SETTINGS = frozenset(f.name for f in dataclasses.fields(ConnectionConfig))


def _check_settings(settings: dict[str, Any], taken: frozenset[str]) -> None:
    # ConnectionConfig would raise TypeError; name the keyword instead
    unknown = sorted(set(settings) - (_SETTINGS - taken))
    if unknown:
        raise ConfigurationError(
            f"unknown keyword(s) {', '.join(unknown)}: the userspace "
            "backend takes ConnectionConfig fields and its own options"
        )


def _check_rotation(
    settings: dict[str, Any], modes: Set[Mode], remedy: str
) -> None:
    """``key_rotation_interval`` only where an E connection can come.

    The core ignores it in the other modes; a caller who set it expects
    rotations, so it is refused here, as the CLI refuses --rotate-every
    without --mode E.
    """
    if settings.get("key_rotation_interval") is None or Mode.E in modes:
        return
    named = ", ".join(sorted(mode.value for mode in modes))
    raise ConfigurationError(
        "key_rotation_interval needs mode E: only E rotates keys, and "
        f"this end runs {named}; pass {remedy} or leave the interval out"
    )


def client_config(
    mode: str | Mode = "G",
    *,
    allow_legacy_fallback: bool = False,
    allow_cleartext_keys: bool | None = None,
    **settings: Any,
) -> ConnectionConfig:
    """A client's :class:`ConnectionConfig` from the public keywords.

    Asking for ``rfc8684`` mode is asking for keys in the clear, so joins
    are then allowed unless ``allow_cleartext_keys=False``.
    """
    _check_settings(settings, frozenset({"mode"}))
    chosen = parse_mode(mode)
    _check_rotation(settings, {chosen}, 'mode="E"')
    if allow_cleartext_keys is None:
        allow_cleartext_keys = chosen is Mode.RFC8684
    return ConnectionConfig(
        mode=chosen,
        allow_legacy_fallback=allow_legacy_fallback,
        allow_cleartext_keys=allow_cleartext_keys,
        **settings,
    )


@functools.cache
def _default_client_config() -> ConnectionConfig:
    # frozen, so every default connection can share one instead of
    # building and checking its own (about 6 us per connect)
    return client_config()


def server_config(
    modes: Sequence[str | Mode] = ("G",),
    *,
    allow_cleartext_keys: bool | None = None,
    **settings: Any,
) -> ConnectionConfig:
    """A server's :class:`ConnectionConfig`: which modes it accepts."""
    _check_settings(settings, frozenset({"mode", "accept_modes"}))
    accepted = frozenset(parse_mode(mode) for mode in modes)
    if not accepted:
        raise ConfigurationError("a server must accept at least one mode")
    _check_rotation(settings, accepted, '"E" in modes=')
    if allow_cleartext_keys is None:
        allow_cleartext_keys = Mode.RFC8684 in accepted
    preferred = next(m for m in RESPONDER_PREFERENCE if m in accepted)
    return ConnectionConfig(
        mode=preferred,
        accept_modes=accepted,
        allow_cleartext_keys=allow_cleartext_keys,
        **settings,
    )


def _transport_of(transport: asyncio.BaseTransport) -> MultipathTransport:
    if not isinstance(transport, MultipathTransport):
        raise BackendError(
            "not a connection of the userspace backend: "
            f"{type(transport).__name__}"
        )
    return transport


def _given_config(
    config: object,
    settings: dict[str, Any],
    make: Callable[[], ConnectionConfig],
) -> ConnectionConfig:
    """``config`` as given, or the one ``make`` builds from ``settings``
    (individual ConnectionConfig fields); not both."""
    if config is None:
        return make()
    if settings:
        raise ConfigurationError(
            "pass either config= or individual settings, not both"
        )
    if not isinstance(config, ConnectionConfig):
        raise ConfigurationError(
            f"config must be a ConnectionConfig, got {type(config).__name__}"
        )
    return config


async def _connect_first_subflow(
    subflow: _FirstSubflow,
    host: str,
    port: int,
    local: str | None,
    timeout: float | None,
    race: AddressRace,
    family: int = socket.AF_UNSPEC,
) -> None:
    """The first subflow's TCP connection, from ``local`` if given.

    ``timeout`` bounds the whole connect, resolution and every address
    of the host included; ``None`` leaves it to the kernel's SYN
    retries. ``race`` says how the host's addresses are tried, and
    ``family`` which of them (asyncio's keyword: every family, or
    ``AF_INET`` or ``AF_INET6`` alone).
    """
    loop = asyncio.get_running_loop()
    subflow.target = (host, port)

    async def connect() -> None:
        sock = await connect_tcp(loop, host, port, local, race, family)
        await _carry_first_subflow(subflow, sock)

    await within_connect_timeout(connect(), host, port, timeout)


async def _carry_first_subflow(
    subflow: _FirstSubflow, sock: socket.socket, *, given: bool = False
) -> None:
    """Make ``sock``, connected, the first subflow's TCP connection.

    The socket is the connection's from here on: if that fails (or is
    cancelled) it is closed before the error propagates, as asyncio's
    ``create_connection`` closes a socket it was given. Unless the loop
    refused the caller's (``given``) socket before taking it, and left
    it open to whatever uses it: asyncio's does so from Python 3.12 for
    one that another of its transports uses (a ``RuntimeError``),
    uvloop for a descriptor it already watches (``EEXIST``, from
    libuv's check before it touches the socket).
    """
    subflow.sock = sock
    try:
        await asyncio.get_running_loop().create_connection(
            lambda: subflow, sock=sock
        )
    except (RuntimeError, FileExistsError) as exc:
        if given and subflow.transport is None:
            subflow.sock = None
            raise SocketInUseError(_in_use_by_the_loop(exc)) from exc
        sock.close()
        raise
    except BaseException:
        sock.close()
        raise


def _in_use_by_the_loop(exc: RuntimeError | FileExistsError) -> str:
    """Why the loop refused a given socket: asyncio's message names the
    transport; uvloop's is only ``File exists``."""
    if isinstance(exc, FileExistsError):
        return (
            "sock is in use by the loop: it already watches its "
            "descriptor (another transport, or a reader or writer "
            "callback)"
        )
    return f"sock is in use by another transport of the loop: {exc}"


# how long a close waits for the peer's end (from the last progress)
# before it resets the connection
CLOSE_TIMEOUT = 10.0


def check_family(family: object) -> int:
    """asyncio's ``family=``: which of a host's addresses to use."""
    if (
        isinstance(family, bool)
        or not isinstance(family, int)
        or family not in _ASYNCIO_FAMILIES
    ):
        raise ConfigurationError(
            "family must be socket.AF_UNSPEC, AF_INET or AF_INET6, got "
            f"{shown_value(family)}"
        )
    return int(family)


_ASYNCIO_FAMILIES = (socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6)


class UserspaceBackend(Backend):
    """MPTCP in userspace over ordinary TCP connections."""

    name = "userspace"

    async def create_connection(
        self,
        protocol_factory: Any,
        host: str,
        port: int,
        *,
        local_addrs: Sequence[str] | None = None,
        mode: str | Mode = "G",
        config: ConnectionConfig | None = None,
        connect_timeout: float | None = CONNECT_TIMEOUT,
        close_timeout: float = CLOSE_TIMEOUT,
        happy_eyeballs_delay: float | None = None,
        interleave: int | None = None,
        family: int = socket.AF_UNSPEC,
        sock: socket.socket | None = None,
        **settings: Any,
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """Open the first subflow; extra ones follow once keys exist.

        ``happy_eyeballs_delay`` and ``interleave`` try the host's
        addresses as asyncio's keywords of those names do (RFC 8305;
        see :class:`~mptls.backends.base.AddressRace`), and ``family``
        picks theirs, as asyncio's does. ``sock``, a TCP socket
        connected to ``host`` and ``port``, carries the first subflow
        in place of one this call would connect. ``settings`` are
        :class:`ConnectionConfig` fields (for example
        ``allow_legacy_fallback``, ``receive_window``).
        """
        loop = asyncio.get_running_loop()
        config = _given_config(
            config,
            settings,
            lambda: (
                client_config(mode, **settings)
                if settings or mode != "G"
                else _default_client_config()
            ),
        )
        if connect_timeout is not None:
            check_seconds("connect_timeout", connect_timeout)
        check_seconds("close_timeout", close_timeout)
        race = AddressRace.from_options(happy_eyeballs_delay, interleave)
        family = check_family(family)
        local_addrs = list(local_addrs or ())
        first_local = local_addrs[0] if local_addrs else None
        placeholder = _PendingSink()
        subflow = _FirstSubflow(placeholder)
        if sock is not None:
            subflow.target = (host, port)
            await _carry_first_subflow(subflow, sock, given=True)
        else:
            await _connect_first_subflow(
                subflow, host, port, first_local, connect_timeout, race, family
            )
        peer = subflow.address("peername")

        # the MPTCP connection; its SYN rides with the ClientHello
        core = Connection.initiator(
            config,
            tokens=_client_tokens_for(config),
            random=os.urandom,
            now=loop.time(),
        )
        transport = MultipathTransport(
            core,
            initiator=True,
            local_addrs=local_addrs,
            remote=peer,
            close_timeout=close_timeout,
        )
        # subflow 0 is the initial subflow (address id 0, RFC 8684 3.2)
        transport.attach(0, subflow)
        try:
            protocol = protocol_factory()
        except BaseException:
            # refused before anything was sent (a bad server name, say):
            # the token and the TCP connection are this call's alone
            core.abort()
            subflow.close_now()
            raise
        try:
            transport.start(protocol)
        except BaseException:
            # the protocol's connection_made failed (a handshake that
            # cannot start fails the waiter instead): nobody will have
            # this connection
            transport.abandon()
            raise
        if placeholder.lost is not None:
            transport.subflow_lost(subflow, placeholder.lost)
        return transport, protocol

    async def create_server(
        self,
        protocol_factory: Any,
        host: str | Sequence[str] | None,
        port: int,
        *,
        mode: str | Mode | None = None,
        modes: str | Mode | Sequence[str | Mode] | None = None,
        config: ConnectionConfig | None = None,
        announce_addrs: Sequence[tuple[str, int]] | None = None,
        server_id: int = 0,
        worker_id: int = 0,
        token_layout: TokenLayout | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        backlog: int = 100,
        start_serving: bool = True,
        join_handoff: Handoff | None = None,
        sock: socket.socket | None = None,
        family: int = socket.AF_UNSPEC,
        **settings: Any,
    ) -> Server:
        """Listen; each accepted TCP connection is a new or joining subflow.

        ``mode`` is the one MPTCP mode accepted (``"G"``, ``"E"`` or
        ``"rfc8684"``), or ``modes`` a list of them (a single string is
        one mode); the default accepts G only. A server that accepts E
        takes neither a ``server_id`` nor a ``worker_id``: E's 32-bit
        tokens have no room for them.
        ``announce_addrs`` are (IP address, port) pairs the server
        announces with ADD_ADDR once keys exist; they are checked here.
        ``server_id`` and ``worker_id`` are written into every token
        this server allocates (see :mod:`mptls.mptcp.tokens`), so that a
        load balancer, or a sibling worker process, can tell from a
        join's token which server owns it. ``join_handoff`` sees each
        new subflow's first segments before this server routes them,
        and may take the TCP connection away (see
        :mod:`mptls.backends.userspace.router`). ``reuse_address``,
        ``reuse_port``, ``backlog``, ``start_serving``, ``family`` (of
        the host's addresses to listen on) and ``sock`` (a bound TCP
        socket to listen on, ``host`` and ``port`` then unused) are
        asyncio's, with its defaults: on Python 3.11 a
        server out of file descriptors logs one error for each of
        ``backlog`` accepts it tries per wakeup, so a larger default
        multiplies that storm.
        """
        loop = asyncio.get_running_loop()
        family = check_family(family)
        accepted = server_modes(mode, modes)
        announce = check_announce(announce_addrs)
        config = _given_config(
            config, settings, lambda: server_config(accepted, **settings)
        )
        check_seconds("close_timeout", close_timeout)
        if join_handoff is not None and not callable(join_handoff):
            raise ConfigurationError(
                "join_handoff must be callable, got "
                f"{type(join_handoff).__name__}"
            )
        check_e_server(
            config.accept_modes, server_id=server_id, worker_id=worker_id
        )
        tokens = TokenAllocator(
            secrets.token_bytes(32),
            layout=check_token_layout(token_layout),
            server_id=server_id,
            worker_id=worker_id,
        )
        # an endpoint that accepts E makes its own 32-bit allocator
        endpoint = Endpoint(config, tokens=tokens, random=os.urandom)
        listener = Listener(
            endpoint,
            protocol_factory,
            announce=announce,
            close_timeout=close_timeout,
            handoff=join_handoff,
        )
        if sock is not None:
            server = await loop.create_server(
                listener,
                sock=sock,
                backlog=backlog,
                start_serving=start_serving,
            )
        else:
            server = await loop.create_server(
                listener,
                host,
                port,
                family=family,
                reuse_address=reuse_address,
                reuse_port=reuse_port,
                backlog=backlog,
                start_serving=start_serving,
            )
        return MptlsServer(server, listener)

    def install_keys(
        self,
        transport: asyncio.BaseTransport,
        keys: KeyMaterial,
        *,
        derive: KeyDerivation | None = None,
    ) -> KeyInstall:
        multipath = _transport_of(transport)
        installed = multipath.install_keys(keys, derive=derive)
        if installed:
            return KeyInstall(True, "TLS exporter keys protect joins")
        info = multipath.mptcp_info()
        return KeyInstall(False, info.keys_reason or "not installed")

    def info(self, transport: asyncio.BaseTransport) -> MptcpInfo:
        return _transport_of(transport).mptcp_info()

    def abandon(self, transport: asyncio.Transport) -> None:
        _transport_of(transport).abandon()

    async def rotate_keys(self, transport: asyncio.BaseTransport) -> int:
        """Rotate an E-mode connection's keys (NEW_KEY exchange with the
        next exporter generation); see ``MultipathTransport.rotate_keys``."""
        return await _transport_of(transport).rotate_keys()

    async def add_path(
        self,
        transport: asyncio.BaseTransport,
        remote: tuple[str, int],
        *,
        local: str | None = None,
        backup: bool = False,
        timeout: float = 10.0,
    ) -> int:
        """Open a TCP connection to ``remote`` and join it to the connection.

        Only the initiator (the client) opens subflows (RFC 8684 section
        3.2), so this is a client-side call.
        """
        _check_path(remote, local)
        check_seconds("timeout", timeout)
        check_bool("backup", backup)
        multipath = _transport_of(transport)
        if not multipath._initiator:
            raise PathError("only the client side opens subflows")
        watch = _JoinWatch(multipath)
        try:
            async with asyncio.timeout(timeout):
                await _first_keys(multipath)
                await _connect(watch, remote, local)
                _start_join(multipath, watch, backup)
                return await asyncio.shield(watch.outcome)
        except JoinTimeoutError:
            # the connection's join_timeout ended the join: its own error
            raise
        except (TimeoutError, asyncio.CancelledError) as exc:
            # given up, by its own limit or the caller's cancel: the
            # join must not go on to add a subflow nobody asked for
            watch.close()
            if watch.subflow_id is not None:
                multipath.subflow_lost(watch, None)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise MptlsTimeoutError(
                f"join to {format_address(remote)} took over {timeout} s"
            ) from exc

    async def remove_path(
        self, transport: asyncio.BaseTransport, subflow_id: int
    ) -> None:
        """Close one subflow's TCP connection; the others carry on.

        The core hears it as a lost subflow (RFC 8684 section 3.3.6), so
        data it held unacknowledged is sent again elsewhere, and the
        peer sees that TCP connection end.
        """
        if isinstance(subflow_id, bool) or not isinstance(subflow_id, int):
            # "0" named the subflow 0 in the error, as if it were closed
            raise ConfigurationError(
                f"subflow_id must be an int, got {shown_value(subflow_id)}"
            )
        multipath = _transport_of(transport)
        subflow = multipath._subflows.get(subflow_id)
        if subflow is None:
            raise PathError(f"no open subflow {shown_value(subflow_id)}")
        # a join still under way does not count: it may yet be refused
        carrying = {
            info.subflow_id
            for info in multipath.mptcp_info().subflows
            if info.state in _CARRIES_DATA
        }
        if carrying <= {subflow_id}:
            raise PathError(
                f"subflow {subflow_id} is the last one that carries data: "
                "close the connection instead"
            )
        # the application's choice: its path is not joined again
        multipath.paths.removed(subflow_id)
        if isinstance(subflow, _JoinWatch):
            subflow.removed()
        subflow.close()
        multipath.subflow_lost(subflow, None)


# create_server's keywords other than ConnectionConfig fields
_SERVER_KEYWORDS = frozenset(
    inspect.signature(UserspaceBackend.create_server).parameters
) - {"self", "protocol_factory", "host", "port", "settings"}


def check_server_keywords(names: Iterable[str]) -> None:
    """Refuse a keyword ``create_server`` would refuse, by name alone.

    For a caller that hands the keywords on to a server started
    elsewhere (a worker pool's processes), which would otherwise hear
    of a misspelt one only from there, once it starts.
    """
    unknown = set(names) - _SERVER_KEYWORDS
    _check_settings(
        dict.fromkeys(unknown), frozenset({"mode", "accept_modes"})
    )


class _JoinWatch(SubflowProtocol):
    """A subflow opened by ``add_path``: resolves once its join settles.

    ``outcome`` gets the subflow id when the join is established, or
    :class:`~mptls.errors.JoinRefusedError` when it is refused or its TCP
    connection ends first.
    """

    def __init__(self, multipath: MultipathTransport) -> None:
        super().__init__(multipath, initiator=True)
        self._multipath = multipath
        self.outcome: asyncio.Future[int] = (
            asyncio.get_running_loop().create_future()
        )
        self.outcome.add_done_callback(_retrieve)
        # bytes of another service, perhaps before the join began
        self.foreign: JoinRefusedError | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._settle(lost=False)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._settle(lost=True)

    def close_after_reset(self) -> None:
        # the connection ended: the join is over now, not when the
        # socket stops lingering after its reset frame (up to
        # CLOSE_LINGER), which would keep add_path's caller waiting
        super().close_after_reset()
        self._settle(lost=True)

    def _refuse_foreign(self, exc: NotMptlsPeerError) -> None:
        # the path leads to another service (an SSH server's banner,
        # say): this join fails, and says why
        which = (
            "" if self.subflow_id is None else f" of subflow {self.subflow_id}"
        )
        self.foreign = JoinRefusedError(f"the join{which} was refused: {exc}")
        if not self.outcome.done() and self.subflow_id is not None:
            self.outcome.set_exception(self.foreign)
        super()._refuse_foreign(exc)

    def removed(self) -> None:
        """``remove_path`` closes this subflow before its join settled:
        the application's own doing, no refusal of the peer's to retry."""
        if self.outcome.done() or self.subflow_id is None:
            return
        self.outcome.set_exception(
            PathError(
                f"subflow {self.subflow_id} was removed with remove_path "
                "before its join was established"
            )
        )

    def _settle(self, *, lost: bool) -> None:
        if self.outcome.done() or self.subflow_id is None:
            return
        state = self._state()
        if state == "ESTABLISHED":
            self.outcome.set_result(self.subflow_id)
        elif lost or state in ("CLOSED", None):
            self.outcome.set_exception(self._refusal())

    def _refusal(self) -> JoinRefusedError:
        """Why the join failed: the core's reason where it gave one,
        with the refusal's MP_TCPRST code and T flag (a caller may try
        again later after a transient one; add_path itself does not)."""
        refused = self._multipath.last_join_refusal
        if refused is None or refused.subflow_id != self.subflow_id:
            if self._multipath.is_closing():
                # a close or abort, of either end, took the join along
                return JoinRefusedError(
                    f"the join of subflow {self.subflow_id} ended with "
                    "the connection before it was established"
                )
            if self.close_reason == JOIN_TIMED_OUT:
                # the far end may have said nothing at all: a listener
                # that never answers, or a SYN it held for keys
                limit = self._multipath._core.config.join_timeout
                return JoinTimeoutError(
                    f"the join of subflow {self.subflow_id} did not "
                    f"complete within join_timeout ({limit:g} s)"
                )
            return JoinRefusedError(
                f"the join of subflow {self.subflow_id} was refused or "
                "reset by the far end"
            )
        return JoinRefusedError(
            f"the join of subflow {self.subflow_id} was refused "
            f"({refused.reason})",
            reset_reason=refused.reset_reason,
            transient=refused.transient,
        )

    def _state(self) -> str | None:
        for subflow in self._multipath.mptcp_info().subflows:
            if subflow.subflow_id == self.subflow_id:
                return subflow.state
        return None


async def _connect(
    watch: _JoinWatch, remote: tuple[str, int], local: str | None
) -> None:
    try:
        await connect_subflow(watch, remote, local)
    except (OSError, BackendError) as exc:
        if isinstance(exc, MptlsError):
            # "cannot connect to ...": it names the address already
            raise PathError(f"cannot open a path: {exc}") from exc
        raise PathError(
            f"cannot open a path to {format_address(remote)}: {exc}"
        ) from exc


async def _first_keys(multipath: MultipathTransport) -> None:
    """Mode E: wait for the keys a join needs, as rotate_keys() does.

    A join asked for right after the TLS handshake would otherwise be
    refused for keys that the peer's NEW_KEY brings a round trip later.
    """
    try:
        await multipath.first_keys()
    except (KeysUnavailableError, MptlsTimeoutError) as exc:
        raise PathError(f"no join: {exc}") from exc


def _start_join(
    multipath: MultipathTransport, watch: _JoinWatch, backup: bool
) -> int:
    """Make the TCP connection in ``watch`` a joining subflow."""
    if multipath.is_closing():
        watch.close()
        raise PathError("the connection is closing: no new subflows")
    if watch.foreign is not None:
        raise watch.foreign
    try:
        subflow_id = multipath.paths.join(watch, backup=backup)
    except MptlsError as exc:
        raise PathError(f"no join: {exc}") from exc
    multipath.process()
    return subflow_id


def _retrieve(outcome: asyncio.Future[int]) -> None:
    # a join that fails after add_path gave up waiting must not log
    # "exception was never retrieved"
    if not outcome.cancelled():
        outcome.exception()


class _FirstSubflow(SubflowProtocol):
    """The client's first subflow, which finds out what the server is.

    An mptls server answers the first segment with :data:`PREAMBLE`
    (docs/wire.md). Bytes that cannot begin it already fail in the
    decoder; a TCP connection that ends (FIN or RST) before all of it
    arrived means a server that does not speak the wire, such as a plain
    TLS server giving up on our preamble: :class:`NotMptlsPeerError`, not
    a lost subflow that would wait for joins. A reset says nothing of
    what the server speaks (a pool worker that dies resets the
    connections queued on its listening socket): :class:`PeerResetError`,
    a ``ConnectionResetError`` as asyncio raises for it.
    """

    def __init__(self, sink: Any) -> None:
        super().__init__(sink, initiator=True)
        self._received = 0
        # the (host, port) connected to: a socket reset before its
        # transport existed has no peername to name it by
        self.target: tuple[str, int] | None = None
        # the socket under it, made here or the caller's: asyncio's
        # transport closes it a loop step after its abort, too late for
        # a connect that fails (see close_now)
        self.sock: socket.socket | None = None

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        super().data_received(data)

    def close_now(self) -> None:
        # and the socket itself, so that its descriptor is free when the
        # connect's error reaches the caller (uvloop keeps it until its
        # own transport lets it go)
        super().close_now()
        if self.sock is not None:
            self.sock.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed or self._received >= len(PREAMBLE):
            super().connection_lost(exc)
            return
        self.closed = True
        peer = self.address("peername") or self.target
        where = format_address(peer) if peer else "the server"
        before = (
            "the connection before answering with the mptls preamble "
            f"({self._received} bytes came)"
        )
        error: ProtocolError
        # a reset reaches the first write as EPIPE when it came before
        # the ClientHello left: still the server's reset
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            error = PeerResetError(
                f"{where} reset {before}: the server went away with the "
                "connection unserved (a worker that died, a restart; a "
                "retry may succeed) or does not speak the mptls wire"
            )
            error.__cause__ = exc
        else:
            error = NotMptlsPeerError(
                f"{where} closed {before}: it is not an mptls userspace "
                "server (a plain TLS or TCP server, or an mptls server on "
                "the kernel backend: use the same backend on both ends?)"
            )
        self.sink.subflow_lost(self, error)


class _PendingSink:
    """Holds a first subflow's events until its transport exists."""

    def __init__(self) -> None:
        self.lost: BaseException | None = None

    def segments_received(self, subflow: Any, segments: Any) -> None:
        self.lost = BackendError("the server spoke before the client")

    def subflow_lost(self, subflow: Any, exc: BaseException | None) -> None:
        self.lost = exc or BackendError("connection closed")

    def subflow_writable(self, subflow: Any, writable: bool) -> None:
        return None
