"""The kernel backend over loopback: MPTCP, fallback, info, keys, options.

Real sockets on 127.0.0.1 and ::1 in the current network namespace; no
privilege needed beyond a kernel with MPTCP enabled. Namespace topologies
are in test_kernel_netns.py.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator
from typing import cast

import pytest
from netns import mptcp_unavailable_reason
from support import skip_without_ipv6

from mptls.backends.base import KeyInstall
from mptls.backends.kernel import KernelBackend
from mptls.backends.kernel import sockets as kernel_sockets
from mptls.backends.kernel.keys import (
    KernelKeyHook,
    KeySupport,
    NoKernelKeys,
)
from mptls.errors import BackendError, ConfigurationError
from mptls.tls.keys import KeyMaterial

pytestmark = pytest.mark.kernel

EKM = bytes(range(16))


@pytest.fixture(autouse=True)
def _needs_mptcp() -> None:
    reason = mptcp_unavailable_reason()
    if reason:
        pytest.skip(reason)


class Echo(asyncio.Protocol):
    """Echoes what it receives; remembers its transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.connected.set_result(transport)

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)


class Collect(asyncio.Protocol):
    """Collects bytes until ``expected`` have arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expected and not self.done.done():
            self.done.set_result(bytes(self.received))


@pytest.fixture
async def backend() -> AsyncIterator[KernelBackend]:
    yield KernelBackend()


async def _echo_round_trip(
    backend: KernelBackend,
    host: str,
    server_factory: object = None,
) -> tuple[asyncio.Transport, Collect, list[Echo]]:
    accepted: list[Echo] = []

    def make_echo() -> Echo:
        echo = Echo()
        accepted.append(echo)
        return echo

    server = await backend.create_server(make_echo, host, 0)
    port = server.sockets[0].getsockname()[1]
    payload = b"mptls kernel backend" * 50
    transport, client = await backend.create_connection(
        lambda: Collect(len(payload)), host, port
    )
    assert isinstance(transport, asyncio.Transport)
    assert isinstance(client, Collect)
    transport.write(payload)
    assert await asyncio.wait_for(client.done, 5) == payload
    server.close()
    return transport, client, accepted


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_mptcp_both_ends_report_kernel_mode(
    backend: KernelBackend, host: str
) -> None:
    skip_without_ipv6(host)
    transport, _, accepted = await _echo_round_trip(backend, host)
    client_info = backend.info(transport)
    assert client_info.backend == "kernel"
    assert client_info.mode == "kernel"
    assert client_info.fallback is False
    assert client_info.local_token is not None
    assert len(client_info.local_token) == 8
    assert client_info.keys_installed is False
    assert "no interface" in client_info.keys_reason
    (subflow,) = client_info.subflows
    assert subflow.remote_address is not None
    assert subflow.remote_address[0] == host
    assert subflow.state == "ESTABLISHED"
    assert subflow.bytes_sent >= 1000
    assert subflow.rtt_ms is not None

    server_transport = accepted[0].transport
    assert server_transport is not None
    server_info = backend.info(server_transport)
    assert server_info.mode == "kernel"
    assert server_info.subflows[0].bytes_received >= 1000
    assert server_info.local_token != client_info.local_token
    transport.close()
    server_transport.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_plain_tcp_server_gives_reported_fallback(
    backend: KernelBackend, host: str
) -> None:
    skip_without_ipv6(host)
    loop = asyncio.get_running_loop()
    plain = await loop.create_server(Echo, host, 0)
    port = plain.sockets[0].getsockname()[1]
    transport, client = await backend.create_connection(
        lambda: Collect(5), host, port
    )
    assert isinstance(transport, asyncio.Transport)
    assert isinstance(client, Collect)
    transport.write(b"hello")
    assert await asyncio.wait_for(client.done, 5) == b"hello"
    report = backend.info(transport)
    assert report.mode == "fallback"
    assert report.fallback is True
    assert report.local_token is None
    assert "did not answer with MPTCP" in report.keys_reason
    (subflow,) = report.subflows
    assert subflow.remote_address == (host, port)
    install = backend.install_keys(transport, KeyMaterial(EKM))
    assert install == KeyInstall(
        False, "the connection fell back to TCP: nothing to key"
    )
    transport.close()
    plain.close()


class FallenBack:
    """A connected MPTCP socket whose connection runs plain TCP."""

    def getsockopt(self, level: int, name: int, size: int = 0) -> int:
        if level == socket.SOL_SOCKET and name == socket.SO_PROTOCOL:
            return kernel_sockets.IPPROTO_MPTCP
        raise OSError(errno.EOPNOTSUPP, "fallen back")


@pytest.mark.parametrize(
    ("limit", "resent", "kernel_did_it"),
    [
        (2, 3, True),
        (2, 2, False),
        (0, 1, True),
        (128, 9, False),
        (None, 9, False),
    ],
)
def test_a_syn_fallback_is_named_only_past_the_kernel_limit(
    monkeypatch: pytest.MonkeyPatch,
    limit: int | None,
    resent: int,
    kernel_did_it: bool,
) -> None:
    monkeypatch.setattr(kernel_sockets, "syn_fallback_limit", lambda: limit)
    sock = cast(socket.socket, FallenBack())
    state = kernel_sockets.connected_fallback_state(sock, resent)
    assert state.fallback is True
    if kernel_did_it:
        assert limit is not None
        assert f"the last {resent - limit} without MPTCP" in state.reason
    else:
        assert state.reason == kernel_sockets.FELL_BACK
    assert kernel_sockets.connected_fallback_state(sock, None).reason == (
        kernel_sockets.FELL_BACK
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_plain_tcp_client_seen_by_server_as_fallback(
    backend: KernelBackend, host: str
) -> None:
    skip_without_ipv6(host)
    accepted: list[Echo] = []

    def make_echo() -> Echo:
        accepted.append(Echo())
        return accepted[-1]

    server = await backend.create_server(make_echo, host, 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    server_transport = await asyncio.wait_for(accepted[0].connected, 5)
    report = backend.info(server_transport)
    assert report.mode == "fallback"
    assert report.keys_reason == "the peer did not ask for MPTCP"
    writer.close()
    server.close()


async def test_install_keys_reports_kernel_cannot_take_them(
    backend: KernelBackend,
) -> None:
    transport, _, _ = await _echo_round_trip(backend, "127.0.0.1")
    keys = KeyMaterial(EKM)
    install = backend.install_keys(transport, keys)
    assert install.installed is False
    assert install.reason == NoKernelKeys().support().reason
    report = backend.info(transport)
    assert report.keys_installed is False
    assert report.key_fingerprint == keys.fingerprint()
    # the keys never show up in the snapshot
    assert EKM.hex() not in repr(report.as_dict())
    assert EKM[:8].hex() not in repr(report.as_dict())
    transport.close()


class RecordingHook(KernelKeyHook):
    """A hook standing in for a patched kernel; records what it was given."""

    def __init__(self) -> None:
        self.given: list[KeyMaterial] = []

    def support(self) -> KeySupport:
        return KeySupport(True, "test hook")

    def install(self, sock: socket.socket, keys: KeyMaterial) -> KeyInstall:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == 262
        self.given.append(keys)
        return KeyInstall(True, "test hook took them")


async def test_key_hook_is_the_one_place_keys_go() -> None:
    hook = RecordingHook()
    backend = KernelBackend(key_hook=hook)
    transport, _, _ = await _echo_round_trip(backend, "127.0.0.1")
    keys = KeyMaterial(EKM)
    assert backend.install_keys(transport, keys).installed
    assert hook.given == [keys]
    report = backend.info(transport)
    assert report.keys_installed is True
    assert report.keys_reason == "test hook took them"
    transport.close()


async def test_server_on_both_families_when_host_is_none(
    backend: KernelBackend,
) -> None:
    skip_without_ipv6(None)
    server = await backend.create_server(Echo, None, 0)
    families = sorted(sock.family for sock in server.sockets)
    assert families == sorted([socket.AF_INET, socket.AF_INET6])
    for sock in server.sockets:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == 262
    server.close()
    await server.wait_closed()
    assert not server.is_serving()


async def test_asyncio_server_keywords_are_taken(
    backend: KernelBackend,
) -> None:
    # asyncio.start_server's own keywords, as a drop-in is called
    server = await backend.create_server(
        Echo,
        "127.0.0.1",
        0,
        start_serving=False,
        reuse_address=True,
        reuse_port=True,
        backlog=8,
    )
    try:
        (sock,) = server.sockets
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert not server.is_serving()
        # not listening yet, as asyncio's own server: a connect is refused
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        await server.start_serving()
        assert server.is_serving()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        payload = b"served once started"
        transport, client = await backend.create_connection(
            lambda: Collect(len(payload)), *sock.getsockname()[:2]
        )
        transport.write(payload)
        assert await asyncio.wait_for(client.done, 5) == payload
        transport.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_unknown_options_are_refused(backend: KernelBackend) -> None:
    with pytest.raises(ConfigurationError, match="require_app_key"):
        await backend.create_connection(
            asyncio.Protocol, "127.0.0.1", 1, require_app_key=True
        )
    with pytest.raises(ConfigurationError, match="announse"):
        await backend.create_server(
            asyncio.Protocol, "127.0.0.1", 0, announse=[]
        )


@pytest.mark.parametrize("timeout", [0, -1.0, "5", float("nan")])
async def test_a_bad_connect_timeout_is_refused_before_connecting(
    backend: KernelBackend, timeout: object
) -> None:
    """connect_timeout is checked as on the userspace backend, before
    any SYN: the port here listens on nothing, so a connect attempt
    would end in a refusal instead."""
    with pytest.raises(ConfigurationError, match="connect_timeout"):
        await backend.create_connection(
            asyncio.Protocol, "127.0.0.1", 1, connect_timeout=timeout
        )


async def test_connection_refused_is_a_backend_error(
    backend: KernelBackend,
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(BackendError, match="cannot connect"):
        await backend.create_connection(asyncio.Protocol, "127.0.0.1", port)


async def test_first_local_address_carries_the_first_subflow(
    backend: KernelBackend,
) -> None:
    server = await backend.create_server(Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await backend.create_connection(
        lambda: Collect(1), "127.0.0.1", port, local_addrs=["127.0.0.3"]
    )
    report = backend.info(transport)
    assert report.subflows[0].local_address is not None
    assert report.subflows[0].local_address[0] == "127.0.0.3"
    transport.close()
    server.close()


async def test_info_after_close_keeps_the_last_snapshot(
    backend: KernelBackend,
) -> None:
    transport, client, _ = await _echo_round_trip(backend, "127.0.0.1")
    before = backend.info(transport)
    transport.abort()
    await asyncio.wait_for(client.lost, 5)
    after = backend.info(transport)
    assert after.local_token == before.local_token
    assert after.mode == "kernel"
    assert after.subflows == ()
    # a backend that never saw the connection open has nothing to say
    with pytest.raises(BackendError, match="closed"):
        KernelBackend().info(transport)


# the receive window every kernel-backend socket starts with


def _receive_options(transport: asyncio.BaseTransport) -> tuple[int, int]:
    sock = transport.get_extra_info("socket")
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT),
    )


def _widened_floor() -> int:
    # the kernel caps the low-water mark at half of tcp_rmem's maximum
    with open("/proc/sys/net/ipv4/tcp_rmem", encoding="ascii") as rmem:
        maximum = int(rmem.read().split()[2])
    return min(kernel_sockets.RECEIVE_WINDOW, maximum // 2)


async def test_sockets_start_with_a_wider_receive_window(
    backend: KernelBackend,
) -> None:
    # a fresh MPTCP socket gets tcp_rmem's default (128 KiB here): a
    # reader slower than the path then closed its window early, which
    # is what the kernel's 200 ms stalls need
    transport, _, accepted = await _echo_round_trip(backend, "127.0.0.1")
    served = accepted[0].transport
    assert served is not None
    for end in (transport, served):
        receive_buffer, low_water = _receive_options(end)
        assert receive_buffer >= _widened_floor()
        # the mark is back at one byte: a small message still wakes
        # the reader (the round trip above was 1,000 bytes)
        assert low_water == 1
    transport.close()
    served.close()


async def test_a_small_message_wakes_the_reader_at_once(
    backend: KernelBackend,
) -> None:
    server = await backend.create_server(Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, client = await backend.create_connection(
        lambda: Collect(1), "127.0.0.1", port
    )
    assert isinstance(client, Collect)
    transport.write(b"x")
    assert await asyncio.wait_for(client.done, 5) == b"x"
    transport.close()
    server.close()


class RefusingSocket:
    """A socket whose kernel knows no SO_RCVLOWAT; records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, name: int, value: int) -> None:
        self.calls.append((level, name, value))
        raise OSError(92, "Protocol not available")


def test_a_kernel_refusing_the_mark_keeps_its_default_window() -> None:
    sock = RefusingSocket()
    kernel_sockets.open_receive_window(sock)  # type: ignore[arg-type]
    # refused once: no second call, nothing raised
    assert sock.calls == [
        (
            socket.SOL_SOCKET,
            socket.SO_RCVLOWAT,
            kernel_sockets.RECEIVE_WINDOW,
        )
    ]
