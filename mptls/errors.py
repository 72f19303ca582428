"""The one exception tree of mptls.

Every error mptls raises on purpose derives from :class:`MptlsError`.
Protocol errors carry their wire reason (an MP_TCPRST reason code, a TLS
alert) so that callers and logs can tell what the peer was told. No error
message ever contains key material.

Where asyncio with stdlib ``ssl`` raises a standard exception for the
same event, the mptls error is one too, so that code written for asyncio
streams catches it unchanged: a TLS failure is an ``ssl.SSLError``, a
certificate that does not verify an ``ssl.SSLCertVerificationError``, a
peer's reset, a connection that lost every path or a peer that ends it
in the handshake (one that is not mptls's too) a
``ConnectionResetError``, a refused connect a ``ConnectionRefusedError``,
a host name that does not resolve a ``socket.gaierror`` (any other
refusal of the OS an ``OSError`` with its ``errno``), a timeout
a ``TimeoutError`` (the TLS handshake's a
``ConnectionAbortedError`` too).
"""

from __future__ import annotations

import errno as _errno
import socket
import ssl


class MptlsError(Exception):
    """Root of every error raised by mptls."""


class ConfigurationError(MptlsError, ValueError):
    """A setting is invalid or cannot be carried over."""


class SocketInUseError(ConfigurationError, RuntimeError):
    """``sock=`` names a socket that a live connection carries already.

    A ``RuntimeError`` too, as asyncio's loop raises for a socket one of
    its transports uses. It is refused before anything touches it, so
    the connection that carries it goes on.
    """


class ProtocolError(MptlsError):
    """The peer (or a local caller) broke the MPTCP or framing rules.

    ``reset_reason`` is the MP_TCPRST reason code sent, or to be sent,
    to the peer (RFC 8684 section 3.6); ``None`` when no reset applies.
    """

    reset_reason: int | None = 0x01

    def __init__(self, message: str, *, reset_reason: int | None = None):
        super().__init__(message)
        if reset_reason is not None:
            self.reset_reason = reset_reason


class OptionError(ProtocolError):
    """An MPTCP option is malformed (bad length, subtype or field)."""


class FramingError(ProtocolError):
    """A userspace subflow frame is malformed."""


class NotMptlsPeerError(ProtocolError, ConnectionResetError):
    """The peer does not speak the mptls userspace wire.

    A ``ConnectionResetError`` too (``errno`` ``ECONNRESET``): a server
    that is not mptls's ends the connection before the TLS handshake is
    over, for which asyncio's TLS raises one, so code written for it
    still catches this.
    """

    reset_reason = None

    def __init__(self, message: str, *, reset_reason: int | None = None):
        super().__init__(message, reset_reason=reset_reason)
        _set_errno(self, _errno.ECONNRESET, message)

    def __str__(self) -> str:
        return _message_of(self)


class JoinRefusedError(ProtocolError, ConnectionResetError):
    """An MP_JOIN was refused (bad HMAC, unknown token, policy, load),
    or went unanswered until the connection's ``join_timeout`` ended it
    (:class:`JoinTimeoutError`).

    ``transient``: the refusal says nothing against the path and a join
    later may be taken (the T flag of MP_TCPRST, RFC 8684 section 3.6):
    the peer is out of room or failed-join credit for now. A refusal
    of policy or of a bad HMAC is not transient.

    A ``ConnectionResetError`` too (``errno`` ``ECONNRESET``): the peer
    reset the join's TCP connection, and when the connection had no
    other subflow left it ends with this error, which code written for
    asyncio streams catches as the reset of its connection.
    """

    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        reset_reason: int | None = None,
        transient: bool = False,
    ):
        super().__init__(message, reset_reason=reset_reason)
        _set_errno(self, _errno.ECONNRESET, message)
        self.transient = transient

    def __str__(self) -> str:
        return _message_of(self)


def _set_errno(error: OSError, code: int, message: str) -> None:
    """Give ``error`` the ``errno`` and ``strerror`` stdlib's would have.

    Set after ``__init__`` rather than passed to it, so that ``args``
    (and so pickling and ``str``) keep the message alone.
    """
    error.errno = code
    error.strerror = message


def _message_of(error: BaseException) -> str:
    # an OSError with an errno shows "[Errno N] ..."; these show the
    # message alone, as they did before they had one
    return str(error.args[0]) if error.args else ""


class PeerResetError(ProtocolError, ConnectionResetError):
    """The peer reset the MPTCP connection (MP_FASTCLOSE or MP_TCPRST),
    or ended it before the TLS handshake was over.

    A ``ConnectionResetError`` too, as a reset TCP connection is, with
    its ``errno`` (``ECONNRESET``). ``unacknowledged`` is how many bytes
    this end had sent or queued that the peer had not acknowledged at
    the data level when it reset; ``None`` where that is not known (the
    kernel backend's resets).
    """

    unacknowledged: int | None = None

    def __init__(
        self,
        message: str,
        *,
        reset_reason: int | None = None,
        unacknowledged: int | None = None,
    ):
        super().__init__(message, reset_reason=reset_reason)
        _set_errno(self, _errno.ECONNRESET, message)
        if unacknowledged is not None:
            self.unacknowledged = unacknowledged

    def __str__(self) -> str:
        return _message_of(self)


class PathsLostError(MptlsError, ConnectionResetError):
    """Every subflow closed without a DATA_FIN, and no join can follow.

    The connection cannot go on (it has no keys to join with yet, or
    joins are off), so its end is as abrupt as a TCP reset and is a
    ``ConnectionResetError`` too (``errno`` ``ECONNRESET``).
    """

    def __init__(self, message: str):
        super().__init__(message)
        _set_errno(self, _errno.ECONNRESET, message)

    def __str__(self) -> str:
        return _message_of(self)


class TLSError(MptlsError, ssl.SSLError):
    """The TLS layer failed: handshake, certificate, alert or policy.

    ``alert`` is the TLS alert description when one was sent or
    received, else ``None``. An ``ssl.SSLError`` too, as stdlib TLS
    failures are: ``errno`` is ``ssl.SSL_ERROR_SSL``, ``library``
    ``"SSL"`` and ``reason`` empty (the message says what OpenSSL
    reported).
    """

    library = "SSL"
    reason = ""

    def __init__(self, message: str, *, alert: int | None = None):
        super().__init__(message)
        _set_errno(self, ssl.SSL_ERROR_SSL, message)
        self.alert = alert

    def __str__(self) -> str:
        return _message_of(self)


# OpenSSL's X509_V_ERR_UNSPECIFIED, for a failure with no verify result
UNSPECIFIED_VERIFY_CODE = 1


class CertificateError(TLSError, ssl.SSLCertVerificationError):
    """The peer's certificate or host name did not verify.

    An ``ssl.SSLCertVerificationError`` too, with stdlib's ``reason``:
    ``verify_code`` is OpenSSL's verify result (an ``X509_V_ERR_*``
    value) and ``verify_message`` the message.
    """

    reason = "CERTIFICATE_VERIFY_FAILED"

    def __init__(
        self,
        message: str,
        *,
        alert: int | None = None,
        verify_code: int = UNSPECIFIED_VERIFY_CODE,
    ):
        super().__init__(message, alert=alert)
        self.verify_code = verify_code
        self.verify_message = message


class HandshakeIncompleteError(TLSError):
    """Key material was asked for before the TLS handshake completed."""


class KeysUnavailableError(MptlsError):
    """TLS-derived keys could not be installed where they were required.

    Raised, for instance, by the kernel backend when the application
    requires TLS-keyed joins and the running kernel cannot take external
    keys.
    """


class TokenError(MptlsError):
    """A token allocator cannot do what was asked: every serial of its
    worker is used (restart it with a new worker id or secret), or
    ``release()`` names a token it does not hold (released already, or
    another allocator's)."""


class BackendError(MptlsError):
    """A backend could not do what was asked (socket, kernel, netlink)."""


class ConnectError(BackendError, OSError):
    """The operating system refused to connect, listen or resolve a name.

    It is an :class:`OSError` too, with the original ``errno`` and a
    ``strerror`` that names the host and port, so that code written for
    asyncio that catches ``OSError`` keeps working. ``host`` and ``port``
    say where it was aimed.
    """

    def __init__(
        self,
        errno: int | None,
        strerror: str,
        *,
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(errno, strerror)
        self.host = host
        self.port = port

    def __str__(self) -> str:
        return str(self.strerror)

    @staticmethod
    def of(
        errno: int | None,
        strerror: str,
        *,
        host: str | None = None,
        port: int | None = None,
        lookup: bool = False,
    ) -> ConnectError:
        """The error for ``errno``: a refusal is a ConnectRefusedError, a
        failed name lookup (``lookup``, its errno getaddrinfo's) a
        HostLookupError."""
        kind: type[ConnectError] = ConnectError
        if lookup:
            kind = HostLookupError
        elif errno == _errno.ECONNREFUSED:
            kind = ConnectRefusedError
        return kind(errno, strerror, host=host, port=port)


class ConnectRefusedError(ConnectError, ConnectionRefusedError):
    """Nothing listens where the connection was aimed (ECONNREFUSED).

    A ``ConnectionRefusedError`` too, as asyncio raises for a refused
    connect: a loop that waits for a server to come up keeps working.
    """


class HostLookupError(ConnectError, socket.gaierror):
    """The host name could not be resolved.

    A ``socket.gaierror`` too, with getaddrinfo's ``errno``
    (``socket.EAI_NONAME``, say), as asyncio raises for an unknown
    host: code that tells a name that does not resolve from a server
    that does not answer keeps working.
    """


class PathError(BackendError):
    """A path could not be added or removed."""


class AddressError(ConfigurationError, PathError):
    """An address that no subflow can run from or to: a multicast or
    broadcast one, or an unspecified one where a host must be named.

    A :class:`ConfigurationError`, as every other bad address given to
    mptls, and a :class:`PathError`, as the kernel backend refuses such
    an address for an endpoint; refused before any socket is made.
    """


class MptlsTimeoutError(MptlsError, TimeoutError):
    """A handshake, join or close did not finish within its limit."""


class HandshakeTimeoutError(MptlsTimeoutError, ConnectionAbortedError):
    """The TLS handshake did not finish within ``ssl_handshake_timeout``.

    A ``TimeoutError``, as every mptls timeout is, and a
    ``ConnectionAbortedError`` too: asyncio's TLS aborts the connection
    with one when its handshake takes too long.
    """


class JoinTimeoutError(JoinRefusedError, MptlsTimeoutError):
    """A join went unanswered until the connection's ``join_timeout``
    ended it: the far end may have said nothing at all (a listener that
    never answers, or a SYN it held).

    A :class:`JoinRefusedError`, as every join that failed at the far
    end is, and an :class:`MptlsTimeoutError` (so a ``TimeoutError``)
    too, with ``errno`` ``ETIMEDOUT``, for no one refused it. An
    ``add_path`` whose own, shorter ``timeout`` passes first raises
    :class:`MptlsTimeoutError` instead.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        _set_errno(self, _errno.ETIMEDOUT, message)


# the longest argument an error message repeats as it was given
_SHOWN_CHARS = 40


def shown_value(value: object) -> str:
    """``value`` as an error about a bad argument repeats it: its repr,
    cut to a readable length.

    An int of more than 64 bits is named by its size. Its digits say
    nothing more, and past 4300 of them Python refuses to make them a
    string at all (a ``ValueError`` of its own): the message about the
    argument must not fail in its place.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 64:
            return f"an int of {value.bit_length()} bits"
        return repr(value)
    try:
        shown = repr(value)
    except Exception:
        # an object whose repr fails is still a bad argument to name
        return f"a {type(value).__name__} object"
    if len(shown) > _SHOWN_CHARS:
        return shown[: _SHOWN_CHARS - 3] + "..."
    return shown
