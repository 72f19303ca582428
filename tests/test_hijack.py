"""The difference the product exists to make, on real sockets.

An observer records every byte of a connection's first subflow, then
opens its own subflow to the server with the token it saw. In G mode the
MP_CAPABLE exchange carried only tokens and the keys came from TLS: the
observer cannot produce the join HMAC and is refused with MP_TCPRST,
while the connection carries on. In RFC 8684 mode the keys crossed the
wire in the clear: the observer computes a valid HMAC and its subflow is
accepted into someone else's connection.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from pki import Pki

import mptls
from mptls.mptcp.crypto import join_hmac, rfc8684_token
from mptls.mptcp.framing import (
    PREAMBLE,
    Flag,
    Segment,
    SegmentDecoder,
    encode_segment,
)
from mptls.mptcp.options import (
    MpCapable,
    MpJoinAck,
    MpJoinSyn,
    MpJoinSynAck,
    MpTcpRst,
    ResetReason,
)


class Tap:
    """A TCP relay that records both directions of what it forwards."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.upstream = bytearray()  # client -> server
        self.downstream = bytearray()  # server -> client
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )

        async def pump(
            src: asyncio.StreamReader,
            dst: asyncio.StreamWriter,
            record: bytearray,
        ) -> None:
            while data := await src.read(65536):
                record += data
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

        await asyncio.gather(
            pump(reader, up_writer, self.upstream),
            pump(up_reader, writer, self.downstream),
            return_exceptions=True,
        )
        writer.close()
        up_writer.close()


def capable_options(stream: bytes) -> list[MpCapable]:
    return [
        option
        for segment in SegmentDecoder().feed(stream)
        for option in segment.options
        if isinstance(option, MpCapable)
    ]


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


@pytest.fixture
async def observed(
    request: pytest.FixtureRequest, pki: Pki
) -> AsyncIterator[tuple[asyncio.AbstractServer, Tap, tuple]]:
    mode = request.param
    server = await mptls.start_server(
        echo, "127.0.0.1", 0, ssl=pki.server(), modes=(mode,)
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        tap = Tap(port)
        tap_port = await tap.start()
        reader, writer = await mptls.open_connection(
            "127.0.0.1", tap_port, ssl=pki.client(), mode=mode
        )
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        yield server, tap, (reader, writer)
        writer.close()
        assert tap.server is not None
        tap.server.close()


async def join_as_observer(
    port: int, token: bytes, hmac_for: object
) -> list[Segment]:
    """Open a subflow with ``token``; answer with ``hmac_for(syn_ack)``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    decoder = SegmentDecoder()
    nonce = int.from_bytes(os.urandom(4), "big")
    syn = Segment(Flag.SYN, (MpJoinSyn(token, nonce, address_id=7),))
    writer.write(PREAMBLE + encode_segment(syn))
    segments: list[Segment] = []
    while not segments:
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, "server closed without answering the join"
        segments = decoder.feed(data)
    syn_ack = segments[0].options[0]
    assert isinstance(syn_ack, MpJoinSynAck)
    ack = Segment(Flag.ACK, (MpJoinAck(hmac_for(nonce, syn_ack)),))
    writer.write(encode_segment(ack))
    answer: list[Segment] = []
    while not answer:
        data = await asyncio.wait_for(reader.read(65536), 10)
        if not data:
            break
        answer = decoder.feed(data)
    writer.close()
    return answer


@pytest.mark.parametrize("observed", ["G"], indirect=True)
async def test_g_mode_join_from_observer_is_refused(observed: tuple) -> None:
    server, tap, (reader, writer) = observed
    seen = capable_options(bytes(tap.upstream))
    third_ack = seen[-1]
    assert third_ack.flags & 0x02  # G
    token_b = third_ack.receiver_key
    assert token_b is not None

    # the observer knows the tokens, not the keys: any HMAC it likes
    answer = await join_as_observer(
        server.sockets[0].getsockname()[1],
        token_b,
        lambda nonce, syn_ack: os.urandom(20),
    )
    assert answer and answer[0].flags & Flag.RST
    resets = [o for o in answer[0].options if isinstance(o, MpTcpRst)]
    assert resets and resets[0].reason == ResetReason.MPTCP_ERROR

    # the victim's connection carries on undisturbed, on one subflow
    writer.write(b"after")
    assert await reader.readexactly(5) == b"after"
    info = writer.get_extra_info("mptcp")
    assert len(info.subflows) == 1


@pytest.mark.parametrize("observed", ["rfc8684"], indirect=True)
async def test_rfc8684_join_from_observer_is_accepted(
    observed: tuple,
) -> None:
    server, tap, (_reader, _writer) = observed
    third_ack = capable_options(bytes(tap.upstream))[-1]
    assert third_ack.flags & 0x01  # H: keys in the clear
    key_a, key_b = third_ack.sender_key, third_ack.receiver_key
    assert key_a is not None and key_b is not None

    # everything the observer needs was on the wire
    answer = await join_as_observer(
        server.sockets[0].getsockname()[1],
        rfc8684_token(key_b),
        lambda nonce, syn_ack: join_hmac(key_a, key_b, nonce, syn_ack.nonce)[
            :20
        ],
    )
    assert answer, "the server should have acknowledged the join"
    assert not answer[0].flags & Flag.RST
    assert answer[0].flags & Flag.ACK

    listener = server.mptls_listener
    server_side = listener.transports[0].mptcp_info()
    assert len(server_side.subflows) == 2
