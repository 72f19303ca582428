"""Path-manager work and event loops: ``run_in_thread``, ``PathManager``.

Needs neither root nor kernel MPTCP: the work here is plain Python.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings

import pytest

from mptls.backends.kernel.pathmanager import PathManager, run_in_thread
from mptls.errors import PathError


@pytest.mark.parametrize("outcome", ["returns", "raises"])
def test_work_that_outlives_its_loop_ends_quietly(
    monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    # a caller that gives up (a connect cancelled or timed out) may close
    # its loop while the netlink work still runs: the thread must end
    # without an "Exception in thread" traceback on stderr
    release = threading.Event()
    workers: list[threading.Thread] = []
    uncaught: list[BaseException | None] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda args: uncaught.append(args.exc_value)
    )

    def work() -> int:
        workers.append(threading.current_thread())
        release.wait(10)
        if outcome == "raises":
            raise OSError("refused")
        return 1

    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(run_in_thread(work), 0.01)

    asyncio.run(give_up())
    release.set()
    workers[0].join(10)

    assert not workers[0].is_alive()
    assert uncaught == []


def test_result_and_error_reach_the_caller() -> None:
    def fail() -> None:
        raise OSError("refused")

    async def main() -> int:
        with pytest.raises(OSError, match="refused"):
            await run_in_thread(fail)
        return await run_in_thread(lambda: 7)

    assert asyncio.run(main()) == 7


def test_path_manager_in_a_running_loop_says_what_to_do() -> None:
    # pyroute2 fails there with "This event loop is already running"
    # and a coroutine never awaited; the error names the way out instead
    async def main() -> str:
        with pytest.raises(PathError) as caught:
            PathManager()
        return str(caught.value)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        message = asyncio.run(main())
        gc.collect()

    assert "running event loop" in message
    assert "run_in_thread" in message
    assert [str(w.message) for w in seen] == []


def test_path_manager_error_reaches_run_in_thread_callers() -> None:
    # the same class in a thread run_in_thread starts gets past the check
    # (opening netlink may still fail where MPTCP is missing)
    def open_and_close() -> str:
        try:
            PathManager().close()
        except PathError as exc:
            return str(exc)
        return "opened"

    async def main() -> str:
        return await run_in_thread(open_and_close)

    assert "running event loop" not in asyncio.run(main())
