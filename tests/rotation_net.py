"""Helpers for the mode E core tests: two cores in memory (memnet.py)
set up for mode E, and ways to look at and forge what they send."""

from __future__ import annotations

from memnet import Link, MemNet

from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.connection import Connection
from mptls.mptcp.crypto import join_hmac
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import MpJoinAck, MpJoinSyn, MpJoinSynAck, NewKey
from mptls.tls.keys import KeyMaterial

E_CLIENT = ConnectionConfig(mode=Mode.E)
E_SERVER = ConnectionConfig(accept_modes=frozenset({Mode.G, Mode.E}))
WAITING = "waiting for the peer to confirm the keys (NEW_KEY)"


def e_net(
    client: ConnectionConfig = E_CLIENT,
    server: ConnectionConfig = E_SERVER,
    **kwargs: object,
) -> MemNet:
    return MemNet(client, server, **kwargs)  # type: ignore[arg-type]


def server_of(net: MemNet) -> Connection:
    assert net.server is not None
    return net.server


def active(net: MemNet, generation: int) -> bool:
    server = net.server
    return (
        net.client.key_generation == generation
        and server is not None
        and server.key_generation == generation
    )


def confirmed(net: MemNet, generation: int = 0) -> MemNet:
    """Run until both ends have ``generation`` active."""
    assert net.run(lambda: active(net, generation))
    return net


def settle(net: MemNet) -> None:
    """Deliver everything under way now, without moving the clock."""
    net.run(lambda: True)


def run_for(net: MemNet, seconds: float) -> None:
    """Run what falls due in the next ``seconds``, and no later."""
    end = net.now + seconds
    net.run(lambda: net.now >= end, max_time=end)


def option_of(segment: Segment, kind: type) -> object | None:
    return next((o for o in segment.options if isinstance(o, kind)), None)


def new_keys(segments: list[Segment]) -> list[NewKey]:
    return [o for s in segments for o in s.options if isinstance(o, NewKey)]


def tokens(net: MemNet) -> tuple[bytes, bytes]:
    token_a, token_b = net.client.local_token, server_of(net).local_token
    assert token_a is not None and token_b is not None
    return token_a, token_b


def status_of(connection: Connection, subflow_id: int) -> str:
    return next(
        s.state
        for s in connection.info().subflows
        if s.subflow_id == subflow_id
    )


def count(side_events: list[ev.Event], event: ev.Event) -> int:
    return sum(1 for e in side_events if e == event)


def forged(key_id: int, tag: bytes = b"\x5a" * 8) -> Segment:
    return Segment(Flag.ACK, (NewKey(key_id=key_id, tag=tag),))


def raw_join(net: MemNet, key_id: int, nonce: int = 0x01020304) -> Link:
    raw = net.open_raw()
    _, token_b = tokens(net)
    syn = MpJoinSyn(token_b, nonce, 0, key_id=key_id)
    net.raw_send(raw, Segment(Flag.SYN, (syn,)))
    return raw


def finish_raw_join(
    net: MemNet, raw: Link, keys: KeyMaterial, nonce: int = 0x01020304
) -> Segment:
    """Check the SYN|ACK against ``keys``, answer with their HMAC-A."""
    reply = option_of(raw.inbox[0], MpJoinSynAck)
    assert isinstance(reply, MpJoinSynAck)
    mac = join_hmac(keys.key_a, keys.key_b, nonce, reply.nonce)[:20]
    net.raw_send(raw, Segment(Flag.ACK, (MpJoinAck(mac),)))
    net.run(lambda: len(raw.inbox) > 1)
    return raw.inbox[-1]


def syn_ack_matches(
    raw: Link, keys: KeyMaterial, key_id: int, nonce: int = 0x01020304
) -> bool:
    reply = option_of(raw.inbox[0], MpJoinSynAck)
    assert isinstance(reply, MpJoinSynAck)
    expected = join_hmac(keys.key_b, keys.key_a, reply.nonce, nonce)[:8]
    return reply.key_id == key_id and reply.hmac == expected
