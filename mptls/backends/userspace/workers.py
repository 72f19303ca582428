"""Several worker processes serving one port, each join sent to its owner.

:class:`WorkerPool` starts N processes that listen on one port with
``SO_REUSEPORT``; in each, a
:class:`~mptls.backends.userspace.router.JoinRouter` passes a join that
names a sibling's token to that sibling.
The parent watches its workers: one that exits unasked is started again
with the same worker id, so that the port keeps N workers and joins to
that id find an owner again, unless it keeps dying
(:mod:`mptls.backends.userspace.restarts`). A handler that raises one of
the pool's ``stop_on`` errors (a server whose output is gone, say) tells
the parent over the worker's pipe, and the whole pool stops serving.

This module is the parent's side: what runs in each worker is
:mod:`mptls.backends.userspace.worker_process`. It must never leave a
worker process behind: the pool stops them on exit, and a worker whose
parent is gone stops by itself. It must never restart a worker after
:meth:`WorkerPool.stop` was called.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import shutil
import signal
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from mptls.aio.keywords import check_callable
from mptls.backends.base import format_address
from mptls.backends.userspace.backend import (
    accepted_modes,
    check_e_server,
    check_token_layout,
)
from mptls.backends.userspace.pool_checks import (
    check_listen_address,
    check_pickles,
    check_server_options,
    check_waits,
    check_workers,
    first_host,
)
from mptls.backends.userspace.restarts import (
    RestartBudget,
    clear_socket_path,
    reap,
    receive,
)
from mptls.backends.userspace.router import (
    SOCKET_NAME,
    JoinRouter,
    WorkerStats,
)
from mptls.backends.userspace.stop_requests import (
    STOP_POOL,
    check_stop_on,
    stop_request,
)
from mptls.backends.userspace.worker_logging import LogSetup
from mptls.backends.userspace.worker_process import (
    STOP,
    ClientConnectedCallback,
    WorkerSpec,
    worker_main,
)
from mptls.errors import BackendError, MptlsError, MptlsTimeoutError
from mptls.mptcp.config import check_bool
from mptls.mptcp.tokens import TokenLayout
from mptls.tls.config import to_openssl_context

__all__ = ["JoinRouter", "WorkerPool", "WorkerStats", "start_workers"]

logger = logging.getLogger("mptls.workers")


def how_it_ended(process: BaseProcess) -> str:
    """How a process that is gone ended, in words: ``exited with code
    1``, or ``was killed by SIGKILL`` for its negative exit code."""
    code = process.exitcode
    if code is None or code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


class WorkerPool:
    """N worker processes serving ``host``:``port`` with mptls.

    ``client_connected_cb(reader, writer)`` runs in the workers, so it
    must pickle: a module-level coroutine function, or a
    ``functools.partial`` of one. ``ssl`` must pickle too: a
    :class:`mptls.TLSConfig`. Other keywords go to each worker's
    ``mptls.start_server`` (``modes``, ``announce_addrs``, ...).
    ``port=0`` picks one free port for all workers.

    ``label_stderr``: each line a worker writes to ``sys.stderr`` (a
    handler's, a log record, a traceback) begins with ``worker N: ``, N
    its worker id (off by default: a handler's stderr may be read by a
    program).

    ``stop_on`` names exception classes (they must pickle: module-level
    ones) that stop the whole pool when a handler raises one: the worker
    aborts that connection and tells the parent, whose
    :meth:`serve_forever` raises the first such error; stopping the
    pool is then the caller's, as after any other return of
    :meth:`serve_forever`. Any other error of a handler ends its
    connection alone, as with ``start_server``.

    A worker that exits before :meth:`stop` asks it to is started again
    with the same worker id (``restart=True``), up to
    :data:`~mptls.backends.userspace.restarts.RESTART_LIMIT` times
    within :data:`~mptls.backends.userspace.restarts.RESTART_WINDOW`
    seconds; then it is left down.
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
        restart: bool = True,
        stop_on: Sequence[type[Exception]] = (),
        label_stderr: bool = False,
        **server_options: Any,
    ) -> None:
        # each worker's start_server is handed a wrapper around it,
        # which can always be called
        check_callable("client_connected_cb", client_connected_cb)
        layout = check_token_layout(token_layout)
        check_workers(workers, layout)
        check_bool("restart", restart)
        layout.check_ids(server_id)
        port = check_listen_address(host, port)
        check_waits(start_timeout=start_timeout, grace=grace)
        check_bool("label_stderr", label_stderr)
        check_server_options(server_options)
        # refused here, not by every worker as it starts
        check_e_server(
            accepted_modes(server_options),
            server_id=server_id,
            workers=workers,
        )
        self._template = WorkerSpec(
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
            stop_on=check_stop_on(stop_on),
            label_stderr=label_stderr,
            options=dict(server_options),
        )
        check_pickles(self._template)
        # a certificate or key start_server would refuse too, with the
        # same ConfigurationError: N processes would each fail on it, and
        # the pool would say only that a worker failed to start
        to_openssl_context(ssl, server_side=True)
        self._start_timeout = start_timeout
        self._grace = grace
        self._port = port
        self._restart = restart
        self._dir: Path | None = None
        # the current process of each worker id, and its pipe
        self._processes: list[BaseProcess] = []
        self._pipes: list[Pipe] = []
        self._stats: tuple[WorkerStats, ...] = ()
        self._stopped = False
        # the stop under way, which a second stop() waits for
        self._stopping: asyncio.Task[tuple[WorkerStats, ...]] | None = None
        # one start or stop at a time
        self._lifecycle = asyncio.Lock()
        self._state = _PoolState()
        self._watchers: set[asyncio.Task[None]] = set()
        # the watchers that are starting a replacement: stop cancels them
        self._restarting: set[asyncio.Task[None]] = set()
        # the pipes of serving workers that the loop reads
        self._heard: set[Pipe] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the workers listen on (the first host)."""
        return (first_host(self._template.host), self._port)

    @property
    def pids(self) -> tuple[int, ...]:
        """The worker processes running now, in worker id order.

        A replacement counts from the moment it is started; a worker
        that is dead, waiting for its replacement or down, has none.
        """
        dead = self._state.dead
        return tuple(
            process.pid
            for worker_id, process in enumerate(self._processes)
            if worker_id not in dead and process.pid is not None
        )

    @property
    def stats(self) -> tuple[WorkerStats, ...]:
        """Each worker's counts, once :meth:`stop` has returned.

        One entry per worker id that was running at the stop. A worker
        that was restarted reports what its last process did alone: the
        counts of the one that died are lost with it.
        """
        return self._stats

    @property
    def exited(self) -> Mapping[int, int | None]:
        """Workers that ended while serving: worker id to exit code.

        The code of the last unexpected exit of each worker id (a
        replacement that failed to start included); a negative code is
        the signal that ended the process. :attr:`restarts` and
        :attr:`down` say what became of them.
        """
        return dict(self._state.exited)

    @property
    def restarts(self) -> Mapping[int, int]:
        """Worker id to the number of its replacements that came up."""
        return dict(self._state.restarts)

    @property
    def down(self) -> frozenset[int]:
        """Worker ids that died and will not be started again."""
        return frozenset(self._state.down)

    async def start(self) -> None:
        """Start the workers; return once every one of them listens.

        A :meth:`stop` called meanwhile stops the pool once it started:
        each reads the workers' pipes, and the stop took the start's
        replies.
        """
        async with self._lifecycle:
            await self._start_workers()

    async def _start_workers(self) -> None:
        if self._processes:
            raise BackendError("the pool is already started")
        # private (0700): only this user's processes can hand sockets
        self._dir = Path(tempfile.mkdtemp(prefix="mptls-workers-"))
        self._state = _PoolState()
        self._stopped = False
        self._stopping = None
        # held until every worker has bound the port with SO_REUSEPORT,
        # so that port 0 means the same free port for all of them
        placeholder = _reserve(first_host(self._template.host), self._port)
        self._port = placeholder.getsockname()[1]
        try:
            for worker_id in range(self._template.workers):
                process, pipe = self._spawn(worker_id)
                self._processes.append(process)
                self._pipes.append(pipe)
            await self._wait_ready()
            for worker_id in range(self._template.workers):
                self._watch(worker_id)
        except BaseException:
            await self._halt()
            raise
        finally:
            placeholder.close()

    async def serve_forever(self) -> None:
        """Wait while the pool serves; return once :meth:`stop` is called.

        Raises :class:`~mptls.errors.BackendError` when every worker is
        down and none will be started again: the port is served no more.
        Raises the error a handler raised in a worker, when it is one of
        the pool's ``stop_on``; the workers serve on until :meth:`stop`.
        """
        state = self._state
        if not self._processes:
            raise BackendError("the pool is not started")
        await state.ended.wait()
        if state.failure is not None:
            raise state.failure
        if not state.stopping:
            raise BackendError(
                f"all {self._template.workers} workers are down and none "
                "will be restarted"
            )

    async def stop(self) -> tuple[WorkerStats, ...]:
        """Stop every worker (open connections get ``grace`` s to end).

        A connection still open then is aborted, and its handler gets up
        to a second more to hear of it (its read ends) before the
        worker's loop cancels it: a handler can say what was cut short.

        Returns the workers' :attr:`stats`; a second call returns them
        again (``async with`` stops a pool its block already stopped),
        once the first is over when they overlap (a signal's task
        stopping the pool as ``async with`` ends): each reading the
        workers' pipes, the second met them closed by the first. A
        cancelled call leaves the stop to go on: a pool half stopped
        would keep its workers.
        """
        if self._stopped:
            return self._stats
        if self._stopping is None:
            loop = asyncio.get_running_loop()
            self._stopping = loop.create_task(self._stop_workers())
        return await asyncio.shield(self._stopping)

    async def _stop_workers(self) -> tuple[WorkerStats, ...]:
        async with self._lifecycle:
            # a stop asked for while the pool started, and then another
            if self._stopped:
                return self._stats
            return await self._stop_started()

    async def _stop_started(self) -> tuple[WorkerStats, ...]:
        self._state.stopping = True
        self._state.ended.set()
        self._unwatch()
        # a replacement that is still starting is terminated; one that
        # already listens is stopped below like the others
        for task in self._restarting:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(STOP)
        # a worker reads only the first "stop"; _halt sends another, unread
        deadline = self._grace + self._start_timeout
        replies = await asyncio.gather(
            *(_final_reply(pipe, deadline) for pipe in self._pipes)
        )
        self._stats = tuple(
            body
            for kind, body in replies
            if kind == "stats" and isinstance(body, WorkerStats)
        )
        await self._halt()
        self._stopped = True
        return self._stats

    async def __aenter__(self) -> WorkerPool:
        # start_workers() hands over a started pool, as asyncio's
        # start_server() a serving server: `async with await
        # start_workers(...)` enters it as it is
        if not self._processes:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _spawn(self, worker_id: int) -> tuple[BaseProcess, Pipe]:
        """Start the process of ``worker_id``; it says "ready" on its pipe."""
        if self._dir is None:
            raise BackendError("the pool is not started")
        spec = replace(
            self._template,
            worker_id=worker_id,
            port=self._port,
            socket_dir=self._dir,
            logs=LogSetup.of_this_process(),
        )
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=worker_main,
            args=(spec, child_end),
            name=f"mptls-worker-{worker_id}",
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        return process, parent_end

    async def _wait_ready(self) -> None:
        replies = await asyncio.gather(
            *(receive(pipe, self._start_timeout) for pipe in self._pipes)
        )
        pairs = zip(self._processes, replies, strict=True)
        for process, (kind, body) in pairs:
            if kind == "timeout":
                raise MptlsTimeoutError(
                    f"a worker did not start within {self._start_timeout} s"
                )
            if kind == "gone":
                await reap(process, self._start_timeout)
                raise BackendError(
                    f"a worker failed to start: it {how_it_ended(process)} "
                    "before it listened (any error "
                    "it had is on stderr; a script that starts a pool "
                    'needs an `if __name__ == "__main__":` guard)'
                )
            if kind != "ready":
                raise BackendError(f"a worker failed to start: {body}")
        logger.info(
            "%d workers listening on %s:%d",
            len(self._processes),
            first_host(self._template.host),
            self._port,
        )

    def _watch(self, worker_id: int) -> None:
        """Notice when the process of ``worker_id`` ends unasked, or
        asks the pool to stop."""
        process = self._processes[worker_id]
        pipe = self._pipes[worker_id]
        loop = asyncio.get_running_loop()
        loop.add_reader(process.sentinel, self._on_exit, worker_id, process)
        loop.add_reader(pipe.fileno(), self._on_message, worker_id, pipe)
        self._heard.add(pipe)

    def _unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        for process in self._processes:
            loop.remove_reader(process.sentinel)
        for pipe in self._heard:
            loop.remove_reader(pipe.fileno())
        self._heard.clear()

    def _unhear(self, pipe: Pipe) -> None:
        if pipe in self._heard:
            self._heard.discard(pipe)
            asyncio.get_running_loop().remove_reader(pipe.fileno())

    def _on_message(self, worker_id: int, pipe: Pipe) -> None:
        """A serving worker's message: only a stop of the pool is news
        here (the stats of one that stopped unasked die with it)."""
        try:
            failure = stop_request(pipe, worker_id)
        except (EOFError, OSError):
            # the worker exited: its sentinel tells the rest
            self._unhear(pipe)
            return
        state = self._state
        if failure is None or state.ended.is_set():
            return
        logger.debug("worker %d asks the pool to stop: %s", worker_id, failure)
        state.failure = failure
        state.ended.set()

    def _on_exit(self, worker_id: int, process: BaseProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        self._unhear(self._pipes[worker_id])
        self._state.dead.add(worker_id)
        task = loop.create_task(self._supervise(worker_id, process))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _supervise(self, worker_id: int, process: BaseProcess) -> None:
        """Log an unexpected exit, then restart the worker or leave it."""
        # the sentinel closes as the process exits; reaping follows
        await reap(process, 5.0)
        state = self._state
        state.exited[worker_id] = process.exitcode
        restart = self._restart and not state.stopping
        # said as it will be: a worker out of restarts is left down
        allowed = restart and state.budget(worker_id).allows(
            asyncio.get_running_loop().time()
        )
        # the kernel reset the connections queued on its listening socket
        # (unless net.ipv4.tcp_migrate_req=1 moved them to a sibling)
        logger.warning(
            "worker %d (pid %s) %s while serving; %d of %d workers left, %s",
            worker_id,
            process.pid,
            how_it_ended(process),
            *self._workers_left(),
            "restarting it" if allowed else "not restarted",
        )
        if not restart:
            if not state.stopping:
                self._leave_down(worker_id)
            return
        task = asyncio.current_task()
        if task is not None:
            self._restarting.add(task)
        try:
            await self._restart_worker(worker_id)
        finally:
            self._restarting.discard(task)

    async def _restart_worker(self, worker_id: int) -> None:
        """Start ``worker_id`` again until it listens or the budget ends."""
        state = self._state
        budget = state.budget(worker_id)
        loop = asyncio.get_running_loop()
        while True:
            if not budget.spend(loop.time()):
                logger.error(
                    "worker %d was restarted %d times within %g s and "
                    "exited again: left down; %d of %d workers left",
                    worker_id,
                    budget.limit,
                    budget.window,
                    *self._workers_left(),
                )
                break
            process = self._start_replacement(worker_id)
            if process is None:
                break
            try:
                kind, body = await receive(
                    self._pipes[worker_id], self._start_timeout
                )
            except asyncio.CancelledError:
                state.starting.discard(worker_id)
                # stop() came first: a process that serves nothing yet is
                # ended now rather than waited for until it listens
                process.terminate()
                raise
            state.starting.discard(worker_id)
            if kind == "ready":
                state.restarts[worker_id] += 1
                self._watch(worker_id)
                logger.info(
                    "worker %d restarted (pid %s)", worker_id, process.pid
                )
                return
            logger.warning(
                "the replacement of worker %d (pid %s) did not start: %s",
                worker_id,
                process.pid,
                body if kind == "error" else kind,
            )
            # one that hangs in its start is not waited for any longer
            if kind == "timeout":
                process.kill()
            state.dead.add(worker_id)
            await reap(process, 5.0)
            state.exited[worker_id] = process.exitcode
        self._leave_down(worker_id)

    def _start_replacement(self, worker_id: int) -> BaseProcess | None:
        """Spawn a new process for ``worker_id`` in its predecessor's place.

        Tokens: the replacement's ``start_server`` draws a fresh secret
        for its TokenAllocator, as every server start does, so its
        serials are a new keyed permutation. Carrying the old one on
        would need the counter the dead process had reached (the
        allocator's own way to restart), which a SIGKILLed worker never
        reports, and a counter short by one repeats a token outright.
        With a fresh secret a new token equals one still held from
        before only by chance: n * m / 2**serial_bits for n old tokens
        and m new ones. The old ones go out of use at once: a
        connection's subflows all live in its owner, so the kernel
        closed every one of them, and a stale join that met a reused
        token would fail its HMAC, whose keys are another connection's.
        """
        if self._dir is None:
            return None
        old_process = self._processes[worker_id]
        old_pipe = self._pipes[worker_id]
        try:
            # siblings find the worker by this path alone
            clear_socket_path(self._dir, SOCKET_NAME.format(worker_id))
            process, pipe = self._spawn(worker_id)
        except (MptlsError, OSError) as exc:
            logger.error("cannot restart worker %d: %s", worker_id, exc)
            return None
        self._processes[worker_id] = process
        self._pipes[worker_id] = pipe
        self._state.dead.discard(worker_id)
        self._state.starting.add(worker_id)
        old_pipe.close()
        # reaped: its sentinel is no longer needed
        with contextlib.suppress(ValueError):
            old_process.close()
        logger.info(
            "starting worker %d again (pid %s)", worker_id, process.pid
        )
        return process

    def _workers_left(self) -> tuple[int, int]:
        """Workers listening (replacements still starting left out), and
        the pool's size: the "N of M workers left" of the log lines."""
        state = self._state
        total = len(self._processes)
        return total - len(state.dead | state.starting), total

    def _leave_down(self, worker_id: int) -> None:
        state = self._state
        state.down.add(worker_id)
        if self._dir is not None:
            # a killed process leaves its socket, and the survivors take
            # the directory with them only when it is empty
            with contextlib.suppress(OSError):
                (self._dir / SOCKET_NAME.format(worker_id)).unlink()
        if len(state.down) == len(self._processes):
            state.ended.set()

    async def _halt(self) -> None:
        """Wait for the processes to exit; end the stragglers."""
        self._unwatch()
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(STOP)
        for process in self._processes:
            await reap(process, self._grace + 5.0)
            if process.is_alive():
                logger.warning("worker %s did not stop: killing", process.pid)
                process.kill()
                await reap(process, 5.0)
        for pipe in self._pipes:
            pipe.close()
        # a report under way finishes (its process is gone) before the
        # list it counts is cleared
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._processes.clear()
        self._pipes.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class _PoolState:
    """What happened to the workers since :meth:`WorkerPool.start`."""

    # worker ids without a running process: dead, restarting or down
    dead: set[int] = field(default_factory=set)
    down: set[int] = field(default_factory=set)
    exited: dict[int, int | None] = field(default_factory=dict)
    restarts: collections.Counter[int] = field(
        default_factory=collections.Counter
    )
    budgets: dict[int, RestartBudget] = field(default_factory=dict)
    # worker ids whose replacement is started but does not listen yet
    starting: set[int] = field(default_factory=set)
    stopping: bool = False
    # the stop_on error a worker's handler raised, which ended serving
    failure: Exception | None = None
    # set by stop(), when the last worker is left down, or on a failure
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def budget(self, worker_id: int) -> RestartBudget:
        return self.budgets.setdefault(worker_id, RestartBudget())


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
    ``restart=False`` leaves a worker that dies down.
    """
    pool = WorkerPool(
        client_connected_cb, host, port, workers=workers, ssl=ssl, **kwds
    )
    await pool.start()
    return pool


async def _final_reply(pipe: Pipe, timeout: float) -> tuple[str, object]:
    """A stopping worker's last message: a replacement says "ready"
    first, and a worker may have asked to stop the pool as the parent
    stopped watching."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        kind, body = await receive(pipe, max(deadline - loop.time(), 0.0))
        if kind not in ("ready", STOP_POOL):
            return (kind, body)


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
