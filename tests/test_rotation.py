"""The rotation profile (mode E) end to end, on real loopback sockets.

E connections over two paths, ``rotate_keys()`` while data flows, joins
after a rotation, the rotation interval, the refusals of the public API
and the keys that never show: userspace backend, and the kernel
backend's refusal where the kernel has MPTCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pcapfile import ACK, SYN, read_pcap
from pki import Pki
from support import echo, established, usable_backend

import mptls
from mptls.backends.base import KeyDerivation, Server
from mptls.backends.userspace.backend import UserspaceBackend
from mptls.backends.userspace.workers import WorkerPool
from mptls.mptcp.endpoint import Accepted, Endpoint, Refused
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import (
    MpJoinSyn,
    MpJoinSynAck,
    MpTcpRst,
    ResetReason,
)
from mptls.tls.keys import KeyMaterial
from mptls.trace import capture

CHUNK = 64 * 1024
# every wait of these tests ends within this, or the test fails
LIMIT = 10.0


class EchoServer:
    """An echo server and the server side of each of its connections."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.writers: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def next_writer(self) -> asyncio.StreamWriter:
        return await asyncio.wait_for(self.writers.get(), LIMIT)


@contextlib.asynccontextmanager
async def echo_server(
    pki: Pki, mode: str | None = "e", **options: Any
) -> AsyncIterator[EchoServer]:
    """An echo server that accepts ``mode`` only (None: the backend's
    default, for the kernel backend, which takes no mode)."""
    served: EchoServer | None = None

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert served is not None
        await served.writers.put(writer)
        with contextlib.suppress(ConnectionError, mptls.MptlsError):
            await echo(reader, writer)

    if mode is not None:
        options["mode"] = mode
    server = await mptls.start_server(
        handle, "127.0.0.1", 0, ssl=pki.server(), **options
    )
    served = EchoServer(server)
    try:
        yield served
    finally:
        server.close()
        await server.wait_closed()


async def connect(
    port: int, pki: Pki, mode: str | None = "e", **options: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if mode is not None:
        options["mode"] = mode
    return await asyncio.wait_for(
        mptls.open_connection("127.0.0.1", port, ssl=pki.client(), **options),
        LIMIT,
    )


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, mptls.MptlsError):
        await asyncio.wait_for(writer.wait_closed(), LIMIT)


async def echo_then_close(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    message: bytes,
) -> None:
    """Send ``message``, half-close, check it comes back whole, close."""
    writer.write(message)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), LIMIT) == message
    await close(writer)


def info(writer: asyncio.StreamWriter) -> mptls.MptcpInfo:
    mptcp: mptls.MptcpInfo = writer.get_extra_info("mptcp")
    return mptcp


async def generation(writer: asyncio.StreamWriter, wanted: int) -> None:
    """Steps the loop until ``writer``'s keys reach generation ``wanted``
    (at most :data:`LIMIT` seconds)."""
    async with asyncio.timeout(LIMIT):
        while True:
            current = info(writer).key_generation
            if current is not None and current >= wanted:
                return
            await asyncio.sleep(0)


async def rotate(writer: asyncio.StreamWriter) -> int:
    transport: Any = writer.transport
    rotated: int = await transport.rotate_keys()
    return rotated


def digest(data: bytes | bytearray) -> bytes:
    return hashlib.sha256(data).digest()


# data over two paths


@pytest.mark.parametrize(
    "fallback",
    # offered alone, E opens the second path's TCP connection while TLS
    # runs; next to H, only once the keys are confirmed
    [False, True],
    ids=["E", "E-or-H"],
)
async def test_an_e_connection_moves_data_both_ways_over_two_paths(
    pki: Pki, fallback: bool
) -> None:
    async with echo_server(pki) as served:
        reader, writer = await connect(
            served.port,
            pki,
            local_addrs=["127.0.0.1", "127.0.0.2"],
            allow_legacy_fallback=fallback,
        )
        # the join waits for the peer's NEW_KEY of generation 0
        await established(writer, 2)
        client = info(writer)
        assert client.mode == "E"
        assert client.key_generation == 0
        # 32-bit tokens on both ends
        assert len(client.local_token or "") == 8
        assert len(client.remote_token or "") == 8

        payload = random.Random(1).randbytes(2 * 1024 * 1024)
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), LIMIT)
        assert digest(echoed) == digest(payload)

        subflows = info(writer).subflows
        assert {s.local_address[0] for s in subflows if s.local_address} == {
            "127.0.0.1",
            "127.0.0.2",
        }
        # both paths carried the upload; the echo came back whole
        assert all(s.bytes_sent > 0 for s in subflows)
        assert sum(s.bytes_received for s in subflows) > len(payload)
        server_side = info(await served.next_writer())
        assert server_side.mode == "E"
        assert server_side.key_fingerprint == client.key_fingerprint
        await close(writer)


# rotate_keys()


async def test_rotate_keys_mid_transfer_keeps_the_data_whole(
    pki: Pki,
) -> None:
    async with echo_server(pki) as served:
        reader, writer = await connect(
            served.port, pki, local_addrs=["127.0.0.1", "127.0.0.2"]
        )
        await established(writer, 2)
        payload = random.Random(2).randbytes(4 * 1024 * 1024)
        half = len(payload) // 2
        rotated = asyncio.Event()

        async def send() -> None:
            # the first half before the rotations, the rest after them
            for start in range(0, len(payload), CHUNK):
                if start == half:
                    await asyncio.wait_for(rotated.wait(), LIMIT)
                writer.write(payload[start : start + CHUNK])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        received = bytearray(await asyncio.wait_for(reader.read(CHUNK), LIMIT))
        # data is in flight both ways while the keys change
        assert await rotate(writer) == 1
        assert info(writer).key_generation == 1
        assert await rotate(writer) == 2
        # no subflow was lost to the change of keys
        states = [s.state for s in info(writer).subflows]
        assert states == ["ESTABLISHED", "ESTABLISHED"], states
        rotated.set()
        received += await asyncio.wait_for(reader.read(), LIMIT)
        await asyncio.wait_for(sending, LIMIT)
        assert digest(received) == digest(payload)

        client = info(writer)
        assert client.key_generation == 2
        server_side = info(await served.next_writer())
        assert server_side.key_generation == 2
        assert server_side.key_fingerprint == client.key_fingerprint
        await close(writer)


async def test_two_calls_at_once_share_one_rotation(pki: Pki) -> None:
    async with echo_server(pki) as served:
        reader, writer = await connect(served.port, pki)
        await generation(writer, 0)
        first, second = await asyncio.gather(rotate(writer), rotate(writer))
        assert first == second == 1
        assert await rotate(writer) == 2
        await echo_then_close(reader, writer, b"after two rotations")


async def test_either_end_may_rotate(pki: Pki) -> None:
    async with echo_server(pki) as served:
        reader, writer = await connect(served.port, pki)
        server_side = await served.next_writer()
        await generation(writer, 0)
        assert await rotate(server_side) == 1
        await generation(writer, 1)
        assert info(writer).key_fingerprint == (
            info(server_side).key_fingerprint
        )
        assert await rotate(writer) == 2
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), LIMIT) == b""
        await close(writer)


async def test_a_join_after_a_rotation_names_the_new_key(
    pki: Pki, tmp_path: Path
) -> None:
    path = tmp_path / "join.pcap"
    async with echo_server(pki) as served:
        reader, writer = await connect(served.port, pki)
        await generation(writer, 0)
        assert await rotate(writer) == 1
        transport: Any = writer.transport
        with capture(path):
            subflow_id = await transport.add_path(
                ("127.0.0.1", served.port), local="127.0.0.2", timeout=LIMIT
            )
        client = info(writer)
        assert client.key_generation == 1
        joined = {s.subflow_id: s for s in client.subflows}[subflow_id]
        assert joined.state == "ESTABLISHED"
        assert joined.local_address is not None
        assert joined.local_address[0] == "127.0.0.2"

        # the data still flows, over both subflows now
        await echo_then_close(reader, writer, b"joined under generation 1")

    # the SYN named key id 1 (the slot of generation 1), the SYN/ACK
    # echoed it; the server's slot 0 still held generation 0, so a join
    # under the old keys would have been accepted too
    _, packets = read_pcap(path)
    syns = [
        option
        for packet in packets
        if packet.flags & (SYN | ACK) == SYN
        for option in packet.only(MpJoinSyn)
    ]
    syn_acks = [
        option
        for packet in packets
        if packet.flags & (SYN | ACK) == SYN | ACK
        for option in packet.only(MpJoinSynAck)
    ]
    assert syns and syn_acks
    assert {option.key_id for option in syns} == {1}
    assert {option.key_id for option in syn_acks} == {1}


async def test_the_rotation_interval_rotates_by_itself(pki: Pki) -> None:
    async with echo_server(pki) as served:
        reader, writer = await connect(
            served.port, pki, key_rotation_interval=0.05
        )
        await generation(writer, 2)
        server_side = await served.next_writer()
        await generation(server_side, 2)
        await echo_then_close(reader, writer, b"rotated twice")


def refuse_joins_as_transient(
    monkeypatch: pytest.MonkeyPatch, times: int
) -> list[bool]:
    """Make every server refuse the next ``times`` join SYNs as an E
    server refuses a join a key rotation overtook (MP_TCPRST with T
    set); the list records, per join SYN, whether it was refused."""
    seen: list[bool] = []
    receive_first = Endpoint.receive_first

    def refusing(
        self: Endpoint, segment: Segment, now: float, **kwargs: Any
    ) -> Accepted | Refused:
        if not any(isinstance(o, MpJoinSyn) for o in segment.options):
            return receive_first(self, segment, now, **kwargs)
        refuse = seen.count(True) < times
        seen.append(refuse)
        if not refuse:
            return receive_first(self, segment, now, **kwargs)
        rst = MpTcpRst(ResetReason.MPTCP_ERROR, transient=True)
        reset = Segment(Flag.RST, (rst,))
        return Refused(reset, "keys rotated while the join waited")

    monkeypatch.setattr(Endpoint, "receive_first", refusing)
    return seen


async def test_a_path_refused_as_transient_is_joined_again(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = refuse_joins_as_transient(monkeypatch, times=2)
    async with echo_server(pki) as served:
        reader, writer = await connect(
            served.port, pki, local_addrs=["127.0.0.1", "127.0.0.2"]
        )
        await established(writer, 2)
        # refused twice, joined again each time, then let in
        assert seen == [True, True, False]
        local = {
            s.local_address[0]
            for s in info(writer).subflows
            if s.state == "ESTABLISHED" and s.local_address is not None
        }
        assert local == {"127.0.0.1", "127.0.0.2"}
        await echo_then_close(reader, writer, b"over the path it got back")


class NoLaterKeys(UserspaceBackend):
    """A userspace backend whose TLS session exports generation 0 only:
    a peer that never confirms a rotation."""

    def install_keys(
        self,
        transport: asyncio.BaseTransport,
        keys: KeyMaterial,
        *,
        derive: KeyDerivation | None = None,
    ) -> mptls.KeyInstall:
        def refuse(generation: int) -> KeyMaterial:
            raise mptls.TLSError(f"no exporter for generation {generation}")

        return super().install_keys(transport, keys, derive=refuse)


async def test_a_rotation_the_peer_never_confirms_times_out(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mptls")
    async with echo_server(pki, backend=NoLaterKeys()) as served:
        reader, writer = await connect(
            served.port, pki, join_timeout=0.5, join_rto=0.1
        )
        await generation(writer, 0)
        with pytest.raises(mptls.MptlsTimeoutError, match="generation 1"):
            await asyncio.wait_for(rotate(writer), LIMIT)
        # the server said why; the keys in use did not change
        assert "cannot export key generation 1" in caplog.text
        assert info(writer).key_generation == 0
        await echo_then_close(reader, writer, b"still keyed by generation 0")


class LateKeys(UserspaceBackend):
    """A userspace backend whose core gets the TLS keys a while after
    the handshake: a peer whose NEW_KEY comes late."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def install_keys(
        self,
        transport: asyncio.BaseTransport,
        keys: KeyMaterial,
        *,
        derive: KeyDerivation | None = None,
    ) -> mptls.KeyInstall:
        install = functools.partial(
            super().install_keys, transport, keys, derive=derive
        )
        asyncio.get_running_loop().call_later(self.delay, install)
        return mptls.KeyInstall(True, "installed later")


async def test_paths_open_when_a_late_peer_confirms_the_first_keys(
    pki: Pki,
) -> None:
    # the client gives up on generation 0 before the server's keys are
    # there; the server's NEW_KEY then brings it back, and the second
    # path, which had no keys to join with, opens after all
    async with echo_server(pki, backend=LateKeys(0.6)) as served:
        reader, writer = await connect(
            served.port,
            pki,
            local_addrs=["127.0.0.1", "127.0.0.2"],
            join_timeout=0.3,
            join_rto=0.1,
        )
        await generation(writer, 0)
        await established(writer, 2)
        await echo_then_close(reader, writer, b"over two paths after all")


async def test_rotate_keys_right_after_connecting_waits_for_the_first_keys(
    pki: Pki,
) -> None:
    # the server's NEW_KEY for generation 0 comes half a second after
    # the handshake: a rotation asked for at once waits for it
    async with echo_server(pki, backend=LateKeys(0.5)) as served:
        _, writer = await connect(served.port, pki)
        waiting = info(writer)
        assert waiting.key_generation is None
        assert not waiting.keys_installed
        assert "NEW_KEY" in waiting.keys_reason
        assert await rotate(writer) == 1
        assert info(writer).keys_installed
        assert info(writer).key_generation == 1
        await close(writer)


# refusals


async def test_a_g_connection_cannot_rotate(pki: Pki) -> None:
    async with echo_server(pki, mode="G") as served:
        _, writer = await connect(served.port, pki, mode="G")
        with pytest.raises(mptls.ConfigurationError, match="mode E"):
            await rotate(writer)
        assert info(writer).key_generation is None
        await close(writer)


async def test_a_closed_connection_has_no_keys_to_rotate(pki: Pki) -> None:
    async with echo_server(pki) as served:
        _, writer = await connect(served.port, pki)
        await close(writer)
        with pytest.raises(mptls.KeysUnavailableError, match="closed"):
            await rotate(writer)


async def test_the_kernel_backend_cannot_rotate(pki: Pki) -> None:
    backend = usable_backend("kernel")
    async with echo_server(pki, backend=backend, mode=None) as served:
        _, writer = await connect(served.port, pki, backend=backend, mode=None)
        with pytest.raises(
            mptls.ConfigurationError,
            match="the kernel backend cannot rotate keys",
        ):
            await rotate(writer)
        assert info(writer).key_generation is None
        await close(writer)


@pytest.mark.parametrize(
    ("client", "server"),
    [("E", "G"), ("G", "E")],
    ids=["E-to-G", "G-to-E"],
)
async def test_a_mode_the_server_refuses_is_named_in_the_error(
    pki: Pki, client: str, server: str
) -> None:
    # the server resets with MP_TCPRST 0x03; the bare "peer reset"
    # left the user guessing that the modes differ
    async with echo_server(pki, mode=server) as served:
        with pytest.raises(
            mptls.PeerResetError,
            match=f"the server may not accept mode {client}",
        ) as caught:
            await connect(served.port, pki, mode=client)
    assert caught.value.reset_reason == 0x03


async def test_e_with_several_workers_is_refused(pki: Pki) -> None:
    # before any worker process starts
    with pytest.raises(mptls.ConfigurationError, match="several workers"):
        WorkerPool(
            echo,
            "127.0.0.1",
            0,
            workers=2,
            ssl=pki.server(),
            modes=["G", "E"],
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"server_id": 3}, "server_id"),
        ({"worker_id": 1}, "several workers"),
    ],
)
async def test_e_with_ids_in_its_tokens_is_refused(
    pki: Pki, options: dict[str, int], match: str
) -> None:
    with pytest.raises(mptls.ConfigurationError, match=match):
        await mptls.start_server(
            echo, "127.0.0.1", 0, ssl=pki.server(), modes=["E"], **options
        )


# what never shows


def spellings(keys: KeyMaterial) -> list[str]:
    """The ways a log line or repr could show ``keys``."""
    shown = []
    for secret in (keys.key_a + keys.key_b, keys.key_a, keys.key_b):
        shown += [secret.hex(), secret.hex().upper(), repr(secret)[2:-1]]
    return shown


async def test_no_key_shows_in_logs_reprs_or_info(
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    exported: list[KeyMaterial],
) -> None:
    caplog.set_level(logging.DEBUG)
    async with echo_server(pki) as served:
        reader, writer = await connect(
            served.port, pki, local_addrs=["127.0.0.1", "127.0.0.2"]
        )
        await established(writer, 2)
        assert await rotate(writer) == 1
        assert await rotate(writer) == 2
        server_side = await served.next_writer()
        shown = [
            caplog.text,
            repr(writer.transport),
            repr(server_side.transport),
            repr(info(writer)),
            str(info(writer).as_dict()),
            str(info(server_side).as_dict()),
        ]
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), LIMIT) == b""
        await close(writer)
    shown.append(caplog.text)

    # generations 0, 1 and 2 on each end, the same on both
    generations = sorted(keys.generation for keys in exported)
    assert generations == [0, 0, 1, 1, 2, 2]
    text = "\n".join(shown)
    for keys in exported:
        for spelling in spellings(keys):
            assert spelling not in text
    # what does show: the one-way fingerprints of each generation
    assert "key generation 2 in use" in caplog.text
    assert exported[-1].fingerprint() in caplog.text
