"""add_path arguments and worker pools: bad input is a ConfigurationError
raised before any socket is made; a pool listens where its clients are
told to join, and stops its handlers quietly."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pki import Pki
from support import echo, established, still_echoes, until

import mptls
from mptls.backends.base import KeyDerivation
from mptls.backends.userspace import backend as backend_module
from mptls.backends.userspace import paths as paths_module
from mptls.backends.userspace.backend import UserspaceBackend
from mptls.backends.userspace.workers import WorkerPool
from mptls.tls.keys import KeyMaterial


@pytest.fixture
async def server_port(pki: Pki) -> AsyncIterator[int]:
    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        data = await reader.read()
        writer.write(data)
        writer.close()

    server = await mptls.start_server(echo, "127.0.0.1", 0, ssl=pki.server())
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


# each would reach no address beyond loopback even unchecked: a bare
# string, which did, is refused by the same check as these
BAD_PATHS = [
    ({"remote": None}, "remote must be"),
    ({"remote": ("127.0.0.1",)}, "remote must be"),
    ({"remote": 443}, "remote must be"),
    ({"remote": (1270001, 1)}, "remote must be"),
    ({"remote": ("127.0.0.1", 70000)}, "remote port"),
    ({"remote": ("127.0.0.1", -1)}, "remote port"),
    ({"remote": ("127.0.0.1", "443")}, "remote port"),
    ({"local": 123}, "local must be"),
    ({"local": "localhost"}, "local must be"),
    # the system bound these and then picked the source itself: the
    # "new" path came from the first subflow's address
    ({"local": "224.0.0.1"}, "local '224.0.0.1' is a multicast address"),
    ({"local": "::ffff:224.0.0.1"}, "is a multicast address"),
    ({"local": "255.255.255.255"}, "is the broadcast address"),
    # it connected to this host
    ({"remote": ("0.0.0.0", 443)}, "is the unspecified address"),
    ({"remote": ("::", 443), "local": None}, "is the unspecified address"),
    ({"timeout": math.nan}, "timeout"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": None}, "timeout"),
    ({"backup": "yes"}, "backup"),
]


@pytest.mark.parametrize(("change", "match"), BAD_PATHS)
async def test_add_path_refuses_bad_arguments(
    pki: Pki, server_port: int, change: dict[str, object], match: str
) -> None:
    reader, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    arguments: dict[str, object] = {
        "remote": ("127.0.0.1", server_port),
        "local": "127.0.0.2",
        **change,
    }
    remote = arguments.pop("remote")
    transport = writer.transport
    with pytest.raises(mptls.ConfigurationError, match=match):
        await transport.add_path(remote, **arguments)  # type: ignore[attr-defined]
    # nothing was opened, and the connection still works
    subflows = writer.get_extra_info("mptcp").subflows
    assert [s.subflow_id for s in subflows] == [0]
    await still_echoes(reader, writer)


@pytest.mark.parametrize(
    ("remote", "match"),
    [
        ("224.0.0.1", "is a multicast address"),
        ("ff02::1", "is a multicast address"),
        ("255.255.255.255", "is the broadcast address"),
    ],
)
async def test_add_path_refuses_a_remote_that_names_no_peer(
    pki: Pki,
    server_port: int,
    monkeypatch: pytest.MonkeyPatch,
    remote: str,
    match: str,
) -> None:
    # unchecked, these went to a connect beyond loopback: the test's
    # stand-in for it makes sure none is tried
    async def no_connect(*args: object) -> None:
        raise AssertionError(f"a connect to {remote} was tried")

    monkeypatch.setattr(backend_module, "connect_subflow", no_connect)
    _, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    transport = writer.transport
    with pytest.raises(mptls.AddressError, match=match):
        await transport.add_path((remote, server_port))  # type: ignore[attr-defined]
    writer.close()
    await writer.wait_closed()


async def test_an_unspecified_local_address_lets_the_system_pick(
    pki: Pki, server_port: int
) -> None:
    # "any", as asyncio's local_addr=("0.0.0.0", 0) means: still taken
    reader, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    transport = writer.transport
    joined = await transport.add_path(  # type: ignore[attr-defined]
        ("127.0.0.1", server_port), local="0.0.0.0"
    )
    assert joined == 1
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()


async def test_a_client_joins_no_announced_address_that_names_no_peer(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a server refuses to announce these itself, but a peer may still:
    # its client connected to the multicast address, and 0.0.0.0 reached
    # the client's own host
    monkeypatch.setattr(backend_module, "check_announce", list)
    tried: list[str] = []

    async def connect(
        protocol: asyncio.BaseProtocol,
        remote: tuple[str, int],
        local: str | None,
    ) -> None:
        tried.append(remote[0])
        if not ipaddress.ip_address(remote[0]).is_loopback:
            # never sent anywhere: the test's stand-in for the system
            raise OSError(errno.ENETUNREACH, "not sent by this test")
        await real_connect(protocol, remote, local)

    real_connect = paths_module.connect_subflow
    monkeypatch.setattr(paths_module, "connect_subflow", connect)
    announced = ["224.0.0.1", "0.0.0.0", "ff02::1", "255.255.255.255"]
    port = _free_port()
    server = await mptls.start_server(
        echo,
        ["127.0.0.1", "127.0.0.2"],
        port,
        ssl=pki.server(),
        # ADD_ADDRs go out in this order: the last one's join comes after
        # the client has read all the others
        announce_addrs=[(a, 0) for a in announced] + [("127.0.0.2", 0)],
    )
    async with server:
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        await established(writer, 2)
        assert tried == ["127.0.0.2"]
        await still_echoes(reader, writer, b"two paths")


@pytest.mark.parametrize(
    ("subflow_id", "error", "match"),
    [
        # "0" was looked up as is and reported as "no open subflow 0"
        ("0", mptls.ConfigurationError, "subflow_id must be an int, got '0'"),
        (None, mptls.ConfigurationError, "subflow_id must be an int"),
        (True, mptls.ConfigurationError, "subflow_id must be an int"),
        # the message repeated it: a bare ValueError past 4300 digits
        (10**5000, mptls.PathError, "no open subflow an int of 16610 bits"),
    ],
    ids=["str", "none", "bool", "huge"],
)
async def test_remove_path_names_a_bad_subflow_id(
    pki: Pki,
    server_port: int,
    subflow_id: object,
    error: type[Exception],
    match: str,
) -> None:
    reader, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    transport = writer.transport
    with pytest.raises(error, match=match):
        await transport.remove_path(subflow_id)  # type: ignore[attr-defined]
    await still_echoes(reader, writer)


async def test_a_bare_string_is_no_remote(pki: Pki, server_port: int) -> None:
    # read as a (host, port) pair, "127.0.0.1" named host "1", port "2":
    # an address beyond loopback. It is refused before any socket.
    _, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    transport = writer.transport
    with pytest.raises(mptls.ConfigurationError, match="remote must be"):
        await transport.add_path("127.0.0.1")  # type: ignore[attr-defined]
    writer.close()
    await writer.wait_closed()


async def test_the_last_subflow_that_carries_data_stays_while_a_join_waits(
    pki: Pki, server_port: int
) -> None:
    # a join to a TCP server that never answers its MP_JOIN stays under
    # way: removing the one established subflow would leave none
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read()
        writer.close()

    quiet = await asyncio.start_server(silent, "127.0.0.1", 0)
    quiet_port = quiet.sockets[0].getsockname()[1]
    reader, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    transport = writer.transport
    joining = asyncio.create_task(
        transport.add_path(  # type: ignore[attr-defined]
            ("127.0.0.1", quiet_port), local="127.0.0.2", timeout=2
        )
    )
    try:
        await until(
            lambda: len(writer.get_extra_info("mptcp").subflows) == 2,
            "the join's TCP connection",
        )
        states = {
            s.subflow_id: s.state
            for s in writer.get_extra_info("mptcp").subflows
        }
        assert states == {0: "ESTABLISHED", 1: "SYN_SENT"}, states
        with pytest.raises(mptls.PathError, match="last one"):
            await transport.remove_path(0)  # type: ignore[attr-defined]
    finally:
        joining.cancel()
        with contextlib.suppress(asyncio.CancelledError, mptls.MptlsError):
            await joining
        quiet.close()
    await still_echoes(reader, writer)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_serve_workers_listen_on_an_announced_address(
    pki: Pki,
) -> None:
    # one process listens where it tells clients to join (an announced
    # address on its own port); a pool of workers must do the same
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mptls",
        "serve",
        "--workers",
        "2",
        "--echo",
        "--port",
        str(port),
        "--announce",
        "127.0.0.3",
        "--cert",
        str(pki.cert_pem),
        "--key",
        str(pki.key_pem),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert f"127.0.0.3:{port}".encode() in line, line
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        transport = writer.transport
        joined = await transport.add_path(  # type: ignore[attr-defined]
            ("127.0.0.3", port), timeout=10
        )
        assert joined >= 1
        await still_echoes(reader, writer, b"over the announced address")
    finally:
        process.send_signal(signal.SIGINT)
        status = await asyncio.wait_for(process.wait(), 30)
    assert status == 0


async def answer_then_hang(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(await reader.readline())
    await asyncio.Event().wait()


async def test_a_pool_stops_handlers_without_tracebacks(
    pki: Pki, capfd: pytest.CaptureFixture[str]
) -> None:
    pool = WorkerPool(
        answer_then_hang,
        "127.0.0.1",
        0,
        workers=2,
        ssl=pki.server(),
        grace=0.2,
    )
    writers = []
    async with pool:
        for _ in range(4):
            reader, writer = await mptls.open_connection(
                "127.0.0.1", pool.address[1], ssl=pki.client()
            )
            writer.write(b"hello\n")
            # answered: the handler runs, and outlives the grace
            assert await reader.readline() == b"hello\n"
            writers.append(writer)
    for writer in writers:
        writer.close()
    assert sum(s.first_subflows for s in pool.stats) == 4
    assert "Traceback" not in capfd.readouterr().err


@contextlib.contextmanager
def silent_listener() -> Iterator[tuple[str, int]]:
    """A TCP listener that never answers a join: it stays under way."""
    silent = socket.socket()
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        yield silent.getsockname()
    finally:
        silent.close()


async def pending_join(
    writer: asyncio.StreamWriter, remote: tuple[str, int], **options: Any
) -> tuple[asyncio.Task[int], int]:
    """An add_path to ``remote`` whose join is under way (its TCP
    connection made, its MP_JOIN sent), and its subflow id."""
    joining = asyncio.create_task(
        writer.transport.add_path(remote, **options)  # type: ignore[attr-defined]
    )
    async with asyncio.timeout(10):
        while len(writer.get_extra_info("mptcp").subflows) < 2:
            await asyncio.sleep(0)
    return joining, writer.get_extra_info("mptcp").subflows[1].subflow_id


async def test_a_cancelled_add_path_leaves_no_join(pki: Pki) -> None:
    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    server = await mptls.start_server(echo, "127.0.0.1", 0, ssl=pki.server())
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        # cancelled once the TCP connection is up and the MP_JOIN sent:
        # the join would otherwise complete without the caller knowing
        joining, _ = await pending_join(
            writer, ("127.0.0.1", port), local="127.0.0.2"
        )
        joining.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joining
        writer.write(b"ping")
        async with asyncio.timeout(10):
            assert await reader.readexactly(4) == b"ping"
        states = [s.state for s in writer.get_extra_info("mptcp").subflows]
        # the given-up join is closed, as after add_path's own timeout
        assert states == ["ESTABLISHED", "CLOSED"]
        writer.close()
        async with asyncio.timeout(10):
            await writer.wait_closed()


class OtherKeys(UserspaceBackend):
    """A userspace backend whose core takes keys other than its TLS
    session's: its join answers fail the client's HMAC check."""

    def install_keys(
        self,
        transport: asyncio.BaseTransport,
        keys: KeyMaterial,
        *,
        derive: KeyDerivation | None = None,
    ) -> mptls.KeyInstall:
        other = KeyMaterial(bytes(16), generation=keys.generation)
        return super().install_keys(transport, other, derive=derive)


async def test_a_join_this_end_refuses_says_why(pki: Pki) -> None:
    server = await mptls.start_server(
        lambda r, w: None,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        backend=OtherKeys(),
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.wait_for(
            mptls.open_connection("127.0.0.1", port, ssl=pki.client()), 10
        )
        transport = writer.transport
        # the client checks the SYN|ACK's HMAC and refuses it itself
        with pytest.raises(
            mptls.JoinRefusedError, match=r"bad MP_JOIN HMAC in the SYN\|ACK"
        ):
            await transport.add_path(  # type: ignore[attr-defined]
                ("127.0.0.1", port), local="127.0.0.2", timeout=10
            )
        writer.transport.abort()


async def test_add_path_says_when_a_join_may_be_taken_later(pki: Pki) -> None:
    # the server takes one subflow per connection: the join is refused
    # with T (lack of resources), and add_path reports it as before,
    # with the code and the flag for a caller that wants to try later
    server = await mptls.start_server(
        echo, "127.0.0.1", 0, ssl=pki.server(), max_subflows=1
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(
            mptls.open_connection("127.0.0.1", port, ssl=pki.client()), 10
        )
        with pytest.raises(
            mptls.JoinRefusedError, match="may take a join later"
        ) as refused:
            await writer.transport.add_path(  # type: ignore[attr-defined]
                ("127.0.0.1", port), local="127.0.0.2", timeout=10
            )
        assert refused.value.transient
        assert refused.value.reset_reason == 0x02
        writer.write(b"ping")
        async with asyncio.timeout(10):
            assert await reader.readexactly(4) == b"ping"
        states = [s.state for s in writer.get_extra_info("mptcp").subflows]
        # not opened again by itself
        assert states == ["ESTABLISHED", "CLOSED"]
        writer.close()
        async with asyncio.timeout(10):
            await writer.wait_closed()


async def test_an_abort_ends_a_pending_add_path_at_once(
    pki: Pki, server_port: int
) -> None:
    _, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    # the join stays pending, and nothing on that path closes its end
    with silent_listener() as silent:
        joining, _ = await pending_join(writer, silent)
        writer.transport.abort()
        # the join's socket lingers after the abort's reset frame,
        # up to ABORT_LINGER (2 s) here; the caller is told at once
        async with asyncio.timeout(1):
            with pytest.raises(mptls.JoinRefusedError):
                await joining


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port whose listener takes no more connections: its
    accept queue is full, so the kernel drops every further SYN and a
    connect there waits until its caller gives up."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(2):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


class Heard(logging.Handler):
    """Keeps the records that name a subflow it could not open, and
    says when the first came."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.first = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "cannot open a subflow" in record.getMessage():
            self.records.append(record)
            self.first.set()


async def test_a_join_connect_that_times_out_says_so(pki: Pki) -> None:
    heard = Heard()
    logger = logging.getLogger("mptls.userspace")
    logger.addHandler(heard)
    try:
        with silent_port() as silent:
            server = await mptls.start_server(
                echo,
                "127.0.0.1",
                0,
                ssl=pki.server(),
                announce_addrs=[("127.0.0.1", silent)],
            )
            async with server:
                port = server.sockets[0].getsockname()[1]
                _, writer = await mptls.open_connection(
                    "127.0.0.1", port, ssl=pki.client(), join_timeout=0.5
                )
                # the client joins the announced address; its TCP
                # connect gets no answer within join_timeout
                async with asyncio.timeout(10):
                    await heard.first.wait()
                writer.close()
                async with asyncio.timeout(10):
                    await writer.wait_closed()
    finally:
        logger.removeHandler(heard)
    message = heard.records[0].getMessage()
    # wait_for's TimeoutError has no text: the line says what ran out
    reason = "no TCP connection within join_timeout (0.5 s)"
    assert message.endswith(f"to 127.0.0.1:{silent}: {reason}"), message


class HeldFirstKeys(UserspaceBackend):
    """A server backend that installs its first keys only on ``release``:
    its NEW_KEY waits for that, and the client's first keys with it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self._held: set[asyncio.Task[None]] = set()

    def install_keys(
        self,
        transport: asyncio.BaseTransport,
        keys: KeyMaterial,
        *,
        derive: KeyDerivation | None = None,
    ) -> mptls.KeyInstall:
        if keys.generation != 0:
            return super().install_keys(transport, keys, derive=derive)

        async def install() -> None:
            await self.release.wait()
            super(HeldFirstKeys, self).install_keys(
                transport, keys, derive=derive
            )

        task = asyncio.get_running_loop().create_task(install())
        self._held.add(task)
        task.add_done_callback(self._held.discard)
        return mptls.KeyInstall(True, "held for the test")


async def test_add_path_in_mode_e_waits_for_the_first_keys(pki: Pki) -> None:
    # open_connection returns at the end of the TLS handshake; mode E's
    # first keys take the server's NEW_KEY too. A join called for at
    # once was refused (PathError: waiting for the peer to confirm the
    # keys), where rotate_keys() waits for them: add_path waits too
    backend = HeldFirstKeys()
    server = await mptls.start_server(
        echo, "127.0.0.1", 0, ssl=pki.server(), modes=["E"], backend=backend
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(
            mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), mode="e"
            ),
            10,
        )
        transport = writer.transport
        joining = asyncio.create_task(
            transport.add_path(  # type: ignore[attr-defined]
                ("127.0.0.1", port), local="127.0.0.2", timeout=10
            )
        )
        for _ in range(100):
            await asyncio.sleep(0)
        assert writer.get_extra_info("mptcp").key_generation is None
        assert not joining.done()
        backend.release.set()
        async with asyncio.timeout(10):
            subflow_id = await joining
        assert writer.get_extra_info("mptcp").key_generation == 0
        writer.write(b"ping")
        async with asyncio.timeout(10):
            assert await reader.readexactly(4) == b"ping"
        states = {
            s.subflow_id: s.state
            for s in writer.get_extra_info("mptcp").subflows
        }
        assert states[subflow_id] == "ESTABLISHED"
        writer.close()
        async with asyncio.timeout(10):
            await writer.wait_closed()


async def test_add_path_on_an_ended_e_connection_is_refused_at_once(
    pki: Pki,
) -> None:
    # the first keys were still pending when the connection ended: the
    # backend's add_path says the connection is over, where it waited
    # for keys nothing would bring until its timeout
    backend = HeldFirstKeys()
    server = await mptls.start_server(
        echo, "127.0.0.1", 0, ssl=pki.server(), modes=["E"], backend=backend
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.wait_for(
            mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), mode="e"
            ),
            10,
        )
        multipath = writer.transport._tls._transport  # type: ignore[attr-defined]
        writer.transport.abort()
        with pytest.raises(mptls.PathError, match="closed"):
            async with asyncio.timeout(5):
                await UserspaceBackend().add_path(
                    multipath, ("127.0.0.1", port), timeout=10
                )
        backend.release.set()


# "::1%lo" is an IPv6 literal to ipaddress, so the checks let it
# through, but not to glibc's numeric parse (a scope on an address that
# is not link-local): asked without AI_NUMERICHOST, getaddrinfo looked
# the whole string up as a name, on the network
SCOPED = "::1%lo"


@contextlib.contextmanager
def numeric_lookups_only(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[tuple[object, int]]]:
    """The loop's getaddrinfo, faked: each call's host and flags kept,
    a lookup by name refused here rather than sent anywhere."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    asked: list[tuple[object, int]] = []

    async def numeric_only(
        host: object, port: object, **options: int
    ) -> list[tuple[object, ...]]:
        flags = options.get("flags", 0)
        asked.append((host, flags))
        if not flags & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "looked up as a name")
        return await real(host, port, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "getaddrinfo", numeric_only)
    yield asked


async def test_add_path_looks_no_scoped_literal_up_as_a_name(
    pki: Pki, server_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    transport = writer.transport
    with (
        numeric_lookups_only(monkeypatch) as asked,
        pytest.raises(mptls.PathError, match="cannot open a path"),
    ):
        await transport.add_path(  # type: ignore[attr-defined]
            (SCOPED, server_port)
        )
    assert asked
    assert all(flags & socket.AI_NUMERICHOST for _, flags in asked), asked
    await still_echoes(reader, writer)


async def test_add_path_refuses_a_local_scope_it_cannot_use(
    pki: Pki, server_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # found at the connect, it was a PathError that named the remote
    # address ("cannot open a path to 127.0.0.1:...: Name or service
    # not known"), which was never the problem
    reader, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    transport = writer.transport
    with (
        numeric_lookups_only(monkeypatch) as asked,
        pytest.raises(mptls.ConfigurationError) as refused,
    ):
        await transport.add_path(  # type: ignore[attr-defined]
            ("127.0.0.1", server_port), local=SCOPED
        )
    assert str(refused.value).startswith(
        f"local {SCOPED!r} has a scope id this host cannot use"
    )
    assert asked == []
    await still_echoes(reader, writer)


@pytest.mark.parametrize(
    "local_addrs", [[SCOPED], ["127.0.0.1", SCOPED]], ids=["first", "extra"]
)
async def test_a_local_scope_it_cannot_use_is_refused_up_front(
    pki: Pki,
    server_port: int,
    monkeypatch: pytest.MonkeyPatch,
    local_addrs: list[str],
) -> None:
    # the first one failed the connect as a HostLookupError for the
    # remote host ("cannot resolve host '127.0.0.1'"); an extra one
    # became a path that failed each time it was tried, a warning apart
    with (
        numeric_lookups_only(monkeypatch) as asked,
        pytest.raises(mptls.ConfigurationError) as refused,
    ):
        await mptls.open_connection(
            "127.0.0.1",
            server_port,
            ssl=pki.client(),
            local_addrs=local_addrs,
        )
    assert str(refused.value).startswith(
        f"local address {SCOPED!r} has a scope id this host cannot use"
    )
    assert asked == []


async def test_a_join_this_end_removes_is_not_blamed_on_the_peer(
    pki: Pki, server_port: int
) -> None:
    # the add_path waiting for it raised JoinRefusedError, "refused or
    # reset by the far end": a reset to retry, for a path the
    # application had just removed itself
    reader, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    transport = writer.transport
    with silent_listener() as silent:
        joining, subflow_id = await pending_join(writer, silent)
        await transport.remove_path(subflow_id)  # type: ignore[attr-defined]
        async with asyncio.timeout(10):
            with pytest.raises(mptls.PathError) as raised:
                await joining
    assert str(raised.value) == (
        f"subflow {subflow_id} was removed with remove_path before its "
        "join was established"
    )
    assert not isinstance(raised.value, mptls.JoinRefusedError)
    await still_echoes(reader, writer)


@pytest.mark.parametrize("end", ["close", "abort"])
async def test_a_join_this_end_cuts_short_says_so(
    pki: Pki, server_port: int, end: str
) -> None:
    _, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    with silent_listener() as silent:
        joining, subflow_id = await pending_join(writer, silent)
        if end == "close":
            writer.close()
        else:
            writer.transport.abort()
        async with asyncio.timeout(10):
            with pytest.raises(mptls.JoinRefusedError) as raised:
                await joining
    # the far end neither refused nor reset it
    assert str(raised.value) == (
        f"the join of subflow {subflow_id} ended with the connection "
        "before it was established"
    )
    with contextlib.suppress(mptls.MptlsError, ConnectionError):
        async with asyncio.timeout(10):
            await writer.wait_closed()


async def test_a_join_nobody_answers_says_it_timed_out(
    pki: Pki, server_port: int
) -> None:
    # the core gave up after join_timeout, and add_path said "refused
    # or reset by the far end" of a listener that never said a word
    reader, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client(), join_timeout=0.3
    )
    transport = writer.transport
    with silent_listener() as silent:
        async with asyncio.timeout(10):
            with pytest.raises(mptls.JoinTimeoutError) as raised:
                await transport.add_path(silent)  # type: ignore[attr-defined]
    assert str(raised.value) == (
        "the join of subflow 1 did not complete within join_timeout (0.3 s)"
    )
    # nobody refused it: a timeout, and still a failed join for code
    # that catches JoinRefusedError
    assert isinstance(raised.value, mptls.JoinRefusedError)
    assert isinstance(raised.value, mptls.MptlsTimeoutError)
    assert raised.value.errno == errno.ETIMEDOUT
    await still_echoes(reader, writer)


class BannerServer:
    """A TCP server that speaks first and no mptls, as SSH does: the
    port of a path that leads to the wrong service. ``left`` is set
    once a client closed a connection it made there."""

    def __init__(self) -> None:
        self.left = asyncio.Event()
        self.port = 0

    async def greet(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        with contextlib.suppress(ConnectionError):
            await reader.read()
        self.left.set()
        writer.close()


@contextlib.asynccontextmanager
async def banner_server() -> AsyncIterator[BannerServer]:
    banner = BannerServer()
    server = await asyncio.start_server(banner.greet, "127.0.0.1", 0)
    banner.port = server.sockets[0].getsockname()[1]
    async with server:
        yield banner


async def test_a_join_to_the_wrong_service_fails_alone(
    pki: Pki, server_port: int
) -> None:
    # the join's NotMptlsPeerError ended the whole connection, as it
    # does a first subflow's: the data on the working path was lost
    reader, writer = await mptls.open_connection(
        "127.0.0.1", server_port, ssl=pki.client()
    )
    async with banner_server() as banner:
        with pytest.raises(
            mptls.JoinRefusedError, match="does not speak the mptls wire"
        ):
            await writer.transport.add_path(  # type: ignore[attr-defined]
                ("127.0.0.1", banner.port), timeout=10
            )
    await still_echoes(reader, writer)


async def test_an_announced_address_of_the_wrong_service_is_left_alone(
    pki: Pki,
) -> None:
    # a server that announces a port another service listens on ended
    # each client's connection as that client joined it (or, where the
    # banner came before the join began, held it join_timeout)
    async with banner_server() as banner:
        server = await mptls.start_server(
            echo,
            "127.0.0.1",
            0,
            ssl=pki.server(),
            announce_addrs=[("127.0.0.1", banner.port)],
        )
        async with server:
            reader, writer = await mptls.open_connection(
                "127.0.0.1",
                server.sockets[0].getsockname()[1],
                ssl=pki.client(),
            )
            async with asyncio.timeout(5):
                await banner.left.wait()
                states = {
                    s.subflow_id: s.state
                    for s in writer.get_extra_info("mptcp").subflows
                }
                # the join, if it began, is over
                assert states.get(1, "CLOSED") == "CLOSED", states
            await still_echoes(reader, writer)
