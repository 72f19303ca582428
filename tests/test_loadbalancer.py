"""mptls servers behind real HAProxy instances that share no state.

Three servers (ids 1, 2, 3) sit behind two HAProxy processes, one per
path, both running examples/haproxy/haproxy.cfg. Clients open their
first subflow through the first balancer and join through the second,
which never saw those first subflows. In G mode the join token names
its server, so every join lands on its owner; with RFC 8684 tokens
(hashes of keys) the second balancer can only guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pki import Pki

import mptls
from mptls.mptcp.tokens import token_fields

EXAMPLE = Path(__file__).parents[1] / "examples" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy")
SERVER_IDS = (1, 2, 3)
CLIENTS = 30
CHUNK = 64 * 1024

needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed"
)


# the servers


@dataclass
class Farm:
    """Three mptls servers and what each one's handler saw."""

    mode: str
    ports: dict[int, int] = field(default_factory=dict)
    seen: dict[int, list[mptls.MptcpInfo]] = field(default_factory=dict)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)


async def start_farm(pki: Pki, mode: str) -> Farm:
    farm = Farm(mode)
    for server_id in SERVER_IDS:
        seen: list[mptls.MptcpInfo] = []

        async def echo(
            reader: asyncio.StreamReader,
            writer: asyncio.StreamWriter,
            seen: list[mptls.MptcpInfo] = seen,
        ) -> None:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
            # recorded before the EOF that tells the client we are done
            seen.append(writer.get_extra_info("mptcp"))
            writer.write_eof()
            await writer.drain()
            writer.close()

        server = await mptls.start_server(
            echo,
            "127.0.0.1",
            0,
            ssl=pki.server(),
            modes=(mode,),
            server_id=server_id,
        )
        farm.servers.append(server)
        farm.ports[server_id] = server.sockets[0].getsockname()[1]
        farm.seen[server_id] = seen
    return farm


@pytest.fixture(params=["G", "rfc8684"])
async def farm(
    request: pytest.FixtureRequest, pki: Pki
) -> AsyncIterator[Farm]:
    started = await start_farm(pki, request.param)
    yield started
    for server in started.servers:
        server.close()


# the balancers


class Balancer:
    """One HAProxy process running the example configuration.

    The test owns the listening socket and HAProxy inherits it
    (``fd@``): connections wait in its backlog until HAProxy accepts
    them, so nothing needs to poll for readiness, and a restarted
    HAProxy takes over the very same socket.
    """

    def __init__(self, config: Path, farm: Farm) -> None:
        self.config = config
        self.log = config.with_name(f"haproxy-{id(self)}.log")
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listening.getsockname()[1])
        fd = self.listening.fileno()
        self.env = {
            **os.environ,
            "MPTLS_LB_BIND": f"fd@{fd}",
            **{
                f"MPTLS_SERVER_{server_id}": f"127.0.0.1:{server_port}"
                for server_id, server_port in farm.ports.items()
            },
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert HAPROXY is not None
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                HAPROXY,
                "-db",
                "-f",
                str(self.config),
                env=self.env,
                pass_fds=(self.listening.fileno(),),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )

    def check_alive(self) -> None:
        """Fail with HAProxy's own words if it has exited."""
        assert self.process is not None
        if self.process.returncode is not None:
            pytest.fail(f"haproxy exited:\n{self.log.read_text()}")

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def close(self) -> None:
        self.listening.close()


@pytest.fixture
async def balancers(
    farm: Farm, tmp_path: Path
) -> AsyncIterator[tuple[Balancer, Balancer]]:
    config = tmp_path / "haproxy.cfg"
    config.write_text(EXAMPLE.read_text())
    first = Balancer(config, farm)
    second = Balancer(config, farm)
    try:
        await first.start()
        await second.start()
        yield first, second
    finally:
        for balancer in (first, second):
            await balancer.stop()
            balancer.close()


# the clients


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    payload: bytes
    joined: bool | None = None


async def open_clients(
    pki: Pki, balancer: Balancer, mode: str, count: int
) -> list[Client]:
    """``count`` connections through ``balancer``."""
    rng = random.Random(count)
    clients = []
    for _ in range(count):
        try:
            reader, writer = await mptls.open_connection(
                "127.0.0.1",
                balancer.port,
                ssl=pki.client(),
                mode=mode,
                ssl_handshake_timeout=10,
            )
        except mptls.MptlsTimeoutError:
            balancer.check_alive()
            raise
        payload = rng.randbytes(rng.randrange(1, 200_000))
        clients.append(Client(reader, writer, payload))
    return clients


async def join(client: Client, port: int) -> None:
    """One more subflow, through the balancer at ``port``."""
    transport = client.writer.transport
    try:
        await transport.add_path(("127.0.0.1", port))  # type: ignore[attr-defined]
    except mptls.JoinRefusedError:
        client.joined = False
    else:
        client.joined = True


async def transfer(client: Client) -> bytes:
    """Echo the client's payload; the SHA-256 of what came back."""
    client.writer.write(client.payload)
    client.writer.write_eof()
    try:
        echoed = await asyncio.wait_for(client.reader.read(), 30)
    finally:
        client.writer.close()
    return hashlib.sha256(echoed).digest()


async def run_clients(
    pki: Pki, first: Balancer, second: Balancer, mode: str, count: int
) -> list[Client]:
    clients = await open_clients(pki, first, mode, count)
    # joins in a shuffled order: in RFC 8684 mode the second balancer's
    # round robin must not line up with the first one's by accident
    order = list(clients)
    random.Random(7).shuffle(order)
    for client in order:
        await join(client, second.port)
    digests = await asyncio.gather(*(transfer(c) for c in clients))
    for client, digest in zip(clients, digests, strict=True):
        assert digest == hashlib.sha256(client.payload).digest()
    return clients


def owner_of(info: mptls.MptcpInfo) -> int:
    assert info.local_token is not None
    return token_fields(bytes.fromhex(info.local_token)).server_id


@needs_haproxy
async def test_joins_through_a_second_balancer(
    pki: Pki, farm: Farm, balancers: tuple[Balancer, Balancer]
) -> None:
    first, second = balancers
    mode = farm.mode
    clients = await run_clients(pki, first, second, mode, CLIENTS)

    joined = sum(1 for c in clients if c.joined)
    seen = {sid: infos for sid, infos in farm.seen.items()}
    # round robin on the first balancer: ten first subflows each
    assert sorted(len(infos) for infos in seen.values()) == [10, 10, 10]
    with_join = {
        sid: sum(1 for info in infos if len(info.subflows) == 2)
        for sid, infos in seen.items()
    }
    assert sum(with_join.values()) == joined
    if mode == "G":
        # every join landed on the server that owns its connection
        assert joined == CLIENTS
        for server_id, infos in seen.items():
            assert {owner_of(info) for info in infos} == {server_id}
    else:
        # the second balancer cannot read a server from a hashed token:
        # the joins it sent to another server were refused there
        assert joined <= CLIENTS - 10


@needs_haproxy
@pytest.mark.parametrize("farm", ["G"], indirect=True)
async def test_restart_between_first_subflow_and_join(
    pki: Pki, farm: Farm, balancers: tuple[Balancer, Balancer]
) -> None:
    first, second = balancers
    clients = await open_clients(pki, first, farm.mode, 6)

    # a fresh process: nothing of the first subflows survives in it
    old_pid = second.process.pid if second.process else None
    await second.restart()
    assert second.process is not None and second.process.pid != old_pid

    for client in clients:
        await join(client, second.port)
    assert [c.joined for c in clients] == [True] * 6
    digests = await asyncio.gather(*(transfer(c) for c in clients))
    for client, digest in zip(clients, digests, strict=True):
        assert digest == hashlib.sha256(client.payload).digest()


@needs_haproxy
async def test_the_example_configuration_is_valid(tmp_path: Path) -> None:
    assert HAPROXY is not None
    env = {
        **os.environ,
        "MPTLS_LB_BIND": "127.0.0.1:1",
        **{f"MPTLS_SERVER_{sid}": "127.0.0.1:2" for sid in SERVER_IDS},
    }
    check = await asyncio.create_subprocess_exec(
        HAPROXY,
        "-c",
        "-f",
        str(EXAMPLE),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(check.communicate(), 30)
    assert check.returncode == 0, output.decode()
    with contextlib.suppress(ProcessLookupError):
        check.kill()


# the path calls the balancer tests rely on


@pytest.fixture
async def one_server(pki: Pki) -> AsyncIterator[int]:
    farm = await start_farm(pki, "G")
    yield farm.ports[SERVER_IDS[0]]
    for server in farm.servers:
        server.close()


async def test_remove_path_leaves_the_other_subflow(
    pki: Pki, one_server: int
) -> None:
    reader, writer = await mptls.open_connection(
        "127.0.0.1", one_server, ssl=pki.client()
    )
    transport = writer.transport
    subflow_id = await transport.add_path(  # type: ignore[attr-defined]
        ("127.0.0.1", one_server), local="127.0.0.2"
    )
    assert subflow_id == 1
    with pytest.raises(mptls.PathError, match="no open subflow 7"):
        await transport.remove_path(7)  # type: ignore[attr-defined]

    # the first subflow goes; the data goes over the join
    await transport.remove_path(0)  # type: ignore[attr-defined]
    with pytest.raises(mptls.PathError, match="last one"):
        await transport.remove_path(1)  # type: ignore[attr-defined]
    client = Client(reader, writer, random.Random(3).randbytes(100_000))
    assert await transfer(client) == hashlib.sha256(client.payload).digest()
    sent = {
        s.subflow_id: s.bytes_sent
        for s in writer.get_extra_info("mptcp").subflows
    }
    assert sent[1] >= len(client.payload)


async def test_add_path_to_nowhere_is_a_path_error(
    pki: Pki, one_server: int
) -> None:
    _, writer = await mptls.open_connection(
        "127.0.0.1", one_server, ssl=pki.client()
    )
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(mptls.PathError, match="cannot open a path"):
            await writer.transport.add_path(  # type: ignore[attr-defined]
                ("127.0.0.1", port)
            )
    writer.close()


async def test_kernel_backend_says_why_it_adds_no_path() -> None:
    from mptls.backends.kernel.backend import KernelBackend

    backend = KernelBackend()
    transport = asyncio.Transport()
    with pytest.raises(mptls.PathError, match="manage_paths"):
        await backend.add_path(transport, ("127.0.0.1", 1))
    with pytest.raises(mptls.PathError, match="kernel"):
        await backend.remove_path(transport, 1)
