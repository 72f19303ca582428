"""How a worker asks its pool to stop serving, and how the parent hears.

A pool's ``stop_on`` names the errors that no worker can serve past (a
server whose output is gone): a handler that raises one has it sent,
once, over the worker's pipe to the parent, which raises it from
``serve_forever``. Every other message a serving worker sends is none
of this module's business.

This module must never let an error that cannot cross the process
boundary (one that does not pickle, or does not unpickle in the parent)
pass for no request at all: it crosses as a
:class:`~mptls.errors.BackendError` that says what it was.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Sequence
from multiprocessing.connection import Connection as Pipe

from mptls.errors import BackendError, ConfigurationError, shown_value

__all__ = ["STOP_POOL", "PoolStopper", "check_stop_on", "stop_request"]

# the kind of a worker's message that asks the pool to stop
STOP_POOL = "stop-pool"


def check_stop_on(
    stop_on: Sequence[type[Exception]],
) -> tuple[type[Exception], ...]:
    """``stop_on`` as a tuple of exception classes, or refused."""
    if isinstance(stop_on, str | bytes) or not all(
        isinstance(kind, type) and issubclass(kind, Exception)
        for kind in stop_on
    ):
        raise ConfigurationError(
            f"stop_on takes exception classes: {shown_value(stop_on)}"
        )
    return tuple(stop_on)


class PoolStopper:
    """In a worker: hands the parent the error a handler raised to stop
    the pool, the first time only (the handlers of the clients that
    come before the stop may raise it too)."""

    def __init__(self, pipe: Pipe, worker_id: int) -> None:
        self._pipe = pipe
        self._worker_id = worker_id
        self._sent = False

    def __call__(self, exc: Exception) -> None:
        if self._sent:
            return
        self._sent = True
        try:
            self._pipe.send((STOP_POOL, exc))
        except (pickle.PicklingError, TypeError, AttributeError):
            # nothing was written: the error crosses as what it says
            said = BackendError(f"worker {self._worker_id}: {exc}")
            with contextlib.suppress(OSError):
                self._pipe.send((STOP_POOL, said))
        except OSError:
            pass  # the parent is gone: the worker stops by itself


def stop_request(pipe: Pipe, worker_id: int) -> Exception | None:
    """The next message of a serving worker: the error it asks the pool
    to stop with, or None for any other message.

    Raises :class:`EOFError` or :class:`OSError` once the worker's end
    of the pipe is closed.
    """
    try:
        kind, body = pipe.recv()
    except (EOFError, OSError):
        raise
    except Exception:
        # unpickling an error can raise whatever its class does; only a
        # stop request carries an object that is not the library's own
        return BackendError(
            f"worker {worker_id} asked to stop the pool with an error "
            "that cannot be read here"
        )
    if kind != STOP_POOL:
        return None
    if not isinstance(body, Exception):
        return BackendError(f"worker {worker_id} asked to stop the pool")
    return body
