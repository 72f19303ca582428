"""Interop with ordinary TLS programs put on MPTCP by ``mptcpize``.

``openssl s_client`` under ``mptcpize run`` talks to an mptls
kernel-backend server, which sees an MPTCP connection (and sees a
fallback when the same client runs without mptcpize); the mptls
kernel-backend client talks to ``openssl s_server`` under mptcpize. All
on loopback. Needs the ``mptcpize`` and ``openssl`` packages.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import netns
import pytest

import mptls
from mptls.tls.config import TLSConfig

pytestmark = pytest.mark.kernel

TIMEOUT = 15.0


@pytest.fixture(autouse=True)
def _needs_tools() -> None:
    for tool in ("mptcpize", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (Debian packages mptcpize, openssl)")
    reason = netns.mptcp_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[netns.ServerPki]:
    yield netns.write_pki(str(tmp_path))


@contextlib.asynccontextmanager
async def started(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process that is killed by PID if it outlives the block."""
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), TIMEOUT)


class LineEcho:
    """Answers one line with the same line; keeps the server's view."""

    def __init__(self) -> None:
        self.infos: asyncio.Queue[mptls.MptcpInfo] = asyncio.Queue()

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await reader.readline()
            self.infos.put_nowait(writer.get_extra_info("mptcp"))
            writer.write(line)
            await writer.drain()
        except (mptls.MptlsError, ConnectionError):
            pass
        finally:
            writer.close()


def s_client(port: int, ca_pem: str) -> list[str]:
    return [
        "openssl", "s_client",
        "-connect", f"127.0.0.1:{port}",
        "-CAfile", ca_pem,
        "-verify_return_error",
        "-verify_ip", "127.0.0.1",
        "-quiet",
        "-ign_eof",
    ]  # fmt: skip


async def _client_round_trip(
    command: list[str], echo: LineEcho
) -> tuple[bytes, mptls.MptcpInfo]:
    async with started(*command) as process:
        output, _ = await asyncio.wait_for(
            process.communicate(b"hello from openssl\n"), TIMEOUT
        )
    info = await asyncio.wait_for(echo.infos.get(), TIMEOUT)
    return output, info


async def test_mptcpized_s_client_reaches_mptls_server_over_mptcp(
    pki: netns.ServerPki,
) -> None:
    echo = LineEcho()
    server = await mptls.start_server(
        echo.handle,
        "127.0.0.1",
        0,
        ssl=TLSConfig(certfile=pki.server_pem),
        backend="kernel",
    )
    port = server.sockets[0].getsockname()[1]

    output, info = await _client_round_trip(
        ["mptcpize", "run", *s_client(port, pki.ca_pem)], echo
    )
    assert b"hello from openssl" in output
    assert info.mode == "kernel"
    assert info.fallback is False
    assert info.local_token is not None

    # the same client without mptcpize asks for plain TCP, and the
    # server says so instead of pretending
    output, info = await _client_round_trip(s_client(port, pki.ca_pem), echo)
    assert b"hello from openssl" in output
    assert info.mode == "fallback"
    assert info.keys_reason == "the peer did not ask for MPTCP"
    server.close()
    await server.wait_closed()


async def _accept_port(process: asyncio.subprocess.Process) -> int:
    """The port from s_server's ``ACCEPT 127.0.0.1:PORT`` line."""
    assert process.stdout is not None
    while True:
        line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
        if not line:
            raise AssertionError("openssl s_server exited before ACCEPT")
        if line.startswith(b"ACCEPT"):
            return int(line.rsplit(b":", 1)[1])


async def test_mptls_client_reaches_mptcpized_s_server(
    pki: netns.ServerPki,
) -> None:
    command = [
        "mptcpize", "run",
        "openssl", "s_server",
        "-accept", "127.0.0.1:0",
        "-cert", pki.server_pem,
        "-naccept", "1",
        "-rev",
    ]  # fmt: skip
    async with started(*command) as process:
        port = await _accept_port(process)
        reader, writer = await mptls.open_connection(
            "127.0.0.1",
            port,
            ssl=TLSConfig(cafile=pki.ca_pem),
            backend="kernel",
        )
        writer.write(b"kernel mptcp\n")
        answer = await asyncio.wait_for(reader.readline(), TIMEOUT)
        info = writer.get_extra_info("mptcp")
        writer.close()
    # s_server -rev answers each line reversed
    assert answer.strip() == b"pctpm lenrek"
    assert info.mode == "kernel"
    assert info.fallback is False
    assert info.subflows[0].remote_address == ("127.0.0.1", port)
