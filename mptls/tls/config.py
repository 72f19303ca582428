"""TLS settings for mptls, and the one place they become OpenSSL contexts.

:class:`TLSConfig` is the settings object of mptls; :func:`to_openssl_context`
turns whatever the public ``ssl=`` argument holds into an
``OpenSSL.SSL.Context`` plus the host-name-check decision for the engine.

What ``ssl=`` accepts, and what each form gives:

- a :class:`TLSConfig`: a context built from it on first use and kept
  by the config for every later connection of the same side (a context
  holds the trust store, which is the costly part of a connect); files
  are read when that context is built, as stdlib ``ssl`` reads them in
  ``load_verify_locations``;
- an ``OpenSSL.SSL.Context``: used as it is, with renegotiation and
  compression switched off on top (on the context when it has made no
  connection yet, and always on each connection by the engine); clients
  check the host name when the context verifies peers (``VERIFY_PEER``);
  one context serves any number of connections; one no handshake can
  succeed on (no protocol version or none newer than TLS 1.1, no
  cipher to offer, a server's without certificate or key: see
  :mod:`mptls.tls.preflight`) is refused before anything connects or
  listens;
- ``True`` (clients only): ``TLSConfig()``, that is TLS 1.3, the system's
  CA certificates and a host name check; its context is built once per
  process;
- a client-side ``ssl.SSLContext`` (``PROTOCOL_TLS_CLIENT`` or
  ``PROTOCOL_TLS``), carried over as far as Python lets it be read:

  ==========================  ==========================================
  ``verify_mode``             ``CERT_NONE`` -> no verification;
                              ``CERT_OPTIONAL`` and ``CERT_REQUIRED`` ->
                              ``VERIFY_PEER``
  ``check_hostname``          carried over
  ``minimum_version``         carried over, raised to TLS 1.2 when lower
                              (mptls never runs below TLS 1.2), and to
                              TLS 1.3 by ``OP_NO_TLSv1_2``
  ``maximum_version``         carried over; below TLS 1.2 is an error;
                              ``OP_NO_TLSv1_3`` caps it at TLS 1.2
  CA certificates             the ones ``get_ca_certs(binary_form=True)``
                              returns; when there are none and the context
                              verifies, OpenSSL's default verify paths
  ``verify_flags``            carried over (X509 store flags)
  ciphers                     ``get_ciphers()``: the TLS 1.2 list and the
                              TLS 1.3 suites
  ==========================  ==========================================

  Not carried over, because Python offers no way to read them: ALPN
  protocols (``set_alpn_protocols``), a client certificate and key
  (``load_cert_chain``), CA directories loaded lazily through ``capath``,
  ``sni_callback``, ``keylog_filename`` and ``post_handshake_auth``; nor
  are ``options`` bits other than the two above.
  ``hostname_checks_common_name`` does not apply: mptls never matches a
  host name against the subject's common name. Use a :class:`TLSConfig`
  or an ``OpenSSL.SSL.Context`` when any of these matters. The same
  ``ssl.SSLContext`` passed again is carried over again only when one
  of the settings above has changed since (a CA certificate added, say);
  otherwise its connections share one OpenSSL context, as a
  :class:`TLSConfig`'s do.

What cannot be carried over is a :class:`~mptls.errors.ConfigurationError`,
never a silent downgrade: a server-side ``ssl.SSLContext`` (its private key
cannot be read out), a maximum version below TLS 1.2, a minimum above the
maximum, a maximum of TLS 1.2 with TLS 1.2 ciphers that leave none to
offer, ``ssl=True`` for a server.

Every context built here has TLS 1.3 as its floor unless TLS 1.2 was asked
for, renegotiation and compression off, and session tickets on. This module
must never load a key it was not given, lower the floor below TLS 1.2, or
turn renegotiation back on.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import ssl
import stat
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    rsa,
)
from OpenSSL import SSL, crypto

from mptls.errors import ConfigurationError, shown_value
from mptls.tls.preflight import check_startable

logger = logging.getLogger("mptls.tls")

# refused on every context mptls builds or is handed (RFC 5746 attacks,
# CRIME); applied again per connection by the engine
POLICY_OPTIONS = SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION

# the session id context OpenSSL needs on a server that verifies clients
# and resumes sessions
_SESSION_ID_CONTEXT = b"mptls"


def _missing_file_reason(path: str) -> str:
    """The system's reason why ``path`` cannot be read (``": No such file
    or directory"``, ``": Permission denied"``, ``": Is a directory"``),
    else empty: OpenSSL's own reason is a library code."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            return f": {os.strerror(errno.EISDIR)}"
        if stat.S_ISREG(mode):
            # opened, not only looked at: a file this user may not read
            with open(path, "rb"):
                pass
    except OSError as exc:
        return f": {exc.strerror or type(exc).__name__}"
    # a pipe or a device would wait for a writer here; what OpenSSL read
    # from it was no chain
    return ""


def _refuse_special_file(path: str, failure: str) -> None:
    """Refuse a pipe or a device before anything opens it.

    The context is built on the event loop's thread: opening a FIFO
    waits for a writer, and reading ``/dev/zero`` or ``/dev/urandom``
    never ends, so either held the loop (and every connection on it)
    for good. A path that cannot be looked at is left to the open that
    follows, which says why. ``failure`` starts the error's message.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ConfigurationError(
            f"{failure}: not a regular file (a pipe or a device)"
        )


# ALPN protocol ids are 1 to 255 bytes (RFC 7301 section 3.1)
_ALPN_MAX = 255

PathLike = str | os.PathLike[str]
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
_USABLE_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)


class TLSVersion(IntEnum):
    """The TLS versions mptls can run, by their wire value."""

    TLS1_2 = 0x0303
    TLS1_3 = 0x0304


def _as_tls_version(value: object, what: str) -> TLSVersion:
    # ssl.TLSVersion members and bare wire values are ints too
    problem = f"{what} must be TLS 1.2 or TLS 1.3, got {shown_value(value)}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(problem)
    try:
        return TLSVersion(int(value))
    except ValueError as exc:
        raise ConfigurationError(problem) from exc


def _alpn_wire(protocols: Iterable[str]) -> list[bytes]:
    wire = []
    for protocol in protocols:
        try:
            encoded = protocol.encode("ascii")
        except (AttributeError, UnicodeEncodeError) as exc:
            raise ConfigurationError(
                f"ALPN protocol {shown_value(protocol)} must be an ASCII "
                "string"
            ) from exc
        if not 1 <= len(encoded) <= _ALPN_MAX:
            raise ConfigurationError(
                f"ALPN protocol {shown_value(protocol)} must be 1 to "
                f"{_ALPN_MAX} bytes"
            )
        wire.append(encoded)
    return wire


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The TLS settings of one mptls client or server.

    ``certfile`` holds a PEM certificate chain (leaf first) and, when
    ``keyfile`` is not given, the private key too; the key must not be
    encrypted. ``cafile`` and ``cadata`` (PEM, one or more certificates,
    or one DER certificate) are the trust anchors; a client given neither
    uses the system's. ``verify`` and ``check_hostname`` concern the
    server's certificate as a client sees it. A server verifies client
    certificates only with ``require_client_cert`` and a CA to check them
    against. ``ciphers`` is an OpenSSL cipher string for TLS 1.2; TLS 1.3
    suites keep OpenSSL's defaults. ``minimum_version`` and
    ``maximum_version`` bound the TLS versions as ``ssl.SSLContext``'s
    attributes of the same names do (``TLSVersion``, ``ssl.TLSVersion``
    or the wire value; ``None`` or ``MAXIMUM_SUPPORTED``: no ceiling),
    within the TLS 1.2 and TLS 1.3 that mptls runs; a ceiling of TLS 1.2
    needs ``minimum_version`` lowered to it too.
    """

    certfile: PathLike | None = None
    keyfile: PathLike | None = None
    cafile: PathLike | None = None
    cadata: bytes | None = field(default=None, repr=False)
    verify: bool = True
    check_hostname: bool = True
    require_client_cert: bool = False
    minimum_version: TLSVersion = TLSVersion.TLS1_3
    alpn_protocols: tuple[str, ...] = ()
    ciphers: str | None = None
    maximum_version: TLSVersion | None = None
    # the built contexts by side (True: server), so that a config reused
    # for many connections loads its trust store once; no part of the
    # settings, so neither compared nor shown
    _contexts: dict[bool, SSL.Context] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __getstate__(self) -> list[object]:
        # the built contexts stay behind: OpenSSL's objects do not pickle
        # or copy, and a config used once must still go to a worker
        # pool's processes, which build their own
        return [
            {} if name == "_contexts" else getattr(self, name)
            for name in self.__slots__
        ]

    def __setstate__(self, state: list[object]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        self._check_types()
        version = _as_tls_version(self.minimum_version, "minimum_version")
        object.__setattr__(self, "minimum_version", version)
        object.__setattr__(self, "maximum_version", self._ceiling())
        if isinstance(self.alpn_protocols, str | bytes | bytearray):
            # a bytes one was read byte by byte: "ALPN protocol 104"
            raise ConfigurationError(
                "alpn_protocols must be a sequence of strings, not "
                f"{type(self.alpn_protocols).__name__}"
            )
        try:
            protocols = tuple(self.alpn_protocols)
        except TypeError:
            raise ConfigurationError(
                "alpn_protocols must be a sequence of strings, got "
                f"{shown_value(self.alpn_protocols)}"
            ) from None
        _alpn_wire(protocols)
        object.__setattr__(self, "alpn_protocols", protocols)
        if self.keyfile is not None and self.certfile is None:
            raise ConfigurationError("keyfile given without certfile")
        if self.require_client_cert and not self._has_ca:
            raise ConfigurationError(
                "require_client_cert needs cafile or cadata to check "
                "client certificates against"
            )

    def _ceiling(self) -> TLSVersion | None:
        # ssl.TLSVersion members and bare wire values come in too
        value: object = self.maximum_version
        if value is None or value is ssl.TLSVersion.MAXIMUM_SUPPORTED:
            return None
        ceiling = _as_tls_version(value, "maximum_version")
        if ceiling < self.minimum_version:
            raise ConfigurationError(
                f"maximum_version {ceiling.name} is below minimum_version "
                f"{self.minimum_version.name}: mptls's floor is TLS 1.3 "
                "unless lowered, so pass minimum_version=TLSVersion.TLS1_2 "
                "too"
            )
        return ceiling

    def _check_types(self) -> None:
        # a wrong type would surface only when a context is built, as a
        # TypeError from deep inside open() or OpenSSL
        for name in ("certfile", "keyfile", "cafile"):
            value = getattr(self, name)
            if value is not None and not isinstance(
                value, str | bytes | os.PathLike
            ):
                raise ConfigurationError(
                    f"{name} must be a path (str, bytes or os.PathLike), "
                    f"got {type(value).__name__}"
                )
            if value is not None and "\0" in os.fsdecode(value):
                # OpenSSL reads a C string: it would open the file named
                # by what comes before the NUL, silently
                raise ConfigurationError(f"{name} contains a NUL character")
        if self.cadata is not None and not isinstance(self.cadata, bytes):
            raise ConfigurationError(
                f"cadata must be bytes, got {type(self.cadata).__name__}"
            )
        if self.ciphers is not None and not isinstance(self.ciphers, str):
            raise ConfigurationError(
                f"ciphers must be a str, got {type(self.ciphers).__name__}"
            )
        for name in ("verify", "check_hostname", "require_client_cert"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"{name} must be True or False")

    @property
    def _has_ca(self) -> bool:
        return self.cafile is not None or self.cadata is not None

    @property
    def hostname_checked(self) -> bool:
        """Whether a client built from this config checks the host name."""
        return self.verify and self.check_hostname

    def client_context(self) -> SSL.Context:
        """An OpenSSL context for the client end of a connection."""
        context = _base_context(self.minimum_version, self.maximum_version)
        if self.verify:
            context.set_verify(SSL.VERIFY_PEER)
            if self._has_ca:
                self._load_trust(context)
            else:
                _load_default_trust(context)
        else:
            context.set_verify(SSL.VERIFY_NONE)
        if self.certfile is not None:
            self._load_identity(context, self.certfile)
        if self.alpn_protocols:
            context.set_alpn_protos(_alpn_wire(self.alpn_protocols))
        self._load_ciphers(context)
        return context

    def server_context(self) -> SSL.Context:
        """An OpenSSL context for the server end of a connection."""
        if self.certfile is None:
            raise ConfigurationError("a server needs certfile")
        context = _base_context(self.minimum_version, self.maximum_version)
        context.set_session_id(_SESSION_ID_CONTEXT)
        self._load_identity(context, self.certfile)
        if self.require_client_cert:
            context.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            )
            # the CA names the server asks for (RFC 8446 section 4.2.4)
            for anchor in self._load_trust(context):
                context.add_client_ca(anchor.to_cryptography())
        else:
            context.set_verify(SSL.VERIFY_NONE)
        if self.alpn_protocols:
            context.set_alpn_select_callback(
                _alpn_selector(_alpn_wire(self.alpn_protocols))
            )
        self._load_ciphers(context)
        return context

    def _load_identity(self, context: SSL.Context, certfile: PathLike) -> None:
        chain = os.fsdecode(certfile)
        _refuse_special_file(
            chain, f"cannot load the certificate chain from {chain!r}"
        )
        try:
            context.use_certificate_chain_file(chain)
        except SSL.Error as exc:
            # OpenSSL's reason for a missing file is a library code; say
            # it as the system would
            why = _missing_file_reason(chain)
            raise ConfigurationError(
                f"cannot load the certificate chain from {chain!r}{why}"
            ) from exc
        keyfile = os.fsdecode(self.keyfile or certfile)
        try:
            context.use_privatekey(_read_private_key(keyfile))
            context.check_privatekey()
        except SSL.Error as exc:
            raise ConfigurationError(
                f"the private key in {keyfile!r} does not match the "
                f"certificate in {chain!r}"
            ) from exc

    def _load_trust(self, context: SSL.Context) -> list[crypto.X509]:
        """Load cafile and cadata; return the anchors for CA name lists."""
        anchors: list[crypto.X509] = []
        if self.cafile is not None:
            cafile = os.fsdecode(self.cafile)
            _refuse_special_file(cafile, f"cannot read the CA file {cafile!r}")
            try:
                with open(cafile, "rb") as handle:
                    anchors.extend(_parse_certificates(handle.read(), cafile))
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read the CA file {cafile!r}: {exc.strerror}"
                ) from exc
        if self.cadata is not None:
            anchors.extend(_parse_certificates(self.cadata, "cadata"))
        _add_anchors(context, anchors)
        return anchors

    def _load_ciphers(self, context: SSL.Context) -> None:
        if self.ciphers is None:
            return
        try:
            context.set_cipher_list(self.ciphers.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError) as exc:
            raise ConfigurationError(
                f"OpenSSL accepts no cipher from {shown_value(self.ciphers)}"
            ) from exc


def _read_private_key(keyfile: str) -> PrivateKey:
    """The unencrypted PEM or DER private key in ``keyfile``.

    Loaded here rather than by OpenSSL so that an encrypted key is a clear
    error, never a passphrase prompt on the terminal.
    """
    _refuse_special_file(keyfile, f"cannot read the key file {keyfile!r}")
    try:
        with open(keyfile, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the key file {keyfile!r}: {exc.strerror}"
        ) from exc
    return parse_private_key(data, repr(keyfile))


def parse_private_key(data: bytes, source: str) -> PrivateKey:
    """The unencrypted PEM or DER private key in ``data``.

    Only the key types a TLS context takes pass; ``source`` names where
    ``data`` came from in the error, which never shows the key itself.
    """
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigurationError(
            f"{source} holds no unencrypted private key mptls can use"
        ) from exc
    if not isinstance(key, _USABLE_KEYS):
        raise ConfigurationError(
            f"{source} holds a {type(key).__name__}, not a TLS key"
        )
    return key


def _alpn_selector(
    ours: list[bytes],
) -> Callable[[SSL.Connection, list[bytes]], Any]:
    """The server's ALPN choice: its own first protocol the client offers.

    With no overlap the handshake goes on without ALPN rather than failing
    (RFC 7301 section 3.2 allows either; a missing ALPN is the caller's to
    judge).
    """

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in ours:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def _base_context(
    minimum_version: TLSVersion, maximum_version: TLSVersion | None = None
) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(int(minimum_version))
    if maximum_version is not None:
        context.set_max_proto_version(int(maximum_version))
    context.set_options(POLICY_OPTIONS)
    return context


def _load_default_trust(context: SSL.Context) -> None:
    try:
        context.set_default_verify_paths()
    except SSL.Error as exc:
        raise ConfigurationError(
            "cannot load the system's CA certificates"
        ) from exc


# one certificate of a PEM file; text around the blocks (a bundle's
# comments) is no part of any
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----",
    re.DOTALL,
)


def _parse_certificates(data: bytes, source: str) -> list[crypto.X509]:
    """The certificates of ``data`` (PEM, one or more; or one DER).

    Read by OpenSSL, which verifies against them, as
    :func:`_add_der_anchors` reads a stdlib context's: ``cryptography``'s
    stricter parse warns about (and in later releases refuses) CA
    certificates that system bundles still hold, such as one with a
    serial number of zero, and would refuse such a bundle whole.
    """
    try:
        if b"-----BEGIN" not in data:
            return [crypto.load_certificate(crypto.FILETYPE_ASN1, data)]
        blocks = _PEM_CERTIFICATE.findall(data)
        if not blocks:
            raise ValueError("no PEM certificate")
        return [
            crypto.load_certificate(crypto.FILETYPE_PEM, block)
            for block in blocks
        ]
    except (ValueError, crypto.Error) as exc:
        raise ConfigurationError(
            f"{source} holds no readable PEM or DER certificate"
        ) from exc


def _add_anchors(context: SSL.Context, anchors: Iterable[crypto.X509]) -> None:
    store = context.get_cert_store()
    if store is None:
        raise ConfigurationError("the OpenSSL context has no X509 store")
    for anchor in anchors:
        store.add_cert(anchor)


def _add_der_anchors(context: SSL.Context, anchors: Iterable[bytes]) -> None:
    """Trust what a stdlib context trusts, read by OpenSSL as it read it.

    Not through ``cryptography``, whose stricter parse warns about (and
    in later releases refuses) CA certificates that system stores still
    hold, such as one with a serial number of zero.
    """
    store = context.get_cert_store()
    if store is None:
        raise ConfigurationError("the OpenSSL context has no X509 store")
    for der in anchors:
        try:
            store.add_cert(crypto.load_certificate(crypto.FILETYPE_ASN1, der))
        except crypto.Error as exc:
            raise ConfigurationError(
                "the ssl.SSLContext trusts a CA certificate OpenSSL cannot "
                "read back"
            ) from exc


# ssl= in the public API

# contexts handed in that this module has put its policy options on;
# pyOpenSSL refuses set_options once a context has made a connection
_POLICED: weakref.WeakSet[SSL.Context] = weakref.WeakSet()


@functools.cache
def _default_client() -> TLSConfig:
    # ssl=True: one TLSConfig(), so its context is built once per process
    return TLSConfig()


def _cached_context(config: TLSConfig, server_side: bool) -> SSL.Context:
    context = config._contexts.get(server_side)
    if context is None:
        if server_side:
            context = config.server_context()
        else:
            context = config.client_context()
        # its ciphers may leave none to offer under its version bounds
        check_startable(context, server_side)
        config._contexts[server_side] = context
    return context


def _police(context: SSL.Context) -> None:
    if context in _POLICED:
        return
    try:
        context.set_options(POLICY_OPTIONS)
    except ValueError:
        # already made a connection elsewhere, so it can no longer be
        # changed; the engine sets the same options on every connection
        logger.debug("OpenSSL context in use; policy set per connection")
    _POLICED.add(context)


def to_openssl_context(
    ssl_arg: object, *, server_side: bool
) -> tuple[SSL.Context, bool]:
    """Turn a public ``ssl=`` value into a context and a host-name decision.

    Returns the ``OpenSSL.SSL.Context`` to build engines from and whether
    a client must check the server's host name (always ``False`` for
    servers). See the module docstring for what each form carries.
    """
    if isinstance(ssl_arg, TLSConfig):
        context = _cached_context(ssl_arg, server_side)
        return context, ssl_arg.hostname_checked and not server_side
    if isinstance(ssl_arg, SSL.Context):
        _police(ssl_arg)
        check_startable(ssl_arg, server_side)
        verifies = bool(ssl_arg.get_verify_mode() & SSL.VERIFY_PEER)
        return ssl_arg, verifies and not server_side
    if ssl_arg is True:
        if server_side:
            raise ConfigurationError(
                "a server needs a certificate: pass a TLSConfig with "
                "certfile, or an OpenSSL context"
            )
        config = _default_client()
        return _cached_context(config, False), config.hostname_checked
    if isinstance(ssl_arg, ssl.SSLContext):
        if server_side:
            raise ConfigurationError(
                "a server-side ssl.SSLContext cannot be used: its private "
                "key cannot be read out; pass a TLSConfig instead"
            )
        return _carried_over(ssl_arg)
    raise ConfigurationError(
        "ssl must be a TLSConfig, an OpenSSL.SSL.Context, a client "
        f"ssl.SSLContext or True, not {type(ssl_arg).__name__}"
    )


# stdlib contexts carried over, each with the settings it was carried
# over from and the result: carrying one over loads its CA certificates
# into a new store (about 9 ms for a system's 140), which a client that
# passes one context to every open_connection would pay at each
_CARRIED: weakref.WeakKeyDictionary[
    ssl.SSLContext, tuple[tuple[object, ...], tuple[SSL.Context, bool]]
] = weakref.WeakKeyDictionary()


def _carried_over(source: ssl.SSLContext) -> tuple[SSL.Context, bool]:
    """:func:`_from_stdlib`, done again only when ``source`` changed."""
    settings = _stdlib_settings(source)
    known = _CARRIED.get(source)
    if known is not None and known[0] == settings:
        return known[1]
    carried = _from_stdlib(source)
    _CARRIED[source] = (settings, carried)
    return carried


def _stdlib_settings(source: ssl.SSLContext) -> tuple[object, ...]:
    """All that :func:`_from_stdlib` reads of ``source``, cheaply.

    Its CA certificates by their count: an ``ssl.SSLContext``'s store
    only grows (nothing removes a certificate from it), so the same
    count is the same certificates. Its ciphers by name, since
    ``set_ciphers`` may change them in any way.
    """
    return (
        source.protocol,
        source.verify_mode,
        source.check_hostname,
        source.minimum_version,
        source.maximum_version,
        int(source.options),
        int(source.verify_flags),
        source.cert_store_stats()["x509_ca"],
        tuple(cipher["name"] for cipher in source.get_ciphers()),
    )


def _from_stdlib(source: ssl.SSLContext) -> tuple[SSL.Context, bool]:
    if source.protocol not in (ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS):
        raise ConfigurationError(
            f"an ssl.SSLContext with {source.protocol.name} cannot be "
            "carried over; use PROTOCOL_TLS_CLIENT"
        )
    minimum, maximum = _stdlib_versions(source)
    context = _base_context(minimum, maximum)

    # trust
    verifies = source.verify_mode != ssl.CERT_NONE
    if verifies:
        context.set_verify(SSL.VERIFY_PEER)
        der_anchors = source.get_ca_certs(binary_form=True)
        if der_anchors:
            _add_der_anchors(context, der_anchors)
        else:
            _load_default_trust(context)
        store = context.get_cert_store()
        if store is not None and source.verify_flags:
            store.set_flags(int(source.verify_flags))
    else:
        context.set_verify(SSL.VERIFY_NONE)

    _stdlib_ciphers(source, context)
    if maximum is not None and maximum < TLSVersion.TLS1_3:
        # its TLS 1.2 ciphers alone may leave none to offer; with TLS
        # 1.3 allowed its suites remain, which the ssl module cannot
        # take away (set_ciphers names TLS 1.2 ciphers only)
        check_startable(context, server_side=False)
    logger.debug(
        "carried over ssl.SSLContext: verify=%s check_hostname=%s "
        "minimum=%s maximum=%s",
        verifies,
        source.check_hostname,
        minimum.name,
        maximum.name if maximum else "none",
    )
    return context, source.check_hostname and verifies


def _stdlib_versions(
    source: ssl.SSLContext,
) -> tuple[TLSVersion, TLSVersion | None]:
    low = source.minimum_version
    high = source.maximum_version
    maximum: TLSVersion | None = None
    if high is not ssl.TLSVersion.MAXIMUM_SUPPORTED:
        if high < ssl.TLSVersion.TLSv1_2:
            raise ConfigurationError(
                f"maximum_version {high.name} is below TLS 1.2, which "
                "mptls requires"
            )
        maximum = _as_tls_version(high, "maximum_version")
    if low is ssl.TLSVersion.MINIMUM_SUPPORTED or low < ssl.TLSVersion.TLSv1_2:
        minimum = TLSVersion.TLS1_2
    else:
        minimum = _as_tls_version(low, "minimum_version")
    # the older way to bound versions, which stdlib ssl still obeys:
    # dropping it would let TLS 1.2 through a context that refuses it
    if source.options & ssl.Options.OP_NO_TLSv1_2:
        minimum = max(minimum, TLSVersion.TLS1_3)
    if source.options & ssl.Options.OP_NO_TLSv1_3 and (
        maximum is None or maximum > TLSVersion.TLS1_2
    ):
        maximum = TLSVersion.TLS1_2
    if maximum is not None and minimum > maximum:
        raise ConfigurationError(
            f"the ssl.SSLContext's floor, {minimum.name}, is above its "
            f"ceiling, {maximum.name} (from minimum_version, "
            "maximum_version and the OP_NO_TLSv1_* options)"
        )
    return minimum, maximum


def _stdlib_ciphers(source: ssl.SSLContext, context: SSL.Context) -> None:
    ciphers = source.get_ciphers()
    tls12 = [c["name"] for c in ciphers if c["protocol"] != "TLSv1.3"]
    tls13 = [c["name"] for c in ciphers if c["protocol"] == "TLSv1.3"]
    try:
        if tls12:
            context.set_cipher_list(":".join(tls12).encode("ascii"))
        if tls13:
            context.set_tls13_ciphersuites(":".join(tls13).encode("ascii"))
    except SSL.Error as exc:
        raise ConfigurationError(
            "OpenSSL accepts none of the ssl.SSLContext's ciphers"
        ) from exc
