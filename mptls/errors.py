"""The one exception tree of mptls.

Every error mptls raises on purpose derives from :class:`MptlsError`.
Protocol errors carry their wire reason (an MP_TCPRST reason code, a TLS
alert) so that callers and logs can tell what the peer was told. No error
message ever contains key material.
"""

from __future__ import annotations


class MptlsError(Exception):
    """Root of every error raised by mptls."""


class ConfigurationError(MptlsError, ValueError):
    """A setting is invalid or cannot be carried over."""


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


class NotMptlsPeerError(ProtocolError):
    """The peer does not speak the mptls userspace wire."""

    reset_reason = None


class JoinRefusedError(ProtocolError):
    """An MP_JOIN was refused (bad HMAC, unknown token, policy)."""


class PeerResetError(ProtocolError):
    """The peer reset the MPTCP connection (MP_FASTCLOSE or MP_TCPRST)."""


class TLSError(MptlsError):
    """The TLS layer failed: handshake, certificate, alert or policy.

    ``alert`` is the TLS alert description when one was sent or
    received, else ``None``.
    """

    def __init__(self, message: str, *, alert: int | None = None):
        super().__init__(message)
        self.alert = alert


class CertificateError(TLSError):
    """The peer's certificate or host name did not verify."""


class HandshakeIncompleteError(TLSError):
    """Key material was asked for before the TLS handshake completed."""


class KeysUnavailableError(MptlsError):
    """TLS-derived keys could not be installed where they were required.

    Raised, for instance, by the kernel backend when the application
    requires TLS-keyed joins and the running kernel cannot take external
    keys.
    """


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


class PathError(BackendError):
    """A path could not be added or removed."""


class MptlsTimeoutError(MptlsError, TimeoutError):
    """A handshake, join or close did not finish within its limit."""
