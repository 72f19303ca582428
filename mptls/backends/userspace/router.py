"""Each worker's side of a pool: hand a join to its owner, adopt sockets.

N processes listen on the same address and port with ``SO_REUSEPORT``;
the kernel spreads new TCP connections over them by a hash of the
addresses, so a connection's first subflow and its joins usually reach
different workers. Every worker writes its own worker id into the tokens
it allocates (:mod:`mptls.mptcp.tokens`). When a join's first frame
names a token of a sibling, the worker that got it passes the TCP socket
and the bytes it already read to that sibling over a Unix datagram
socket (``SCM_RIGHTS``), and the sibling carries on as if it had
accepted the connection itself. The token alone says where to go: the
workers share no table and no memory.

This module must never hand a socket to anything but a sibling's socket
in the pool's own private directory, and never read or write a token's
secret serial.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from mptls.backends.userspace.listener import Listener
from mptls.backends.userspace.subflow import SubflowProtocol
from mptls.mptcp.framing import PREAMBLE, Segment, encode_segment
from mptls.mptcp.options import MpCapable, MpJoinSyn
from mptls.mptcp.tokens import TOKEN_LENGTH, TokenLayout, token_fields

__all__ = ["SOCKET_NAME", "JoinRouter", "WorkerStats"]

logger = logging.getLogger("mptls.workers")

# a join's first bytes are the preamble and one 32-byte SYN frame; a few
# retransmitted SYN frames still fit with room to spare
_MAX_FIRST_BYTES = 4096
# a worker's socket in the pool's directory, by worker id
SOCKET_NAME = "worker-{}.sock"


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """What one worker did, reported when it stops.

    ``first_subflows``: MP_CAPABLE SYNs it took; ``joins``: MP_JOIN
    SYNs it routed through its own table, adopted ones included, be they
    accepted or refused there; ``handed_off``: joins it passed to a
    sibling; ``adopted``: sockets a sibling passed to it.
    """

    worker_id: int
    first_subflows: int = 0
    joins: int = 0
    handed_off: int = 0
    adopted: int = 0


class JoinRouter:
    """One worker's side of the routing: hand off joins, adopt sockets.

    ``handoff`` is the listener's hook (``join_handoff`` of the
    userspace backend's ``create_server``). It is called with a new
    subflow's first segments and takes the TCP connection away when the
    MP_JOIN's token names a sibling worker of the same server.
    """

    def __init__(
        self,
        *,
        socket_dir: Path,
        server_id: int,
        worker_id: int,
        workers: int,
        layout: TokenLayout,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._dir = socket_dir
        self._server_id = server_id
        self._worker_id = worker_id
        self._workers = workers
        self._layout = layout
        self._listener: Listener | None = None
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts = {"first": 0, "joins": 0, "out": 0, "in": 0}
        # siblings a handoff failed to reach, warned about once until a
        # handoff reaches them again: joins naming a dead worker (forged
        # ones too) would otherwise log a warning each
        self._unreachable: set[int] = set()

    def open(self) -> None:
        """Bind this worker's socket; siblings may hand off from now on."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self._path(self._worker_id)))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def attach(self, listener: Listener) -> None:
        """The listener that adopted sockets are given to."""
        self._listener = listener

    def close(self, *, remove_dir: bool = False) -> None:
        """Take no more handoffs; remove this worker's socket.

        ``remove_dir``: the directory too, if empty, for a worker whose
        parent is gone (a killed parent leaves it). While the parent
        runs the directory is its own: a sibling may be about to bind
        in it, and would fail to start if it had gone.
        """
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            # gone even if the parent, which removes the directory, is not
            self._path(self._worker_id).unlink(missing_ok=True)
            if remove_dir:
                # the last worker out takes it: only an empty one goes
                with contextlib.suppress(OSError):
                    self._dir.rmdir()
        for task in self._tasks:
            task.cancel()

    def stats(self) -> WorkerStats:
        counts = self._counts
        return WorkerStats(
            worker_id=self._worker_id,
            first_subflows=counts["first"],
            joins=counts["joins"],
            handed_off=counts["out"],
            adopted=counts["in"],
        )

    def _path(self, worker_id: int) -> Path:
        return self._dir / SOCKET_NAME.format(worker_id)

    # sending side

    def handoff(
        self, subflow: SubflowProtocol, segments: list[Segment]
    ) -> bool:
        """Pass ``subflow`` to the worker its join token names, if another."""
        owner = self._owner(segments[0])
        if owner is None:
            return False
        transport = subflow.transport
        # the decoder's own count: bytes of a frame not yet complete
        # could not be sent on, so such a join is refused here instead
        if transport is None or subflow._decoder.buffered:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None or self._sock is None:
            return False
        # the frames as the client sent them; the owner decodes them again
        first = PREAMBLE + b"".join(encode_segment(s) for s in segments)
        try:
            # sendmsg, not socket.send_fds: that one drops the address
            self._sock.sendmsg(
                [first],
                [_rights(sock.fileno())],
                0,
                str(self._path(owner)),
            )
        except OSError as exc:
            # the owner is gone or swamped: let this worker refuse the
            # join with an RST, as for any token it does not know
            gone = exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
            level = (
                logging.DEBUG
                if owner in self._unreachable
                else logging.WARNING
            )
            self._unreachable.add(owner)
            logger.log(
                level,
                "cannot hand a join to worker %d: %s; refused",
                owner,
                "it is not running (it died, or is being restarted)"
                if gone
                else os.strerror(exc.errno or 0),
            )
            return False
        self._unreachable.discard(owner)
        self._counts["out"] += 1
        # this process's copy goes; the owner holds the connection now, so
        # closing here sends no FIN
        subflow.close()
        return True

    def _owner(self, segment: Segment) -> int | None:
        """The sibling worker that owns the join in ``segment``, if any."""
        for option in segment.options:
            if isinstance(option, MpCapable):
                self._counts["first"] += 1
                return None
            if isinstance(option, MpJoinSyn):
                return self._sibling(option.token)
        return None

    def _sibling(self, token: bytes) -> int | None:
        if len(token) != TOKEN_LENGTH:
            # an RFC 8684 token is a hash of a key: it names no worker
            return None
        fields = token_fields(token, self._layout)
        if (
            fields.server_id != self._server_id
            or fields.worker_id == self._worker_id
            or fields.worker_id >= self._workers
        ):
            self._counts["joins"] += 1
            return None
        return fields.worker_id

    # receiving side

    def _on_readable(self) -> None:
        while self._sock is not None:
            try:
                first, fds, flags, _ = socket.recv_fds(
                    self._sock, _MAX_FIRST_BYTES, 1
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("handoff socket failed: %s", exc)
                return
            if not fds:
                continue
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                continue
            self._adopt(socket.socket(fileno=fds[0]), first)

    def _adopt(self, sock: socket.socket, first: bytes) -> None:
        listener = self._listener
        if listener is None:
            sock.close()
            return
        self._counts["in"] += 1
        # the socket waits here until _connect takes it: a task that
        # close() cancels before it ran closes it as it ends, where one
        # that ran leaves it to asyncio's transport
        unclaimed = [sock]
        task = self._loop.create_task(
            self._connect(listener, unclaimed, first)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: _close_all(unclaimed))

    async def _connect(
        self, listener: Listener, unclaimed: list[socket.socket], first: bytes
    ) -> None:
        sock = unclaimed.pop()
        try:
            await self._loop.connect_accepted_socket(
                lambda: _AdoptedSubflow(listener, first), sock
            )
        except OSError as exc:
            logger.debug("an adopted subflow failed: %s", exc)
            sock.close()


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _rights(fd: int) -> tuple[int, int, bytes]:
    """The SCM_RIGHTS control message that passes ``fd``."""
    return (
        socket.SOL_SOCKET,
        socket.SCM_RIGHTS,
        array.array("i", [fd]).tobytes(),
    )


class _AdoptedSubflow(SubflowProtocol):
    """A subflow another worker accepted: its first bytes come along."""

    def __init__(self, listener: Listener, first: bytes) -> None:
        super().__init__(listener, initiator=False)
        self._first = first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # before anything read from the socket itself, which comes later
        first, self._first = self._first, b""
        self.data_received(first)
