"""What a worker pool's parent needs to bring a dead worker back.

A supervisor restarts a process that dies, but not one that dies again
and again: :class:`RestartBudget` counts the restarts of one worker id
in a sliding window, with the time passed in. The other helpers wait on
a worker without tying up a thread that could outlive a cancelled wait,
and clear the way for a replacement's Unix socket.

This module must never remove anything outside the pool's own private
directory, nor follow a link out of it, and never return from a
cancelled reap while a thread still waits on the process.
"""

from __future__ import annotations

import asyncio
import collections
import os
import stat
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from pathlib import Path

from mptls.errors import BackendError, ConfigurationError

__all__ = ["RESTART_LIMIT", "RESTART_WINDOW", "RestartBudget"]

# At most 5 restarts of one worker id within 60 s, as process supervisors
# bound a crash loop (systemd's StartLimitBurst is 5 by default). A
# worker that dies once in a while is restarted every time; one whose
# handler or start-up crashes at once costs 5 process starts, a few
# seconds, and is then left down.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0


class RestartBudget:
    """How many more times one worker id may be restarted, and when.

    :meth:`spend` is asked before each restart with the current time of
    a monotonic clock; it refuses once ``limit`` restarts fall within
    the last ``window`` seconds. Older restarts are forgotten, so a
    worker that stays up long enough earns its budget back.
    """

    __slots__ = ("_limit", "_times", "_window")

    def __init__(
        self, limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW
    ) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError("restart limit must be an int >= 0")
        if not isinstance(window, int | float) or not window > 0:
            raise ConfigurationError("restart window must be > 0 seconds")
        self._limit = limit
        self._window = float(window)
        self._times: collections.deque[float] = collections.deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def window(self) -> float:
        return self._window

    def allows(self, now: float) -> bool:
        """Whether :meth:`spend` at ``now`` would grant a restart."""
        times = self._times
        # restarts that left the window no longer count (the clock is
        # monotonic: they never come back into it)
        while times and times[0] <= now - self._window:
            times.popleft()
        return len(times) < self._limit

    def spend(self, now: float) -> bool:
        """Take one restart at ``now``; False when the budget is spent."""
        if not self.allows(now):
            return False
        self._times.append(now)
        return True


def clear_socket_path(socket_dir: Path, name: str) -> Path:
    """Make room for a replacement's socket ``name`` in ``socket_dir``.

    A worker killed with SIGKILL leaves its socket file behind, and
    binding a Unix socket to a path that exists fails. Workers remove
    the then empty directory only once the parent is gone; should it be
    gone all the same, it is made again, and any directory found there
    is used only if it is still private to this user (a real
    directory, mode 0700).
    """
    try:
        os.mkdir(socket_dir, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise BackendError(f"cannot make {socket_dir}: {exc}") from exc
    info = os.lstat(socket_dir)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.geteuid()
        or info.st_mode & 0o077
    ):
        raise BackendError(f"{socket_dir} is no longer the pool's own")
    path = socket_dir / name
    # only the pool's user can write here: what is there is a stale socket
    path.unlink(missing_ok=True)
    return path


async def reap(process: BaseProcess, timeout: float) -> None:
    """Wait for ``process`` to end and collect its exit code.

    The wait runs in a thread; cancelled, this still lets that thread
    finish before it raises, so that no second wait for the same process
    (the pool's own, on stop) runs beside it.
    """
    join = asyncio.ensure_future(asyncio.to_thread(process.join, timeout))
    try:
        await asyncio.shield(join)
    except asyncio.CancelledError:
        await join
        raise


async def receive(pipe: Pipe, timeout: float) -> tuple[str, object]:
    """One message from a worker, ("timeout", None) or ("gone", None).

    Woken by the event loop when the pipe is readable, so a cancelled or
    timed out wait leaves nothing behind.
    """
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pipe.fileno(), _resolve, readable)
    try:
        # not wait_for: in 3.11 it returns a result that came with a
        # cancel and drops the cancel, and stop() would go unheard
        async with asyncio.timeout(timeout):
            await readable
    except TimeoutError:
        return ("timeout", None)
    finally:
        loop.remove_reader(pipe.fileno())
    try:
        kind, body = pipe.recv()
    except (EOFError, OSError):
        return ("gone", None)
    return (str(kind), body)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
