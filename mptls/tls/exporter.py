"""MPTCP keys from the TLS exporter of a finished OpenSSL connection.

draft-paasch-mptcp-tls-authentication: 16 bytes of
``TLS-Exporter("EXPORTER-MPTCP", no context, 16)`` become Key-A and
Key-B. Generation n >= 1 (key rotation in the spirit of
draft-baerts-tcpm-mptcpext) uses the context ``uint32(n)``; generation 0
uses no context at all, which in TLS 1.2 is not the same as an empty one
(RFC 5705 section 4), and not the same as ``uint32(0)`` in any version.

This module must never export before the handshake is complete (on a
TLS 1.3 server OpenSSL would already answer once the server's Finished is
out, before the client's Finished is verified), never from a TLS 1.2
session without Extended Master Secret (RFC 7627; RFC 9266 sets the same
rule for its exporter), never through the early (0-RTT) exporter, and
never put exporter output anywhere but inside a
:class:`~mptls.tls.keys.KeyMaterial`.
"""

from __future__ import annotations

import struct
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from mptls.errors import (
    ConfigurationError,
    HandshakeIncompleteError,
    TLSError,
    shown_value,
)
from mptls.tls.keys import (
    EXPORTER_LABEL,
    EXPORTER_LENGTH,
    MAX_GENERATION,
    KeyMaterial,
)

# SSL_get_extms_support(3): -1 while a handshake is in progress (or has
# not started), else whether the session used Extended Master Secret
_EXTMS_IN_HANDSHAKE = -1
_EXTMS_USED = 1

_TLS1_2 = 0x0303


def ssl_pointer(connection: SSL.Connection) -> Any:
    """The ``SSL *`` behind a pyOpenSSL connection.

    pyOpenSSL has no public wrapper for SSL_get_extms_support,
    SSL_session_reused, SSL_get0_param or SSL_get_verify_result, so the
    few calls mptls needs go through the binding with this pointer.
    """
    return connection._ssl


def handshake_finished(connection: SSL.Connection) -> bool:
    """Whether OpenSSL considers the connection's handshake finished."""
    support = _lib.SSL_get_extms_support(ssl_pointer(connection))
    return bool(support != _EXTMS_IN_HANDSHAKE)


def policy_problem(connection: SSL.Connection) -> str | None:
    """Why mptls refuses this finished session's keys, or ``None``.

    TLS 1.3 is fine. TLS 1.2 is fine only with Extended Master Secret:
    without it two sessions can share a master secret, and so share MPTCP
    keys (the triple-handshake attack). Anything older is refused.
    """
    version = connection.get_protocol_version()
    if version < _TLS1_2:
        name = connection.get_protocol_version_name()
        return f"peer negotiated {name}; mptls requires TLS 1.2 or later"
    if version == _TLS1_2:
        support = _lib.SSL_get_extms_support(ssl_pointer(connection))
        if support != _EXTMS_USED:
            return (
                "peer negotiated TLS 1.2 without Extended Master Secret "
                "(RFC 7627); mptls takes no keys from such a session"
            )
    return None


def exporter_context(generation: int) -> bytes | None:
    """The exporter context of a key generation: none, or ``uint32(n)``."""
    if isinstance(generation, bool) or not isinstance(generation, int):
        raise ConfigurationError(
            f"key generation must be an integer, got {shown_value(generation)}"
        )
    if not 0 <= generation <= MAX_GENERATION:
        raise ConfigurationError(
            f"key generation must be 0 to {MAX_GENERATION}, got {generation}"
        )
    if generation == 0:
        return None
    return struct.pack("!I", generation)


def export_mptcp_keys(
    connection: SSL.Connection, *, generation: int = 0
) -> KeyMaterial:
    """Key-A and Key-B of generation ``generation`` from ``connection``.

    Raises :class:`~mptls.errors.HandshakeIncompleteError` before the
    handshake has finished and :class:`~mptls.errors.TLSError` when the
    session breaks mptls's policy (TLS 1.2 without Extended Master
    Secret) or OpenSSL refuses.
    """
    context = exporter_context(generation)
    if not handshake_finished(connection):
        raise HandshakeIncompleteError(
            "the TLS handshake is not complete: no MPTCP keys yet"
        )
    problem = policy_problem(connection)
    if problem is not None:
        raise TLSError(problem)
    try:
        output = connection.export_keying_material(
            EXPORTER_LABEL, EXPORTER_LENGTH, context
        )
    except SSL.Error as exc:
        raise TLSError("OpenSSL refused the TLS exporter") from exc
    return KeyMaterial(output, generation=generation)
