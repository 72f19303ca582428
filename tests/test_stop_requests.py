"""A worker's request to stop its pool, over a pipe in one process."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from mptls.backends.userspace.stop_requests import (
    PoolStopper,
    check_stop_on,
    stop_request,
)
from mptls.errors import BackendError, ConfigurationError


class Halt(Exception):
    """An error that crosses as it is."""


class NoPickle(Exception):
    """An error that cannot be sent."""

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("not to be pickled")


class OneWay(Exception):
    """An error that pickles but does not unpickle: its arguments are
    not the ones its class takes."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")


@pytest.fixture
def pipe() -> Iterator[tuple[Connection, Connection]]:
    parent, worker = multiprocessing.Pipe()
    yield parent, worker
    parent.close()
    worker.close()


def test_the_error_crosses_once(pipe: tuple[Connection, Connection]) -> None:
    parent, worker = pipe
    stopper = PoolStopper(worker, 1)
    stopper(Halt("output closed"))
    stopper(Halt("a second client's"))
    heard = stop_request(parent, 1)
    assert isinstance(heard, Halt)
    assert str(heard) == "output closed"
    assert not parent.poll(0)


def test_other_messages_are_no_request(
    pipe: tuple[Connection, Connection],
) -> None:
    parent, worker = pipe
    worker.send(("stats", None))
    assert stop_request(parent, 0) is None
    worker.close()
    with pytest.raises(EOFError):
        stop_request(parent, 0)


def test_an_error_that_does_not_pickle_says_what_it_was(
    pipe: tuple[Connection, Connection],
) -> None:
    parent, worker = pipe
    PoolStopper(worker, 2)(NoPickle("disk on fire"))
    heard = stop_request(parent, 2)
    assert isinstance(heard, BackendError)
    assert str(heard) == "worker 2: disk on fire"


def test_an_error_that_does_not_unpickle_is_still_a_request(
    pipe: tuple[Connection, Connection],
) -> None:
    parent, worker = pipe
    PoolStopper(worker, 3)(OneWay("output", "gone"))
    heard = stop_request(parent, 3)
    assert isinstance(heard, BackendError)
    assert "worker 3 asked to stop the pool" in str(heard)


def test_a_gone_parent_is_no_error_of_the_worker(
    pipe: tuple[Connection, Connection],
) -> None:
    parent, worker = pipe
    parent.close()
    PoolStopper(worker, 0)(Halt("nobody hears"))


@pytest.mark.parametrize(
    "stop_on", ["Halt", [Halt, "Halt"], [KeyboardInterrupt], [Halt()]]
)
def test_stop_on_refuses_anything_but_exception_classes(
    stop_on: object,
) -> None:
    with pytest.raises(ConfigurationError, match="exception classes"):
        check_stop_on(stop_on)  # type: ignore[arg-type]


def test_stop_on_is_kept_as_a_tuple() -> None:
    assert check_stop_on([Halt, OSError]) == (Halt, OSError)
    assert check_stop_on(()) == ()
