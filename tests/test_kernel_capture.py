"""mptls's MPTCP codec and crypto against the Linux kernel's own packets.

The kernel backend runs a connection across two namespaces while a raw
socket captures every segment in the server's namespace. Every MPTCP
option decodes with :func:`decode_options` and re-encodes to the same
bytes; the RFC 8684 keys seen in MP_CAPABLE give the tokens MPTCP_INFO
reports and the data sequence numbers it counts; the MP_JOIN HMACs and
the ADD_ADDR HMAC equal mptls's own over the captured keys and nonces.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address

import netns
import pytest

from mptls.backends.base import MptcpInfo
from mptls.backends.kernel import KernelBackend
from mptls.backends.kernel import info as kernel_info
from mptls.backends.kernel.pathmanager import (
    EndpointFlag,
    PathManager,
    run_in_thread,
)
from mptls.mptcp.crypto import (
    add_addr_hmac,
    join_hmac,
    rfc8684_idsn,
    rfc8684_token,
)
from mptls.mptcp.options import (
    MPTCP_KIND,
    AddAddr,
    MpCapable,
    MpJoinAck,
    MpJoinSyn,
    MpJoinSynAck,
    Option,
    decode_options,
    encode_option,
)

pytestmark = [pytest.mark.root, pytest.mark.kernel]

PORT = 4434
MESSAGE = bytes(range(256)) * 8
SETTLE_TIMEOUT = 10.0


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.echoed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(MESSAGE) and not self.echoed.done():
            self.echoed.set_result(bytes(self.received))


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Re-check a kernel condition until it holds, failing after a bound."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def mptcp_option_bytes(options: bytes) -> list[bytes]:
    """The raw kind-30 options of a TCP option list, in order."""
    found = []
    index = 0
    while index < len(options):
        kind = options[index]
        if kind == 0:
            break
        if kind == 1:
            index += 1
            continue
        length = options[index + 1]
        if kind == MPTCP_KIND:
            found.append(options[index : index + length])
        index += length
    return found


Decoded = tuple[netns.TcpSegment, Option]


def decode_capture(segments: list[netns.TcpSegment]) -> list[Decoded]:
    """Decode every MPTCP option; each must re-encode to its bytes."""
    decoded: list[Decoded] = []
    for segment in segments:
        options = decode_options(
            segment.options, syn=segment.syn, ack=segment.ack
        )
        raw = mptcp_option_bytes(segment.options)
        assert len(options) == len(raw), segment
        for option, captured in zip(options, raw, strict=True):
            assert encode_option(option) == captured, (option, segment)
            decoded.append((segment, option))
    return decoded


def first(decoded: list[Decoded], kind: type, **where: object) -> Decoded:
    for segment, option in decoded:
        if not isinstance(option, kind):
            continue
        if all(getattr(segment, k) == v for k, v in where.items()):
            return segment, option
    raise AssertionError(f"no {kind.__name__} with {where} in the capture")


async def _configure_paths(topology: netns.Topology) -> None:
    def server_side() -> None:
        with PathManager() as paths:
            paths.add_endpoint(
                topology.paths[1].server_address, EndpointFlag.SIGNAL
            )

    def client_side() -> None:
        with PathManager() as paths:
            paths.set_limits(subflows=2, add_addr_accepted=1)

    with topology.server.entered():
        await run_in_thread(server_side)
    with topology.client.entered():
        await run_in_thread(client_side)


@dataclass(frozen=True)
class EndStates:
    """What the kernel reported at both ends once the join was up."""

    client: MptcpInfo
    server: MptcpInfo
    client_raw: kernel_info.KernelMptcpInfo
    server_raw: kernel_info.KernelMptcpInfo


async def _run_connection(
    topology: netns.Topology,
) -> tuple[list[netns.TcpSegment], EndStates]:
    """One echo exchange plus a join; returns the capture and states."""
    await _configure_paths(topology)
    backend = KernelBackend()
    echoes: list[Echo] = []

    def make_echo() -> Echo:
        echoes.append(Echo())
        return echoes[-1]

    with topology.server.entered():
        capture = netns.PacketCapture()
        server = await backend.create_server(make_echo, "0.0.0.0", PORT)
    try:
        with topology.client.entered():
            transport, client = await backend.create_connection(
                Collect, topology.paths[0].server_address, PORT
            )
        assert isinstance(transport, asyncio.Transport)
        assert isinstance(client, Collect)
        transport.write(MESSAGE)
        assert await asyncio.wait_for(client.echoed, 10) == MESSAGE

        server_transport = echoes[0].transport

        def joined() -> bool:
            both = (backend.info(transport), backend.info(server_transport))
            return all(
                len(report.subflows) == 2
                and all(s.state == "ESTABLISHED" for s in report.subflows)
                for report in both
            )

        await wait_until(joined, "the second subflow")
        states = EndStates(
            client=backend.info(transport),
            server=backend.info(server_transport),
            client_raw=kernel_info.read_mptcp_info(
                transport.get_extra_info("socket")
            ),
            server_raw=kernel_info.read_mptcp_info(
                server_transport.get_extra_info("socket")
            ),
        )
        segments = capture.segments(PORT)
        transport.close()
    finally:
        capture.close()
        server.close()
    return segments, states


async def test_kernel_packets_match_codec_and_crypto(
    topology: netns.Topology,
) -> None:
    segments, states = await _run_connection(topology)
    decoded = decode_capture(segments)

    # MP_CAPABLE (RFC 8684 3.1): SYN without a key, SYN/ACK with Key-B,
    # third ACK with Key-A then Key-B
    _, syn = first(decoded, MpCapable, syn=True, ack=False)
    assert isinstance(syn, MpCapable) and syn.sender_key is None
    _, syn_ack = first(decoded, MpCapable, syn=True, ack=True)
    assert isinstance(syn_ack, MpCapable)
    key_b = syn_ack.sender_key
    _, third = first(decoded, MpCapable, syn=False, ack=True)
    assert isinstance(third, MpCapable)
    key_a = third.sender_key
    assert key_a is not None and key_b is not None
    assert third.receiver_key == key_b

    # tokens: mptcpi_token is the local token of each end
    assert rfc8684_token(key_a).hex() == states.client.local_token
    assert rfc8684_token(key_b).hex() == states.server.local_token

    # IDSN: the SYN takes one data sequence number, then MESSAGE went
    # each way, so each end's next DSN is IDSN + 1 + len(MESSAGE)
    wrap = 1 << 64
    client_raw = states.client_raw.fields
    server_raw = states.server_raw.fields
    sent = len(MESSAGE)
    assert client_raw["write_seq"] == (rfc8684_idsn(key_a) + 1 + sent) % wrap
    assert client_raw["rcv_nxt"] == (rfc8684_idsn(key_b) + 1 + sent) % wrap
    assert server_raw["write_seq"] == (rfc8684_idsn(key_b) + 1 + sent) % wrap
    assert server_raw["rcv_nxt"] == (rfc8684_idsn(key_a) + 1 + sent) % wrap

    check_join(decoded, key_a, key_b)
    check_add_addr(decoded, topology, key_a, key_b)


def check_join(decoded: list[Decoded], key_a: bytes, key_b: bytes) -> None:
    """MP_JOIN (RFC 8684 3.2): token, and both truncated HMACs."""
    _, join_syn = first(decoded, MpJoinSyn, syn=True, ack=False)
    _, join_syn_ack = first(decoded, MpJoinSynAck, syn=True, ack=True)
    _, join_ack = first(decoded, MpJoinAck, syn=False, ack=True)
    assert isinstance(join_syn, MpJoinSyn)
    assert isinstance(join_syn_ack, MpJoinSynAck)
    assert isinstance(join_ack, MpJoinAck)
    assert join_syn.token == rfc8684_token(key_b)
    r_a, r_b = join_syn.nonce, join_syn_ack.nonce
    assert join_syn_ack.hmac == join_hmac(key_b, key_a, r_b, r_a)[:8]
    assert join_ack.hmac == join_hmac(key_a, key_b, r_a, r_b)[:20]


def check_add_addr(
    decoded: list[Decoded],
    topology: netns.Topology,
    key_a: bytes,
    key_b: bytes,
) -> None:
    """ADD_ADDR (RFC 8684 3.4.1) from the server, then the client's echo."""
    client_addr = topology.paths[0].client_address
    server_addr = topology.paths[0].server_address
    announce_segment, announce = first(
        decoded, AddAddr, source=(server_addr, PORT)
    )
    assert isinstance(announce, AddAddr) and not announce.echo
    assert announce.address == ip_address(topology.paths[1].server_address)
    assert announce.hmac == add_addr_hmac(
        key_b, key_a, announce.address_id, announce.address, announce.port
    )
    assert announce_segment.destination[0] == client_addr
    echoes = [
        option
        for segment, option in decoded
        if isinstance(option, AddAddr) and segment.source[0] == client_addr
    ]
    assert echoes and all(option.echo for option in echoes)
