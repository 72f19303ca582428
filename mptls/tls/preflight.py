"""Refuse an OpenSSL context that no handshake can succeed on, up front.

A client's context that lets OpenSSL build no ClientHello, or whose
ClientHello offers nothing newer than TLS 1.1 (its security level
lowered), would fail once its TCP connection was up; a server's that
allows no version or nothing newer than TLS 1.1, holds no certificate
or private key, leaves no cipher, or holds a key that can sign in none
of the versions and ciphers it allows (a DSA key: TLS 1.3 has no
signature scheme for it, OpenSSL's default TLS 1.2 ciphers use none)
would fail at every client that came. :func:`check_startable` finds
these out before anything connects or listens, from OpenSSL's own start
of a handshake on a throwaway SSL object: the reasons it gives, and the
ClientHello it writes. A server's context answers, on another throwaway
SSL object, the ClientHello the same context builds: it offers every
version, cipher and signature algorithm the server allows, so a server
that cannot answer it can answer no client.

What it cannot see is left to the handshake: a cipher list a particular
client shares nothing with. A server whose context has a servername
callback may hand each connection another context, so its own
certificate and key are not asked for; nor are the ciphers, the version
ceiling and the key of a server's context made with
``TLS_SERVER_METHOD``, which can build no ClientHello.

This module must never mark a context used (pyOpenSSL would refuse
every setter of it from then on), nor let an application's callback
hear of a handshake that never was: the throwaway SSL objects quiet the
info callback, a client's offers no ALPN (no selection callback runs),
and the server's answer runs with the context's key log callback
lifted, for it derives TLS 1.3 secrets.
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

# OpenSSL's reasons for a server that cannot answer a ClientHello
# offering all it allows: no version its key can sign in (TLS 1.3 only
# with a key it has no scheme for), no cipher for its key, no signature
# algorithm for it
_CANNOT_SIGN = frozenset(
    {
        b"unsupported protocol",
        b"no shared cipher",
        b"no suitable signature algorithm",
        b"no shared signature algorithms",
    }
)

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
    it could); ``hello`` is what a client's start wrote: its ClientHello
    record.
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
            # a context's ALPN list would have a server's selection
            # callback run on the answer (0 is success here)
            _lib.SSL_set_alpn_protos(ssl, _ffi.NULL, 0)
        result = _lib.SSL_do_handshake(ssl)
        if result > 0 or (
            _lib.SSL_get_error(ssl, result) == _lib.SSL_ERROR_WANT_READ
        ):
            return _Start((), _drain(outgoing))
        return _Start(tuple(_error_reasons()), b"")
    finally:
        _lib.ERR_clear_error()
        _lib.SSL_free(ssl)


def _answer(context: SSL.Context, hello: bytes) -> tuple[bytes, ...]:
    """OpenSSL's reasons why a server on ``context`` cannot answer the
    ClientHello record ``hello``; empty when it can.

    The server picks its version, cipher and signature algorithm and
    signs its first flight, as for a client. Made without pyOpenSSL's
    Connection, which would mark the context used.
    """
    ssl = _lib.SSL_new(context._context)
    if ssl == _ffi.NULL:
        raise MemoryError("OpenSSL could not make an SSL object")
    key_log = _lib.SSL_CTX_get_keylog_callback(context._context)
    try:
        _lib.SSL_set_info_callback(ssl, _QUIET_INFO)
        incoming = _lib.BIO_new(_lib.BIO_s_mem())
        outgoing = _lib.BIO_new(_lib.BIO_s_mem())
        _lib.SSL_set_bio(ssl, incoming, outgoing)
        _lib.SSL_set_accept_state(ssl)
        _lib.BIO_write(incoming, hello, len(hello))
        # OpenSSL logs TLS 1.3 secrets through the context's callback
        # alone: lifted for this one call, so the application's never
        # hears of this handshake
        _lib.SSL_CTX_set_keylog_callback(context._context, _ffi.NULL)
        try:
            result = _lib.SSL_do_handshake(ssl)
        finally:
            _lib.SSL_CTX_set_keylog_callback(context._context, key_log)
        if result > 0 or (
            _lib.SSL_get_error(ssl, result) == _lib.SSL_ERROR_WANT_READ
        ):
            return ()
        return tuple(_error_reasons())
    finally:
        _lib.ERR_clear_error()
        _lib.SSL_free(ssl)


def _drain(bio: Any) -> bytes:
    """All a memory BIO holds."""
    chunks = []
    buffer = _ffi.new("char[]", 4096)
    while (count := _lib.BIO_read(bio, buffer, 4096)) > 0:
        chunks.append(bytes(_ffi.buffer(buffer, count)))
    return b"".join(chunks)


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

    if _picks_context(context):
        # it may hand each connection a context with a certificate
        return
    _check_identity(context)
    if not as_client.reasons:
        _check_signing(context, as_client.hello)


def _picks_context(context: SSL.Context) -> bool:
    """Whether a servername callback may switch each connection's
    context, and with it the certificate and key."""
    return getattr(context, "_tlsext_servername_callback", None) is not None


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


def _check_signing(context: SSL.Context, hello: bytes) -> None:
    """Refuse a server context whose key can sign in none of the
    versions and ciphers it allows.

    ``hello``, the ClientHello the same context builds, offers them all;
    a server that cannot answer it answers no client.
    """
    reasons = _answer(context, hello)
    if not _CANNOT_SIGN.intersection(reasons):
        # anything else is a client's to meet, not a setting's
        return
    said = b", ".join(reasons).decode("ascii", "replace")
    raise ConfigurationError(
        "the server's private key can sign in none of the TLS versions "
        f"and ciphers its OpenSSL context allows (OpenSSL: {said}), so "
        "every client's handshake would fail: a DSA key, say, has no "
        "TLS 1.3 signature scheme and no TLS 1.2 cipher among OpenSSL's "
        "defaults. Use an RSA, ECDSA or Ed25519 key, or allow a cipher "
        "for this key (set_cipher_list, TLS 1.2)"
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
