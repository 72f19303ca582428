"""Helpers several test modules share: servers and process measurements.

Echo and digest handlers for served connections, a seeded echo check
and the check that a connection still echoes to its end,
the file-descriptor, RSS and RLIMIT_NOFILE helpers the load tests use,
the IPv6 loopback check the kernel tests skip by, a client that stops
half-way through its handshake, and the bounded runs of the ``mptls``
command (``run_mptls``, ``serving``) that the command line's tests
share. Nothing here connects or starts a task by itself;
the tests decide what runs and for how long.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import os
import random
import resource
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from mptls.bench.netns import mptcp_unavailable_reason
from mptls.errors import MptlsError
from mptls.mptcp.framing import (
    PREAMBLE,
    Flag,
    Segment,
    SegmentDecoder,
    encode_segment,
)
from mptls.mptcp.options import CapableFlag, MpCapable

# the digest handler's read size
PIECE = 64 * 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_rss() -> int:
    """RSS after a full collection and, on glibc, malloc_trim(0).

    Freed memory the allocator keeps is not a leak; trimming gives it
    back so that what remains is what is still referenced.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss()


def rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def skip_without_ipv6(host: str | None) -> None:
    """Skip the test when ``host`` is IPv6 (or ``None``: every family)
    and no socket can bind ::1 here."""
    if host is not None and ":" not in host:
        return
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")


@contextlib.contextmanager
def file_limit(needed: int) -> Iterator[None]:
    """Raise the soft RLIMIT_NOFILE to ``needed`` for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors, hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A server handler: send back everything read, then half-close."""
    while data := await reader.read(PIECE):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()


class EchoServer:
    """Echoes each connection; counts the ones fully closed."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.closed = 0
        self.failures: list[BaseException] = []
        self.all_closed = asyncio.Event()

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except Exception as exc:  # reported through failures
            self.failures.append(exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.closed += 1
            if self.closed >= self.expected:
                self.all_closed.set()


async def check_echo(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    seed: int,
    size: int,
) -> None:
    """Send ``size`` seeded bytes, half-close, and check that the same
    bytes come back before the server closes."""
    payload = random.Random(seed).randbytes(size)
    writer.write(payload)
    writer.write_eof()
    echoed = await reader.read()
    assert hashlib.sha256(echoed).digest() == (
        hashlib.sha256(payload).digest()
    )


async def still_echoes(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    data: bytes = b"still here",
) -> None:
    """Send ``data`` to an echoing server, half-close, check that the
    same bytes come back before the end of the stream, then close:
    what a connection must still do after what the test did to it.
    Bounded to 10 s, so that a connection the test broke fails it
    rather than hanging it."""
    async with asyncio.timeout(10):
        writer.write(data)
        writer.write_eof()
        assert await reader.read() == data
        writer.close()
        await writer.wait_closed()


# the server: SHA-256 of the upload and the longest pause between reads


async def digest_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer ``"<sha256 hex> <size> <longest pause>"`` once the client
    has sent everything."""
    digest = hashlib.sha256()
    size = 0
    longest = 0.0
    last = time.monotonic()
    try:
        while data := await reader.read(PIECE):
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now
            digest.update(data)
            size += len(data)
        writer.write(f"{digest.hexdigest()} {size} {longest:.4f}".encode())
        await writer.drain()
    except (MptlsError, ConnectionError):
        pass
    finally:
        writer.close()


# leaving a connection while its reader is paused


Handler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]


def reporting_to(
    ends: asyncio.Queue[BaseException | None], body: Handler
) -> Handler:
    """A handler that runs ``body`` and puts how it ended on ``ends``.

    ``None`` for a clean end, else the exception, so that the test (not
    the server's task) sees a failure of the server's side.
    """

    async def report(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await body(reader, writer)
        except Exception as exc:  # reported to the test through the queue
            await ends.put(exc)
        else:
            await ends.put(None)

    return report


def answer_streamer(answer: bytes) -> Handler:
    """A handler that writes ``answer`` at once and reads nothing."""

    async def stream_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(answer)
        with contextlib.suppress(ConnectionError, MptlsError):
            await writer.drain()

    return stream_answer


async def until(condition: Callable[[], object], what: str) -> None:
    """Steps the loop (a bounded number of times) until ``condition``."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} never happened")


async def established(writer: asyncio.StreamWriter, count: int) -> None:
    """Steps the loop until ``count`` subflows are established (10 s)."""
    async with asyncio.timeout(10):
        while True:
            subflows = writer.get_extra_info("mptcp").subflows
            if sum(s.state == "ESTABLISHED" for s in subflows) >= count:
                return
            await asyncio.sleep(0)


def is_paused(reader: asyncio.StreamReader) -> bool:
    return bool(reader._paused)  # type: ignore[attr-defined]


async def leave(writer: asyncio.StreamWriter, how: str) -> None:
    """Close or abort, and wait until the connection has ended."""
    if how == "close":
        writer.close()
    else:
        writer.transport.abort()
    with contextlib.suppress(ConnectionError, MptlsError):
        await asyncio.wait_for(writer.wait_closed(), 15)


# a client that stops in its handshake


def client_hello() -> bytes:
    """A real ClientHello (the standard library's TLS): what a client's
    first segment carries before it waits for the server's answer."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def stalled_in_handshake(
    port: int, wait: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A G client that opens the MPTCP and TLS handshakes in its first
    segment and then says nothing more; returns once the server has
    answered it, so its TLS handshake is under way there."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    syn = Segment(
        Flag.SYN, (MpCapable(flags=CapableFlag.G),), payload=client_hello()
    )
    writer.write(PREAMBLE + encode_segment(syn))
    answer = await asyncio.wait_for(reader.read(65536), wait)
    assert SegmentDecoder().feed(answer)[0].flags & Flag.SYN
    return reader, writer


# the command line, in child processes


def readline_within(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a child's pipe, or a test failure after ``timeout``.

    Reads the descriptor directly, so a silent child cannot hang the
    test until the suite's own timeout.
    """
    deadline = time.monotonic() + timeout
    line = bytearray()
    fd = stream.fileno()
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not ready:
            pytest.fail(
                f"no complete line within {timeout} s: {bytes(line)!r}"
            )
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return bytes(line)


# every subprocess is bounded; together they stay well under 30 s
COMMAND_TIMEOUT = 20.0


def run_mptls(
    *args: str, cwd: Path | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mptls", *args],
        input=stdin,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        cwd=cwd,
        check=False,
    )


def served_by(certs: Path) -> list[str]:
    """``mptls serve`` arguments: any free port, the development
    certificate that ``mptls certs --dir certs`` wrote."""
    return [
        "serve",
        "--port",
        "0",
        "--cert",
        str(certs / "server.pem"),
        "--key",
        str(certs / "server.key"),
    ]


@contextlib.contextmanager
def serving(
    certs: Path, *options: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``mptls serve`` on a free port; yields the process and its port."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mptls", *served_by(certs), *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stderr is not None
        listening = readline_within(server.stderr, COMMAND_TIMEOUT).decode()
        assert listening.startswith("listening on 127.0.0.1:"), listening
        # "listening on 127.0.0.1:PORT", "... (N workers)" with --workers
        yield server, listening.rsplit(":", 1)[1].split()[0]
    finally:
        reap(server)


def reap(process: subprocess.Popen[bytes]) -> None:
    """Kill ``process`` if it still runs, wait for it (bounded) and close
    its pipes: how every test ends a child, so that none outlives the
    test or leaves a pipe for the garbage collector."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=COMMAND_TIMEOUT)
    close_pipes(process)


def close_pipes(process: subprocess.Popen[bytes]) -> None:
    """Close what the test kept of ``process``'s pipes, so that none is
    left for the garbage collector (a ResourceWarning)."""
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def worker_pids(parent: int) -> list[int]:
    """The pool workers among ``parent``'s children (not its tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text()
    return [
        int(pid)
        for pid in children.split()
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def usable_backend(name: str) -> str:
    """``name``, or a skip with the reason where the kernel backend
    cannot run here (no MPTCP in the running kernel)."""
    if name == "kernel":
        reason = mptcp_unavailable_reason()
        if reason:
            pytest.skip(reason)
    return name
