"""What a worker pool refuses before any worker process runs.

Each worker's ``start_server`` would refuse a bad argument too, but N
processes would each fail on it, and the pool could say no more than
that a worker failed to start. The pool
(:mod:`mptls.backends.userspace.workers`) checks its arguments here
first, and refuses a bad one with the
:class:`~mptls.errors.ConfigurationError` the caller can act on.

This module must never start a process, bind a socket or resolve a
host name: the first host is parsed as a number only.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Mapping, Sequence
from typing import Any, cast

from mptls.aio.keywords import (
    ASYNCIO_SERVER_ONLY,
    check_backlog,
    check_port,
    check_server_host,
    refuse_asyncio_only,
)
from mptls.backends.userspace.backend import check_server_keywords
from mptls.backends.userspace.worker_process import WorkerSpec
from mptls.errors import ConfigurationError, shown_value
from mptls.mptcp.config import check_seconds
from mptls.mptcp.tokens import TokenLayout

__all__ = [
    "check_listen_address",
    "check_pickles",
    "check_server_options",
    "check_waits",
    "check_workers",
    "first_host",
]

# start_server's keywords above the backend's, which a worker passes on
_STREAM_KEYWORDS = frozenset(
    {
        "limit",
        "require_app_keys",
        "ssl_handshake_timeout",
        "ssl_shutdown_timeout",
    }
)


def check_workers(workers: object, layout: TokenLayout) -> None:
    """The number of workers, which their ids must fit in ``layout``."""
    # True is an int, and counted as one worker
    if (
        isinstance(workers, bool)
        or not isinstance(workers, int)
        or workers < 1
    ):
        raise ConfigurationError("workers must be an int >= 1")
    if workers > 1 << layout.worker_id_bits:
        raise ConfigurationError(
            f"{workers} workers do not fit in "
            f"{layout.worker_id_bits} worker id bits"
        )


def check_pickles(spec: WorkerSpec) -> None:
    """That ``spec`` pickles, as the spawn start needs: refused as the
    pool is made, with what to pass instead, not later as its start
    spawns a worker."""
    try:
        pickle.dumps(spec)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ConfigurationError(
            "worker processes need a handler and settings that pickle: a "
            "module-level coroutine function (or a functools.partial of "
            f"one) and ssl=TLSConfig(...); {exc}"
        ) from exc


def check_server_options(options: Mapping[str, Any]) -> None:
    """The keywords each worker's ``start_server`` gets: by name, and
    ``backlog`` by value too.

    A misspelt one, or a backlog no worker's loop accepts with, was
    refused only by the workers as they started, so the pool said no
    more than that a worker failed to start.
    """
    for name in ("backend", "join_handoff", "worker_id", "reuse_port"):
        if name in options:
            raise ConfigurationError(f"the pool sets {name} itself")
    refuse_asyncio_only(dict(options), ASYNCIO_SERVER_ONLY)
    check_server_keywords(set(options) - _STREAM_KEYWORDS)
    # each worker serves on asyncio's own loop (asyncio.run)
    check_backlog(options, selector_loop=True)


def check_listen_address(host: object, port: object) -> int:
    """``host`` and ``port`` as ``start_server`` checks them; the port.

    Each worker gets the port the parent reserved, which the socket
    module had taken modulo 65536 (70000 listened on 4464), and a
    missing host failed inside the pool's ``start()`` as a TypeError.
    The pool binds its hosts' addresses itself, so it needs one, and
    reserves the port on the first by number alone, never a lookup: a
    name there failed the pool's ``start()`` with a bare
    ``socket.gaierror``.
    """
    if host is None:
        raise ConfigurationError(
            "host must be a str or a list of str for a pool, got None"
        )
    check_server_host(host)
    first = first_host(cast(str | Sequence[str], host))
    try:
        socket.getaddrinfo(
            first, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        raise ConfigurationError(
            "a pool's first host must be an IP address (its workers share "
            f"the port reserved there), got {shown_value(first)}"
        ) from None
    return check_port(port, server=True)


def check_waits(*, start_timeout: object, grace: object) -> None:
    """The pool's own limits, before any worker runs: a bad one raised
    a bare TypeError or ValueError only as the pool stopped."""
    check_seconds("start_timeout", start_timeout)
    check_seconds("grace", grace, zero=True)


def first_host(host: str | Sequence[str]) -> str:
    # a list of hosts, as asyncio's create_server takes: every worker
    # listens on each of them, on the port reserved on the first
    return host if isinstance(host, str) else host[0]
