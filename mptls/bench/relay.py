"""A delay relay for benchmarks: a loopback path with a real round trip.

The kernel here has no netem, and on loopback one round trip is mostly
Python work, so latency in round trips means little there. The relay
listens on a loopback address and forwards every TCP connection to one
upstream address, each direction after a fixed one-way ``delay``,
keeping the order of the bytes. A TCP connect costs a round trip as on
a real path: the upstream connect starts one ``delay`` after the accept
(the SYN's way there), and the client's bytes leave no earlier than two
``delay`` after it (when a real SYN|ACK would have come back).

It runs in a process of its own (:class:`RelayProcess`) so that its
timers do not wait for the measured client's GIL. This module must
never listen or connect anywhere but the loopback addresses it is
given, and never outlive ``--lifetime`` or its parent's pipe.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from collections.abc import Sequence

from mptls.bench.peer import ChildServer, until_parent_leaves
from mptls.errors import ConfigurationError

DEFAULT_DELAY = 0.010
READ_SIZE = 1 << 16
# reads a direction holds back at most (each up to READ_SIZE bytes)
QUEUE_READS = 64
# how long closing may wait to flush bytes to a peer that reads nothing
CLOSE_TIMEOUT = 2.0
# (deliver at, bytes); None marks the end of the direction
_Item = tuple[float, bytes | None]


class RelayProcess(ChildServer):
    """A running relay in front of ``upstream``; ``ports["relay"]``."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        delay: float = DEFAULT_DELAY,
        listen: str = "127.0.0.1",
        lifetime: float = 600.0,
    ) -> None:
        for host in (upstream[0], listen):
            if not ipaddress.ip_address(host).is_loopback:
                raise ConfigurationError(f"relay: {host} is not loopback")
        super().__init__(
            [
                sys.executable,
                "-m",
                "mptls.bench.relay",
                "--listen",
                listen,
                "--upstream",
                f"{upstream[0]}:{upstream[1]}",
                "--delay",
                repr(delay),
                "--lifetime",
                repr(lifetime),
            ]
        )


async def _read_into(
    reader: asyncio.StreamReader,
    queue: asyncio.Queue[_Item],
    delay: float,
    not_before: float,
) -> None:
    loop = asyncio.get_running_loop()
    try:
        # a full queue stops the reading: the sender then sees the
        # relay's TCP window close, as behind a slow path
        while data := await reader.read(READ_SIZE):
            await queue.put((max(loop.time(), not_before) + delay, data))
    except ConnectionError:
        pass
    await queue.put((max(loop.time(), not_before) + delay, None))


async def _write_from(
    queue: asyncio.Queue[_Item], writer: asyncio.StreamWriter
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        deliver_at, data = await queue.get()
        wait = deliver_at - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if data is None:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.write(data)
        await writer.drain()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream: tuple[str, int],
    delay: float,
) -> None:
    loop = asyncio.get_running_loop()
    accepted = loop.time()
    outbound: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_READS)
    inbound: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_READS)
    # the client's bytes are timed from now, though they may leave only
    # when its SYN|ACK would have arrived
    reading = loop.create_task(
        _read_into(client_reader, outbound, delay, accepted + 2 * delay)
    )
    tasks = [reading]
    server_writer = None
    try:
        await asyncio.sleep(delay)
        server_reader, server_writer = await asyncio.open_connection(*upstream)
        tasks += [
            loop.create_task(work)
            for work in (
                _write_from(outbound, server_writer),
                _read_into(server_reader, inbound, delay, 0.0),
                _write_from(inbound, client_writer),
            )
        ]
        await asyncio.gather(*tasks)
    except (ConnectionError, OSError):
        pass
    except asyncio.CancelledError:
        # the relay's own shutdown: the connection ends with it
        pass
    finally:
        # one direction failing ends the others too
        for task in tasks:
            task.cancel()
        for writer in (client_writer, server_writer):
            if writer is not None:
                await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close ``writer`` and retrieve how its connection ended.

    A peer's reset leaves its error in the stream's close future; unless
    ``wait_closed`` retrieves it, asyncio prints "Future exception was
    never retrieved" when the stream is collected.
    """
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (ConnectionError, OSError, asyncio.CancelledError):
        # TimeoutError too: a peer that reads nothing keeps the close
        # waiting on unsent bytes; abort() then ends it at once
        writer.transport.abort()


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    upstream = (host, int(port))
    server = await asyncio.start_server(
        lambda r, w: _relay(r, w, upstream, args.delay), args.listen, 0
    )
    port_number = server.sockets[0].getsockname()[1]
    print(json.dumps({"relay": port_number}), flush=True)
    await until_parent_leaves(args.lifetime)
    server.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mptls.bench.relay")
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--delay", type=float, default=DEFAULT_DELAY)
    parser.add_argument("--lifetime", type=float, default=600.0)
    args = parser.parse_args(argv)
    for host in (args.listen, args.upstream.rpartition(":")[0]):
        if not ipaddress.ip_address(host).is_loopback:
            parser.error(f"{host} is not a loopback address")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
