"""Scenario 7: what the TLS exporter and the MPTCP HMACs cost.

Per connection, mptls exports its MPTCP keys once from TLS
(RFC 5705 / RFC 8446 section 7.5); per join each end computes HMAC-A
and HMAC-B (RFC 8684 section 3.2); per ADD_ADDR one HMAC (section
3.4.1); per key rotation of the E profile each end exports the next
generation (context ``uint32(n)``) and computes two NEW_KEY tags, its
own and the one it checks the peer's against. Each is timed in
microseconds next to a whole TLS 1.3 handshake over memory BIOs (same
certificate, no sockets), so the ratios show the share of the handshake
they add. The key material stays in this
process and is never printed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Callable

from cryptography import x509
from OpenSSL import SSL

from mptls.bench.common import BenchOptions
from mptls.bench.harness import ScenarioResult, Variant, interleave
from mptls.bench.stacks import Pki
from mptls.mptcp.crypto import add_addr_hmac, join_hmac, new_key_tag
from mptls.tls.config import parse_private_key
from mptls.tls.exporter import export_mptcp_keys

NAME = "keys"
TITLE = "Key export and HMAC costs"
ANNOUNCED = ipaddress.ip_address("192.0.2.2")
# E-profile tokens are 4 bytes; any pair serves to time the tags
TOKEN_A = bytes.fromhex("0a0b0c0d")
TOKEN_B = bytes.fromhex("01020304")
ROTATED_GENERATION = 1


def _contexts(pki: Pki) -> tuple[SSL.Context, SSL.Context]:
    server = SSL.Context(SSL.TLS_METHOD)
    server.set_min_proto_version(SSL.TLS1_3_VERSION)
    chain = x509.load_pem_x509_certificates(pki.chain.read_bytes())
    server.use_certificate(chain[0])
    for extra in chain[1:]:
        server.add_extra_chain_cert(extra)
    server.use_privatekey(
        parse_private_key(pki.key.read_bytes(), repr(str(pki.key)))
    )
    client = SSL.Context(SSL.TLS_METHOD)
    client.set_min_proto_version(SSL.TLS1_3_VERSION)
    client.load_verify_locations(str(pki.ca))
    client.set_verify(SSL.VERIFY_PEER)
    return server, client


def _step(connection: SSL.Connection) -> None:
    # a handshake over memory BIOs waits for the other end's bytes
    with contextlib.suppress(SSL.WantReadError):
        connection.do_handshake()


def handshake(
    server_context: SSL.Context, client_context: SSL.Context
) -> SSL.Connection:
    """One TLS 1.3 handshake over memory BIOs; the client's connection."""
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    for _ in range(10):
        _step(client)
        _pump(client, server)
        _step(server)
        _pump(server, client)
        if (
            client.get_state_string()
            == server.get_state_string()
            == (b"SSL negotiation finished successfully")
        ):
            break
    _step(client)
    return client


def _pump(source: SSL.Connection, target: SSL.Connection) -> None:
    while True:
        try:
            data = source.bio_read(65536)
        except SSL.WantReadError:
            return
        if not data:
            return
        target.bio_write(data)


def _per_call(operation: Callable[[], object], count: int) -> float:
    """Wall-clock microseconds per call of ``operation``."""
    started = time.perf_counter()
    for _ in range(count):
        operation()
    return (time.perf_counter() - started) / count * 1e6


async def run(options: BenchOptions, pki: Pki) -> ScenarioResult:
    rounds = options.rounds_or(5)
    handshakes = options.size(200, 10)
    calls = options.size(20_000, 500)
    result = ScenarioResult(
        NAME, TITLE, "us/operation", False, rounds, options.quick
    )
    server_context, client_context = _contexts(pki)
    client = handshake(server_context, client_context)
    keys = export_mptcp_keys(client)
    key_a, key_b = keys.key_a, keys.key_b

    def join_pair() -> None:
        join_hmac(key_a, key_b, 0x01020304, 0x05060708)
        join_hmac(key_b, key_a, 0x05060708, 0x01020304)

    def rotation() -> None:
        # one end's work for one rotation: the next generation, its own
        # tag and the tag the peer's NEW_KEY must match
        fresh = export_mptcp_keys(client, generation=ROTATED_GENERATION)
        new_key_tag(TOKEN_A, TOKEN_B, fresh)
        new_key_tag(TOKEN_B, TOKEN_A, fresh)

    variants = [
        Variant(
            "tls-handshake",
            lambda: _per_call(
                lambda: handshake(server_context, client_context),
                handshakes,
            ),
            "TLS 1.3 handshake, both ends, memory BIOs",
        ),
        Variant(
            "exporter",
            lambda: _per_call(lambda: export_mptcp_keys(client), calls),
            "EXPORTER-MPTCP keys, once per connection and end",
        ),
        Variant(
            "join-hmacs",
            lambda: _per_call(join_pair, calls),
            "HMAC-A and HMAC-B, each end of each join",
        ),
        Variant(
            "add-addr-hmac",
            lambda: _per_call(
                lambda: add_addr_hmac(key_a, key_b, 1, ANNOUNCED, 443),
                calls,
            ),
            "one ADD_ADDR HMAC",
        ),
        Variant(
            "rotation",
            lambda: _per_call(rotation, calls),
            "E profile key rotation, one end: export + two NEW_KEY tags",
        ),
    ]
    result.variants = await interleave(variants, rounds)
    for name in ("exporter", "join-hmacs", "add-addr-hmac", "rotation"):
        result.add_ratio(name, "tls-handshake")
    result.notes.append(
        "ratios to tls-handshake are the share of one handshake that each "
        "operation adds"
    )
    return result
