"""The paths of one userspace connection: address ids, subflows opened.

:class:`Paths` numbers the local addresses of one connection (RFC 8684
section 3.2: the ids its joins and ADD_ADDR options carry) and opens
its extra subflows: the TCP connections made while TLS runs, the joins
once the keys are installed, the joins to the addresses the peer
announces, the rejoins of a client that lost every subflow and those
of a path of its own whose subflow failed while others carried on; a
server announces its addresses from here. The transport that owns it
(:class:`PathOwner`) is handed each subflow once its join has started.

It never moves a segment: what a subflow sends and receives, and the
core's events, are the transport's, which tells it of the few that
concern paths (keys installed, a join refused or established, a
subflow closed, an address announced or removed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from mptls.backends.addresses import unusable_reason
from mptls.backends.base import format_address, os_reason
from mptls.backends.userspace.connect import connect_subflow
from mptls.backends.userspace.subflow import (
    Detached,
    SegmentSink,
    SubflowProtocol,
    host_port,
)
from mptls.errors import BackendError, MptlsError
from mptls.mptcp import events
from mptls.mptcp.config import Mode
from mptls.mptcp.connection import Connection
from mptls.mptcp.credit import CreditBucket
from mptls.mptcp.options import ResetReason

logger = logging.getLogger("mptls.userspace")

# a client that lost every subflow tries its local addresses again,
# waiting this long before the first attempt and doubling up to the cap
_REJOIN_FIRST_DELAY = 0.1
_REJOIN_MAX_DELAY = 2.0
# a path of the client's own (one of local_addrs to the address it
# connected to) whose subflow failed while others live is joined again
# after this long, doubling up to the cap for as long as it fails; a
# join that held at least the cap starts the waits afresh
_PATH_REJOIN_FIRST_DELAY = 0.1
_PATH_REJOIN_MAX_DELAY = 4.0
# the cap once the peer refused the path's join "for now" (MP_TCPRST
# with T, out of room or failed-join credit): it asked for a wait, and a
# server that stays full (its max_subflows below this client's paths)
# hears one join from it per half minute, not one per 4 s
_PATH_LATER_MAX_DELAY = 32.0
# how often a path whose join was refused as transient (mode E: a key
# rotation overtook it) is joined again in a row before it is left
_JOIN_RETRIES = 3

# a path as this end opens it: (local address or None, remote address)
_Path = tuple[str | None, tuple[str, int]]


class PathOwner(SegmentSink, Protocol):
    """The transport, as its paths see it: it takes the subflows."""

    def attach(self, subflow_id: int, subflow: SubflowProtocol) -> None: ...

    def process(self) -> None: ...

    def is_closing(self) -> bool: ...

    def tag(self) -> str: ...


class _Finished(Detached):
    """The owner of paths whose connection is finished: always closing.

    The transport holds its paths, and the paths holding it back made
    every connection a reference cycle that only the cyclic garbage
    collector could free; once the connection is over the paths keep
    this instead, which takes nothing a subflow hands on (as a detached
    subflow's sink) and tags log lines as the transport did.
    """

    def __init__(self, core: Connection) -> None:
        self._core = core

    def attach(self, subflow_id: int, subflow: SubflowProtocol) -> None:
        # nothing joins a finished connection: no TCP connection is kept
        subflow.close()

    def process(self) -> None:
        return None

    def is_closing(self) -> bool:
        return True

    def tag(self) -> str:
        return connection_tag(self._core)


class Paths:
    """The local addresses and extra subflows of one connection."""

    def __init__(
        self,
        owner: PathOwner,
        core: Connection,
        loop: asyncio.AbstractEventLoop,
        *,
        initiator: bool,
        local_addrs: Sequence[str],
        remote: tuple[str, int] | None,
        announce: Sequence[tuple[str, int]],
        names: Mapping[int, tuple[Any, Any]],
    ) -> None:
        self._owner: PathOwner = owner
        self._core = core
        self._loop = loop
        self._initiator = initiator
        self._local_addrs = list(local_addrs)
        self._remote = remote
        self._announce = list(announce)
        # the owner's (sockname, peername) of each subflow, read only
        # here: the first subflow's local address has id 0
        self._names = names
        # RFC 8684 section 3.2: the id of each local address, which its
        # joins carry; the first subflow's is 0, an announced one keeps
        # its ADD_ADDR id, any other gets the next free one
        self._address_ids: dict[tuple[Any, int | None], int] = {}
        self._next_address_id = 1 if initiator else len(self._announce) + 1
        self._closed = False
        self._paths_started = False
        # extra subflows' TCP connections, opened while TLS runs and
        # joined the moment the keys are installed
        self._preconnected = False
        self._parked: list[tuple[SubflowProtocol, _Path]] = []
        self._rejoining = False
        # TCP connects under way to addresses the peer announced, and
        # the bucket they draw from (join_failure_burst, refilled at
        # join_failure_rate per second, as the peer's failed joins),
        # full until the first announcement
        self._announced_connects = 0
        self._announce_credit: CreditBucket | None = None
        # the path of each join opened here and not yet settled, and
        # the transient refusals each path has had since its last join
        self._joining: dict[int, _Path] = {}
        self._retries: dict[_Path, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # the client's own paths: each subflow on one, the paths whose
        # subflow failed and want one again, the wait before the next
        # attempt of each and when its last join was established, its
        # attempt under way (one at a time), and the paths never joined
        # again (removed by the application, withdrawn by the peer or
        # refused for good)
        self._own: dict[int, _Path] = {}
        self._remote_ids: dict[_Path, int] = {}
        self._lost: set[_Path] = set()
        self._backoff: dict[_Path, float] = {}
        # the lost paths whose last join the peer refused "for now"
        self._later: set[_Path] = set()
        self._up_since: dict[_Path, float] = {}
        self._path_rejoins: dict[_Path, asyncio.Task[None]] = {}
        self._dropped: set[_Path] = set()

    # address ids

    def _number_addresses(self, sockname: Any) -> None:
        """Ids for the first subflow's local address and the announced."""
        if sockname is None:
            return
        self._address_ids.setdefault(self._address_key(sockname), 0)
        for address_id, key, _ in self._announcements():
            self._address_ids.setdefault(key, address_id)

    def _announcements(
        self,
    ) -> Iterator[tuple[int, tuple[Any, int | None], tuple[str, int]]]:
        """Each announced address: its ADD_ADDR id, key and entry.

        Ids count 1, 2, ... in ``announce`` order, for ADD_ADDR and the
        joins to it alike. The address and port the first subflow
        reached is left out: the peer knows it already, as id 0.
        """
        if not self._announce:
            # most servers announce nothing: no parse of the first
            # subflow's address for every connection
            return
        names = self._names.get(0)
        first = None if names is None else self._address_key(names[0])
        for address_id, (host, port) in enumerate(self._announce, start=1):
            # port 0 announces the address alone: joins to it come to
            # the port the first subflow reached
            key = (_address_of(host), port or (first and first[1]))
            if key != first:
                yield address_id, key, (host, port)

    def _address_key(self, sockname: Any) -> tuple[Any, int | None]:
        host, port = host_port(sockname) or ("", 0)
        # the client's ports are ephemeral: its ids name addresses. The
        # server's name what it may announce, an address and a port
        return (_address_of(host), None if self._initiator else port)

    def local_address_id(self, sockname: Any) -> int:
        """The address id of a subflow's local address (RFC 8684 3.2).

        The same address always gets the same id on this connection.
        Raises :class:`~mptls.errors.MptlsError` when the 256 ids of
        the option's octet are used up.
        """
        if not self._address_ids and 0 in self._names:
            # numbered at the first join, not on every connection's setup
            self._number_addresses(self._names[0][0])
        key = self._address_key(sockname)
        known = self._address_ids.get(key)
        if known is not None:
            return known
        address_id = self._next_address_id
        if address_id > 0xFF:
            raise MptlsError("no address id left for one more local address")
        self._next_address_id += 1
        self._address_ids[key] = address_id
        return address_id

    # what the transport tells its paths

    def preconnect(self) -> None:
        """Open the extra subflows' TCP connections while TLS runs."""
        # G and E modes: a join needs the TLS keys, but its TCP
        # connection does not; opened now, in parallel with the MPTCP
        # and TLS handshakes, the join SYN leaves with the keys instead
        # of a TCP connect later. Only where G or E is the one mode
        # offered: a fallback to cleartext keys might forbid joins, and
        # then no TCP connection should be opened for one.
        config = self._core.config
        if (
            self._preconnected
            or not self._initiator
            or self._remote is None
            or config.mode not in (Mode.G, Mode.E)
            or config.allow_legacy_fallback
        ):
            return
        self._preconnected = True
        for local in self._local_addrs[1:]:
            self._spawn(self._open_subflow(local, self._remote))

    def keys_installed(self) -> None:
        """Join the TCP connections opened so far, open the others or
        announce the server's addresses.

        Called once keys protect joins (in E mode: once the peer has
        confirmed them), or once it is clear that none will: then the
        connections opened ahead are closed. In E mode a peer may still
        confirm the first keys after that: called again then, it opens
        the paths afresh.
        """
        self._start_paths()
        parked, self._parked = self._parked, []
        joining = self._core.joins_allowed
        for subflow, path in parked:
            if subflow.closed:
                continue
            if joining:
                self._join(subflow, path)
            else:
                subflow.close()
        if not joining:
            # the subflows opened ahead are gone
            self._preconnected = False

    def join_refused(self, event: events.JoinRefused) -> bool:
        """A join was refused; whether that is news for a warning.

        Refused for good (no T flag): a path of the client's own is
        never joined again by itself. Refused with T because a key
        rotation overtook the join (0x01): a join opened here is opened
        again, a few times in a row at most; on a lost path of the
        client's own, as :meth:`_rejoin_path` does. Refused with T for
        now (0x02, 0x03: the peer is out of room or failed-join credit,
        which forged joins can drain): a path of the client's own stays
        in its rejoin attempts, with their backoff and no count, and
        comes back once the peer takes joins again; any other path is
        not joined again, as after a refusal for good.

        News: a refusal after which nothing here joins the path again
        and nothing here said so. A client left with no subflow at all
        rejoins as :meth:`subflow_closed` has it instead.
        """
        path = self._joining.pop(event.subflow_id, None)
        own = self._own.pop(event.subflow_id, None) is not None
        if not event.transient:
            if own and path is not None:
                # refused for good: a new join would fare no better
                self._give_up(path)
            return True
        if _try_later(event):
            if not own or path is None:
                return True
            # the path's own attempts, one at a time with their waits:
            # a flood of forged joins costs one refused join per wait
            if path not in self._dropped:
                self._lost.add(path)
                self._later.add(path)
                self._rejoin_path(path)
            return False
        if (
            path is None
            or self._closed
            or self._rejoining
            or self._owner.is_closing()
            or self._core.closed
            or self._core.live_subflows == 0
        ):
            return False
        self._retry(path, event)
        return False

    def _retry(self, path: _Path, event: events.JoinRefused) -> None:
        """Open ``path`` again after a refusal with T for a key rotation,
        unless it was refused so too many times in a row."""
        tries = self._retries.get(path, 0)
        if tries >= _JOIN_RETRIES:
            self._give_up(path)
            logger.warning(
                "%s: path from %s to %s not joined again: refused %d "
                "times in a row (%s)",
                self._owner.tag(),
                path[0] or "any local address",
                format_address(path[1]),
                tries + 1,
                event.reason,
            )
            return
        self._retries[path] = tries + 1
        logger.debug(
            "%s: joining again from %s: %s",
            self._owner.tag(),
            path[0] or "any local address",
            event.reason,
        )
        if path in self._lost:
            # a lost path of the client's own: one attempt at a time,
            # tried again until a join starts (a connect may fail too)
            self._rejoin_path(path)
            return
        self._spawn(self._open_subflow(*path))

    def join_established(self, subflow_id: int) -> None:
        """A join is up: its path starts its retries afresh.

        Paths of the client's own that wait for a subflow while none
        was live (the rejoin after every path was lost brings back one)
        are joined again from here.
        """
        path = self._joining.pop(subflow_id, None)
        if path is not None:
            self._retries.pop(path, None)
            if subflow_id in self._own:
                self._lost.discard(path)
                self._later.discard(path)
                self._up_since[path] = self._loop.time()
                self._remote_ids[path] = self._remote_id(subflow_id)
        self._rejoin_lost()

    def subflow_closed(self, event: events.SubflowClosed) -> None:
        """A subflow closed: a client joins its path again.

        A subflow on one of the client's own paths that failed (reset,
        blackholed, its TCP connection lost) is joined again on that
        path with backoff while others live; a client left with none
        tries each of its local addresses in turn.
        """
        subflow_id = event.subflow_id
        self._joining.pop(subflow_id, None)
        path = self._own.pop(subflow_id, None)
        if path is not None and _path_fault(event):
            if self._held(path):
                self._backoff.pop(path, None)
            self._lost.add(path)
            self._rejoin_path(path)
        if (
            self._initiator
            and self._remote is not None
            and self._paths_started
            and not self._rejoining
            and not self._owner.is_closing()
            and self._core.live_subflows == 0
            and not self._core.closed
        ):
            # the core waits path_loss_timeout for a join: offer one
            self._rejoining = True
            self._spawn(self._rejoin(self._remote))

    def address_announced(self, event: events.AddressAnnounced) -> None:
        """The peer announced an address (ADD_ADDR): a client joins it.

        Not past ``max_subflows``, counting the connects still under way
        to announced addresses: the core would refuse each such join
        only once its TCP connection was up, and a peer that announces,
        withdraws and announces again had a connect and a warning made
        for each announcement, any number at once. Nor faster than the
        failed-join bucket allows: such a peer had its clients connect
        wherever it named, as often as it sent.
        """
        if not self._initiator or self._remote is None:
            return
        unusable = unusable_reason(event.address, local=False)
        if unusable is not None:
            # a peer's mistake (or worse): a connect to it reaches no
            # peer, or this host itself
            logger.debug(
                "%s: announced address id %d not joined: %s",
                self._owner.tag(),
                event.address_id,
                unusable,
            )
            return
        config = self._core.config
        room = (
            config.max_subflows
            - self._core.live_subflows
            - self._announced_connects
        )
        now = self._loop.time()
        if self._announce_credit is None:
            self._announce_credit = CreditBucket(
                config.join_failure_burst, config.join_failure_rate, now
            )
        if room <= 0 or self._announce_credit.credit(now) < 1.0:
            logger.debug(
                "%s: announced address id %d not joined: %s",
                self._owner.tag(),
                event.address_id,
                "max_subflows reached" if room <= 0 else "too many joined",
            )
            return
        self._announce_credit.spend(now)
        port = event.port or self._remote[1]
        # either family may be announced (RFC 8684 section 3.4.1): join
        # from a given local address of the announced one's family, or
        # let the system pick one when none of that family was given
        version = event.address.version
        local = next(
            (
                address
                for address in self._local_addrs
                if ipaddress.ip_address(address).version == version
            ),
            None,
        )
        self._announced_connects += 1
        self._spawn(self._join_announced(local, (str(event.address), port)))

    async def _join_announced(
        self, local: str | None, remote: tuple[str, int]
    ) -> None:
        try:
            await self._open_subflow(local, remote)
        finally:
            self._announced_connects -= 1

    def removed(self, subflow_id: int) -> None:
        """The application removes a subflow: its path stays down."""
        path = self._own.pop(subflow_id, None)
        if path is not None:
            self._give_up(path)

    def address_removed(self, address_id: int) -> None:
        """The peer withdrew an address: no path to it is joined again."""
        if self._remote is None:
            return
        for local in self._local_paths():
            path = (local, self._remote)
            # a path not yet established is to the address the first
            # subflow reached: id 0 (RFC 8684 section 3.2)
            if self._remote_ids.get(path, 0) == address_id:
                self._give_up(path)

    def close(self) -> None:
        """The connection is finished: nothing more is opened, and the
        owner is let go (see :class:`_Finished`)."""
        self._closed = True
        for subflow, _ in self._parked:
            subflow.close()
        self._parked.clear()
        for task in self._tasks:
            task.cancel()
        self._owner = _Finished(self._core)

    # opening subflows

    def _start_paths(self) -> None:
        if self._paths_started or self._closed:
            return
        if not self._core.joins_allowed:
            # a downgraded connection (keys in the clear, not allowed)
            # or one without keys: no join and no ADD_ADDR may follow,
            # unless E mode's first keys are confirmed late after all
            logger.debug(
                "%s: no extra paths: %s",
                self._owner.tag(),
                self._core.info().keys_reason,
            )
            return
        self._paths_started = True
        if self._initiator:
            if self._remote is None:
                return
            # the first subflow is on the client's own first path
            self._own.setdefault(0, (self._local_paths()[0], self._remote))
            if self._preconnected:
                return
            for local in self._local_addrs[1:]:
                self._spawn(self._open_subflow(local, self._remote))
            return
        for address_id, _, (host, port) in self._announcements():
            try:
                self._core.announce(
                    address_id, ipaddress.ip_address(host), port
                )
            except MptlsError as exc:
                logger.warning(
                    "%s: cannot announce %s: %s", self._owner.tag(), host, exc
                )

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _local_paths(self) -> list[str | None]:
        """The local end of each of the client's own paths."""
        return [*self._local_addrs] or [None]

    def _remote_id(self, subflow_id: int) -> int:
        """The peer's address id of one live subflow (0 if unknown)."""
        for status in self._core.info().subflows:
            if status.subflow_id == subflow_id:
                return status.remote_address_id or 0
        return 0

    def _full(self) -> bool:
        """Whether the core takes no more subflows (``max_subflows``)."""
        return self._core.live_subflows >= self._core.config.max_subflows

    def _ended(self) -> bool:
        """Whether the connection is closing or closed: no more joins."""
        return self._closed or self._owner.is_closing() or self._core.closed

    def _give_up(self, path: _Path) -> None:
        """Never join ``path`` again by itself; stop its attempt."""
        self._dropped.add(path)
        self._lost.discard(path)
        self._later.discard(path)
        task = self._path_rejoins.pop(path, None)
        if task is not None:
            task.cancel()

    def _held(self, path: _Path) -> bool:
        """Whether the last join of ``path`` held a while, so that its
        failure starts the waits afresh. One that fails as soon as it
        is up (a middlebox that lets handshakes through, resets forged
        on the path) keeps doubling them: otherwise it would be joined
        every 0.1 s for the connection's life."""
        up_since = self._up_since.pop(path, None)
        return (
            up_since is not None
            and self._loop.time() - up_since >= _PATH_REJOIN_MAX_DELAY
        )

    def _rejoin_lost(self) -> None:
        """Start joining every lost path of the client's own again, in
        a fixed order."""
        for path in sorted(self._lost, key=repr):
            self._rejoin_path(path)

    def _rejoin_path(self, path: _Path) -> None:
        """Start joining a lost path of the client's own again, unless
        an attempt is under way, the path is given up, no subflow is
        live (:meth:`_rejoin` has that case) or the connection ends."""
        if (
            path in self._dropped
            or path in self._path_rejoins
            or path in self._joining.values()
            or self._rejoining
            or self._ended()
            or self._core.live_subflows == 0
        ):
            return
        self._path_rejoins[path] = self._spawn(self._rejoin_one(path))

    async def _rejoin_one(self, path: _Path) -> None:
        """Wait, then join ``path`` again until a join is under way.

        The wait doubles from one attempt to the next, also across
        joins that start and then fail, until one holds (:meth:`_held`).
        """
        try:
            # checked before each wait as well: a close while a connect
            # ended may not reach this task as a cancel
            while not self._ended():
                delay = self._backoff.get(path, _PATH_REJOIN_FIRST_DELAY)
                cap = (
                    _PATH_LATER_MAX_DELAY
                    if path in self._later
                    else _PATH_REJOIN_MAX_DELAY
                )
                self._backoff[path] = min(delay * 2, cap)
                await asyncio.sleep(delay)
                if self._ended() or self._core.live_subflows == 0:
                    return
                if self._full():
                    # the core would refuse the join: no TCP connection
                    # for it, no warning; the next wait may find room
                    continue
                logger.debug(
                    "%s: joining the path from %s again",
                    self._owner.tag(),
                    path[0] or "any local address",
                )
                if await self._open_subflow(*path, quiet=True):
                    return
        finally:
            # at once: the join just started may fail before a callback
            if self._path_rejoins.get(path) is asyncio.current_task():
                del self._path_rejoins[path]

    async def _rejoin(self, remote: tuple[str, int]) -> None:
        """Join again from each local address in turn until one holds.

        Runs while no subflow is live; the core ends the connection with
        a timeout error after ``path_loss_timeout`` if none comes back.
        """
        locals_: list[str | None] = [*self._local_addrs] or [None]
        delay = _REJOIN_FIRST_DELAY
        attempt = 0
        try:
            while (
                not self._owner.is_closing() and self._core.live_subflows == 0
            ):
                await asyncio.sleep(delay)
                delay = min(delay * 2, _REJOIN_MAX_DELAY)
                local = locals_[attempt % len(locals_)]
                attempt += 1
                logger.debug(
                    "%s: no subflow left, joining again from %s",
                    self._owner.tag(),
                    local,
                )
                await self._open_subflow(local, remote)
        finally:
            self._rejoining = False
        # one path is back: the others lost on the way follow
        self._rejoin_lost()

    async def _open_subflow(
        self,
        local: str | None,
        remote: tuple[str, int],
        *,
        quiet: bool = False,
    ) -> bool:
        """Open a subflow on a path and join it; whether a join started.

        ``quiet``: a failed connect is detail (a path being retried).
        """
        subflow = SubflowProtocol(self._owner, initiator=True)
        try:
            # a path that blackholes SYNs must not hold the task forever
            await asyncio.wait_for(
                connect_subflow(subflow, remote, local),
                self._core.config.join_timeout,
            )
        except (OSError, TimeoutError, BackendError) as exc:
            # a refused rejoin is tried again until path_loss_timeout
            # ends the connection with its own error: detail, not news;
            # a lost path is tried for the connection's whole life (a
            # link that stays down would log a line every few seconds)
            level = logging.WARNING
            if quiet:
                level = logging.DEBUG
            elif self._rejoining:
                level = logging.INFO
            logger.log(
                level,
                "%s: cannot open a subflow from %s to %s: %s",
                self._owner.tag(),
                local or "any local address",
                format_address(remote),
                _connect_reason(exc, self._core.config.join_timeout),
            )
            return False
        if self._closed or self._owner.is_closing():
            subflow.close()
            return False
        if not self._paths_started:
            # connected before the keys: keys_installed joins it
            self._parked.append((subflow, (local, remote)))
            return True
        started = self._join(subflow, (local, remote))
        self._owner.process()
        return started

    def join(self, subflow: SubflowProtocol, *, backup: bool = False) -> int:
        """Start the MP_JOIN on a connected subflow; its subflow id.

        The owner sends it at its next ``process()``. Raises
        :class:`~mptls.errors.MptlsError` (and closes ``subflow``) when
        the core takes no more subflows or no address id is left, or
        when ``subflow`` ended before this.
        """
        if subflow.closed:
            # it ended (a reset, another service's bytes) before this
            # step came: joined, it would wait join_timeout for nothing
            raise MptlsError(
                "the path's TCP connection ended before its join began"
            )
        try:
            address_id = self.local_address_id(subflow.name("sockname"))
            subflow_id = self._core.open_subflow(
                self._loop.time(), backup=backup, address_id=address_id
            )
        except MptlsError:
            subflow.close()
            raise
        self._owner.attach(subflow_id, subflow)
        return subflow_id

    def _join(self, subflow: SubflowProtocol, path: _Path) -> bool:
        """Join a subflow mptls opened itself: a refusal is logged."""
        try:
            subflow_id = self.join(subflow)
        except MptlsError as exc:
            logger.warning("%s: no join: %s", self._owner.tag(), exc)
            return False
        self._joining[subflow_id] = path
        if path[1] == self._remote and path[0] in self._local_paths():
            self._own[subflow_id] = path
        return True


def connection_tag(core: Connection) -> str:
    """The token prefix that begins a connection's log lines."""
    token = core.info().local_token
    return f"[{token[:8] if token else '-'}]"


def _try_later(event: events.JoinRefused) -> bool:
    """Whether a refusal with T says "later" rather than "again now".

    A key rotation that overtook the join (mode E) is reset with
    MPTCP_ERROR and T: a join with the keys in use now may succeed at
    once. Any other code with T asks for a wait: an mptls server sends
    0x02 when it is out of room and 0x03 when its failed-join credit
    is spent, and a peer's other codes with T are taken alike.
    """
    return event.transient and event.reset_reason not in (
        None,
        ResetReason.MPTCP_ERROR,
    )


def _path_fault(event: events.SubflowClosed) -> bool:
    """Whether a subflow closed for a fault of its path, not by choice.

    A reset (sent or received), a blackhole's timeout or a lost TCP
    connection is a fault; the peer's FIN on that subflow alone, or its
    reset saying it forbids the path, is the peer's choice.
    """
    if event.reason == events.PEER_CLOSED_SUBFLOW:
        return False
    return event.reset_reason != ResetReason.ADMINISTRATIVELY_PROHIBITED


def _address_of(host: str) -> Any:
    """An IP literal as an address object (one spelling per address).

    The zone stays: fe80::1 on two links is two addresses (RFC 4007).
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host


def _connect_reason(exc: OSError | BackendError, join_timeout: float) -> str:
    """Why a subflow's TCP connect failed, in words: the limit for a
    connect that got no answer (wait_for's TimeoutError has no text of
    its own), else the system's reason, or mptls's for a path between
    addresses of two families."""
    if isinstance(exc, BackendError):
        # "cannot connect to ...: refused", where the line names both
        # ends already: the system's reason alone, as the cause has it
        cause = exc.__cause__
        if isinstance(cause, OSError) and not isinstance(
            cause, socket.gaierror
        ):
            exc = cause
        else:
            return str(exc)
    if isinstance(exc, TimeoutError) and not exc.errno:
        return f"no TCP connection within join_timeout ({join_timeout:g} s)"
    return os_reason(exc)
