"""A handler's write after the peer's failure raises mptls's own error.

An echo handler reads, writes, drains. When the connection fails under
it (a corrupted TLS record, the peer's MP_FASTCLOSE), asyncio's
transports drop the write and the stream tells the failure at the next
drain or read, with its reason. mptls raised ``RuntimeError`` from
``write`` instead, outside its error tree and without the reason.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest
from pki import Pki

import mptls
from mptls.errors import MptlsError

HEADER = struct.Struct("!BBHI")
PREAMBLE_LENGTH = 8
# one write that the client's TLS sends as two records in one frame
TWO_RECORDS = 20000


class CorruptingRelay:
    """Forwards one TCP connection; flips the last byte of the first
    client-to-server frame carrying more than one TLS record."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flipped = False
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        self.writers += [writer, up_writer]
        await asyncio.gather(
            self._pump(reader, up_writer, self._corrupt),
            self._pump(up_reader, writer, bytes),
            return_exceptions=True,
        )
        for each in (writer, up_writer):
            each.transport.abort()

    def _corrupt(self, frame: bytes) -> bytes:
        _, _, payload_length, _ = HEADER.unpack_from(frame)
        if self.flipped or payload_length <= 16384:
            return frame
        self.flipped = True
        return frame[:-1] + bytes([frame[-1] ^ 0x01])

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        change: Callable[[bytes], bytes],
    ) -> None:
        dst.write(await src.readexactly(PREAMBLE_LENGTH))
        while True:
            try:
                header = await src.readexactly(HEADER.size)
            except asyncio.IncompleteReadError:
                break
            _, options, payload, _ = HEADER.unpack(header)
            rest = await src.readexactly(options + payload)
            dst.write(change(header + rest))
            await dst.drain()
        dst.write_eof()


async def _echo_until_failure(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    failed: asyncio.Future[BaseException | None],
) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        failed.set_result(None)
    except Exception as exc:
        failed.set_result(exc)
        writer.transport.abort()


async def test_a_corrupted_record_reaches_the_handler_as_a_tls_error(
    pki: Pki,
) -> None:
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[BaseException | None] = loop.create_future()
    server = await mptls.start_server(
        lambda r, w: _echo_until_failure(r, w, failed),
        "127.0.0.1",
        0,
        ssl=pki.server(),
    )
    relay = CorruptingRelay(server.sockets[0].getsockname()[1])
    relay_server = await relay.start()
    async with server, relay_server:
        reader, writer = await mptls.open_connection(
            "127.0.0.1",
            relay_server.sockets[0].getsockname()[1],
            ssl=pki.client(),
            close_timeout=2,
        )
        # the handler waits in its read when the two records come
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.write(b"x" * TWO_RECORDS)
        error = await asyncio.wait_for(failed, 10)
        assert relay.flipped
        # the first record reached the handler; its echo met the failure
        assert isinstance(error, MptlsError), repr(error)
        assert "bad record mac" in str(error)
        with pytest.raises(MptlsError):
            await asyncio.wait_for(reader.read(), 10)
        writer.transport.abort()
        for each in relay.writers:
            each.transport.abort()


@pytest.mark.parametrize("last_words", ["write", "write_eof"])
async def test_a_write_between_the_peers_fastclose_and_its_news(
    pki: Pki, last_words: str
) -> None:
    # the peer's MP_FASTCLOSE ends the multipath transport, which tells
    # the TLS layer one loop turn later; a handler that runs in between
    # (its drain woke first) writes to a finished transport
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[BaseException | None] = loop.create_future()
    ready = asyncio.Event()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        backend = writer.transport._tls._transport  # type: ignore[attr-defined]
        finish = backend._finish
        finished = asyncio.Event()

        def finish_and_wake(error: Exception | None) -> None:
            finished.set()  # the handler's turn comes before the news
            finish(error)

        backend._finish = finish_and_wake
        try:
            await reader.readexactly(5)
            ready.set()
            await finished.wait()
            if last_words == "write":
                writer.write(b"late")
            else:
                writer.write_eof()  # close_notify and DATA_FIN
            await writer.drain()
            await reader.read()
            failed.set_result(None)
        except Exception as exc:
            failed.set_result(exc)
            writer.transport.abort()

    server = await mptls.start_server(
        handler, "127.0.0.1", 0, ssl=pki.server()
    )
    async with server:
        _, writer = await mptls.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1], ssl=pki.client()
        )
        writer.write(b"hello")
        await asyncio.wait_for(ready.wait(), 10)
        writer.transport.abort()  # MP_FASTCLOSE
        error = await asyncio.wait_for(failed, 10)
        assert isinstance(error, MptlsError), repr(error)
        assert isinstance(error, ConnectionResetError)
