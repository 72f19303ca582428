"""``run_in_thread``: path-manager work on a thread of its own.

Needs neither root nor kernel MPTCP: the work here is plain Python.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from mptls.backends.kernel.pathmanager import run_in_thread


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
