"""Worker processes on one port: every join reaches the worker owning it.

The in-process tests put two routers side by side on two ports, so the
join certainly reaches the wrong worker; the pool tests run real worker
processes behind SO_REUSEPORT, where the kernel picks the worker.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import logging
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pki import Pki
from support import echo as echo_back
from support import stalled_in_handshake, worker_pids

import mptls
from mptls.backends.userspace.restarts import RESTART_LIMIT
from mptls.backends.userspace.worker_logging import LabelledLines
from mptls.backends.userspace.workers import (
    JoinRouter,
    WorkerPool,
    start_workers,
)
from mptls.mptcp.tokens import TokenLayout, token_fields

SERVER_ID = 9


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The workers' handler: send everything back, then close."""
    await echo_back(reader, writer)
    writer.close()


async def serve_workers(pki: Pki, *options: str) -> asyncio.subprocess.Process:
    """``mptls serve --echo`` on a free port with ``options``; stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mptls",
        "serve",
        *options,
        "--echo",
        "--port",
        "0",
        "--cert",
        str(pki.cert_pem),
        "--key",
        str(pki.key_pem),
        stderr=asyncio.subprocess.PIPE,
    )


async def transfer_with_join(
    pki: Pki, port: int, payload: bytes, *, join_port: int | None = None
) -> tuple[bytes, mptls.MptcpInfo]:
    """Connect, join a second subflow from 127.0.0.2, echo ``payload``.

    Returns the SHA-256 of what came back and the client's last view.
    """
    reader, writer = await mptls.open_connection(
        "127.0.0.1", port, ssl=pki.client()
    )
    try:
        await writer.transport.add_path(  # type: ignore[attr-defined]
            ("127.0.0.1", join_port or port), local="127.0.0.2"
        )
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), 30)
        info = writer.get_extra_info("mptcp")
    finally:
        writer.close()
    return hashlib.sha256(echoed).digest(), info


# two routers in one process: the join goes to the other worker's port


class TwoWorkers:
    """Workers 0 and 1 of one server, each on its own port."""

    def __init__(self) -> None:
        self.routers: list[JoinRouter] = []
        self.servers: list[asyncio.AbstractServer] = []

    def port(self, worker_id: int) -> int:
        return int(self.servers[worker_id].sockets[0].getsockname()[1])


@pytest.fixture
async def two_workers(pki: Pki, tmp_path: Path) -> AsyncIterator[TwoWorkers]:
    pair = TwoWorkers()
    for worker_id in (0, 1):
        router = JoinRouter(
            socket_dir=tmp_path,
            server_id=SERVER_ID,
            worker_id=worker_id,
            workers=2,
            layout=TokenLayout(),
        )
        router.open()
        server = await mptls.start_server(
            echo,
            "127.0.0.1",
            0,
            ssl=pki.server(),
            server_id=SERVER_ID,
            worker_id=worker_id,
            join_handoff=router.handoff,
        )
        router.attach(server.mptls_listener)  # type: ignore[attr-defined]
        pair.routers.append(router)
        pair.servers.append(server)
    yield pair
    for router, server in zip(pair.routers, pair.servers, strict=True):
        router.close()
        server.close()


async def test_join_at_the_wrong_worker_is_passed_to_its_owner(
    pki: Pki, two_workers: TwoWorkers
) -> None:
    payload = random.Random(1).randbytes(300_000)
    digest, info = await transfer_with_join(
        pki, two_workers.port(0), payload, join_port=two_workers.port(1)
    )
    assert digest == hashlib.sha256(payload).digest()

    # the token names server 9, worker 0: the owner of the first subflow
    assert info.remote_token is not None
    fields = token_fields(bytes.fromhex(info.remote_token))
    assert (fields.server_id, fields.worker_id) == (SERVER_ID, 0)
    owner, other = (router.stats() for router in two_workers.routers)
    assert (other.handed_off, owner.adopted) == (1, 1)
    assert (owner.first_subflows, owner.joins) == (1, 1)
    assert (other.first_subflows, other.joins) == (0, 0)
    assert len(info.subflows) == 2
    assert {s.subflow_id: s.bytes_sent > 0 for s in info.subflows}[1]


async def test_joins_for_a_dead_worker_warn_once(
    pki: Pki,
    two_workers: TwoWorkers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # worker 0's handoff socket is gone, as when it died: each join that
    # reaches worker 1 with worker 0's token is refused there, and only
    # the first says so at WARNING (forged joins naming a dead worker
    # would otherwise flood the log)
    two_workers.routers[0].close()
    caplog.set_level(logging.DEBUG, logger="mptls.workers")
    _, writer = await mptls.open_connection(
        "127.0.0.1", two_workers.port(0), ssl=pki.client()
    )
    try:
        for _ in range(3):
            with pytest.raises(mptls.JoinRefusedError):
                await writer.transport.add_path(  # type: ignore[attr-defined]
                    ("127.0.0.1", two_workers.port(1))
                )
    finally:
        writer.close()
    lines = [
        r for r in caplog.records if r.getMessage().startswith("cannot hand")
    ]
    assert [r.levelno for r in lines] == [
        logging.WARNING,
        logging.DEBUG,
        logging.DEBUG,
    ]


async def test_join_at_its_own_worker_stays(
    pki: Pki, two_workers: TwoWorkers
) -> None:
    payload = b"stay" * 1000
    digest, _ = await transfer_with_join(pki, two_workers.port(1), payload)
    assert digest == hashlib.sha256(payload).digest()
    stats = [router.stats() for router in two_workers.routers]
    assert [s.handed_off for s in stats] == [0, 0]
    assert (stats[1].first_subflows, stats[1].joins) == (1, 1)


async def test_join_naming_an_absent_worker_is_refused_here(
    pki: Pki, tmp_path: Path
) -> None:
    # worker 1 of a pool of one: no sibling 1 exists, so nothing is sent
    # anywhere and the join is refused like any unknown token
    router = JoinRouter(
        socket_dir=tmp_path,
        server_id=SERVER_ID,
        worker_id=0,
        workers=1,
        layout=TokenLayout(),
    )
    router.open()
    owner = await mptls.start_server(
        echo,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        server_id=SERVER_ID,
        worker_id=1,
    )
    stray = await mptls.start_server(
        echo,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        server_id=SERVER_ID,
        join_handoff=router.handoff,
    )
    router.attach(stray.mptls_listener)  # type: ignore[attr-defined]
    try:
        _, writer = await mptls.open_connection(
            "127.0.0.1", owner.sockets[0].getsockname()[1], ssl=pki.client()
        )
        with pytest.raises(mptls.JoinRefusedError):
            await writer.transport.add_path(  # type: ignore[attr-defined]
                ("127.0.0.1", stray.sockets[0].getsockname()[1])
            )
        writer.close()
    finally:
        router.close()
        owner.close()
        stray.close()
    assert router.stats().handed_off == 0


async def test_a_closing_router_leaves_the_directory_to_the_pool(
    tmp_path: Path,
) -> None:
    socket_dir = tmp_path / "pool"
    socket_dir.mkdir(mode=0o700)

    def router(worker_id: int) -> JoinRouter:
        return JoinRouter(
            socket_dir=socket_dir,
            server_id=SERVER_ID,
            worker_id=worker_id,
            workers=2,
            layout=TokenLayout(),
        )

    # a worker that failed to start closes its router while a sibling
    # may not have bound yet: the sibling failed with "No such file or
    # directory", which the pool reported in place of the real error
    failed = router(0)
    failed.open()
    failed.close()
    sibling = router(1)
    sibling.open()
    assert [path.name for path in socket_dir.iterdir()] == ["worker-1.sock"]
    # the last worker out of a pool whose parent is gone takes it
    sibling.close(remove_dir=True)
    assert not socket_dir.exists()


async def test_a_socket_adopted_as_the_router_closes_is_closed(
    two_workers: TwoWorkers,
) -> None:
    # a sibling's socket arrives and the worker stops before the task
    # that hands it to asyncio has run: the socket must not be left to
    # the garbage collector
    router = two_workers.routers[1]
    ours, theirs = socket.socketpair()
    with ours:
        router._adopt(theirs, b"")
        adopting = list(router._tasks)
        router.close()
        await asyncio.gather(*adopting, return_exceptions=True)
        assert theirs.fileno() == -1
        assert ours.recv(1) == b""  # the peer end saw it close


# a real pool of processes


@pytest.fixture
async def pool(pki: Pki) -> AsyncIterator[WorkerPool]:
    workers = await start_workers(
        echo, "127.0.0.1", 0, workers=4, ssl=pki.server(), server_id=SERVER_ID
    )
    try:
        yield workers
    finally:
        await workers.stop()


async def test_four_workers_two_hundred_connections(
    pki: Pki, pool: WorkerPool
) -> None:
    port = pool.address[1]
    rng = random.Random(4)
    failures: list[BaseException] = []
    owners: set[int] = set()
    for _ in range(10):
        payloads = [rng.randbytes(rng.randrange(1, 40_000)) for _ in range(20)]
        results = await asyncio.gather(
            *(transfer_with_join(pki, port, p) for p in payloads),
            return_exceptions=True,
        )
        for payload, result in zip(payloads, results, strict=True):
            if isinstance(result, BaseException):
                failures.append(result)
                continue
            digest, info = result
            assert digest == hashlib.sha256(payload).digest()
            assert info.remote_token is not None
            owners.add(
                token_fields(bytes.fromhex(info.remote_token)).worker_id
            )
    assert failures == []
    assert owners == {0, 1, 2, 3}

    stats = await pool.stop()
    assert sorted(s.worker_id for s in stats) == [0, 1, 2, 3]
    assert sum(s.first_subflows for s in stats) == 200
    assert sum(s.joins for s in stats) == 200
    handed = sum(s.handed_off for s in stats)
    # SO_REUSEPORT spreads joins by address hash: about 3 in 4 go astray
    assert handed == sum(s.adopted for s in stats)
    assert 50 <= handed <= 200


async def test_stop_leaves_no_process_or_socket(pki: Pki) -> None:
    pool = WorkerPool(echo, "127.0.0.1", 0, workers=2, ssl=pki.server())
    await pool.start()
    pids = pool.pids
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, 0)  # alive
    stats = await pool.stop()
    assert [s.first_subflows for s in stats] == [0, 0]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert pool.pids == ()
    assert multiprocessing.active_children() == []


async def test_two_stops_at_once_share_one(pki: Pki) -> None:
    # `async with pool:` stops the pool as its block ends, while a
    # signal's task may be stopping it too: the second read the pipes
    # the first had closed (a bare OSError, "handle is closed") and
    # waited out grace + start_timeout for replies that never came
    pool = WorkerPool(
        echo, "127.0.0.1", 0, workers=2, ssl=pki.server(), grace=0.5
    )
    await pool.start()
    pids = pool.pids
    async with asyncio.timeout(30):
        first, second = await asyncio.gather(pool.stop(), pool.stop())
    assert [s.worker_id for s in first] == [0, 1]
    assert second == first
    assert await pool.stop() == first
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert multiprocessing.active_children() == []


async def test_a_stop_while_the_pool_starts_stops_it_once_started(
    pki: Pki,
) -> None:
    # both read the workers' pipes: the stop waited out grace +
    # start_timeout for replies the start had taken, and the start
    # then raised a bare OSError ("handle is closed")
    pool = WorkerPool(
        echo, "127.0.0.1", 0, workers=2, ssl=pki.server(), grace=0.5
    )
    starting = asyncio.create_task(pool.start())
    async with asyncio.timeout(20):
        while not pool.pids:
            await asyncio.sleep(0)
        stats = await pool.stop()
        await starting
    assert [s.worker_id for s in stats] == [0, 1]
    assert pool.pids == ()
    assert multiprocessing.active_children() == []


class _Records(logging.Handler):
    """Resolves ``seen`` with the first record at WARNING or above."""

    def __init__(self, seen: asyncio.Future[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self._loop = asyncio.get_running_loop()
        self._seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        self._loop.call_soon_threadsafe(_resolve, self._seen, record)


def _resolve(
    seen: asyncio.Future[logging.LogRecord], record: logging.LogRecord
) -> None:
    if not seen.done():
        seen.set_result(record)


async def test_without_restart_a_dead_worker_stays_down(pki: Pki) -> None:
    pool = WorkerPool(
        echo, "127.0.0.1", 0, workers=3, ssl=pki.server(), restart=False
    )
    await pool.start()
    seen: asyncio.Future[logging.LogRecord] = (
        asyncio.get_running_loop().create_future()
    )
    handler = _Records(seen)
    logging.getLogger("mptls.workers").addHandler(handler)
    try:
        victim = pool.pids[1]
        os.kill(victim, signal.SIGKILL)
        record = await asyncio.wait_for(seen, 10)
        message = record.getMessage()
        assert f"worker 1 (pid {victim})" in message
        assert "2 of 3" in message
        assert message.endswith("not restarted")
        assert pool.exited == {1: -signal.SIGKILL}
        assert pool.down == {1}
        assert pool.restarts == {}
        assert victim not in pool.pids
        assert len(pool.pids) == 2
    finally:
        logging.getLogger("mptls.workers").removeHandler(handler)
        stats = await pool.stop()
    # the others stopped as asked: not reported as exits
    assert sorted(s.worker_id for s in stats) == [0, 2]
    assert pool.exited == {1: -signal.SIGKILL}
    assert multiprocessing.active_children() == []


class LogWatch(logging.Handler):
    """Keeps the records of ``mptls.workers`` and wakes who waits on one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self._loop.call_soon_threadsafe(self._add, record)

    def _add(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    def messages(self, text: str) -> list[str]:
        return [
            message
            for record in self.records
            if text in (message := record.getMessage())
        ]

    async def wait_for(
        self, text: str, timeout: float, *, count: int = 1
    ) -> logging.LogRecord:
        """The ``count``-th record whose message holds ``text``."""
        async with asyncio.timeout(timeout):
            while True:
                found = [r for r in self.records if text in r.getMessage()]
                if len(found) >= count:
                    return found[count - 1]
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def log_watch() -> AsyncIterator[LogWatch]:
    logger = logging.getLogger("mptls.workers")
    level = logger.level
    watch = LogWatch()
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


def assert_gone(pids: Iterator[int] | tuple[int, ...]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert multiprocessing.active_children() == []


async def test_a_killed_worker_is_replaced(
    pki: Pki, log_watch: LogWatch
) -> None:
    pool = WorkerPool(
        echo, "127.0.0.1", 0, workers=3, ssl=pki.server(), server_id=SERVER_ID
    )
    await pool.start()
    first_pids = pool.pids
    try:
        os.kill(first_pids[1], signal.SIGKILL)
        await log_watch.wait_for("worker 1 restarted", 30)
        pids = pool.pids
        assert len(pids) == 3
        assert (pids[0], pids[2]) == (first_pids[0], first_pids[2])
        assert pids[1] not in first_pids
        assert pool.exited == {1: -signal.SIGKILL}
        assert pool.restarts == {1: 1}
        assert pool.down == frozenset()
        (warning,) = log_watch.messages("while serving")
        # the signal by its name, not as "exited with code -9"
        assert f"worker 1 (pid {first_pids[1]}) was killed by SIGKILL" in (
            warning
        )
        assert warning.endswith("2 of 3 workers left, restarting it")

        # the port is served by three again, the new worker 1 included:
        # every join reaches its owner, the ones naming worker 1 too
        owned = []
        rng = random.Random(12)
        for _ in range(3):
            payloads = [
                rng.randbytes(rng.randrange(1, 20_000)) for _ in range(10)
            ]
            results = await asyncio.gather(
                *(
                    transfer_with_join(pki, pool.address[1], p)
                    for p in payloads
                )
            )
            for payload, (digest, info) in zip(payloads, results, strict=True):
                assert digest == hashlib.sha256(payload).digest()
                assert len(info.subflows) == 2
                assert info.remote_token is not None
                token = bytes.fromhex(info.remote_token)
                owned.append(token_fields(token).worker_id)
        assert set(owned) == {0, 1, 2}
    finally:
        stats = await pool.stop()
    new_one = {s.worker_id: s for s in stats}[1]
    # the replacement's own counts: it took these first subflows and
    # routed every join to its tokens, some handed over by a sibling
    assert new_one.first_subflows == owned.count(1)
    assert new_one.joins == owned.count(1)
    assert sorted(s.worker_id for s in stats) == [0, 1, 2]
    assert_gone(first_pids + pids)


async def test_a_worker_that_dies_at_once_is_given_up(
    pki: Pki, tmp_path: Path, log_watch: LogWatch
) -> None:
    # replacements read the certificate again, and it is gone
    cert = shutil.copy(pki.cert_pem, tmp_path / "cert.pem")
    key = shutil.copy(pki.key_pem, tmp_path / "key.pem")
    tls = mptls.TLSConfig(certfile=cert, keyfile=key)
    pool = WorkerPool(echo, "127.0.0.1", 0, workers=2, ssl=tls)
    await pool.start()
    first_pids = pool.pids
    Path(cert).unlink()
    serving = asyncio.ensure_future(pool.serve_forever())
    try:
        os.kill(first_pids[0], signal.SIGKILL)
        given_up = await log_watch.wait_for("left down", 30)
        assert given_up.levelno == logging.ERROR
        assert given_up.getMessage() == (
            f"worker 0 was restarted {RESTART_LIMIT} times within 60 s "
            "and exited again: left down; 1 of 2 workers left"
        )
        failed = log_watch.messages("replacement of worker 0")
        assert len(failed) == RESTART_LIMIT
        assert all("did not start" in message for message in failed)
        assert (pool.down, pool.restarts) == ({0}, {})
        assert pool.pids == (first_pids[1],)
        assert not serving.done()

        # the last one down ends the pool's service
        os.kill(first_pids[1], signal.SIGKILL)
        with pytest.raises(mptls.BackendError, match="all 2 workers are down"):
            await asyncio.wait_for(serving, 30)
        assert pool.down == {0, 1}
        assert pool.pids == ()
    finally:
        serving.cancel()
        await pool.stop()
    assert pool.stats == ()
    assert_gone(first_pids)


async def test_stop_during_a_restart_leaves_no_process(
    pki: Pki, log_watch: LogWatch
) -> None:
    pool = WorkerPool(echo, "127.0.0.1", 0, workers=2, ssl=pki.server())
    await pool.start()
    first_pids = pool.pids
    os.kill(first_pids[0], signal.SIGKILL)
    starting = await log_watch.wait_for("starting worker 0 again", 30)
    replacement = pool.pids[0]
    assert f"(pid {replacement})" in starting.getMessage()

    # the replacement is still importing: it is ended, not waited for,
    # and has no counts to report
    stats = await pool.stop()
    assert pool.restarts == {}
    assert [s.worker_id for s in stats] == [1]
    assert pool.pids == ()
    assert_gone((*first_pids, replacement))
    assert [
        record.getMessage()
        for record in log_watch.records
        if record.levelno >= logging.WARNING
    ] == [
        f"worker 0 (pid {first_pids[0]}) was killed by SIGKILL while "
        "serving; 1 of 2 workers left, restarting it"
    ]


PARENT_DIES = """
import asyncio, functools, os, sys
import mptls
from mptls.backends.userspace.workers import start_workers
from mptls.cli.netcat import _handle_client

async def main():
    tls = mptls.TLSConfig(certfile=sys.argv[1], keyfile=sys.argv[2])
    handler = functools.partial(_handle_client, echo=True, verbose=False)
    pool = await start_workers(handler, "127.0.0.1", 0, workers=2, ssl=tls)
    print(*pool.pids, flush=True)
    os._exit(0)  # no stop(): the workers must notice on their own

asyncio.run(main())
"""


async def wait_exited(pid: int, timeout: float) -> None:
    """Wait for ``pid`` to exit, woken by its pidfd (no polling)."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    exited = loop.create_future()
    loop.add_reader(pidfd, exited.set_result, None)
    try:
        await asyncio.wait_for(exited, timeout)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def test_workers_stop_when_the_parent_dies(
    pki: Pki, tmp_path: Path
) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PARENT_DIES,
        str(pki.cert_pem),
        str(pki.key_pem),
        stdout=asyncio.subprocess.PIPE,
        # where the pool's socket directory is made
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    output, _ = await asyncio.wait_for(parent.communicate(), 60)
    pids = [int(pid) for pid in output.split()]
    assert len(pids) == 2
    for pid in pids:
        await wait_exited(pid, 30)
    # each worker removed its own socket on the way out, and the last
    # one the directory that the dead parent left
    assert list(tmp_path.glob("mptls-workers-*")) == []


async def test_a_worker_that_cannot_start_fails_the_pool(pki: Pki) -> None:
    # an option only the workers' start_server checks (a certificate the
    # pool checks itself, before any worker)
    pool = WorkerPool(
        echo,
        "127.0.0.1",
        0,
        workers=2,
        ssl=pki.server(),
        announce_addrs=[("not an address", 4433)],
    )
    with pytest.raises(mptls.BackendError, match="failed to start"):
        await pool.start()
    assert pool.pids == ()


def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A plain (non-async) callback that writes and never closes."""
    writer.write(b"hello")


async def test_a_started_pool_enters_as_it_is(pki: Pki) -> None:
    # `async with await start_server(...)` is how asyncio servers are
    # used; the pool that start_workers() returns is already started
    async with await start_workers(
        greet, "127.0.0.1", 0, workers=1, ssl=pki.server()
    ) as pool:
        pids = pool.pids
        assert len(pids) == 1
        reader, writer = await mptls.open_connection(
            *pool.address, ssl=pki.client()
        )
        writer.write_eof()
        # the worker runs the callback in a coroutine: once it has
        # returned, the client's end closes the connection there too
        async with asyncio.timeout(20):
            assert await reader.read() == b"hello"
            writer.close()
            await writer.wait_closed()
        stats = await pool.stop()
        assert [s.first_subflows for s in stats] == [1]
    # the block's exit stopped the pool again and kept what it reported
    assert pool.stats == stats
    for pid in pids:
        await wait_exited(pid, 30)
    assert pool.pids == ()


class Halt(Exception):
    """What ``halting`` raises to stop its pool."""


async def halting(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Echo a line; ``halt`` raises :class:`Halt`, ``fail`` another error."""
    line = await reader.readline()
    if line == b"halt\n":
        raise Halt("a handler asked to halt")
    if line == b"fail\n":
        raise LookupError("a handler failed")
    writer.write(line)
    await writer.drain()
    writer.close()


async def say(pki: Pki, port: int, line: bytes) -> bytes:
    """Send ``line``; what came back before the end (or a reset)."""
    reader, writer = await mptls.open_connection(
        "127.0.0.1", port, ssl=pki.client()
    )
    try:
        writer.write(line)
        async with asyncio.timeout(20):
            return await reader.read()
    except (mptls.MptlsError, ConnectionError):
        return b""
    finally:
        writer.close()


async def test_a_stop_on_error_of_a_handler_ends_serving(pki: Pki) -> None:
    pool = WorkerPool(
        halting, "127.0.0.1", 0, workers=2, ssl=pki.server(), stop_on=[Halt]
    )
    async with pool:
        serving = asyncio.ensure_future(pool.serve_forever())
        port = pool.address[1]
        # any other error ends its own connection, and the pool serves on
        assert await say(pki, port, b"fail\n") == b""
        assert await say(pki, port, b"still here\n") == b"still here\n"
        assert await say(pki, port, b"halt\n") == b""
        with pytest.raises(Halt, match=r"^a handler asked to halt$"):
            await asyncio.wait_for(serving, 20)
        # the workers serve on until the pool is stopped
        pids = pool.pids
        assert len(pids) == 2
    for pid in pids:
        await wait_exited(pid, 30)
    assert pool.pids == ()
    assert multiprocessing.active_children() == []


def test_a_pool_started_without_the_main_guard_says_so(
    pki: Pki, tmp_path: Path
) -> None:
    # spawned workers import the main script again: without the guard
    # each one dies starting a pool of its own, before it listens
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """\
            import asyncio, sys
            import mptls
            from mptls.backends.userspace.workers import start_workers

            async def handler(reader, writer):
                writer.close()

            async def main():
                cert, key = sys.argv[1:3]
                tls = mptls.TLSConfig(certfile=cert, keyfile=key)
                pool = await start_workers(
                    handler, "127.0.0.1", 0, workers=1, ssl=tls,
                    start_timeout=20,
                )
                await pool.stop()

            asyncio.run(main())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), str(pki.cert_pem), str(pki.key_pem)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mptls.errors.BackendError: a worker failed"), last
    assert "exited with code 1 before it listened" in last
    assert "__main__" in last


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"workers": 0}, "workers must be"),
        ({"workers": 3, "token_layout": TokenLayout(8, 1)}, "do not fit"),
        # its worker_id_bits were read before anything checked its type
        ({"workers": 2, "token_layout": "8/8"}, "must be a TokenLayout"),
        (
            {"workers": 2, "token_layout": TokenLayout(0, 8, token_bits=32)},
            "token_bits=64",
        ),
        ({"workers": 2, "worker_id": 1}, "sets worker_id itself"),
        # each of these failed start() as "a worker failed to start"
        ({"workers": 2, "backend": "kernel"}, "sets backend itself"),
        ({"workers": 2, "recieve_window": 1}, r"unknown keyword\(s\) recieve"),
        ({"workers": 2, "accept_modes": ["G"]}, "unknown keyword"),
        ({"workers": 2, "keep_alive": True}, "keep_alive= is asyncio's"),
        # every worker serves on asyncio's own loop, which accepts
        # nothing with it: each failed to start, a BackendError
        ({"workers": 2, "backlog": 0}, "accept no connection"),
        ({"workers": 2, "backlog": "100"}, "backlog must be an int"),
        ({"workers": 2, "stop_on": ["Halt"]}, "takes exception classes"),
        ({"workers": 2, "stop_on": [SystemExit]}, "takes exception"),
    ],
)
def test_pool_settings_are_checked(
    pki: Pki, keywords: dict[str, object], message: str
) -> None:
    with pytest.raises(mptls.ConfigurationError, match=message):
        WorkerPool(
            echo,
            "127.0.0.1",
            0,
            ssl=pki.server(),
            **keywords,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("callback", [None, 5])
def test_a_pool_callback_that_cannot_be_called_is_refused(
    pki: Pki, callback: Any
) -> None:
    # start_server refused it, but took the worker's wrapper around it:
    # the pool started, and each client met a TypeError and was reset
    with pytest.raises(mptls.ConfigurationError) as refused:
        WorkerPool(callback, "127.0.0.1", 0, workers=2, ssl=pki.server())
    assert str(refused.value) == (
        f"client_connected_cb must be callable, got {callback!r}"
    )


def test_pool_takes_what_start_server_takes(pki: Pki) -> None:
    # the names a worker hands on to start_server pass the pool's check
    WorkerPool(
        echo,
        "127.0.0.1",
        0,
        workers=2,
        ssl=pki.server(),
        limit=2**17,
        require_app_keys=True,
        ssl_handshake_timeout=5.0,
        ssl_shutdown_timeout=5.0,
        modes=["G"],
        announce_addrs=[("127.0.0.2", 0)],
        close_timeout=3.0,
        backlog=50,
        receive_window=2**20,
    )


@pytest.mark.parametrize(
    ("host", "port", "keywords", "message"),
    [
        # the port was taken modulo 65536: 70000 listened on 4464
        ("127.0.0.1", 70000, {}, "port must be between 0 and 65535"),
        ("127.0.0.1", -1, {}, "port must be between 0 and 65535"),
        ("127.0.0.1", True, {}, "port must be an int"),
        # a TypeError or IndexError from start(), as start_server says
        (None, 0, {}, "host must be"),
        ([], 0, {}, "host must be"),
        # the port is reserved on the first host, by number alone: a
        # socket.gaierror from start()
        ("localhost", 0, {}, "first host must be an IP address"),
        ("", 0, {}, "first host must be an IP address"),
        (["localhost", "127.0.0.1"], 0, {}, "first host must be an IP"),
        # a ValueError or TypeError from stop(), once the workers served
        ("127.0.0.1", 0, {"grace": float("nan")}, "grace must be in"),
        ("127.0.0.1", 0, {"grace": "5"}, "grace must be a number"),
        ("127.0.0.1", 0, {"grace": -1}, "grace must be in"),
        ("127.0.0.1", 0, {"start_timeout": "x"}, "start_timeout must be"),
        ("127.0.0.1", 0, {"start_timeout": 0}, "start_timeout must be in"),
        ("127.0.0.1", 0, {"label_stderr": "yes"}, "label_stderr must be"),
        # True counted as one worker
        ("127.0.0.1", 0, {"workers": True}, "workers must be"),
        # a BackendError, "a worker failed to start", from each worker
        ("127.0.0.1", 0, {"server_id": 256}, "server id 256 does not fit"),
        ("127.0.0.1", 0, {"server_id": True}, "server id True does not"),
    ],
)
def test_pool_addresses_ids_and_waits_are_checked(
    pki: Pki,
    host: object,
    port: object,
    keywords: dict[str, object],
    message: str,
) -> None:
    options: dict[str, object] = {"workers": 2, **keywords}
    with pytest.raises(mptls.ConfigurationError, match=message):
        WorkerPool(
            echo,
            host,  # type: ignore[arg-type]
            port,  # type: ignore[arg-type]
            ssl=pki.server(),
            **options,  # type: ignore[arg-type]
        )


def test_handler_must_pickle(pki: Pki) -> None:
    async def local_handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.close()

    with pytest.raises(mptls.ConfigurationError, match="pickle"):
        WorkerPool(local_handler, "127.0.0.1", 0, workers=2, ssl=pki.server())

    class LocalError(Exception):
        pass

    with pytest.raises(mptls.ConfigurationError, match="pickle"):
        WorkerPool(
            echo,
            "127.0.0.1",
            0,
            workers=2,
            ssl=pki.server(),
            stop_on=[LocalError],
        )
    # a partial of a module-level function is fine
    WorkerPool(
        functools.partial(echo), "127.0.0.1", 0, workers=2, ssl=pki.server()
    )


# the command line


async def test_serve_workers_command(pki: Pki) -> None:
    process = await serve_workers(
        pki, "--workers", "3", "--server-id", str(SERVER_ID)
    )
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line.startswith(b"listening on 127.0.0.1:"), line
        assert line.rstrip().endswith(b"(3 workers)")
        port = int(line.split()[2].split(b":")[1])
        for size in (10, 100_000):
            payload = os.urandom(size)
            digest, info = await transfer_with_join(pki, port, payload)
            assert digest == hashlib.sha256(payload).digest()
            assert info.remote_token is not None
            assert info.remote_token.startswith(f"{SERVER_ID:02x}")
    finally:
        process.send_signal(signal.SIGINT)
        status = await asyncio.wait_for(process.wait(), 30)
    assert status == 0


async def test_serve_workers_exits_when_every_worker_is_down(
    pki: Pki,
) -> None:
    process = await serve_workers(pki, "--workers", "2", "--no-restart")
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line.rstrip().endswith(b"(2 workers)"), line
        workers = worker_pids(process.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        rest = await asyncio.wait_for(process.stderr.read(), 30)
        status = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = rest.decode().splitlines()
    assert status == 1
    assert lines[-1] == (
        "mptls: error: all 2 workers are down and none will be restarted"
    )
    assert sum("not restarted" in one for one in lines) == 2
    assert sum("was killed by SIGKILL" in one for one in lines) == 2
    assert "Traceback" not in rest.decode()
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_no_restart_needs_workers(pki: Pki) -> None:
    from mptls.cli.main import main

    status = main(
        [
            "serve",
            "--no-restart",
            "--cert",
            str(pki.cert_pem),
            "--key",
            str(pki.key_pem),
        ]
    )
    assert status == 2


@pytest.fixture
def not_a_chain(tmp_path: Path) -> Path:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return garbage


def test_a_pool_refuses_a_bad_certificate_before_any_worker(
    pki: Pki, not_a_chain: Path
) -> None:
    # as start_server refuses it, and before N processes each fail on it
    tls = mptls.TLSConfig(certfile=not_a_chain, keyfile=pki.key_pem)
    with pytest.raises(
        mptls.ConfigurationError, match="cannot load the certificate chain"
    ):
        WorkerPool(echo, "127.0.0.1", 0, workers=2, ssl=tls)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_says_a_bad_certificate_alike_with_workers(
    pki: Pki,
    not_a_chain: Path,
    capsys: pytest.CaptureFixture[str],
    workers: str,
) -> None:
    from mptls.cli.main import main

    argv = ["serve", "--port", "0", "--workers", workers]
    argv += ["--cert", str(not_a_chain), "--key", str(pki.key_pem)]
    # bad input, exit status 2, with one worker or several
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"mptls: error: cannot load the certificate chain from "
        f"{str(not_a_chain)!r}"
    ]


async def test_a_worker_left_down_leaves_no_socket(
    pki: Pki, log_watch: LogWatch
) -> None:
    # the survivors remove the pool's directory when the parent is
    # killed, but only an empty one: a dead worker's socket must go
    pool = WorkerPool(
        echo, "127.0.0.1", 0, workers=2, ssl=pki.server(), restart=False
    )
    await pool.start()
    first_pids = pool.pids
    directory = pool._dir
    assert directory is not None
    try:
        os.kill(first_pids[1], signal.SIGKILL)
        await log_watch.wait_for("not restarted", 30)
        assert pool.down == {1}
        assert sorted(p.name for p in directory.iterdir()) == ["worker-0.sock"]
    finally:
        await pool.stop()
    assert not directory.exists()
    assert_gone(first_pids)


async def logging_echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    logging.getLogger("mptls.test").warning("worker handled a connection")
    logging.getLogger("mptls.test").debug("a worker's debug line")
    logging.getLogger("elsewhere").debug("another library's debug line")
    await echo(reader, writer)


@pytest.mark.parametrize("debug", [False, True])
async def test_workers_log_as_their_parent_does(
    pki: Pki,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    debug: bool,
) -> None:
    # a spawned process inherits no logging: a worker's warnings came
    # out as bare lines (Python's last-resort handler), and the CLI's
    # --debug never reached it. It now logs with its parent's format
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    # what the CLI's --debug does: mptls's logger at DEBUG, the root's
    # (other libraries) left at WARNING
    ours = logging.getLogger("mptls")
    level = ours.level
    if debug:
        ours.setLevel(logging.DEBUG)
    try:
        pool = WorkerPool(
            logging_echo, "127.0.0.1", 0, workers=1, ssl=pki.server()
        )
        await pool.start()
        try:
            digest, _ = await transfer_with_join(pki, pool.address[1], b"x")
            assert digest == hashlib.sha256(b"x").digest()
        finally:
            await pool.stop()
    finally:
        ours.setLevel(level)
    err = capfd.readouterr().err
    assert "WARNING mptls.test: worker handled a connection" in err
    assert ("DEBUG mptls.test: a worker's debug line" in err) is debug
    assert "another library's debug line" not in err


async def test_a_handshake_a_stopping_worker_cuts_short_is_no_refusal(
    pki: Pki,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a worker aborts what is left once its grace is over: a client
    # still in its handshake then was not refused, the worker stopped
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    ours = logging.getLogger("mptls")
    level = ours.level
    ours.setLevel(logging.DEBUG)
    try:
        pool = WorkerPool(
            echo, "127.0.0.1", 0, workers=1, ssl=pki.server(), grace=0.1
        )
        await pool.start()
        try:
            _, writer = await stalled_in_handshake(pool.address[1])
        finally:
            await pool.stop()
        writer.close()
    finally:
        ours.setLevel(level)
    err = capfd.readouterr().err
    assert "the server is stopping" in err
    assert "mptls.refusals" not in err


def test_a_workers_lines_begin_with_its_id_however_they_are_written() -> None:
    stream = io.StringIO()
    labelled = LabelledLines(stream, "worker 3: ")
    labelled.write("refused 127.0.0.1:1: ")
    labelled.write("a reason\nWARNING mptls: one\ntwo")
    labelled.write(" halves\n")
    labelled.flush()
    assert stream.getvalue().splitlines() == [
        "worker 3: refused 127.0.0.1:1: a reason",
        "worker 3: WARNING mptls: one",
        "worker 3: two halves",
    ]
