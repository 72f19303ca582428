"""Peers that stall or leave early, over the userspace backend.

A server that never speaks TLS makes the client fail with
:class:`~mptls.errors.HandshakeTimeoutError` within ``ssl_handshake_timeout``
(a ``ConnectionAbortedError``, as asyncio's, and a ``TimeoutError``);
a client that closes right after the handshake gives the server a clean
end of stream; a peer that never answers close_notify cannot hold
``wait_closed()`` past ``close_timeout``; records a peer sends after its
own close_notify are ignored (RFC 8446 section 6.1), not delivered and
not buffered. The other engine-level TLS cases
(one byte at a time, session tickets, renegotiation, exporter before
completion) are in tests/test_tls_engine.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any

import pytest
from OpenSSL import SSL
from pki import Pki

import mptls
from mptls.aio import protocol
from mptls.errors import HandshakeTimeoutError, MptlsTimeoutError
from mptls.tls.engine import TLSEngine


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
        with pytest.raises(MptlsTimeoutError) as caught:
            await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), ssl_handshake_timeout=0.5
            )
        assert time.monotonic() - started < 2.0
    # what asyncio's TLS raises for it, so its callers' except clauses
    # still catch it
    assert isinstance(caught.value, ConnectionAbortedError)
    assert isinstance(caught.value, HandshakeTimeoutError)
    # it said only "did not complete", as of a handshake stalled
    # half-way, of a server that never answered
    assert str(caught.value) == (
        "TLS handshake did not complete within 0.5 s: the server sent no "
        "TLS data at all"
    )


async def test_a_handshake_stalled_half_way_is_not_blamed_on_silence(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a server that sent part of its first flight did answer: the
    # timeout says only that the handshake did not complete
    servers: list[TLSEngine] = []
    sent = asyncio.Event()
    init, take_output = TLSEngine.__init__, TLSEngine.take_output

    def recording_init(engine: TLSEngine, *args: Any, **kwargs: Any) -> None:
        init(engine, *args, **kwargs)
        if kwargs.get("server_side"):
            servers.append(engine)

    def first_bytes_only(engine: TLSEngine) -> memoryview:
        output = take_output(engine)
        if engine not in servers or not output:
            return output
        if sent.is_set():
            return memoryview(b"")
        # a record header and one byte of its body, then nothing
        sent.set()
        return output[:6]

    monkeypatch.setattr(TLSEngine, "__init__", recording_init)
    monkeypatch.setattr(TLSEngine, "take_output", first_bytes_only)
    server = await mptls.start_server(
        _closing, "127.0.0.1", 0, ssl=pki.server()
    )
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        with pytest.raises(HandshakeTimeoutError) as caught:
            await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), ssl_handshake_timeout=0.5
            )
        server.close_clients()  # type: ignore[attr-defined]
    assert sent.is_set()
    assert str(caught.value) == "TLS handshake did not complete within 0.5 s"


async def _closing(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.close()


async def test_a_handshake_timeout_of_none_is_the_default_limit(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncio takes None for its default; it must not mean no limit
    monkeypatch.setattr(protocol, "HANDSHAKE_TIMEOUT", 0.5)
    silent = socket.create_server(("127.0.0.1", 0))
    port = int(silent.getsockname()[1])
    with silent:
        started = time.monotonic()
        with pytest.raises(HandshakeTimeoutError, match=r"0\.5 s"):
            await asyncio.wait_for(
                mptls.open_connection(
                    "127.0.0.1",
                    port,
                    ssl=pki.client(),
                    ssl_handshake_timeout=None,
                ),
                10,
            )
        assert time.monotonic() - started < 5.0


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


# data after close_notify (RFC 8446 section 6.1: it MUST be ignored)


def _raw_server(pki: Pki) -> SSL.Connection:
    """A pyOpenSSL server on memory BIOs: it can be made to misbehave."""
    server = SSL.Connection(pki.server().server_context(), None)
    server.set_accept_state()
    return server


def _pump(client: TLSEngine, server: SSL.Connection) -> None:
    for _ in range(10):
        moved = False
        if outgoing := client.data_to_send():
            server.bio_write(outgoing)
            moved = True
        with contextlib.suppress(SSL.WantReadError):
            server.do_handshake()
        with contextlib.suppress(SSL.WantReadError):
            while server.recv(65536):
                pass
        with contextlib.suppress(SSL.WantReadError):
            while incoming := server.bio_read(65536):
                client.receive(incoming)
                moved = True
        if not moved:
            return


def _records_after_close_notify(server: SSL.Connection) -> tuple[bytes, bytes]:
    """("before" + close_notify, a record sent after it) as ciphertext."""
    server.send(b"before")
    server.shutdown()
    closing = _drain(server)
    # a broken peer: clear its sent-shutdown flag and write on
    server.set_shutdown(0)
    server.send(b"after close_notify")
    return closing, _drain(server)


def _drain(server: SSL.Connection) -> bytes:
    chunks = []
    with contextlib.suppress(SSL.WantReadError):
        while True:
            chunks.append(server.bio_read(65536))
    return b"".join(chunks)


@pytest.mark.parametrize("together", [True, False], ids=["same", "later"])
def test_records_after_close_notify_are_ignored(
    pki: Pki, together: bool
) -> None:
    client = TLSEngine(
        pki.client().client_context(),
        server_side=False,
        server_hostname="localhost",
    )
    server = _raw_server(pki)
    client.start()
    _pump(client, server)
    assert client.handshake_complete
    closing, after = _records_after_close_notify(server)
    assert after  # the misbehaving peer really produced a record

    if together:
        client.receive(closing + after)
    else:
        client.receive(closing)
        client.receive(after)

    # the bytes before close_notify arrive, the end is clean, and
    # nothing after it is ever delivered or raised
    assert client.read() == b"before"
    assert client.eof_received
    for _ in range(3):
        client.receive(after)
        client.receive(b"\x17\x03\x03\x00\x05junk!")
    assert client.read() == b""
    # our own direction still works after the peer's close_notify
    client.send(b"reply")
    assert client.data_to_send()


def test_bytes_after_close_notify_are_not_buffered(pki: Pki) -> None:
    client = TLSEngine(
        pki.client().client_context(),
        server_side=False,
        server_hostname="localhost",
    )
    server = _raw_server(pki)
    client.start()
    _pump(client, server)
    closing, _ = _records_after_close_notify(server)
    client.receive(closing)
    before = _rss()
    # 256 MiB of trailing bytes: kept in a BIO, they would show in RSS
    chunk = bytes(1024 * 1024)
    for _ in range(256):
        client.receive(chunk)
    assert _rss() - before < 64 * 1024 * 1024
    assert client.read() == b"before"


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
