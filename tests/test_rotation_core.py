"""Mode E in the sans-I/O core: 32-bit tokens, NEW_KEY and key rotation.

Two cores wired in memory (tests/memnet.py), every segment through the
real codec. Covered: the E handshake and mode preference, the endpoint's
32-bit tokens, generation 0's confirmation by NEW_KEY (retransmission,
timeout, recovery), rotations started by either end or both, forged
NEW_KEYs, generations 0 -> 1 -> 2, the rotation interval, and secrets
kept out of reprs, events and logs. Joins, ADD_ADDR and MP_FASTCLOSE
under E are in test_rotation_joins.py.
"""

from __future__ import annotations

import logging

import pytest
from memnet import (
    KEYS,
    MemNet,
    Pipe,
    established,
    generation_keys,
    has_data,
    join,
    stream,
)
from rotation_net import (
    E_CLIENT,
    E_SERVER,
    WAITING,
    active,
    confirmed,
    count,
    e_net,
    forged,
    new_keys,
    option_of,
    run_for,
    server_of,
    settle,
    tokens,
)

from mptls.errors import ConfigurationError, KeysUnavailableError
from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.connection import Connection
from mptls.mptcp.crypto import fastclose_tag, idsn_from_token, new_key_tag
from mptls.mptcp.endpoint import Accepted, Endpoint, Refused
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import (
    CapableFlag,
    Dss,
    MpCapable,
    MpJoinSyn,
    NewKey,
    encode_option,
)
from mptls.mptcp.rotation import FIRST_KEY_RETRIES, NEW_KEY_ANSWERS
from mptls.mptcp.tokens import E_TOKEN_LAYOUT, TokenAllocator
from mptls.tls.keys import KeyMaterial

# the handshake


def test_e_handshake_uses_4_byte_tokens_and_their_idsns() -> None:
    net = established(e_net())
    up, down = net.link(0).to_server.sent, net.link(0).to_client.sent
    syn = option_of(up[0], MpCapable)
    assert syn == MpCapable(flags=CapableFlag.E)
    syn_ack = option_of(down[0], MpCapable)
    assert isinstance(syn_ack, MpCapable)
    assert syn_ack.flags == CapableFlag.E
    token_a, token_b = tokens(net)
    assert len(token_a) == len(token_b) == 4
    assert syn_ack.sender_key == token_b
    assert len(encode_option(syn_ack)) == 8
    third = option_of(up[1], MpCapable)
    assert isinstance(third, MpCapable)
    assert (third.sender_key, third.receiver_key) == (token_a, token_b)
    assert len(encode_option(third)) == 12

    done = net.client_side.of_type(ev.HandshakeComplete)
    assert done == [ev.HandshakeComplete(Mode.E, token_a, token_b)]
    net.client.send(b"x" * 10)
    assert net.run(has_data(net.server_side, 15))
    mapped = [s for s in net.link(0).to_server.sent if option_of(s, Dss)]
    dss = option_of(mapped[-1], Dss)
    assert isinstance(dss, Dss)
    # "hello" took offsets 0-4 implicitly
    assert dss.dsn == (idsn_from_token(token_a) + 1 + 5) % 2**64


def test_e_initiator_offers_h_only_with_the_legacy_fallback() -> None:
    config = ConnectionConfig(mode=Mode.E, allow_legacy_fallback=True)
    net = established(e_net(config))
    offer = option_of(net.link(0).to_server.sent[0], MpCapable)
    assert offer == MpCapable(flags=CapableFlag.E | CapableFlag.H)
    assert net.client.mode is Mode.E


@pytest.mark.parametrize(
    ("accepted", "offered", "chosen"),
    [
        ({Mode.G, Mode.E, Mode.RFC8684}, "GEH", Mode.G),
        ({Mode.E, Mode.RFC8684}, "GEH", Mode.E),
        ({Mode.G, Mode.E}, "EH", Mode.E),
        ({Mode.RFC8684}, "EH", Mode.RFC8684),
        ({Mode.E, Mode.RFC8684}, "H", Mode.RFC8684),
    ],
)
def test_responder_prefers_g_then_e_then_h(
    accepted: set[Mode], offered: str, chosen: Mode
) -> None:
    flags = CapableFlag(0)
    for name in offered:
        flags |= CapableFlag[name]
    config = ConnectionConfig(accept_modes=frozenset(accepted))
    endpoint = Endpoint(config, tokens=TokenAllocator(bytes(32)), random=bytes)
    syn = Segment(Flag.SYN, (MpCapable(flags=flags),))
    result = endpoint.receive_first(syn, 0.0)
    assert isinstance(result, Accepted)
    assert result.connection.mode is chosen
    token = result.connection.local_token
    assert token is not None
    assert len(token) == {Mode.G: 8, Mode.E: 4, Mode.RFC8684: 4}[chosen]


def test_e_is_not_chosen_unless_accepted() -> None:
    endpoint = Endpoint(
        ConnectionConfig(), tokens=TokenAllocator(bytes(32)), random=bytes
    )
    syn = Segment(Flag.SYN, (MpCapable(flags=CapableFlag.E),))
    result = endpoint.receive_first(syn, 0.0)
    assert isinstance(result, Refused)
    assert result.reason == "the client asked for mode E, this server allows G"


class ScriptedTokens(TokenAllocator):
    """A 32-bit allocator whose first tokens the test chooses."""

    def __init__(self, first: list[bytes]) -> None:
        super().__init__(bytes(range(32)), layout=E_TOKEN_LAYOUT)
        self.first = first
        self.released: list[bytes] = []

    def allocate(self) -> bytes:
        return self.first.pop(0) if self.first else super().allocate()

    def release(self, token: bytes) -> None:
        self.released.append(token)


def test_endpoint_skips_an_e_token_an_rfc8684_connection_holds() -> None:
    config = ConnectionConfig(accept_modes=frozenset({Mode.E, Mode.RFC8684}))
    scripted = ScriptedTokens([])
    endpoint = Endpoint(
        config,
        tokens=TokenAllocator(bytes(32)),
        random=lambda n: bytes(range(n)),
        e_tokens=scripted,
    )
    h_syn = Segment(Flag.SYN, (MpCapable(flags=CapableFlag.H),))
    held = endpoint.receive_first(h_syn, 0.0)
    assert isinstance(held, Accepted)
    taken = held.connection.local_token
    assert taken is not None and len(taken) == 4

    scripted.first = [taken, b"\x00\x00\x00\x07"]
    e_syn = Segment(Flag.SYN, (MpCapable(flags=CapableFlag.E),))
    result = endpoint.receive_first(e_syn, 0.0)
    assert isinstance(result, Accepted)
    assert result.connection.local_token == b"\x00\x00\x00\x07"
    # the skipped token is released for good, the holder keeps its own
    assert scripted.released == [taken]
    assert len(endpoint) == 2
    endpoint.remove(result.connection)
    assert scripted.released == [taken, b"\x00\x00\x00\x07"]


def test_endpoint_makes_its_own_32_bit_allocator() -> None:
    net = established(e_net())
    assert net.server_tokens.live == 0
    token = server_of(net).local_token
    assert token is not None and len(token) == 4


@pytest.mark.parametrize(
    "build",
    [
        # ids in the 64-bit tokens of a server that also accepts E
        lambda: Endpoint(
            E_SERVER,
            tokens=TokenAllocator(bytes(32), server_id=3),
            random=bytes,
        ),
        # an E allocator that hands out 8-byte tokens
        lambda: Endpoint(
            E_SERVER,
            tokens=TokenAllocator(bytes(32)),
            random=bytes,
            e_tokens=TokenAllocator(bytes(32)),
        ),
        # an E initiator given 8-byte tokens
        lambda: Connection.initiator(
            E_CLIENT,
            tokens=TokenAllocator(bytes(32)),
            random=bytes,
            now=0.0,
        ),
    ],
)
def test_e_refuses_tokens_that_do_not_fit(build: object) -> None:
    with pytest.raises(ConfigurationError):
        build()  # type: ignore[operator]


# generation 0: confirmed by NEW_KEY both ways


def test_generation_0_waits_for_both_new_keys() -> None:
    net = e_net()
    seen: list[tuple[bool, str]] = []

    def on_event(connection: Connection, event: ev.Event) -> None:
        if isinstance(event, ev.HandshakeComplete):
            info = connection.info()
            seen.append((connection.joins_allowed, info.keys_reason))

    net.on_event = on_event
    established(net)
    # right after the handshake: no key, joins off, and why
    assert seen[0] == (False, "waiting for the TLS handshake to export keys")
    confirmed(net)

    token_a, token_b = tokens(net)
    up = new_keys(net.link(0).to_server.sent)
    down = new_keys(net.link(0).to_client.sent)
    assert up == [NewKey(0, new_key_tag(token_a, token_b, KEYS))]
    assert down == [NewKey(0, new_key_tag(token_b, token_a, KEYS))]
    for side in (net.client_side, net.server_side):
        assert side.of_type(ev.KeysActivated) == [
            ev.KeysActivated(0, KEYS.fingerprint())
        ]
        assert side.of_type(ev.KeysRequested) == []
    for connection in (net.client, server_of(net)):
        info = connection.info()
        assert info.key_generation == 0 and connection.key_generation == 0
        assert info.keys_installed and info.keys_reason == ""
        assert info.key_fingerprint == KEYS.fingerprint()
        assert connection.joins_allowed


def test_pending_keys_allow_no_join_and_say_why() -> None:
    net = e_net(server_keys_at=5.0)
    established(net)
    run_for(net, 1.0)
    assert net.client.info().keys_reason == WAITING
    assert not net.client.info().keys_installed
    assert net.client.key_generation is None
    assert not net.client.joins_allowed
    with pytest.raises(KeysUnavailableError, match="NEW_KEY"):
        net.client.open_subflow(net.now)
    with pytest.raises(KeysUnavailableError, match="NEW_KEY"):
        net.client.request_rotation()


def test_a_rotation_before_the_first_keys_says_when_to_ask() -> None:
    # right after open_connection the client's first keys may still
    # wait for the peer's NEW_KEY: the error says what to wait for
    net = e_net(server_keys_at=5.0)
    established(net)
    with pytest.raises(
        KeysUnavailableError, match=r"NEW_KEY.*once key_generation is set"
    ):
        net.client.request_rotation()


def test_new_key_is_retransmitted_with_backoff_until_confirmed() -> None:
    net = e_net(server_keys_at=2.0)
    established(net)
    installed_at = net.now
    confirmed(net)
    pipe = net.link(0).to_server
    times = [
        t - installed_at
        for s, t in zip(pipe.sent, pipe.sent_at, strict=True)
        if option_of(s, NewKey)
    ]
    # join_rto 0.2, doubling: 0, 0.2, 0.6, 1.4 (the server's keys at 2.0)
    assert times == pytest.approx([0.0, 0.2, 0.6, 1.4], abs=0.05)
    # the server found the client's NEW_KEY on installing: active at once
    server_active = net.server_side.of_type(ev.KeysActivated)
    assert server_active == [ev.KeysActivated(0, KEYS.fingerprint())]
    # nothing more once both agree
    net.run(lambda: net.now >= 20.0)
    assert len(new_keys(pipe.sent)) == 4
    assert len(new_keys(net.link(0).to_client.sent)) == 1


def test_unconfirmed_generation_0_fails_and_joins_stay_off() -> None:
    net = e_net(server_keys_at=1000.0)
    established(net)
    start = net.now
    assert net.run(lambda: net.client_side.of_type(ev.KeyRotationFailed))
    (failed,) = net.client_side.of_type(ev.KeyRotationFailed)
    assert failed.generation == 0
    assert "NEW_KEY" in failed.reason and "10.0 s" in failed.reason
    assert net.now - start == pytest.approx(10.0, abs=0.05)
    assert not net.client.joins_allowed
    assert net.client.info().keys_reason == (
        "the peer did not confirm the keys (NEW_KEY) within 10.0 s"
    )
    assert net.client.info().key_generation is None
    # tried again FIRST_KEY_RETRIES times, a join_timeout after each
    # failure, then given up for good
    run_for(net, 200.0)
    failures = net.client_side.of_type(ev.KeyRotationFailed)
    assert [f.generation for f in failures] == [0] * (1 + FIRST_KEY_RETRIES)
    asked = count(net.client_side.events, ev.KeysRequested(0))
    assert asked == FIRST_KEY_RETRIES
    sent = len(new_keys(net.link(0).to_server.sent))
    run_for(net, 100.0)
    assert len(new_keys(net.link(0).to_server.sent)) == sent
    assert not net.client.joins_allowed


def test_generation_0_the_peer_confirmed_unheard_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every NEW_KEY of the server is lost while generation 0 is being
    # confirmed: the server heard the client's and uses it, the client
    # gives it up. Its next try, a join_timeout later, gets the answer
    net = e_net(keys=None)
    established(net)
    with monkeypatch.context() as patch:
        lost = lose_new_keys(patch, net.link(0).to_client)
        assert net.client.install_keys(KEYS)
        assert server_of(net).install_keys(KEYS)
        run_for(net, net.client.config.join_timeout + 1.0)
    assert len(lost) == 1 + NEW_KEY_ANSWERS
    assert server_of(net).key_generation == 0
    assert net.client.key_generation is None
    assert not net.client.joins_allowed
    assert net.run(lambda: active(net, 0), max_time=net.now + 15.0)
    assert net.client.joins_allowed
    assert count(net.client_side.events, ev.KeysRequested(0)) == 1


def test_a_late_peer_brings_generation_0_back() -> None:
    # the client gave generation 0 up (at 10 s); the server's NEW_KEY,
    # later but before the client's own retry (at 20 s), makes it ask
    # for generation 0 once and confirm at once
    net = e_net(server_keys_at=15.0)
    established(net)
    confirmed(net)
    assert 15.0 <= net.now < 20.0
    assert net.client_side.of_type(ev.KeysRequested) == [ev.KeysRequested(0)]
    assert net.client_side.of_type(ev.KeysActivated) == [
        ev.KeysActivated(0, KEYS.fingerprint())
    ]
    assert net.client.joins_allowed


def test_install_keys_takes_only_the_next_generation() -> None:
    net = confirmed(established(e_net()))
    client = net.client
    assert not client.install_keys(KEYS)
    assert not client.install_keys(generation_keys(2))
    assert client.install_keys(generation_keys(1))
    # one rotation at a time
    assert not client.install_keys(generation_keys(1))
    assert not client.install_keys(generation_keys(2))
    confirmed(net, 1)


def test_install_keys_before_the_handshake_is_refused() -> None:
    net = e_net()
    assert not net.client.install_keys(KEYS)


# rotations


def test_request_rotation_is_for_mode_e_with_active_keys() -> None:
    g_net = established(MemNet())
    with pytest.raises(ConfigurationError, match="mode E"):
        g_net.client.request_rotation()
    net = e_net()
    with pytest.raises(KeysUnavailableError):
        net.client.request_rotation()


def test_a_rotation_asked_for_after_an_abort_has_no_keys() -> None:
    # rotate_keys() may resume from its wait for generation 0 after an
    # abort: the caller was promised KeysUnavailableError there, which
    # it catches, not a bare MptlsError
    net = confirmed(established(e_net()))
    net.client.abort()
    with pytest.raises(KeysUnavailableError, match="closed"):
        net.client.request_rotation()


def test_rotation_started_by_the_client() -> None:
    net = confirmed(established(e_net()))
    assert net.client.request_rotation() == 1
    # asked again while under way: the same one, and no second request
    assert net.client.request_rotation() == 1
    confirmed(net, 1)
    assert net.client.request_rotation() == 2
    confirmed(net, 2)
    keys_1 = generation_keys(1)
    token_a, token_b = tokens(net)
    client_up = new_keys(net.link(0).to_server.sent)
    assert NewKey(1, new_key_tag(token_a, token_b, keys_1)) in client_up
    assert net.client_side.of_type(ev.KeysRequested) == [
        ev.KeysRequested(1),
        ev.KeysRequested(2),
    ]
    # the server learnt of each rotation from the client's NEW_KEY
    assert net.server_side.of_type(ev.KeysRequested) == [
        ev.KeysRequested(1),
        ev.KeysRequested(2),
    ]
    assert [
        e.generation for e in net.server_side.of_type(ev.KeysActivated)
    ] == [
        0,
        1,
        2,
    ]


def test_the_peer_that_follows_activates_at_once_and_sends_once() -> None:
    net = confirmed(established(e_net()))
    server = server_of(net)
    assert server.request_rotation() == 1
    confirmed(net, 1)
    # the client's one NEW_KEY for K=1 both confirmed the server's and
    # made its own key active: no retransmission was needed
    client_k1 = [o for o in new_keys(net.link(0).to_server.sent) if o.key_id]
    assert len(client_k1) == 1
    server_k1 = [o for o in new_keys(net.link(0).to_client.sent) if o.key_id]
    assert len(server_k1) == 1
    assert count(net.client_side.events, ev.KeysRequested(1)) == 1


def test_simultaneous_rotations_from_both_ends() -> None:
    net = confirmed(established(e_net()))
    assert net.client.request_rotation() == 1
    assert server_of(net).request_rotation() == 1
    confirmed(net, 1)
    for side in (net.client_side, net.server_side):
        assert count(side.events, ev.KeysRequested(1)) == 1
        assert side.of_type(ev.KeyRotationFailed) == []
    fingerprint = generation_keys(1).fingerprint()
    assert net.client.info().key_fingerprint == fingerprint
    assert server_of(net).info().key_fingerprint == fingerprint


def test_generation_2_reuses_the_slot_of_generation_0() -> None:
    net = confirmed(established(e_net()))
    for generation in (1, 2):
        net.client.request_rotation()
        confirmed(net, generation)
    down = new_keys(net.link(0).to_client.sent)
    token_a, token_b = tokens(net)
    assert [o.key_id for o in down] == [0, 1, 0]
    assert down[2].tag == new_key_tag(token_b, token_a, generation_keys(2))
    sid = join(net)
    syn = option_of(net.link(sid).to_server.sent[0], MpJoinSyn)
    assert isinstance(syn, MpJoinSyn) and syn.key_id == 0


def test_a_rotation_the_peer_never_confirms_fails_and_keeps_the_keys() -> None:
    net = confirmed(established(e_net()))
    net.derive = None  # neither end's TLS answers KeysRequested
    net.client.install_keys(generation_keys(1))
    start = net.now
    assert net.run(lambda: net.client_side.of_type(ev.KeyRotationFailed))
    (failed,) = net.client_side.of_type(ev.KeyRotationFailed)
    assert failed.generation == 1 and "NEW_KEY" in failed.reason
    assert net.now - start == pytest.approx(10.0, abs=0.05)
    assert net.client.key_generation == 0
    assert net.client.info().key_fingerprint == KEYS.fingerprint()
    # the server's request failed the same way: the keys never came
    assert net.run(lambda: net.server_side.of_type(ev.KeyRotationFailed))
    (server_failed,) = net.server_side.of_type(ev.KeyRotationFailed)
    assert server_failed.generation == 1
    assert "not installed" in server_failed.reason
    # joins go on with generation 0, and a new rotation can follow
    sid = join(net)
    syn = option_of(net.link(sid).to_server.sent[0], MpJoinSyn)
    assert isinstance(syn, MpJoinSyn) and syn.key_id == 0
    net.derive = generation_keys
    assert net.client.request_rotation() == 1
    confirmed(net, 1)


def test_keys_never_installed_fail_the_request() -> None:
    net = confirmed(established(e_net()))
    net.derive = None
    assert net.client.request_rotation() == 1
    assert net.run(lambda: net.client_side.of_type(ev.KeyRotationFailed))
    (failed,) = net.client_side.of_type(ev.KeyRotationFailed)
    assert failed == ev.KeyRotationFailed(
        1, "the keys of generation 1 were not installed within 10.0 s"
    )
    # a new request asks again
    assert net.client.request_rotation() == 1
    settle(net)
    assert count(net.client_side.events, ev.KeysRequested(1)) == 2


# NEW_KEYs that match nothing


def test_forged_new_keys_cost_one_request_and_start_nothing() -> None:
    net = confirmed(established(e_net()))
    net.derive = None
    up = net.link(0).to_server.sent
    sent_before = len(new_keys(up))
    for _ in range(5):
        net.inject(0, forged(1))
    run_for(net, 1.0)
    assert net.client_side.of_type(ev.KeysRequested) == [ev.KeysRequested(1)]
    # the keys come, and the forged tag does not match them: not taken,
    # no NEW_KEY of the client's, slot 1 untouched
    assert not net.client.install_keys(generation_keys(1))
    net.inject(0, forged(1))
    run_for(net, 1.0)
    assert net.client.key_generation == 0
    assert len(new_keys(up)) == sent_before
    assert net.server_side.of_type(ev.KeysRequested) == []
    assert count(net.client_side.events, ev.KeysRequested(1)) == 1
    # the server's own rotation is checked against the keys kept aside:
    # no second request, active on both ends
    net.derive = generation_keys
    assert server_of(net).request_rotation() == 1
    confirmed(net, 1)
    assert count(net.client_side.events, ev.KeysRequested(1)) == 1


def test_our_own_request_takes_the_keys_a_forged_new_key_asked_for() -> None:
    # a forged NEW_KEY asked for generation 1; while its keys are on
    # their way, this end wants the rotation too: the keys are then
    # ours to start it with, whatever the forged tag said
    net = confirmed(established(e_net()))
    net.derive = None
    net.inject(0, forged(1))
    run_for(net, 0.1)
    assert net.client_side.of_type(ev.KeysRequested) == [ev.KeysRequested(1)]
    assert net.client.request_rotation() == 1
    assert net.client.install_keys(generation_keys(1))
    net.derive = generation_keys
    confirmed(net, 1)


def test_our_own_rotation_takes_the_keys_a_forged_new_key_brought() -> None:
    # a forged NEW_KEY made the client export generation 1, which it
    # kept aside; its own rotation later starts with those keys, with no
    # second export
    net = confirmed(established(e_net()))
    exported: list[int] = []

    def derive(generation: int) -> KeyMaterial:
        exported.append(generation)
        return generation_keys(generation)

    net.derive = derive
    net.inject(0, forged(1))
    settle(net)
    assert exported == [1] and net.client.key_generation == 0
    assert net.client.request_rotation() == 1
    confirmed(net, 1)
    # one export at each end: the client's from the forged NEW_KEY, the
    # server's when the client's own NEW_KEY came
    assert exported == [1, 1]
    assert net.client_side.of_type(ev.KeysRequested) == [ev.KeysRequested(1)]
    assert net.server_side.of_type(ev.KeysRequested) == [ev.KeysRequested(1)]


def test_a_forged_new_key_for_the_current_slot_is_ignored() -> None:
    net = confirmed(established(e_net()))
    net.inject(0, forged(0))
    net.inject(0, forged(0, new_key_tag(b"\0" * 4, b"\0" * 4, KEYS)))
    run_for(net, 1.0)
    assert net.client_side.of_type(ev.KeysRequested) == []
    assert net.client.key_generation == 0


def test_a_forged_tag_does_not_confirm_a_pending_key() -> None:
    net = confirmed(established(e_net()))
    net.derive = None
    assert net.client.request_rotation() == 1
    assert net.client.install_keys(generation_keys(1))
    net.inject(0, forged(1))
    run_for(net, 0.5)
    assert net.client.key_generation == 0
    server = server_of(net)
    # the server asked once (the client's NEW_KEY) and now gets them
    assert net.server_side.of_type(ev.KeysRequested) == [ev.KeysRequested(1)]
    assert server.install_keys(generation_keys(1))
    # the server had the client's NEW_KEY: active at once
    assert server.key_generation == 1
    confirmed(net, 1)


def test_a_new_key_before_generation_0_is_checked_on_install() -> None:
    # the server's keys come late; its NEW_KEY reaches a client whose
    # TLS is later still
    net = e_net(keys=None)
    established(net)
    server = server_of(net)
    assert server.install_keys(KEYS)
    run_for(net, 0.5)
    assert net.client_side.of_type(ev.KeysRequested) == []
    assert net.client.install_keys(KEYS)
    # the server's NEW_KEY was remembered: active at once
    assert net.client.key_generation == 0
    confirmed(net)


def test_a_matching_new_key_for_the_active_key_is_answered() -> None:
    net = confirmed(established(e_net()))
    token_a, token_b = tokens(net)
    client_before = len(new_keys(net.link(0).to_server.sent))
    # the server's NEW_KEY again, as if the client's had been lost
    net.inject(0, forged(0, new_key_tag(token_b, token_a, KEYS)))
    settle(net)
    up = new_keys(net.link(0).to_server.sent)
    assert len(up) == client_before + 1
    assert up[-1] == NewKey(0, new_key_tag(token_a, token_b, KEYS))
    assert net.client_side.of_type(ev.KeysRequested) == []


def test_answers_to_a_repeating_peer_are_spaced_and_few() -> None:
    # the server repeats its NEW_KEY because the client's answers keep
    # getting lost: each repeat a join_rto later is answered, up to
    # NEW_KEY_ANSWERS, and repeats closer together than that are not
    net = confirmed(established(e_net()))
    token_a, token_b = tokens(net)
    sent = net.link(0).to_server.sent
    before = len(new_keys(sent))
    repeat = forged(0, new_key_tag(token_b, token_a, KEYS))
    rto = net.client.config.join_rto
    answered = []
    for _ in range(NEW_KEY_ANSWERS + 2):
        net.inject(0, repeat)
        net.inject(0, repeat)  # at once: no second answer
        settle(net)
        answered.append(len(new_keys(sent)) - before)
        net.now += rto  # nothing is due: the clock moves by hand
    expected = [min(n, NEW_KEY_ANSWERS) for n in range(1, NEW_KEY_ANSWERS + 3)]
    assert answered == expected
    assert net.client.key_generation == 0


def lose_new_keys(
    monkeypatch: pytest.MonkeyPatch, pipe: Pipe
) -> list[Segment]:
    """Drop every NEW_KEY put on ``pipe`` from now on; the dropped ones."""
    lost: list[Segment] = []
    put = pipe.put

    def lossy(segment: Segment, at: float, now: float) -> None:
        if option_of(segment, NewKey) is not None:
            lost.append(segment)
        else:
            put(segment, at, now)

    monkeypatch.setattr(pipe, "put", lossy)
    return lost


def test_a_generation_the_peer_dropped_can_be_confirmed_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every NEW_KEY of the server is lost while the client rotates: the
    # server heard the client's and uses generation 1, the client never
    # heard the server's and drops it. Once NEW_KEYs get through again,
    # the client's next try must still get the server's answer, or the
    # two ends stay on different generations for good
    net = confirmed(established(e_net()))
    down = net.link(0).to_client
    with monkeypatch.context() as patch:
        lost = lose_new_keys(patch, down)
        assert net.client.request_rotation() == 1
        run_for(net, net.client.config.join_timeout + 1.0)
    assert len(lost) == 1 + NEW_KEY_ANSWERS
    assert server_of(net).key_generation == 1
    assert net.client.key_generation == 0
    assert net.client.request_rotation() == 1
    assert net.run(lambda: active(net, 1), max_time=net.now + 15.0)
    # and then all is quiet: the two active ends do not echo
    answered = len(new_keys(down.sent))
    run_for(net, 30.0)
    assert len(new_keys(down.sent)) == answered


# the rotation interval


def test_key_rotation_interval_rotates_after_each_activation() -> None:
    config = ConnectionConfig(mode=Mode.E, key_rotation_interval=5.0)
    net = established(e_net(config))
    confirmed(net)
    times = {}

    def on_event(connection: Connection, event: ev.Event) -> None:
        if connection is net.client and isinstance(event, ev.KeysActivated):
            times[event.generation] = net.now

    net.on_event = on_event
    start = net.now
    confirmed(net, 3)
    assert times[1] - start == pytest.approx(5.0, abs=0.05)
    assert times[2] - times[1] == pytest.approx(5.0, abs=0.05)
    assert times[3] - times[2] == pytest.approx(5.0, abs=0.05)
    # the server, without the setting, only followed
    assert server_of(net).config.key_rotation_interval is None


def test_a_closing_end_starts_no_periodic_rotation() -> None:
    # the client closed its side; the server keeps its own open (a
    # half-close) for as long as it likes: the client's interval asks
    # for no generation after its DATA_FIN, though the server's data
    # still comes
    config = ConnectionConfig(mode=Mode.E, key_rotation_interval=1.0)
    net = confirmed(established(e_net(config)))
    net.client.close()
    run_for(net, 0.5)
    asked_before = len(net.client_side.of_type(ev.KeysRequested))
    server_of(net).send(b"still here")
    run_for(net, 10.0)
    assert bytes(net.client_side.data).endswith(b"still here")
    assert len(net.client_side.of_type(ev.KeysRequested)) == asked_before
    assert net.client.key_generation == 0


def test_the_interval_takes_the_keys_a_forged_new_key_asked_for() -> None:
    # the interval falls due while a forged NEW_KEY's request is open:
    # the keys that come start the rotation, and the interval goes on
    config = ConnectionConfig(mode=Mode.E, key_rotation_interval=5.0)
    net = confirmed(established(e_net(config)))
    net.derive = None
    net.inject(0, forged(1))
    run_for(net, 5.5)
    assert net.client_side.of_type(ev.KeysRequested) == [ev.KeysRequested(1)]
    assert net.client.install_keys(generation_keys(1))
    net.derive = generation_keys
    confirmed(net, 2)


@pytest.mark.parametrize("both", [False, True], ids=["client", "both"])
def test_a_tiny_rotation_interval_limits_itself(both: bool) -> None:
    # 1 ms between rotations, 10 ms each way on the path: one rotation
    # at a time, the next interval from the last one's end, one request
    # and one NEW_KEY per generation and end, and the data goes through
    interval, delay = 0.001, 0.01
    config = ConnectionConfig(mode=Mode.E, key_rotation_interval=interval)
    server = ConnectionConfig(
        accept_modes=frozenset({Mode.G, Mode.E}),
        key_rotation_interval=interval if both else None,
    )
    net = confirmed(established(e_net(config, server)))
    net.link(0).delay = delay
    times: dict[tuple[int, type, int], float] = {}

    def on_event(connection: Connection, event: ev.Event) -> None:
        end = 0 if connection is net.client else 1
        if isinstance(event, ev.KeysRequested | ev.KeysActivated):
            key = (end, type(event), event.generation)
            assert key not in times, "asked for or activated twice"
            times[key] = net.now

    net.on_event = on_event
    start = net.now
    data = stream(200_000)
    net.client.send(data)
    run_for(net, 1.0)
    assert bytes(net.server_side.data) == b"hello" + data
    assert not net.client_side.of_type(ev.KeyRotationFailed)
    last = net.client.key_generation
    assert last is not None
    # each rotation waits a one-way delay at least, plus the interval
    assert 10 <= last <= (net.now - start) / (delay + interval) + 1
    for pipe in (net.link(0).to_server, net.link(0).to_client):
        # generation 0, each rotation, and one that may be under way
        assert len(new_keys(pipe.sent)) <= last + 2
    # the client's own rotations: each asked for an interval after the
    # one before came into use there, never while one was under way
    for generation in range(2, last + 1):
        asked = times.get((0, ev.KeysRequested, generation))
        if asked is None:
            continue  # the server started this one
        before = times[(0, ev.KeysActivated, generation - 1)]
        assert asked - before >= interval - 1e-9


def test_key_rotation_interval_is_ignored_outside_e() -> None:
    config = ConnectionConfig(key_rotation_interval=1.0)
    net = established(MemNet(config))
    net.run(lambda: net.now >= 5.0)
    assert net.client_side.of_type(ev.KeysRequested) == []
    assert net.client.key_generation is None


@pytest.mark.parametrize("value", [0, -1.0, True, "5", 100000.0])
def test_key_rotation_interval_is_checked(value: object) -> None:
    with pytest.raises(ConfigurationError, match="key_rotation_interval"):
        ConnectionConfig(key_rotation_interval=value)  # type: ignore[arg-type]


# secrets


def test_no_key_or_tag_in_reprs_events_info_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mptls")
    net = confirmed(established(e_net()))
    net.client.request_rotation()
    confirmed(net, 1)
    join(net)
    net.client.abort()
    net.run()
    token_a, token_b = tokens(net)
    secrets: list[bytes] = []
    for generation in (0, 1):
        keys = generation_keys(generation)
        secrets += [keys.key_a, keys.key_b]
        for pair in ((token_a, token_b), (token_b, token_a)):
            secrets += [new_key_tag(*pair, keys), fastclose_tag(*pair, keys)]
    wire = [
        o
        for link in net.links
        for s in link.to_server.sent + link.to_client.sent
        for o in s.options
    ]
    texts = [repr(net.client), repr(server_of(net))]
    texts += [repr(net.client.info()), repr(server_of(net).info())]
    texts += [repr(e) for e in net.client_side.events + net.server_side.events]
    texts += [repr(o) for o in wire]
    texts.append(caplog.text)
    assert any(isinstance(o, NewKey) for o in wire)
    for text in texts:
        for secret in secrets:
            assert secret.hex() not in text
    assert "generation 1" in caplog.text


def test_new_key_is_retransmitted_on_another_subflow() -> None:
    net = confirmed(established(e_net()))
    sid = join(net)
    net.derive = None
    assert net.client.install_keys(generation_keys(1))
    run_for(net, 0.3)
    first = new_keys(net.link(0).to_server.sent)
    again = new_keys(net.link(sid).to_server.sent)
    assert [o.key_id for o in first] == [0, 1]
    assert [o.key_id for o in again] == [1]


def test_a_new_key_waits_for_a_subflow_that_can_carry_it() -> None:
    net = confirmed(established(e_net()))
    net.derive = None
    assert net.client.install_keys(generation_keys(1))
    settle(net)
    net.kill(0)
    server = server_of(net)
    # the server had the client's NEW_KEY: its own waits for a path
    assert server.install_keys(generation_keys(1))
    run_for(net, 1.0)
    assert net.client.key_generation == 0
    sid = join(net)
    confirmed(net, 1)
    assert [o.key_id for o in new_keys(net.link(sid).to_client.sent)] == [1]


def test_g_mode_has_no_generation_and_ignores_new_key() -> None:
    net = established(MemNet())
    token_a, token_b = tokens(net)
    net.inject(0, forged(0, new_key_tag(token_b, token_a, KEYS)))
    settle(net)
    assert net.client.info().key_generation is None
    assert net.client.key_generation is None
    assert net.client.info().keys_installed
    kinds = {type(e) for e in net.client_side.events}
    assert not kinds & {ev.KeysRequested, ev.KeysActivated}
    assert new_keys(net.link(0).to_server.sent) == []
