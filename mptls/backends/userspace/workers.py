"""Several worker processes serving one port, each join sent to its owner.

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
in the pool's own private directory, never read or write a token's
secret serial, and never leave a worker process behind: the pool stops
them on exit, and a worker whose parent is gone stops by itself.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from mptls.backends.base import format_address
from mptls.backends.userspace.listener import Listener
from mptls.backends.userspace.transport import SubflowProtocol
from mptls.errors import BackendError, ConfigurationError, MptlsTimeoutError
from mptls.mptcp.framing import PREAMBLE, Segment, encode_segment
from mptls.mptcp.options import MpCapable, MpJoinSyn
from mptls.mptcp.tokens import TOKEN_LENGTH, TokenLayout, token_fields

__all__ = ["JoinRouter", "WorkerPool", "WorkerStats", "start_workers"]

logger = logging.getLogger("mptls.workers")

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
]

# a join's first bytes are the preamble and one 32-byte SYN frame; a few
# retransmitted SYN frames still fit with room to spare
_MAX_FIRST_BYTES = 4096
_SOCKET_NAME = "worker-{}.sock"
_STOP = "stop"


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

    def close(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            # gone even if the parent, which removes the directory, is not
            self._path(self._worker_id).unlink(missing_ok=True)
            # and the last worker out takes the directory (a killed
            # parent would leave it): only an empty one goes
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
        return self._dir / _SOCKET_NAME.format(worker_id)

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
            logger.warning("cannot hand a join to worker %d: %s", owner, exc)
            return False
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
        task = self._loop.create_task(self._connect(listener, sock, first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(
        self, listener: Listener, sock: socket.socket, first: bytes
    ) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: _AdoptedSubflow(listener, first), sock
            )
        except OSError as exc:
            logger.debug("an adopted subflow failed: %s", exc)
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


# the worker process


@dataclass(frozen=True)
class _WorkerSpec:
    """Everything a worker process needs; crosses the process boundary."""

    worker_id: int
    workers: int
    host: str | Sequence[str]
    port: int
    socket_dir: Path
    server_id: int
    layout: TokenLayout
    client_connected_cb: ClientConnectedCallback
    ssl: Any
    grace: float
    options: Mapping[str, Any] = field(default_factory=dict)


def _worker_main(spec: _WorkerSpec, pipe: Pipe) -> None:
    """Entry point of a worker process."""
    # the parent stops the workers on Ctrl-C; a terminal's SIGINT reaches
    # the whole process group and must not kill them half-way
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_serve(spec, pipe))
    except Exception as exc:
        with contextlib.suppress(OSError):
            pipe.send(("error", f"worker {spec.worker_id}: {exc}"))
    finally:
        pipe.close()


async def _serve(spec: _WorkerSpec, pipe: Pipe) -> None:
    router = JoinRouter(
        socket_dir=spec.socket_dir,
        server_id=spec.server_id,
        worker_id=spec.worker_id,
        workers=spec.workers,
        layout=spec.layout,
    )
    router.open()
    try:
        await _serve_until_stopped(spec, pipe, router)
    finally:
        router.close()
    with contextlib.suppress(OSError):
        pipe.send(("stats", router.stats()))


async def _serve_until_stopped(
    spec: _WorkerSpec, pipe: Pipe, router: JoinRouter
) -> None:
    from mptls.aio.streams import start_server

    loop = asyncio.get_running_loop()
    server = await start_server(
        functools.partial(_run_handler, spec.client_connected_cb),
        spec.host,
        spec.port,
        ssl=spec.ssl,
        backend="userspace",
        reuse_port=True,
        server_id=spec.server_id,
        worker_id=spec.worker_id,
        token_layout=spec.layout,
        join_handoff=router.handoff,
        **spec.options,
    )
    listener: Listener = server.mptls_listener  # type: ignore[attr-defined]
    router.attach(listener)

    # stop on "stop", on SIGTERM, or when the parent is gone (EOF)
    stop = loop.create_future()

    def on_pipe() -> None:
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            message = _STOP
        if message == _STOP:
            _set_stop(stop)

    loop.add_reader(pipe.fileno(), on_pipe)
    loop.add_signal_handler(signal.SIGTERM, _set_stop, stop)
    pipe.send(("ready", spec.worker_id))
    await stop
    loop.remove_reader(pipe.fileno())

    server.close()
    await _drain(listener, spec.grace)


async def _run_handler(
    client_connected_cb: ClientConnectedCallback,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """The application's handler, ended quietly when the worker stops.

    A handler still running after ``grace`` is cancelled as the
    worker's loop ends; asyncio 3.11's stream callback then reads the
    cancelled task's exception and prints a traceback per connection.
    Its connection is aborted and the cancellation ends here.
    """
    try:
        # a plain callable, as asyncio takes, returns no awaitable
        running = client_connected_cb(reader, writer)
        if running is not None:
            await running
    except asyncio.CancelledError:
        writer.transport.abort()


def _set_stop(stop: asyncio.Future[None]) -> None:
    if not stop.done():
        stop.set_result(None)


async def _drain(listener: Listener, grace: float) -> None:
    """Let open connections finish for up to ``grace`` s, then abort."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while listener.transports and loop.time() < deadline:
        # shutdown only: a coarse look every 50 ms is enough
        await asyncio.sleep(0.05)
    for transport in listener.transports:
        transport.abort()


# the parent


class WorkerPool:
    """N worker processes serving ``host``:``port`` with mptls.

    ``client_connected_cb(reader, writer)`` runs in the workers, so it
    must pickle: a module-level coroutine function, or a
    ``functools.partial`` of one. ``ssl`` must pickle too: a
    :class:`mptls.TLSConfig`. Other keywords go to each worker's
    ``mptls.start_server`` (``modes``, ``announce_addrs``, ...).
    ``port=0`` picks one free port for all workers.
    """

    def __init__(
        self,
        client_connected_cb: ClientConnectedCallback,
        host: str | Sequence[str],
        port: int,
        *,
        workers: int,
        ssl: Any,
        server_id: int = 0,
        token_layout: TokenLayout | None = None,
        start_timeout: float = 30.0,
        grace: float = 5.0,
        **server_options: Any,
    ) -> None:
        layout = token_layout or TokenLayout()
        if not isinstance(workers, int) or workers < 1:
            raise ConfigurationError("workers must be an int >= 1")
        if workers > 1 << layout.worker_id_bits:
            raise ConfigurationError(
                f"{workers} workers do not fit in "
                f"{layout.worker_id_bits} worker id bits"
            )
        for name in ("join_handoff", "worker_id", "reuse_port"):
            if name in server_options:
                raise ConfigurationError(f"the pool sets {name} itself")
        self._template = _WorkerSpec(
            worker_id=0,
            workers=workers,
            host=host,
            port=port,
            socket_dir=Path(),
            server_id=server_id,
            layout=layout,
            client_connected_cb=client_connected_cb,
            ssl=ssl,
            grace=grace,
            options=dict(server_options),
        )
        _check_pickles(self._template)
        self._start_timeout = start_timeout
        self._grace = grace
        self._port = port
        self._dir: Path | None = None
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._pipes: list[Pipe] = []
        self._stats: tuple[WorkerStats, ...] = ()
        # workers that ended while the pool served, by worker id
        self._exited: dict[int, int | None] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the workers listen on (the first host)."""
        return (_first_host(self._template.host), self._port)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self._processes if p.pid is not None)

    @property
    def stats(self) -> tuple[WorkerStats, ...]:
        """Each worker's counts, once :meth:`stop` has returned."""
        return self._stats

    @property
    def exited(self) -> Mapping[int, int | None]:
        """Workers that ended while serving: worker id to exit code.

        A negative code is the signal that ended the process. Such a
        worker is not restarted and has no entry in :attr:`stats`.
        """
        return dict(self._exited)

    async def start(self) -> None:
        """Start the workers; return once every one of them listens."""
        if self._processes:
            raise BackendError("the pool is already started")
        # private (0700): only this user's processes can hand sockets
        self._dir = Path(tempfile.mkdtemp(prefix="mptls-workers-"))
        self._exited.clear()
        # held until every worker has bound the port with SO_REUSEPORT,
        # so that port 0 means the same free port for all of them
        placeholder = _reserve(_first_host(self._template.host), self._port)
        self._port = placeholder.getsockname()[1]
        try:
            self._spawn(self._dir)
            await self._wait_ready()
            self._watch()
        except BaseException:
            await self._halt()
            raise
        finally:
            placeholder.close()

    async def stop(self) -> tuple[WorkerStats, ...]:
        """Stop every worker (open connections get ``grace`` s to end)."""
        self._unwatch()
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(_STOP)
        # a worker reads only the first "stop"; _halt sends another, unread
        deadline = self._grace + self._start_timeout
        replies = await asyncio.gather(
            *(_receive(pipe, deadline) for pipe in self._pipes)
        )
        self._stats = tuple(
            body
            for kind, body in replies
            if kind == "stats" and isinstance(body, WorkerStats)
        )
        await self._halt()
        return self._stats

    async def __aenter__(self) -> WorkerPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _spawn(self, socket_dir: Path) -> None:
        from dataclasses import replace

        context = multiprocessing.get_context("spawn")
        for worker_id in range(self._template.workers):
            spec = replace(
                self._template,
                worker_id=worker_id,
                port=self._port,
                socket_dir=socket_dir,
            )
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(spec, child_end),
                name=f"mptls-worker-{worker_id}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self._processes.append(process)
            self._pipes.append(parent_end)

    async def _wait_ready(self) -> None:
        replies = await asyncio.gather(
            *(_receive(pipe, self._start_timeout) for pipe in self._pipes)
        )
        for kind, body in replies:
            if kind == "timeout":
                raise MptlsTimeoutError(
                    f"a worker did not start within {self._start_timeout} s"
                )
            if kind != "ready":
                raise BackendError(f"a worker failed to start: {body}")
        logger.info(
            "%d workers listening on %s:%d",
            len(self._processes),
            _first_host(self._template.host),
            self._port,
        )

    def _watch(self) -> None:
        """Report a worker that ends before :meth:`stop` asks it to."""
        loop = asyncio.get_running_loop()
        for worker_id, process in enumerate(self._processes):
            loop.add_reader(
                process.sentinel, self._on_exit, worker_id, process
            )

    def _unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        for process in self._processes:
            loop.remove_reader(process.sentinel)

    def _on_exit(
        self, worker_id: int, process: multiprocessing.process.BaseProcess
    ) -> None:
        asyncio.get_running_loop().remove_reader(process.sentinel)
        task = asyncio.get_running_loop().create_task(
            self._report_exit(worker_id, process)
        )
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _report_exit(
        self, worker_id: int, process: multiprocessing.process.BaseProcess
    ) -> None:
        # the sentinel closes as the process exits; reaping follows
        await asyncio.to_thread(process.join, 5.0)
        self._exited[worker_id] = process.exitcode
        left = len(self._processes) - len(self._exited)
        # the kernel reset the connections queued on its listening socket
        # (unless net.ipv4.tcp_migrate_req=1 moved them to a sibling)
        logger.warning(
            "worker %d (pid %s) exited with code %s while serving; %d of "
            "%d workers left, not restarted",
            worker_id,
            process.pid,
            process.exitcode,
            left,
            len(self._processes),
        )

    async def _halt(self) -> None:
        """Wait for the processes to exit; end the stragglers."""
        self._unwatch()
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(_STOP)
        for process in self._processes:
            await asyncio.to_thread(process.join, self._grace + 5.0)
            if process.is_alive():
                logger.warning("worker %s did not stop: killing", process.pid)
                process.kill()
                await asyncio.to_thread(process.join, 5.0)
        for pipe in self._pipes:
            pipe.close()
        # a report under way finishes (its process is gone) before the
        # list it counts is cleared
        await asyncio.gather(*self._watchers)
        self._processes.clear()
        self._pipes.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


async def start_workers(
    client_connected_cb: ClientConnectedCallback,
    host: str | Sequence[str],
    port: int,
    *,
    workers: int,
    ssl: Any,
    **kwds: Any,
) -> WorkerPool:
    """Start a :class:`WorkerPool`; like ``mptls.start_server`` times N.

    Stop it with ``await pool.stop()``, or use it as ``async with``.
    """
    pool = WorkerPool(
        client_connected_cb, host, port, workers=workers, ssl=ssl, **kwds
    )
    await pool.start()
    return pool


def _check_pickles(spec: _WorkerSpec) -> None:
    try:
        pickle.dumps(spec)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ConfigurationError(
            "worker processes need a handler and settings that pickle: a "
            "module-level coroutine function (or a functools.partial of "
            f"one) and ssl=TLSConfig(...); {exc}"
        ) from exc


def _first_host(host: str | Sequence[str]) -> str:
    # a list of hosts, as asyncio's create_server takes: every worker
    # listens on each of them, on the port reserved on the first
    return host if isinstance(host, str) else host[0]


def _reserve(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket holding the port."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        where = format_address((host, port))
        raise BackendError(f"cannot bind {where}: {exc}") from exc
    return sock


async def _receive(pipe: Pipe, timeout: float) -> tuple[str, object]:
    """One message from a worker, ("timeout", None) or ("gone", None)."""
    ready = await asyncio.to_thread(pipe.poll, timeout)
    if not ready:
        return ("timeout", None)
    try:
        kind, body = pipe.recv()
    except (EOFError, OSError):
        return ("gone", None)
    return (str(kind), body)
