"""Refuse an OpenSSL context that no handshake can succeed on, up front.

A client's context that lets OpenSSL build no ClientHello, or whose
ClientHello offers nothing newer than TLS 1.1 (its security level
lowered), would fail once its TCP connection was up; a server's that
allows no version or nothing newer than TLS 1.1, holds no certificate
or private key, or leaves no cipher would fail at every client that
came. :func:`check_startable` finds these out before anything connects
or listens, from OpenSSL's own start of a handshake on a throwaway SSL
object: the reasons it gives, and the ClientHello it writes.

What it cannot see is left to the handshake: a server's key that can
sign in none of the versions and signature algorithms a client offers
(a DSA key under TLS 1.3, say), or a cipher list a particular client
shares nothing with. A server whose context has a servername callback
may hand each connection another context, so its own certificate and
key are not asked for; nor are the ciphers and the version ceiling of a
server's context made with ``TLS_SERVER_METHOD``, which can build no
ClientHello.

This module must never mark a context used (pyOpenSSL would refuse
every setter of it from then on), nor let an application's callback
hear of a handshake that never was.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mptls.errors import ConfigurationError

# OpenSSL's reasons (ssl_get_min_max_version, ssl_cipher_list_to_bytes,
# and a one-sided method asked for the other side's handshake)
_NO_PROTOCOLS = b"no protocols available"
_NO_CIPHERS = b"no ciphers available"
_WRONG_SIDE = b"called a function you should not call"

# the oldest version mptls runs (RFC 7627 Extended Master Secret on top)
_TLS1_2 = 0x0303

_VERSION_NAMES = {
    0x0300: "SSL 3.0",
    0x0301: "TLS 1.0",
    0x0302: "TLS 1.1",
}

_FIX_VERSIONS = (
    "mptls runs TLS 1.3, or TLS 1.2 with Extended Master Secret: allow "
    "one of them with set_min_proto_version() and "
    "set_max_proto_version() (0: no bound)"
)


def _ignore_info(ssl: Any, where: int, ret: int) -> None:
    """Stand in for an info callback set on the context, so that the
    application never hears of the check's handshake."""


_QUIET_INFO = _ffi.callback("void (*)(const SSL *, int, int)", _ignore_info)


@dataclass(frozen=True, slots=True)
class _Start:
    """What OpenSSL did when a handshake began on a throwaway SSL object.

    ``reasons`` are OpenSSL's reasons why it could not begin (empty when
    it could); ``hello`` is the start of the ClientHello record a
    client's start wrote, up to its legacy_version.
    """

    reasons: tuple[bytes, ...]
    hello: bytes


def _start(context: SSL.Context, server_side: bool) -> _Start:
    """Begin a handshake of the given side on ``context``.

    It runs up to where it would read the peer's first flight: OpenSSL
    checks the context's protocol versions as it begins, and a client
    builds its ClientHello from the versions and ciphers the context
    allows. Made without pyOpenSSL's Connection, which would mark the
    context used.
    """
    ssl = _lib.SSL_new(context._context)
    if ssl == _ffi.NULL:
        raise MemoryError("OpenSSL could not make an SSL object")
    try:
        _lib.SSL_set_info_callback(ssl, _QUIET_INFO)
        incoming = _lib.BIO_new(_lib.BIO_s_mem())
        outgoing = _lib.BIO_new(_lib.BIO_s_mem())
        # the SSL object owns both from here
        _lib.SSL_set_bio(ssl, incoming, outgoing)
        if server_side:
            _lib.SSL_set_accept_state(ssl)
        else:
            _lib.SSL_set_connect_state(ssl)
        result = _lib.SSL_do_handshake(ssl)
        if result > 0 or (
            _lib.SSL_get_error(ssl, result) == _lib.SSL_ERROR_WANT_READ
        ):
            return _Start((), _head(outgoing, _HELLO_HEAD))
        return _Start(tuple(_error_reasons()), b"")
    finally:
        _lib.ERR_clear_error()
        _lib.SSL_free(ssl)


def _head(bio: Any, size: int) -> bytes:
    """Up to ``size`` bytes from the start of a memory BIO."""
    buffer = _ffi.new("char[]", size)
    count = _lib.BIO_read(bio, buffer, size)
    return bytes(_ffi.buffer(buffer, max(count, 0)))


def _error_reasons() -> Iterator[bytes]:
    while code := _lib.ERR_get_error():
        reason = _lib.ERR_reason_error_string(code)
        if reason != _ffi.NULL:
            yield _ffi.string(reason)


# the ClientHello as a record carries it (RFC 8446 sections 4.1.2 and
# 5.1): record header, handshake header, then legacy_version
_HANDSHAKE_RECORD = 22
_CLIENT_HELLO = 1
_LEGACY_VERSION = 5 + 4
_HELLO_HEAD = _LEGACY_VERSION + 2


def offered_ceiling(record: bytes) -> int | None:
    """The newest version up to TLS 1.2 a ClientHello record offers,
    read from the record's first bytes.

    Its legacy_version: TLS 1.2 (0x0303) from a client that allows TLS
    1.2 or newer, which names TLS 1.3 in supported_versions instead
    (RFC 8446 section 4.2.1), and the client's newest version from one
    capped below (RFC 5246 section 7.4.1.2). ``None`` for what does not
    read as a ClientHello: no ground to refuse a context on.
    """
    if (
        len(record) < _HELLO_HEAD
        or record[0] != _HANDSHAKE_RECORD
        or record[5] != _CLIENT_HELLO
    ):
        return None
    version = record[_LEGACY_VERSION : _LEGACY_VERSION + 2]
    return int.from_bytes(version, "big")


# contexts that passed once they could no longer change (pyOpenSSL
# refuses every setter of a context that has made a connection): a
# client's many connects check their context once
_STARTABLE: weakref.WeakSet[SSL.Context] = weakref.WeakSet()


def check_startable(context: SSL.Context, server_side: bool) -> None:
    """Refuse a context no handshake of ``server_side``'s can succeed on.

    Raises :class:`~mptls.errors.ConfigurationError` saying what is
    wrong and how to fix it. A context that passes and has made a
    connection is not checked again.
    """
    if context in _STARTABLE:
        return
    if server_side:
        _check_server(context)
    else:
        _check_client(context)
    if getattr(context, "_used", False):
        _STARTABLE.add(context)


def _check_client(context: SSL.Context) -> None:
    start = _start(context, server_side=False)
    if start.reasons:
        raise ConfigurationError(_unstartable("client's", start.reasons))
    _check_ceiling("client's", offered_ceiling(start.hello))


def _check_server(context: SSL.Context) -> None:
    start = _start(context, server_side=True)
    if start.reasons:
        raise ConfigurationError(_unstartable("server's", start.reasons))

    # what a ClientHello from the same context would offer: the
    # ciphers and versions the server can agree on, bounded alike. A
    # context made for servers alone builds none
    as_client = _start(context, server_side=False)
    if _NO_CIPHERS in as_client.reasons:
        raise ConfigurationError(_unstartable("server's", as_client.reasons))
    if not as_client.reasons:
        _check_ceiling("server's", offered_ceiling(as_client.hello))

    _check_identity(context)


def _check_ceiling(whose: str, maximum: int | None) -> None:
    if maximum is None or maximum >= _TLS1_2:
        return
    name = _VERSION_NAMES.get(maximum, f"0x{maximum:04x}")
    raise ConfigurationError(
        f"the {whose} OpenSSL context allows nothing newer than {name} "
        "(its security level lets OpenSSL offer that), and mptls never "
        f"runs below TLS 1.2. {_FIX_VERSIONS}"
    )


def _check_identity(context: SSL.Context) -> None:
    """Refuse a server context without a certificate and its key."""
    if getattr(context, "_tlsext_servername_callback", None) is not None:
        # it may hand each connection a context with a certificate
        return
    if _lib.SSL_CTX_check_private_key(context._context) == 1:
        return
    reasons = list(_error_reasons())
    _lib.ERR_clear_error()
    why = b", ".join(reasons).decode("ascii", "replace") or "no reason"
    raise ConfigurationError(
        "the server's OpenSSL context holds no certificate with its "
        f"private key (OpenSSL: {why}), so every client's handshake "
        "would fail: load them with use_certificate_chain_file() and "
        "use_privatekey_file(), or pass a TLSConfig with certfile"
    )


def _unstartable(whose: str, reasons: tuple[bytes, ...]) -> str:
    """What is wrong with a context OpenSSL can start no handshake on,
    and how to fix it."""
    said = b", ".join(reasons).decode("ascii", "replace")
    if _NO_PROTOCOLS in reasons:
        return (
            f"the {whose} OpenSSL context allows no TLS version (OpenSSL: "
            f"{said}): its minimum is above its maximum, its maximum is "
            "below TLS 1.2, or OP_NO_TLSv1_2 and OP_NO_TLSv1_3 together "
            f"leave none. {_FIX_VERSIONS}"
        )
    if _WRONG_SIDE in reasons:
        made_for, method = (
            ("clients", "TLS_CLIENT_METHOD")
            if whose == "server's"
            else ("servers", "TLS_SERVER_METHOD")
        )
        return (
            f"the {whose} OpenSSL context was made for {made_for} alone "
            f"({method}); make it with TLS_METHOD"
        )
    if _NO_CIPHERS in reasons:
        return (
            f"the {whose} OpenSSL context leaves no cipher to offer "
            f"(OpenSSL: {said}): its TLS 1.2 cipher list "
            "(set_cipher_list) and TLS 1.3 suites "
            "(set_tls13_ciphersuites) hold none usable in the versions "
            "it allows at its security level. Give it one, or allow TLS "
            "1.3 with OpenSSL's default suites"
        )
    return (
        f"OpenSSL can start no handshake on the {whose} OpenSSL context "
        f"(OpenSSL: {said}): its security level, groups or signature "
        "algorithms leave it nothing to offer"
    )
