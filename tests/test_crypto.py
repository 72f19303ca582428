"""Known answers for mptls.mptcp.crypto.

The vectors come from vectors.json and protocol.md section 9. The
"hand-derived" constants were computed once from the formulas with
hashlib and hmac and are written here as hex, so a wrong byte order or
a wrong slice in the module fails them.
"""

from __future__ import annotations

import hashlib
import hmac
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest

from mptls.errors import ConfigurationError
from mptls.mptcp.crypto import (
    IdsnRule,
    add_addr_hmac,
    fastclose_tag,
    fastclose_value,
    idsn_from_token,
    join_hmac,
    mptcp_hmac,
    new_key_tag,
    rfc8684_idsn,
    rfc8684_token,
)
from mptls.mptcp.options import (
    CapableFlag,
    MpCapable,
    MpFastclose,
    NewKey,
    decode_options,
    encode_option,
)
from mptls.tls.keys import KeyMaterial

# protocol.md 9.3: Key-A/Key-B from the RFC 8448 exporter trace, and
# their RFC 8684 tokens and IDSNs (derived).
KEY_A = bytes.fromhex("89a873a3e2e80ec3")
KEY_B = bytes.fromhex("0b5eba7b3c4541df")
TLS13_TOKENS_IDSNS = [
    (KEY_A, "e8e581c2", 0x83BF04F90C29F94A),
    (KEY_B, "d591c3f5", 0xEC338A3C5259652B),
]

# Hand-derived, nonces R-A = 0x01020304, R-B = 0xa1b2c3d4.
R_A = 0x01020304
R_B = 0xA1B2C3D4
HMAC_A = bytes.fromhex(
    "fb167ed3310b2674b130e3c8a34b0689ea010ba5f9ac6b5c25ded4ff7eae9c90"
)
HMAC_B = bytes.fromhex(
    "6967244d6eca3f39bfa2a9fa47cacfd89d1b0afaae98c419151da1ce825982c5"
)


# Linux KUnit vectors (protocol.md 9.1)


def _kunit_cases(vectors: dict[str, Any]) -> list[dict[str, str]]:
    cases: list[dict[str, str]] = vectors["linux_kunit_hmac"]["cases"]
    assert len(cases) == 3
    return cases


def test_linux_kunit_hmac_vectors_read_as_ascii(
    vectors: dict[str, Any],
) -> None:
    for case in _kunit_cases(vectors):
        key = case["key_ascii"].encode("ascii")
        message = case["msg_ascii"].encode("ascii")
        expected = bytes.fromhex(case["hmac"])
        assert mptcp_hmac(key[:8], key[8:], message) == expected


def test_linux_kunit_hmac_vectors_fail_when_hex_decoded(
    vectors: dict[str, Any],
) -> None:
    # The regression protocol.md warns about: the C strings are bytes as
    # written, and hex-decoding them must not reproduce the digests.
    for case in _kunit_cases(vectors):
        key = bytes.fromhex(case["key_ascii"])
        message = bytes.fromhex(case["msg_ascii"])
        wrong = mptcp_hmac(key[:4], key[4:], message)
        assert wrong != bytes.fromhex(case["hmac"])


def test_mptcp_hmac_is_keyed_by_the_concatenation() -> None:
    # Only key1 || key2 matters, not where the split falls.
    assert mptcp_hmac(b"abc", b"defgh", b"m") == mptcp_hmac(
        b"abcde", b"fgh", b"m"
    )
    assert mptcp_hmac(KEY_A, KEY_B, b"m") != mptcp_hmac(KEY_B, KEY_A, b"m")
    assert len(mptcp_hmac(KEY_A, KEY_B, b"")) == 32


# RFC 8684 token and IDSN


@pytest.mark.parametrize(
    ("key1", "key2", "message"),
    [(8, b"k" * 8, b"m"), (b"k" * 8, 3, b"m"), (b"k" * 8, b"k" * 8, "m")],
)
def test_mptcp_hmac_takes_only_bytes(
    key1: Any, key2: Any, message: Any
) -> None:
    # bytes() of an int is that many zero bytes: mptcp_hmac(8, ...) was
    # an HMAC under a key of zeros
    with pytest.raises(ConfigurationError, match="bytes"):
        mptcp_hmac(key1, key2, message)


def test_rfc8684_token_and_idsn_vectors(vectors: dict[str, Any]) -> None:
    for case in vectors["rfc8684_token_idsn"]:
        key = bytes.fromhex(case["key"])
        assert rfc8684_token(key) == bytes.fromhex(case["token"])
        assert rfc8684_idsn(key) == int(case["idsn"], 16)


@pytest.mark.parametrize(("key", "token", "idsn"), TLS13_TOKENS_IDSNS)
def test_tls13_exporter_keys_tokens_and_idsns(
    key: bytes, token: str, idsn: int
) -> None:
    assert rfc8684_token(key) == bytes.fromhex(token)
    assert rfc8684_idsn(key) == idsn


def test_tls13_vector_split_gives_key_a_and_key_b(
    vectors: dict[str, Any],
) -> None:
    exporter = vectors["tls13_exporter_rfc8448"]
    output = bytes.fromhex(exporter["output"])
    assert output[:8] == KEY_A == bytes.fromhex(exporter["key_a"])
    assert output[8:] == KEY_B == bytes.fromhex(exporter["key_b"])


@pytest.mark.parametrize("bad", [b"", b"1234567", b"123456789", "01234567"])
def test_rfc8684_token_refuses_wrong_key_lengths(bad: Any) -> None:
    with pytest.raises(ConfigurationError):
        rfc8684_token(bad)
    with pytest.raises(ConfigurationError):
        rfc8684_idsn(bad)


# G-mode IDSN and MP_FASTCLOSE


def test_idsn_from_token_sha256_is_the_low_64_bits() -> None:
    token = bytes.fromhex("0102030405060708")
    # Same hashing as an RFC 8684 key, so the 9.2 vector applies.
    assert idsn_from_token(token) == 0xF5A101D3D29D6F72
    assert idsn_from_token(token, IdsnRule.SHA256) == rfc8684_idsn(token)


def test_idsn_from_token_paasch2016_is_the_high_64_bits_of_sha1() -> None:
    token = bytes.fromhex("0102030405060708")
    assert idsn_from_token(token, IdsnRule.PAASCH2016) == 0xDD5783BCF1E9002B
    digest = hashlib.sha1(token).digest()
    assert idsn_from_token(token, IdsnRule.PAASCH2016) == int.from_bytes(
        digest[:8], "big"
    )


def test_idsn_rules_disagree() -> None:
    token = b"\xa1\xa2\xa3\xa4\xa5\xa6\xa7\xa8"
    assert idsn_from_token(token, IdsnRule.SHA256) != idsn_from_token(
        token, IdsnRule.PAASCH2016
    )


def test_idsn_from_token_accepts_32_bit_tokens_only_besides_64() -> None:
    assert 0 <= idsn_from_token(b"\x00\x00\x00\x01") < 2**64
    for bad in (b"", b"123", b"12345", b"123456789"):
        with pytest.raises(ConfigurationError):
            idsn_from_token(bad)


def test_fastclose_value_hashes_the_receiver_key() -> None:
    assert fastclose_value(KEY_B, IdsnRule.SHA256) == bytes.fromhex(
        "d591c3f59131cc05"
    )
    assert fastclose_value(KEY_B, IdsnRule.PAASCH2016) == bytes.fromhex(
        "f9c622524c6de996"
    )
    # Under SHA-256 its first 4 bytes are the RFC 8684 token of that key.
    assert fastclose_value(KEY_B, IdsnRule.SHA256)[:4] == rfc8684_token(KEY_B)


# MP_JOIN HMACs (RFC 8684 3.2)


def test_join_hmacs_put_the_sender_first() -> None:
    assert join_hmac(KEY_A, KEY_B, R_A, R_B) == HMAC_A
    assert join_hmac(KEY_B, KEY_A, R_B, R_A) == HMAC_B


def test_join_hmac_truncations_used_on_the_wire() -> None:
    hmac_a = join_hmac(KEY_A, KEY_B, R_A, R_B)
    hmac_b = join_hmac(KEY_B, KEY_A, R_B, R_A)
    assert hmac_b[:8] == bytes.fromhex("6967244d6eca3f39")  # SYN/ACK
    assert hmac_a[:20] == bytes.fromhex(
        "fb167ed3310b2674b130e3c8a34b0689ea010ba5"
    )  # third ACK


def test_join_hmac_depends_on_every_input() -> None:
    reference = join_hmac(KEY_A, KEY_B, R_A, R_B)
    variants = [
        join_hmac(KEY_B, KEY_A, R_A, R_B),
        join_hmac(KEY_A, KEY_B, R_B, R_A),
        join_hmac(KEY_A, KEY_B, R_A + 1, R_B),
        join_hmac(KEY_A, KEY_B, R_A, R_B ^ 1),
    ]
    assert reference not in variants


@pytest.mark.parametrize("nonce", [-1, 2**32, "1"])
def test_join_hmac_refuses_bad_nonces(nonce: Any) -> None:
    with pytest.raises(ConfigurationError):
        join_hmac(KEY_A, KEY_B, nonce, R_B)


def test_join_hmac_errors_never_quote_the_key() -> None:
    with pytest.raises(ConfigurationError) as caught:
        join_hmac(KEY_A + b"\x00", KEY_B, R_A, R_B)
    assert KEY_A.hex() not in str(caught.value)
    assert repr(KEY_A) not in str(caught.value)


# ADD_ADDR HMAC (RFC 8684 3.4.1)


def test_add_addr_hmac_ipv4_with_port_is_the_rightmost_8_bytes() -> None:
    full = bytes.fromhex(
        "9f455fc2a845a49cedfd9a233aa81ebd9e92303d9a53098baa81edda19433e1e"
    )
    value = add_addr_hmac(KEY_A, KEY_B, 5, IPv4Address("192.0.2.7"), 8443)
    assert value == full[-8:]
    assert value != full[:8]


def test_add_addr_hmac_ipv6_without_port_hashes_a_zero_port() -> None:
    full = bytes.fromhex(
        "796aa91514c5b8193d6b09e4650d55c684ebc4c91a7d219467f8294928607722"
    )
    address = IPv6Address("2001:db8::7")
    value = add_addr_hmac(KEY_B, KEY_A, 6, address, None)
    assert value == full[24:32]
    assert value == add_addr_hmac(KEY_B, KEY_A, 6, address, 0)


def test_add_addr_hmac_matches_the_formula() -> None:
    address = ip_address("198.51.100.9")
    message = bytes([9]) + address.packed + (443).to_bytes(2, "big")
    expected = mptcp_hmac(KEY_A, KEY_B, message)[24:]
    assert add_addr_hmac(KEY_A, KEY_B, 9, address, 443) == expected


@pytest.mark.parametrize(
    ("address_id", "address", "port"),
    [
        (256, IPv4Address("192.0.2.1"), None),
        (-1, IPv4Address("192.0.2.1"), None),
        (1, "192.0.2.1", None),
        (1, IPv4Address("192.0.2.1"), 65536),
    ],
)
def test_add_addr_hmac_refuses_bad_fields(
    address_id: Any, address: Any, port: Any
) -> None:
    with pytest.raises(ConfigurationError):
        add_addr_hmac(KEY_A, KEY_B, address_id, address, port)


# G-mode wire examples (protocol.md section 3)


def test_g_mode_wire_examples() -> None:
    token_a = bytes(range(1, 9))
    token_b = bytes(range(0xA1, 0xA9))
    syn = MpCapable(CapableFlag.G | CapableFlag.H)
    syn_ack = MpCapable(CapableFlag.G, sender_key=token_b)
    ack = MpCapable(CapableFlag.G, sender_key=token_a, receiver_key=token_b)
    assert encode_option(syn) == bytes.fromhex("1e040103")
    assert encode_option(syn_ack) == bytes.fromhex("1e0c0102a1a2a3a4a5a6a7a8")
    assert encode_option(ack) == bytes.fromhex(
        "1e1401020102030405060708a1a2a3a4a5a6a7a8"
    )
    # The responder's IDSN comes from the token it chose.
    assert idsn_from_token(token_b) == int.from_bytes(
        hashlib.sha256(token_b).digest()[24:], "big"
    )


# E mode (draft-baerts): NEW_KEY and MP_FASTCLOSE tags, protocol.md
# section 7 and section 11 item 12. Hand-derived, with the protocol.md
# 9.3 exporter output as generation 0 and 32-bit tokens.

E_KEYS = KeyMaterial(KEY_A + KEY_B)
E_TOKEN_A = bytes.fromhex("01020304")
E_TOKEN_B = bytes.fromhex("a1a2a3a4")
# HMAC-SHA256(Token-A || Token-B, Key-A || Key-B), and B's with the
# tokens swapped.
E_HMAC_FROM_A = bytes.fromhex(
    "d9a70e22be22576c10460509ea3e1412520c7d001dc022487984307b74476873"
)
E_HMAC_FROM_B = bytes.fromhex(
    "f2b599ef93c62655845eaf8d243c5167b82f5d4264fe8cacc296759ebb13391b"
)


def test_new_key_tag_is_the_rightmost_8_bytes() -> None:
    from_a = new_key_tag(E_TOKEN_A, E_TOKEN_B, E_KEYS)
    from_b = new_key_tag(E_TOKEN_B, E_TOKEN_A, E_KEYS)
    assert from_a == bytes.fromhex("7984307b74476873") == E_HMAC_FROM_A[24:]
    assert from_b == bytes.fromhex("c296759ebb13391b") == E_HMAC_FROM_B[24:]


def test_fastclose_tag_is_the_leftmost_8_bytes() -> None:
    from_a = fastclose_tag(E_TOKEN_A, E_TOKEN_B, E_KEYS)
    from_b = fastclose_tag(E_TOKEN_B, E_TOKEN_A, E_KEYS)
    assert from_a == bytes.fromhex("d9a70e22be22576c") == E_HMAC_FROM_A[:8]
    assert from_b == bytes.fromhex("f2b599ef93c62655") == E_HMAC_FROM_B[:8]


def test_e_mode_tags_match_the_formula() -> None:
    # The formula written out again, for 64-bit tokens and another
    # generation: the tokens key the HMAC, the 16 exporter bytes are the
    # message.
    exporter_output = bytes(range(0x30, 0x40))
    keys = KeyMaterial(exporter_output, generation=7)
    token_a = bytes(range(1, 9))
    token_b = bytes(range(0xA1, 0xA9))
    full = hmac.new(token_a + token_b, exporter_output, "sha256").digest()
    assert new_key_tag(token_a, token_b, keys) == full[-8:]
    assert fastclose_tag(token_a, token_b, keys) == full[:8]


def test_e_mode_tags_depend_on_every_input() -> None:
    other_keys = KeyMaterial(KEY_B + KEY_A, generation=1)
    tags = {
        new_key_tag(E_TOKEN_A, E_TOKEN_B, E_KEYS),
        new_key_tag(E_TOKEN_B, E_TOKEN_A, E_KEYS),
        new_key_tag(E_TOKEN_A, E_TOKEN_B, other_keys),
        new_key_tag(E_TOKEN_A, b"\xa1\xa2\xa3\xa5", E_KEYS),
        fastclose_tag(E_TOKEN_A, E_TOKEN_B, E_KEYS),
        fastclose_tag(E_TOKEN_B, E_TOKEN_A, E_KEYS),
    }
    assert len(tags) == 6


@pytest.mark.parametrize(
    ("sender", "receiver", "keys", "message"),
    [
        (b"", E_TOKEN_B, E_KEYS, "sender token"),
        (b"123", E_TOKEN_B, E_KEYS, "sender token"),
        (E_TOKEN_A, b"12345", E_KEYS, "receiver token"),
        (E_TOKEN_A, b"123456789", E_KEYS, "receiver token"),
        ("0102", E_TOKEN_B, E_KEYS, "sender token"),
        (E_TOKEN_A, None, E_KEYS, "receiver token"),
        (E_TOKEN_A, bytes(range(8)), E_KEYS, "same length"),
        (E_TOKEN_A, E_TOKEN_B, KEY_A + KEY_B, "KeyMaterial"),
        (E_TOKEN_A, E_TOKEN_B, None, "KeyMaterial"),
    ],
)
def test_e_mode_tags_refuse_bad_inputs(
    sender: Any, receiver: Any, keys: Any, message: str
) -> None:
    for function in (new_key_tag, fastclose_tag):
        with pytest.raises(ConfigurationError, match=message) as caught:
            function(sender, receiver, keys)
        text = str(caught.value)
        for secret in (KEY_A, KEY_B, E_TOKEN_A, E_TOKEN_B):
            assert secret.hex() not in text
            assert repr(secret) not in text


def test_e_mode_wire_examples() -> None:
    # A confirms generation 0 in slot 0, B closes with the key of slot 1.
    new_key = NewKey(0, new_key_tag(E_TOKEN_A, E_TOKEN_B, E_KEYS))
    assert encode_option(new_key) == bytes.fromhex("1e0c90007984307b74476873")
    fastclose = MpFastclose(
        fastclose_tag(E_TOKEN_B, E_TOKEN_A, E_KEYS), key_id=1
    )
    wire = encode_option(fastclose)
    assert wire == bytes.fromhex("1e0c7100f2b599ef93c62655")
    assert decode_options(wire, syn=False, ack=True) == (fastclose,)
    third_ack = MpCapable(CapableFlag.E, E_TOKEN_A, E_TOKEN_B)
    assert encode_option(third_ack) == bytes.fromhex(
        "1e0c010801020304a1a2a3a4"
    )
    # the IDSN of an E token is the 32-bit token rule of idsn_from_token
    assert idsn_from_token(E_TOKEN_A) == int.from_bytes(
        hashlib.sha256(E_TOKEN_A).digest()[24:], "big"
    )


# A Linux 6.18 kernel's own values (RFC 8684 mode, captured over loopback
# from a throwaway connection): the kernel computed these HMACs and
# accepted the join, so the formulas here interoperate with it.

KERNEL_KEY_A = bytes.fromhex("b0a3c3ec12b220d1")
KERNEL_KEY_B = bytes.fromhex("0b8b3e58bf7c03da")
KERNEL_R_A = 0x7C9685D5
KERNEL_R_B = 0x376288F1


def test_linux_kernel_join_token_and_hmacs() -> None:
    assert rfc8684_token(KERNEL_KEY_B) == bytes.fromhex("8d8baf4d")
    hmac_b = join_hmac(KERNEL_KEY_B, KERNEL_KEY_A, KERNEL_R_B, KERNEL_R_A)
    hmac_a = join_hmac(KERNEL_KEY_A, KERNEL_KEY_B, KERNEL_R_A, KERNEL_R_B)
    assert hmac_b[:8] == bytes.fromhex("ac7b80229c8d8eaa")
    assert hmac_a[:20] == bytes.fromhex(
        "18f4363b572ce9f5fa07c7d308ce3bdaecc14a14"
    )


def test_linux_kernel_add_addr_hmacs() -> None:
    address = IPv4Address("127.0.0.3")
    # Announced by B (the listener), then by A, both with id 2, no port.
    from_b = add_addr_hmac(KERNEL_KEY_B, KERNEL_KEY_A, 2, address, None)
    from_a = add_addr_hmac(KERNEL_KEY_A, KERNEL_KEY_B, 2, address, None)
    assert from_b == bytes.fromhex("9260dbd231decacc")
    assert from_a == bytes.fromhex("d3f190e3f4d6e335")


def test_linux_kernel_idsns_match_its_first_data_sequence_numbers() -> None:
    # A's first data byte had DSN 0x82340f3255452c60 = IDSN-A + 1; B's
    # had 0x75a9565361361679 = IDSN-B + 1.
    assert rfc8684_idsn(KERNEL_KEY_A) + 1 == 0x82340F3255452C60
    assert rfc8684_idsn(KERNEL_KEY_B) + 1 == 0x75A9565361361679
