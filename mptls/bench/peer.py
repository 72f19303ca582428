"""The benchmark server, in a process of its own.

Client and server of a benchmark run in different processes, so that
each has a core (and, for the namespace scenarios, its own network
namespace). :class:`PeerProcess` starts ``python -m mptls.bench.peer``,
which listens with every stack it is asked for and prints one JSON line
``{stack: port}``. It stops when its standard input closes or after
``--lifetime`` seconds, whichever comes first, so that it can never
outlive the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from mptls.backends.base import Server
from mptls.bench.stacks import Pki, start_stack_server
from mptls.errors import MptlsError

START_TIMEOUT = 30.0
# the connect scenario's join probe server (mptls.bench.connect)
JOIN_STACK = "mptls-join"
STOP_TIMEOUT = 10.0


class ChildServer:
    """A server process that prints one JSON line ``{name: port}``.

    A context manager: it waits for that line, and stops the process
    (closing its standard input, then by PID) on the way out.
    """

    def __init__(self, command: Sequence[str]) -> None:
        # a process group of its own: Ctrl-C at the terminal reaches
        # only the bench, which stops this server itself (stop()); the
        # server then never prints a traceback of its own
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            process_group=0,
        )
        self.ports: dict[str, int] = {}

    def wait_ready(self) -> dict[str, int]:
        """Block until the server prints its ports (or fails)."""
        stdout = self.process.stdout
        if stdout is None:
            raise MptlsError("benchmark server has no stdout")
        line = stdout.readline()
        if not line:
            code = self.process.wait(timeout=START_TIMEOUT)
            raise MptlsError(f"benchmark server exited ({code})")
        self.ports = {k: int(v) for k, v in json.loads(line).items()}
        return self.ports

    def stop(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Self:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class PeerProcess(ChildServer):
    """A running benchmark server; a context manager that stops it."""

    def __init__(
        self,
        stacks: Sequence[str],
        host: str,
        pki: Pki,
        *,
        loop: str = "asyncio",
        lifetime: float = 1800.0,
        prefix: Sequence[str] = (),
    ) -> None:
        command = [
            *prefix,
            sys.executable,
            "-m",
            "mptls.bench.peer",
            "--stacks",
            ",".join(stacks),
            "--host",
            host,
            "--pki",
            str(pki.ca.parent),
            "--loop",
            loop,
            "--lifetime",
            str(lifetime),
        ]
        super().__init__(command)


def read_rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


async def _serve(args: argparse.Namespace) -> None:
    pki = Pki.in_directory(Path(args.pki))
    servers: dict[str, asyncio.Server | Server] = {}
    for stack in args.stacks.split(","):
        if stack == JOIN_STACK:
            # imported here: the connect scenario itself imports this
            from mptls.bench.connect import start_join_server

            servers[stack] = await start_join_server(args.host, pki)
            continue
        servers[stack] = await start_stack_server(stack, args.host, pki)
    ports = {s: v.sockets[0].getsockname()[1] for s, v in servers.items()}
    print(json.dumps(ports), flush=True)
    await until_parent_leaves(args.lifetime)
    for server in servers.values():
        server.close()


async def until_parent_leaves(lifetime: float) -> None:
    """Return when our standard input closes or ``lifetime`` is over."""
    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()
    descriptor = sys.stdin.fileno()

    def on_stdin() -> None:
        if not os.read(descriptor, 4096):
            loop.remove_reader(descriptor)
            stdin_closed.set()

    loop.add_reader(descriptor, on_stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stdin_closed.wait(), lifetime)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mptls.bench.peer")
    parser.add_argument("--stacks", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--pki", required=True)
    parser.add_argument("--loop", default="asyncio")
    parser.add_argument("--lifetime", type=float, default=1800.0)
    args = parser.parse_args(argv)
    run_loop(_serve(args), args.loop)


def run_loop(coroutine: object, loop: str) -> None:
    """``asyncio.run``, on uvloop's loop when asked for."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)  # type: ignore[arg-type]
        return
    asyncio.run(coroutine)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
