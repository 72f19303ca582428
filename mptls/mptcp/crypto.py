"""The hashes and HMACs of MPTCP: tokens, IDSNs, join and ADD_ADDR HMACs.

Formulas come from RFC 8684 (sections 3.1, 3.2, 3.4.1 and 3.5), from
the G mode of draft-paasch-mptcp-application-authentication and from
the E mode of draft-baerts-tcpm-mptcpext, with the choices recorded in
protocol.md section 11 (items 4, 10, 11, 12 and 14). Every HMAC is
HMAC-SHA256, keyed with the sender's key (or token) followed by the
receiver's.

Keys are 8-byte strings, tokens 4 or 8. These functions are pure: no
I/O, no logging, and no error message ever quotes a key or a digest.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from enum import Enum
from ipaddress import IPv4Address, IPv6Address

from mptls.errors import ConfigurationError, shown_value
from mptls.tls.keys import KeyMaterial

__all__ = [
    "IdsnRule",
    "add_addr_hmac",
    "fastclose_tag",
    "fastclose_value",
    "idsn_from_token",
    "join_hmac",
    "mptcp_hmac",
    "new_key_tag",
    "rfc8684_idsn",
    "rfc8684_token",
]

KEY_LENGTH = 8
TAG_LENGTH = 8
_TOKEN_LENGTHS = (4, 8)
_NONCES = struct.Struct(">II")
_ID_AND_PORT = struct.Struct(">BH")


class IdsnRule(Enum):
    """How a G-mode IDSN (and MP_FASTCLOSE value) is hashed.

    ``SHA256`` follows RFC 8684's hash family. ``PAASCH2016`` is the
    SHA-1 reading of the 2016 draft. Both peers must use the same rule
    (protocol.md section 11 item 4).
    """

    SHA256 = "sha256"
    PAASCH2016 = "paasch2016"


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_LENGTH:
        raise ConfigurationError(f"{what} must be {KEY_LENGTH} bytes")


def _check_token(token: bytes, what: str) -> None:
    valid = isinstance(token, bytes | bytearray)
    if not valid or len(token) not in _TOKEN_LENGTHS:
        raise ConfigurationError(f"{what} must be 4 or 8 bytes")


def _check_u32(value: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ConfigurationError(f"{what} must be an unsigned 32-bit integer")


def mptcp_hmac(key1: bytes, key2: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 keyed with ``key1 || key2``: the full 32 bytes."""
    for value, what in ((key1, "key1"), (key2, "key2"), (message, "message")):
        # bytes() of an int is that many zero bytes: a key of zeros
        if not isinstance(value, bytes | bytearray):
            raise ConfigurationError(f"{what} must be bytes")
    return hmac.digest(bytes(key1) + bytes(key2), message, "sha256")


def rfc8684_token(key: bytes) -> bytes:
    """The RFC 8684 token of a key: the first 4 bytes of SHA-256(key)."""
    _check_key(key, "key")
    return hashlib.sha256(key).digest()[:4]


def rfc8684_idsn(key: bytes) -> int:
    """The RFC 8684 IDSN of a key: SHA-256(key)[24:32], big-endian."""
    _check_key(key, "key")
    return int.from_bytes(hashlib.sha256(key).digest()[24:], "big")


def idsn_from_token(token: bytes, rule: IdsnRule = IdsnRule.SHA256) -> int:
    """The IDSN of a G-mode token (8 bytes; 4 for 32-bit tokens).

    ``SHA256`` takes the least-significant 64 bits of SHA-256(token), as
    RFC 8684 does with a key. ``PAASCH2016`` takes the most-significant
    64 bits of SHA-1(token), as the draft says.
    """
    if not isinstance(token, bytes | bytearray) or len(token) not in (4, 8):
        raise ConfigurationError("token must be 4 or 8 bytes")
    if rule is IdsnRule.SHA256:
        digest = hashlib.sha256(token).digest()[-8:]
    elif rule is IdsnRule.PAASCH2016:
        digest = hashlib.sha1(token).digest()[:8]
    else:
        raise ConfigurationError(f"unknown IDSN rule {shown_value(rule)}")
    return int.from_bytes(digest, "big")


def join_hmac(
    sender_key: bytes,
    receiver_key: bytes,
    sender_nonce: int,
    receiver_nonce: int,
) -> bytes:
    """The full 32-byte MP_JOIN HMAC (RFC 8684 3.2).

    ``HMAC-SHA256(sender_key || receiver_key, R-sender || R-receiver)``.
    HMAC-A is ``join_hmac(key_a, key_b, r_a, r_b)`` and HMAC-B is
    ``join_hmac(key_b, key_a, r_b, r_a)``. The SYN/ACK carries the
    leftmost 8 bytes and the third ACK the leftmost 20.
    """
    _check_key(sender_key, "sender key")
    _check_key(receiver_key, "receiver key")
    _check_u32(sender_nonce, "sender nonce")
    _check_u32(receiver_nonce, "receiver nonce")
    message = _NONCES.pack(sender_nonce, receiver_nonce)
    return mptcp_hmac(sender_key, receiver_key, message)


def add_addr_hmac(
    sender_key: bytes,
    receiver_key: bytes,
    address_id: int,
    address: IPv4Address | IPv6Address,
    port: int | None,
) -> bytes:
    """The 8-byte ADD_ADDR HMAC (RFC 8684 3.4.1).

    It is the rightmost 8 bytes of
    ``HMAC-SHA256(sender_key || receiver_key, id || address || port)``.
    The port takes 2 bytes and is 0 when none is announced. Linux first
    took the leftmost bytes and left the port out, and both were fixed
    later (protocol.md 2.5).
    """
    _check_key(sender_key, "sender key")
    _check_key(receiver_key, "receiver key")
    if not isinstance(address_id, int) or not 0 <= address_id <= 0xFF:
        raise ConfigurationError("address id must be 0 to 255")
    if not isinstance(address, IPv4Address | IPv6Address):
        raise ConfigurationError("address must be an IPv4 or IPv6 address")
    port_value = 0 if port is None else port
    if not isinstance(port_value, int) or not 0 <= port_value <= 0xFFFF:
        raise ConfigurationError("port must be 0 to 65535")
    id_and_port = _ID_AND_PORT.pack(address_id, port_value)
    message = id_and_port[:1] + address.packed + id_and_port[1:]
    return mptcp_hmac(sender_key, receiver_key, message)[-8:]


def fastclose_value(receiver_key: bytes, rule: IdsnRule) -> bytes:
    """What a G-mode MP_FASTCLOSE carries in place of the receiver's key.

    The most-significant 64 bits of the hash of the receiver's key:
    SHA-256 under ``IdsnRule.SHA256``, SHA-1 under ``PAASCH2016``
    (protocol.md section 11 item 11).
    """
    _check_key(receiver_key, "receiver key")
    if rule is IdsnRule.SHA256:
        return hashlib.sha256(receiver_key).digest()[:8]
    if rule is IdsnRule.PAASCH2016:
        return hashlib.sha1(receiver_key).digest()[:8]
    raise ConfigurationError(f"unknown IDSN rule {shown_value(rule)}")


def _key_hmac(
    sender_token: bytes, receiver_token: bytes, keys: KeyMaterial
) -> bytes:
    """HMAC-SHA256(sender_token || receiver_token, Key-A || Key-B).

    The E profile's one HMAC over a key generation; both tags below are
    halves of it. The tokens key it, the 16 exporter bytes are the
    message (draft-baerts, protocol.md section 7).
    """
    _check_token(sender_token, "sender token")
    _check_token(receiver_token, "receiver token")
    if not isinstance(keys, KeyMaterial):
        raise ConfigurationError("keys must be a KeyMaterial")
    if len(sender_token) != len(receiver_token):
        raise ConfigurationError("the two tokens must have the same length")
    return mptcp_hmac(sender_token, receiver_token, keys.key_a + keys.key_b)


def new_key_tag(
    sender_token: bytes, receiver_token: bytes, keys: KeyMaterial
) -> bytes:
    """The 8-byte tag a NEW_KEY carries for one key generation.

    The rightmost 8 bytes of ``HMAC-SHA256(sender_token ||
    receiver_token, Key-A || Key-B)``: the draft's "low-order 64 bits".
    A sends it with ``(Token-A, Token-B)`` and B with ``(Token-B,
    Token-A)`` (protocol.md section 11 item 12), so the two ends' tags
    for the same keys differ.
    """
    return _key_hmac(sender_token, receiver_token, keys)[-TAG_LENGTH:]


def fastclose_tag(
    sender_token: bytes, receiver_token: bytes, keys: KeyMaterial
) -> bytes:
    """The 8 bytes an E-mode MP_FASTCLOSE carries.

    The leftmost 8 bytes of the same HMAC as :func:`new_key_tag`. The
    draft truncates that HMAC for both options; with the same half, the
    NEW_KEY an end sends (and repeats) would be a valid MP_FASTCLOSE of
    that end for anyone on the path. The other half keeps the two apart:
    seeing one tells nothing about the other.
    """
    return _key_hmac(sender_token, receiver_token, keys)[:TAG_LENGTH]
