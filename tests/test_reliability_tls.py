"""Peers that stall or leave early, over the userspace backend.

A server that never speaks TLS makes the client fail with
:class:`~mptls.errors.MptlsTimeoutError` within ``ssl_handshake_timeout``;
a client that closes right after the handshake gives the server a clean
end of stream; a peer that never answers close_notify cannot hold
``wait_closed()`` past ``close_timeout``. The engine-level TLS cases
(one byte at a time, session tickets, renegotiation, exporter before
completion) are in tests/test_tls_engine.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pki import Pki, make_pki

import mptls
from mptls.errors import MptlsTimeoutError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_silent_server_times_out_the_handshake(pki: Pki) -> None:
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # reads what the client sends and never answers
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        started = time.monotonic()
        with pytest.raises(MptlsTimeoutError):
            await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), ssl_handshake_timeout=0.5
            )
        assert time.monotonic() - started < 2.0


async def test_client_closing_right_after_the_handshake(pki: Pki) -> None:
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        seen.set_result(await reader.read())
        writer.close()

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server()
    )
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        _, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5.0)
        assert await asyncio.wait_for(seen, 5.0) == b""


async def test_close_returns_when_close_notify_is_never_answered(
    pki: Pki,
) -> None:
    release = asyncio.Event()

    async def never_closes(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # reads the client's close_notify and stays open
        await reader.read()
        await release.wait()
        writer.close()

    server = await mptls.start_server(
        never_closes, "127.0.0.1", 0, ssl=pki.server()
    )
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        _, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client(), close_timeout=0.5
        )
        started = time.monotonic()
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5.0)
        elapsed = time.monotonic() - started
        release.set()
    assert 0.4 <= elapsed < 2.0
