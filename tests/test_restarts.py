"""The restart budget of a worker pool, and the room made for a socket.

The budget takes the time from the caller, so these tests run on a
clock of their own; the socket path tests work in a temporary directory.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import stat
from pathlib import Path

import pytest

from mptls.backends.userspace.restarts import (
    RESTART_LIMIT,
    RESTART_WINDOW,
    RestartBudget,
    clear_socket_path,
    receive,
)
from mptls.errors import BackendError, ConfigurationError


def test_the_budget_refuses_the_restart_past_the_limit() -> None:
    budget = RestartBudget(limit=3, window=10.0)
    assert [budget.spend(now) for now in (0.0, 1.0, 2.0)] == [True] * 3
    assert not budget.spend(3.0)
    # a refusal spends nothing: the window still starts at 0.0
    assert not budget.spend(9.9)
    assert budget.spend(10.0)


def test_the_window_slides() -> None:
    budget = RestartBudget(limit=2, window=60.0)
    assert budget.spend(0.0)
    assert budget.spend(50.0)
    assert not budget.spend(59.0)
    # the restart at 0.0 is forgotten, the one at 50.0 still counts
    assert budget.spend(60.0)
    assert not budget.spend(109.0)
    assert budget.spend(110.0)


def test_a_worker_dying_now_and_then_is_always_restarted() -> None:
    budget = RestartBudget()
    spacing = RESTART_WINDOW / RESTART_LIMIT
    assert all(budget.spend(n * spacing) for n in range(100))


def test_the_defaults() -> None:
    budget = RestartBudget()
    assert (budget.limit, budget.window) == (RESTART_LIMIT, RESTART_WINDOW)
    assert [budget.spend(0.5) for _ in range(RESTART_LIMIT + 1)] == [
        True
    ] * RESTART_LIMIT + [False]


def test_a_limit_of_zero_never_restarts() -> None:
    assert not RestartBudget(limit=0).spend(0.0)


@pytest.mark.parametrize(
    ("limit", "window"),
    [(-1, 1.0), (True, 1.0), (1.5, 1.0), (1, 0.0), (1, -2.0), (1, "1")],
)
def test_the_budget_checks_its_settings(limit: object, window: object) -> None:
    with pytest.raises(ConfigurationError):
        RestartBudget(limit=limit, window=window)  # type: ignore[arg-type]


def test_a_stale_socket_is_removed(tmp_path: Path) -> None:
    directory = tmp_path / "pool"
    directory.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(directory / "worker-3.sock"))
    stale.close()
    other = directory / "worker-4.sock"
    other.touch()

    path = clear_socket_path(directory, "worker-3.sock")

    assert path == directory / "worker-3.sock"
    assert not path.exists()
    assert other.exists()
    fresh = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fresh.bind(str(path))
    fresh.close()


def test_a_removed_directory_is_made_again_private(tmp_path: Path) -> None:
    directory = tmp_path / "pool"
    clear_socket_path(directory, "worker-0.sock")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "pool"
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o755)
    kept = directory / "worker-0.sock"
    kept.touch()
    with pytest.raises(BackendError, match="no longer the pool's own"):
        clear_socket_path(directory, "worker-0.sock")
    assert kept.exists()


def test_a_link_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    kept = elsewhere / "worker-0.sock"
    kept.touch()
    (tmp_path / "pool").symlink_to(elsewhere)
    with pytest.raises(BackendError, match="no longer the pool's own"):
        clear_socket_path(tmp_path / "pool", "worker-0.sock")
    assert kept.exists()


@pytest.mark.parametrize("steps", range(4))
async def test_a_cancelled_receive_never_returns_a_message(steps: int) -> None:
    # stop() cancels a restart waiting for "ready"; a message that
    # arrives in the same loop pass must not swallow the cancellation
    parent_end, child_end = multiprocessing.Pipe()
    try:
        child_end.send(("ready", 1))
        waiting = asyncio.ensure_future(receive(parent_end, 5.0))
        for _ in range(steps):
            await asyncio.sleep(0)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        parent_end.close()
        child_end.close()


def test_allows_says_what_spend_would_and_spends_nothing() -> None:
    # the warning of a death says "restarting it" only when the restart
    # that follows will be granted
    budget = RestartBudget(limit=2, window=10.0)
    for now in (0.0, 1.0, 2.0, 9.9, 10.0, 11.5, 25.0):
        for _ in range(2):
            assert budget.allows(now) is budget.allows(now)
        said = budget.allows(now)
        assert budget.spend(now) is said
