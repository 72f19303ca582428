"""IPv6 and dual stack: both backends as asyncio would behave.

An address announced in the other family than the first subflow's is
joined (RFC 8684 section 3.4.1 lets a connection mix them); ``peername``
keeps asyncio's four-item IPv6 form after the close; the kernel backend
listens on every interface for ``host=""`` and keeps the scope id of a
link-local address. Everything runs on loopback, or in a namespace this
module creates and removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest
from netns import mptcp_unavailable_reason, run, unavailable_reason
from pki import Pki
from support import established, skip_without_ipv6, still_echoes

import mptls
from mptls.backends.kernel import sockets as kernel_sockets
from mptls.bench.netns import Namespace, new_namespace
from mptls.errors import PathError

LINK_LOCAL = "fe80::1"


def _port_free_on_both() -> int:
    """A port that 127.0.0.1 and ::1 both have free just now."""
    for _ in range(20):
        with (
            socket.socket(socket.AF_INET6) as six,
            socket.socket(socket.AF_INET) as four,
        ):
            six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            six.bind(("::1", 0))
            port = int(six.getsockname()[1])
            try:
                four.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


async def _echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(await reader.read())
    writer.write_eof()
    with contextlib.suppress(ConnectionError, mptls.MptlsError):
        await writer.drain()
    writer.close()


@pytest.mark.parametrize(
    ("first", "announced"), [("127.0.0.1", "::1"), ("::1", "127.0.0.1")]
)
async def test_an_announced_address_of_the_other_family_is_joined(
    pki: Pki, first: str, announced: str
) -> None:
    skip_without_ipv6("::1")
    port = _port_free_on_both()
    server = await mptls.start_server(
        _echo,
        [first, announced],
        port,
        ssl=pki.server(),
        announce_addrs=[(announced, port)],
    )
    async with server:
        # local_addrs names the first subflow's address only: the join
        # to the announced address leaves from one of its own family
        reader, writer = await mptls.open_connection(
            first, port, ssl=pki.client(), local_addrs=[first]
        )
        await established(writer, 2)
        writer.write(b"over both families")
        writer.write_eof()
        assert await reader.read() == b"over both families"
        remotes = {
            s.remote_address[0]
            for s in writer.get_extra_info("mptcp").subflows
            if s.remote_address is not None
        }
        assert remotes == {first, announced}
        writer.close()
        await writer.wait_closed()


async def test_peername_keeps_its_ipv6_form_after_close(pki: Pki) -> None:
    skip_without_ipv6("::1")
    server = await mptls.start_server(_echo, "::1", 0, ssl=pki.server())
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await mptls.open_connection(
            "::1", port, ssl=pki.client()
        )
        live = (
            writer.get_extra_info("peername"),
            writer.get_extra_info("sockname"),
        )
        assert live[0] == ("::1", port, 0, 0)
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        after = (
            writer.get_extra_info("peername"),
            writer.get_extra_info("sockname"),
        )
        assert after == live


# the kernel backend


def _skip_without_mptcp() -> None:
    reason = mptcp_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.kernel
async def test_kernel_server_on_empty_host_listens_everywhere(
    pki: Pki,
) -> None:
    _skip_without_mptcp()
    skip_without_ipv6(None)
    server = await mptls.start_server(
        _echo, "", 0, ssl=pki.server(), backend="kernel"
    )
    async with server:
        bound = {
            (sock.family, sock.getsockname()[0]) for sock in server.sockets
        }
    assert bound == {(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")}


@pytest.mark.kernel
async def test_kernel_resolve_keeps_the_ipv6_scope_id() -> None:
    try:
        scope = socket.if_nametoindex("lo")
    except OSError as exc:
        pytest.skip(f"no interface lo: {exc}")
    loop = asyncio.get_running_loop()
    found = await kernel_sockets.resolve(loop, f"{LINK_LOCAL}%lo", 4433)
    assert found == [(socket.AF_INET6, (LINK_LOCAL, 4433, 0, scope))]


@pytest.fixture
def link_local() -> Iterator[Namespace]:
    """A namespace whose loopback has fe80::1, removed afterwards."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    namespace = new_namespace("v6")
    try:
        namespace.ip(
            "address", "add", f"{LINK_LOCAL}/64", "dev", "lo", "nodad"
        )
        yield namespace
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            run(["ip", "netns", "del", namespace.name])


@contextlib.asynccontextmanager
async def _inside(namespace: Namespace) -> AsyncIterator[None]:
    with namespace.entered():
        yield


@pytest.mark.parametrize(
    "backend", ["userspace", pytest.param("kernel", marks=pytest.mark.kernel)]
)
async def test_link_local_round_trip(
    pki: Pki, link_local: Namespace, backend: str
) -> None:
    scoped = f"{LINK_LOCAL}%lo"
    async with _inside(link_local), asyncio.timeout(15):
        server = await mptls.start_server(
            _echo, scoped, 0, ssl=pki.server(), backend=backend
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await mptls.open_connection(
                scoped,
                port,
                ssl=pki.client(),
                server_hostname="localhost",
                local_addrs=[scoped],
                backend=backend,
            )
            peer = writer.get_extra_info("peername")
            assert peer[0] == LINK_LOCAL
            await still_echoes(reader, writer, b"link-local")


async def test_a_refused_path_brackets_an_ipv6_host(pki: Pki) -> None:
    skip_without_ipv6("::1")

    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(await reader.read())
        writer.close()

    closed = socket.create_server(("::1", 0), family=socket.AF_INET6)
    refused_port = closed.getsockname()[1]
    closed.close()
    server = await mptls.start_server(echo, "::1", 0, ssl=pki.server())
    async with server:
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await mptls.open_connection(
            "::1", port, ssl=pki.client()
        )
        with pytest.raises(PathError) as caught:
            await writer.transport.add_path(("::1", refused_port))  # type: ignore[attr-defined]
        assert f"[::1]:{refused_port}:" in str(caught.value)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10)
