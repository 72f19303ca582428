"""What runs in each process of a worker pool, from spawn to exit.

:func:`worker_main` is the entry point the pool's parent
(:mod:`mptls.backends.userspace.workers`) starts each worker with: it
labels the worker's stderr, repeats the parent's logging, and serves
with ``mptls.start_server`` on the shared port until the parent says
"stop" over the worker's pipe, sends SIGTERM, or is gone. Open
connections then get the pool's ``grace`` to end, and the worker sends
its :class:`~mptls.backends.userspace.router.WorkerStats` back.

:class:`WorkerSpec` and :func:`worker_main` cross the process boundary
by their qualified names, so both stay at module level here. This module
must never outlive its parent: a worker whose pipe reaches EOF stops
as on "stop". It must never let a Ctrl-C meant for the parent end a
worker half-way: the parent stops its workers itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any, TextIO, cast

from mptls.backends.userspace.listener import Listener
from mptls.backends.userspace.router import JoinRouter
from mptls.backends.userspace.stop_requests import PoolStopper
from mptls.backends.userspace.worker_logging import (
    LabelledLines,
    LogSetup,
    worker_label,
)
from mptls.mptcp.tokens import TokenLayout
from mptls.refusals import refusal_log

__all__ = ["STOP", "ClientConnectedCallback", "WorkerSpec", "worker_main"]

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
]

# what the parent sends over a worker's pipe to stop it
STOP = "stop"
# how long a stopping worker lets the handlers of the connections it
# aborted see their end: they only return from a read or a drain
_HANDLERS_END = 1.0


@dataclass(frozen=True)
class WorkerSpec:
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
    stop_on: tuple[type[Exception], ...] = ()
    label_stderr: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    # the parent's logging, which a spawned process does not inherit
    logs: LogSetup = field(default_factory=LogSetup)


def worker_main(spec: WorkerSpec, pipe: Pipe) -> None:
    """Entry point of a worker process."""
    # the parent stops the workers on Ctrl-C; a terminal's SIGINT reaches
    # the whole process group and must not kill them half-way
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.label_stderr and sys.stderr is not None:
        # the workers share the parent's stderr: each line says whose
        # it is (a handler's, a log record, a traceback); stdout is left
        # as it is, for it may carry data
        labelled = LabelledLines(sys.stderr, worker_label(spec.worker_id))
        sys.stderr = cast(TextIO, labelled)
    spec.logs.apply()
    try:
        asyncio.run(_serve(spec, pipe))
    except Exception as exc:
        with contextlib.suppress(OSError):
            pipe.send(("error", f"worker {spec.worker_id}: {exc}"))
    finally:
        pipe.close()


async def _serve(spec: WorkerSpec, pipe: Pipe) -> None:
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
        router.close(remove_dir=_parent_gone())
        # refusals held back in a flood are counted; a worker that stops
        # before their interval ends says how many now, as a server in
        # one process does, before its parent hears it is done
        refusal_log.flush()
    with contextlib.suppress(OSError):
        pipe.send(("stats", router.stats()))


def _parent_gone() -> bool:
    """Whether the pool's process has ended: it removes the socket
    directory itself, unless killed."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


async def _serve_until_stopped(
    spec: WorkerSpec, pipe: Pipe, router: JoinRouter
) -> None:
    from mptls.aio.streams import start_server

    loop = asyncio.get_running_loop()
    handlers: set[asyncio.Task[Any]] = set()
    handler = functools.partial(
        _run_handler,
        spec.client_connected_cb,
        spec.stop_on,
        PoolStopper(pipe, spec.worker_id),
        handlers,
    )
    server = await start_server(
        handler,
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
            message = STOP
        if message == STOP:
            _set_stop(stop)

    loop.add_reader(pipe.fileno(), on_pipe)
    loop.add_signal_handler(signal.SIGTERM, _set_stop, stop)
    pipe.send(("ready", spec.worker_id))
    await stop
    loop.remove_reader(pipe.fileno())

    server.close()
    await _drain(listener, spec.grace)
    if handlers:
        # a handler whose connection the stop ended hears of it (its
        # read ends) and reports it before the loop's end cancels it
        await asyncio.wait(set(handlers), timeout=_HANDLERS_END)


async def _run_handler(
    client_connected_cb: ClientConnectedCallback,
    stop_on: tuple[type[Exception], ...],
    stop_pool: PoolStopper,
    handlers: set[asyncio.Task[Any]],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """The application's handler, ended quietly when the worker stops.

    A handler still running after ``grace`` is cancelled as the
    worker's loop ends; asyncio 3.11's stream callback then reads the
    cancelled task's exception and prints a traceback per connection.
    Its connection is aborted and the cancellation ends here. A handler
    that raises one of ``stop_on`` has its connection aborted too, and
    the parent hears of the error.
    """
    task = asyncio.current_task()
    if task is not None:
        handlers.add(task)
        task.add_done_callback(handlers.discard)
    try:
        # a plain callable, as asyncio takes, returns no awaitable
        running = client_connected_cb(reader, writer)
        if running is not None:
            await running
    except asyncio.CancelledError:
        writer.transport.abort()
    except stop_on as exc:
        writer.transport.abort()
        stop_pool(exc)


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
    listener.end_connections(abort=True)
