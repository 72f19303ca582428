"""A sans-I/O TLS engine on pyOpenSSL memory BIOs.

:class:`TLSEngine` runs one TLS connection without touching a socket, a
clock or an event loop. Ciphertext from the peer goes in through
:meth:`~TLSEngine.receive` and ciphertext for the peer comes out of
:meth:`~TLSEngine.data_to_send`; application bytes go in through
:meth:`~TLSEngine.send` and come out of :meth:`~TLSEngine.read`. The
caller moves bytes; the engine decides.

Outputs are pulled, not returned as events. After every ``receive()`` the
caller looks at three things, each of which only ever changes one way:
``handshake_complete``, ``read()`` and ``eof_received``. A list of
``HandshakeComplete`` / ``DataReceived`` / ``EndOfStream`` events would
carry the same three facts twice, and the asyncio protocol on top needs
the state anyway (to pause reading, to answer ``get_extra_info``).

The engine must never call a handshake complete before the peer is
verified (certificate chain by OpenSSL, host name for clients by
OpenSSL's own X509_VERIFY_PARAM check) and the session meets mptls's
policy (TLS 1.3, or TLS 1.2 with Extended Master Secret; no
renegotiation). It must never export keys before that, and never let a
secret reach a log, a ``repr`` or an error message.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from enum import Enum, IntEnum
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mptls.errors import (
    CertificateError,
    ConfigurationError,
    HandshakeIncompleteError,
    MptlsError,
    TLSError,
    shown_value,
)
from mptls.tls.certinfo import describe_certificate
from mptls.tls.config import POLICY_OPTIONS
from mptls.tls.exporter import export_mptcp_keys, policy_problem, ssl_pointer
from mptls.tls.keys import KeyMaterial
from mptls.tls.outbuf import OUTPUT_POOL, POOLED_MIN, POOLED_SIZE

logger = logging.getLogger("mptls.tls")

# plaintext decrypted into one buffer before it becomes one bytes object:
# one SSL_read returns at most one record of at most 2^14 bytes (RFC 8446
# section 5.1), so a batch of received ciphertext takes many calls, all
# into the same buffer (one per thread: SSL_read runs without the GIL).
# Below malloc's mmap threshold (128 KiB): a larger piece is fresh pages,
# faulted in and zeroed by the kernel, for every piece
RECEIVE_BUFFER = 64 * 1024
# ciphertext dropped per BIO_read when output is discarded
TRANSMIT_CHUNK = 64 * 1024
# plaintext handed to one SSL_write (which cuts it into records)
WRITE_CHUNK = 1024 * 1024

_X509_V_OK = 0

_thread_buffers = threading.local()
_ALLOCATE = _ffi.new_allocator(should_clear_after_alloc=False)
_NO_OUTPUT = memoryview(b"")


def _receive_buffer() -> Any:
    buffer = getattr(_thread_buffers, "receive", None)
    if buffer is None:
        # not zeroed: only what SSL_read wrote is ever read back
        buffer = _ALLOCATE("char[]", RECEIVE_BUFFER)
        _thread_buffers.receive = buffer
    return buffer


_NAME_MISMATCH = {
    _lib.X509_V_ERR_HOSTNAME_MISMATCH,
    _lib.X509_V_ERR_IP_ADDRESS_MISMATCH,
}
# RFC 6125 matching as browsers do it: no "f*o.example" wildcards and no
# fallback to the subject's common name
_HOST_FLAGS = (
    _lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS
    | _lib.X509_CHECK_FLAG_NEVER_CHECK_SUBJECT
)


class AlertLevel(IntEnum):
    """TLS alert levels (RFC 5246 section 7.2)."""

    WARNING = 1
    FATAL = 2


class AlertDescription(IntEnum):
    """TLS alert descriptions (RFC 8446 section 6, RFC 5246 7.2)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    NO_RENEGOTIATION = 100
    MISSING_EXTENSION = 109
    UNSUPPORTED_EXTENSION = 110
    UNRECOGNIZED_NAME = 112
    BAD_CERTIFICATE_STATUS_RESPONSE = 113
    UNKNOWN_PSK_IDENTITY = 115
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120


def alert_name(description: int) -> str:
    """``handshake_failure (40)`` for a known alert, ``alert 222`` else."""
    try:
        return f"{AlertDescription(description).name.lower()} ({description})"
    except ValueError:
        return f"alert {description}"


class _AlertLog:
    """The last fatal alert each way, kept by OpenSSL's info callback.

    Deliberately not the engine itself, so that the table the callback
    looks in does not keep the engine alive; held there weakly, so that
    it goes with its engine.
    """

    __slots__ = ("__weakref__", "received", "sent")

    def __init__(self) -> None:
        self.sent: int | None = None
        self.received: int | None = None

    def on_alert(self, where: int, ret: int) -> None:
        level, description = ret >> 8, ret & 0xFF
        incoming = bool(where & _lib.SSL_CB_READ)
        if level == AlertLevel.FATAL:
            if incoming:
                self.received = description
            else:
                self.sent = description
        if description != AlertDescription.CLOSE_NOTIFY:
            logger.debug(
                "TLS alert %s %s, level %d",
                "received" if incoming else "sent",
                alert_name(description),
                level,
            )


# the alert log of each live SSL object, by its address: one callback for
# every connection, rather than pyOpenSSL's set_info_callback, which builds
# a new C callback per connection and a Python wrapper that looks the
# connection up on each of the twenty-odd calls a handshake makes (about
# a tenth of an in-memory handshake's time, both ends)
_ALERT_LOGS: weakref.WeakValueDictionary[int, _AlertLog] = (
    weakref.WeakValueDictionary()
)
_SSL_CB_ALERT = _lib.SSL_CB_ALERT


def _address(ssl: Any) -> int:
    return int(_ffi.cast("uintptr_t", ssl))


def _on_info(ssl: Any, where: int, ret: int) -> None:
    # OpenSSL calls this at every handshake state change; only alerts
    # matter (RFC 8446 section 6)
    if where & _SSL_CB_ALERT:
        alerts = _ALERT_LOGS.get(_address(ssl))
        if alerts is not None:
            alerts.on_alert(where, ret)


_INFO_CALLBACK = _ffi.callback("void (*)(const SSL *, int, int)", _on_info)


class _State(Enum):
    # singletons compared by identity: hashed in C, not by Enum's
    # Python __hash__, at each state change
    __hash__ = object.__hash__

    NEW = "new"
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    FAILED = "failed"


# the only edges _set_state accepts
_EDGES: dict[_State, frozenset[_State]] = {
    _State.NEW: frozenset({_State.HANDSHAKING, _State.FAILED}),
    _State.HANDSHAKING: frozenset({_State.ESTABLISHED, _State.FAILED}),
    _State.ESTABLISHED: frozenset({_State.FAILED}),
    _State.FAILED: frozenset(),
}


class TLSEngine:
    """One TLS connection over memory BIOs, driven by its caller.

    ``context`` comes from :func:`mptls.tls.config.to_openssl_context`
    or :class:`mptls.tls.config.TLSConfig`; renegotiation and compression
    are switched off on this connection whatever the context says. A
    client with ``check_hostname`` needs ``server_hostname`` and a context
    that verifies the peer. ``session`` (clients) offers a session from an
    earlier connection's :meth:`session` for resumption.

    :meth:`send` before the handshake is complete buffers; the bytes go
    out, in order, right after it completes. :meth:`close` sends
    close_notify (after any buffered bytes) and closes only our direction:
    :meth:`read` keeps returning what the peer sends until its own
    close_notify. After receiving close_notify we may still send.

    Once an error has been raised the engine is failed: :meth:`receive`,
    :meth:`send` and :meth:`export_keys` raise again, while
    :meth:`data_to_send` still hands out a pending alert and :meth:`read`
    what was decrypted (and so authenticated) before the failure.
    """

    def __init__(
        self,
        context: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        check_hostname: bool = True,
        session: SSL.Session | None = None,
    ) -> None:
        if server_side and server_hostname is not None:
            raise ConfigurationError("server_hostname is for clients only")
        if server_side and session is not None:
            raise ConfigurationError("session is for clients only")
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._alerts = _AlertLog()
        self._connection = SSL.Connection(context, None)
        self._connection.set_options(POLICY_OPTIONS)
        pointer = ssl_pointer(self._connection)
        _ALERT_LOGS[_address(pointer)] = self._alerts
        _lib.SSL_set_info_callback(pointer, _INFO_CALLBACK)
        # pyOpenSSL turns partial writes on: one SSL_write per record; a
        # memory BIO never blocks, so let one call cut all the records
        _lib.SSL_clear_mode(pointer, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        if server_side:
            self._connection.set_accept_state()
        else:
            self._connection.set_connect_state()
            self._configure_client(context, check_hostname)
            if session is not None:
                self._connection.set_session(session)

        self._state = _State.NEW
        self._error: TLSError | None = None
        self._handshake_done = False
        self._incoming: list[bytes] = []
        # takes plaintext as a view while nothing older waits (see
        # set_plaintext_sink)
        self._sink: Callable[[memoryview], object] | None = None
        self._pending: list[bytes] = []
        # the outgoing memory BIO (pyOpenSSL has no public accessor)
        self._output_bio = self._connection._from_ssl
        self._mem_data = _ffi.new("char **")
        self._close_requested = False
        self._eof_received = False

    def __repr__(self) -> str:
        role = "server" if self._server_side else "client"
        return f"<TLSEngine {role} {self._state.value}>"

    # setup

    def _configure_client(
        self, context: SSL.Context, check_hostname: bool
    ) -> None:
        name = self._server_hostname
        if check_hostname:
            if name is None:
                raise ConfigurationError(
                    "check_hostname needs server_hostname"
                )
            if not context.get_verify_mode() & SSL.VERIFY_PEER:
                raise ConfigurationError(
                    "check_hostname needs a context that verifies the "
                    "server's certificate (VERIFY_PEER)"
                )
        if name is None:
            return

        # SNI carries host names only (RFC 6066 section 3)
        address = _ip_address(name)
        encoded = _idna(name) if address is None else b""
        if address is None:
            self._connection.set_tlsext_host_name(encoded)
        if not check_hostname:
            return

        # OpenSSL checks the name while verifying the chain, so a mismatch
        # fails the handshake with an alert to the server
        param = _lib.SSL_get0_param(ssl_pointer(self._connection))
        _lib.X509_VERIFY_PARAM_set_hostflags(param, _HOST_FLAGS)
        if address is None:
            ok = _lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded))
        else:
            packed = address.packed
            ok = _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
        if ok != 1:
            raise refused_server_name(name, encoded)

    def _set_state(self, new: _State) -> None:
        if new not in _EDGES[self._state]:
            raise MptlsError(
                f"TLS engine cannot go from {self._state.value} to {new.value}"
            )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "TLS %s: %s -> %s",
                "server" if self._server_side else "client",
                self._state.value,
                new.value,
            )
        self._state = new

    # driving the connection

    def start(self) -> None:
        """Begin the handshake; a client's ClientHello is then ready.

        A server may call it too (it then waits for the ClientHello);
        :meth:`receive` starts an engine that was not started. Calling it
        again does nothing. A client whose context lets OpenSSL build no
        ClientHello gets a :class:`~mptls.errors.TLSError` that says the
        handshake could not start, with no alert: nothing is left to send.
        """
        if self._state is not _State.NEW:
            return
        self._set_state(_State.HANDSHAKING)
        if not self._server_side:
            self._advance_handshake(starting=True)

    def receive(self, data: bytes) -> None:
        """Take ciphertext from the peer and process all it completes.

        Handshake messages advance the handshake; application records are
        decrypted for :meth:`read`; close_notify sets
        :attr:`eof_received`. Raises :class:`~mptls.errors.TLSError`
        (:class:`~mptls.errors.CertificateError` for a peer that did not
        verify) when the connection fails.
        """
        self.receive_all((data,))

    def receive_all(self, chunks: Iterable[bytes]) -> None:
        """:meth:`receive` of consecutive pieces of ciphertext at once.

        One pass of the handshake and of record reading for all of them,
        however the transport cut the stream.
        """
        self._raise_if_failed()
        if self._eof_received:
            # RFC 8446 section 6.1: data after a closure alert MUST be
            # ignored. Not even buffered: a peer cannot grow our memory
            # (what shared the close_notify's own bytes stays unread)
            ignored = sum(len(data) for data in chunks)
            if ignored:
                logger.debug("TLS: %d bytes after close_notify", ignored)
            return
        if self._state is _State.NEW:
            self.start()
        write = self._connection.bio_write
        try:
            for data in chunks:
                if data:
                    write(data)
        except SSL.Error as exc:
            raise self._fail(self._translate(exc)) from exc
        if self._state is _State.HANDSHAKING:
            self._advance_handshake()
        if self._state is _State.ESTABLISHED:
            self._read_records()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt application bytes (buffered until the handshake ends)."""
        if type(data) is not bytes:
            # bytes() of an int is that many zero bytes, of a list of
            # ints its items: only a buffer is data the caller wrote
            try:
                memoryview(data)
            except TypeError:
                raise ConfigurationError(
                    f"send() takes bytes-like data, got {type(data).__name__}"
                ) from None
        self._raise_if_failed()
        if self._close_requested:
            raise TLSError("send() after close(): our direction is closed")
        if not data:
            return
        if self._state is _State.ESTABLISHED:
            self._write(data)
        else:
            self._pending.append(bytes(data))

    def data_to_send(self) -> bytes:
        """All ciphertext waiting for the peer, possibly ``b""``.

        Works after a failure too, so that an alert still goes out.
        """
        output = self.take_output()
        return output.tobytes() if output else b""

    def take_output(self) -> memoryview:
        """:meth:`data_to_send` as a read-only view, copied once.

        The view is the only reference to a buffer made for this call,
        so a transport may keep it (until the peer acknowledges the
        bytes) instead of copying it: pyOpenSSL's ``bio_read`` copies
        the ciphertext twice, into a scratch buffer and then into
        ``bytes``; this copies it once, out of OpenSSL.
        """
        # the memory BIO tells how much it holds: one read of exactly
        # that, and none when it is empty (after most received frames),
        # where pyOpenSSL would raise and catch WantReadError
        bio = self._output_bio
        pending = _lib.BIO_get_mem_data(bio, self._mem_data)
        if pending <= 0:
            return _NO_OUTPUT
        # not zeroed: BIO_read fills all of it
        if POOLED_MIN <= pending <= POOLED_SIZE:
            buffer = OUTPUT_POOL.allocate("char[]", pending)
        else:
            buffer = _ALLOCATE("char[]", pending)
        if _lib.BIO_read(bio, buffer, pending) != pending:
            raise self._fail(TLSError("TLS output could not be read"))
        return memoryview(_ffi.buffer(buffer, pending)).toreadonly()

    def read(self) -> bytes:
        """Application bytes decrypted so far and not yet read, or ``b""``."""
        chunks, self._incoming = self._incoming, []
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    @property
    def unread(self) -> bool:
        """Whether decrypted application bytes wait to be read."""
        return bool(self._incoming)

    def set_plaintext_sink(
        self, sink: Callable[[memoryview], object] | None
    ) -> None:
        """Hand decrypted bytes to ``sink`` as they come, or stop (None).

        While a sink is set and nothing decrypted earlier waits to be
        read, each piece goes to ``sink`` as a view of the engine's own
        buffer instead of becoming a ``bytes`` kept for :meth:`read`:
        one copy less per byte for a sink that copies anyway (a stream
        reader's buffer). The view is valid only during the call, so a
        sink must copy what it keeps. A sink may take itself away from
        within its call; what is decrypted after that waits for
        :meth:`read` as before.
        """
        self._sink = sink

    def read_piece(self) -> bytes:
        """The oldest decrypted piece not yet read, or ``b""``.

        What :meth:`read` returns, without joining: pieces of up to 64 KiB
        in order, so that a reader that pauses stops at a piece boundary
        and nothing is copied just to be handed on.
        """
        incoming = self._incoming
        return incoming.pop(0) if incoming else b""

    def close(self) -> None:
        """Send close_notify: the end of our direction, not of the peer's.

        Bytes buffered by :meth:`send` go out first; before the handshake
        is complete, close_notify waits for it. Calling it again, or on a
        failed engine, does nothing.
        """
        if self._close_requested or self._state is _State.FAILED:
            return
        self._close_requested = True
        if self._state is _State.ESTABLISHED:
            self._send_close_notify()

    # state

    @property
    def handshake_complete(self) -> bool:
        """The handshake finished, the peer verified, the policy holds."""
        return self._handshake_done

    @property
    def eof_received(self) -> bool:
        """The peer's close_notify has arrived: it will send nothing more."""
        return self._eof_received

    @property
    def closed(self) -> bool:
        """We send nothing more: :meth:`close` was called or we failed."""
        return self._close_requested or self._state is _State.FAILED

    # what the handshake produced

    def export_keys(self, *, generation: int = 0) -> KeyMaterial:
        """The MPTCP keys of this connection (EXPORTER-MPTCP, 16 bytes).

        Generation 0 uses no exporter context; generation n >= 1 uses
        ``uint32(n)``. Raises
        :class:`~mptls.errors.HandshakeIncompleteError` before
        :attr:`handshake_complete`.
        """
        self._raise_if_failed()
        if not self._handshake_done:
            raise HandshakeIncompleteError(
                "the TLS handshake is not complete: no MPTCP keys yet"
            )
        return export_mptcp_keys(self._connection, generation=generation)

    def peer_certificate(
        self, binary: bool = False
    ) -> dict[str, Any] | bytes | None:
        """The peer's certificate, shaped like ``SSLObject.getpeercert``.

        ``None`` before the handshake is complete or when the peer sent
        none; with ``binary`` the DER bytes; otherwise a dict, empty when
        the certificate was not verified.
        """
        if not self._handshake_done:
            return None
        certificate = self._connection.get_peer_certificate(
            as_cryptography=True
        )
        if certificate is None:
            return None
        if binary:
            return certificate.public_bytes(Encoding.DER)
        if not self._connection.get_verify_mode() & SSL.VERIFY_PEER:
            return {}
        return describe_certificate(certificate)

    def cipher(self) -> tuple[str, str, int] | None:
        """``(name, protocol, secret bits)`` like ``SSLObject.cipher``."""
        if not self._handshake_done:
            return None
        name = self._connection.get_cipher_name()
        version = self._connection.get_cipher_version()
        bits = self._connection.get_cipher_bits()
        if name is None or version is None or bits is None:
            return None
        return name, version, bits

    def version(self) -> str | None:
        """The negotiated protocol, such as ``"TLSv1.3"``."""
        if not self._handshake_done:
            return None
        return self._connection.get_protocol_version_name()

    def alpn_protocol(self) -> str | None:
        """The ALPN protocol both ends agreed on, if any."""
        if not self._handshake_done:
            return None
        selected = self._connection.get_alpn_proto_negotiated()
        return selected.decode("utf-8", "replace") if selected else None

    def session_reused(self) -> bool:
        """Whether the handshake resumed an earlier session."""
        if not self._handshake_done:
            return False
        pointer = ssl_pointer(self._connection)
        return bool(_lib.SSL_session_reused(pointer) == 1)

    def session(self) -> SSL.Session | None:
        """The session to offer a later connection for resumption.

        In TLS 1.3 it exists once the server's NewSessionTicket has been
        received, after the handshake.
        """
        if not self._handshake_done:
            return None
        return self._connection.get_session()

    # internals

    def _advance_handshake(self, *, starting: bool = False) -> None:
        try:
            self._connection.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as exc:
            if not starting:
                raise self._fail(self._translate(exc)) from exc
            # no ClientHello could be built (no protocol version or no
            # cipher to offer): the alert OpenSSL queued would be the
            # first the server hears of us and answers nothing, so it
            # is dropped and the error claims none
            self._discard_output()
            reasons = _reasons(exc) or type(exc).__name__
            raise self._fail(
                TLSError(f"TLS could not start: {reasons}")
            ) from exc
        self._complete_handshake()

    def _complete_handshake(self) -> None:
        # the mptls policy on top of OpenSSL's (RFC 7627, RFC 9266)
        problem = policy_problem(self._connection)
        if problem is not None:
            # a refused session must not look finished to the peer
            self._discard_output()
            raise self._fail(TLSError(problem))
        if (
            not self._server_side
            and self._connection.get_verify_mode() & SSL.VERIFY_PEER
            and not self._has_peer_certificate()
        ):
            self._discard_output()
            raise self._fail(
                CertificateError("the server sent no certificate")
            )

        self._set_state(_State.ESTABLISHED)
        self._handshake_done = True
        # four calls into OpenSSL: made only when the line is logged
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "TLS %s established: %s, %s, ALPN %s, resumed %s",
                "server" if self._server_side else "client",
                self.version(),
                (self.cipher() or ("?",))[0],
                self.alpn_protocol(),
                self.session_reused(),
            )

        # what the application sent early, then its close if it asked
        pending, self._pending = self._pending, []
        for data in pending:
            self._write(data)
        if self._close_requested:
            self._send_close_notify()

    def _has_peer_certificate(self) -> bool:
        # whether there is one, without pyOpenSSL's wrapper or a
        # cryptography object (an encode and a parse per connection)
        certificate = _lib.SSL_get_peer_certificate(
            ssl_pointer(self._connection)
        )
        if certificate == _ffi.NULL:
            return False
        _lib.X509_free(certificate)
        return True

    def _read_records(self) -> None:
        if self._eof_received:
            # nothing may follow close_notify (RFC 8446 section 6.1)
            return
        connection = self._connection
        ssl = ssl_pointer(connection)
        buffer = _receive_buffer()
        ssl_read = _lib.SSL_read
        try:
            while True:
                # SSL_read straight into the buffer: pyOpenSSL's recv
                # allocates, copies and raises WantReadError per record
                filled = 0
                result = 1
                while filled < RECEIVE_BUFFER:
                    result = ssl_read(
                        ssl, buffer + filled, RECEIVE_BUFFER - filled
                    )
                    if result <= 0:
                        break
                    filled += result
                if filled:
                    self._take_plaintext(buffer, filled)
                if result <= 0:
                    # pyOpenSSL's own reading of the error, so that it is
                    # the exception its recv would have raised
                    connection._raise_ssl_error(ssl, result)
                    return
        except SSL.WantReadError:
            # also what a NewSessionTicket or KeyUpdate alone gives
            pass
        except SSL.ZeroReturnError:
            self._eof_received = True
            logger.debug("TLS close_notify received")
        except SSL.Error as exc:
            raise self._fail(self._translate(exc)) from exc

    def _take_plaintext(self, buffer: Any, filled: int) -> None:
        sink = self._sink
        if sink is None or self._incoming:
            self._incoming.append(_ffi.buffer(buffer, filled)[:])
            return
        # the sink copies what it keeps: the view dies with the call
        with memoryview(_ffi.buffer(buffer, filled)) as view:
            sink(view)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        view = view.cast("B")
        send = self._connection.send
        offset = 0
        try:
            while offset < len(view):
                offset += send(view[offset : offset + WRITE_CHUNK])
        except SSL.Error as exc:
            raise self._fail(self._translate(exc)) from exc

    def _send_close_notify(self) -> None:
        try:
            self._connection.shutdown()
        except SSL.Error as exc:
            raise self._fail(self._translate(exc)) from exc
        logger.debug("TLS close_notify sent")

    def _discard_output(self) -> None:
        try:
            while self._connection.bio_read(TRANSMIT_CHUNK):
                pass
        except SSL.Error:
            pass

    def _raise_if_failed(self) -> None:
        error = self._error
        if error is not None:
            raise type(error)(
                f"the TLS connection has already failed: {error}",
                alert=error.alert,
            ) from error

    def _fail(self, error: TLSError) -> TLSError:
        self._error = error
        self._pending = []
        self._set_state(_State.FAILED)
        logger.debug("TLS failed: %s", error)
        return error

    def _translate(self, exc: SSL.Error) -> TLSError:
        """A TLSError saying what OpenSSL's error means, with the alert."""
        reasons = _reasons(exc)
        received, sent = self._alerts.received, self._alerts.sent
        alert = received if received is not None else sent

        verify = _lib.SSL_get_verify_result(ssl_pointer(self._connection))
        if (
            verify != _X509_V_OK
            and self._connection.get_verify_mode() & SSL.VERIFY_PEER
        ):
            return CertificateError(
                self._certificate_message(verify, sent),
                alert=sent,
                verify_code=verify,
            )
        if received is not None:
            message = f"peer sent TLS alert {alert_name(received)}"
            if reasons:
                message += f": {reasons}"
            return TLSError(message, alert=received)
        message = f"TLS failed: {reasons or type(exc).__name__}"
        if sent is not None:
            message += f"; sent TLS alert {alert_name(sent)}"
        return TLSError(message, alert=alert)

    def _certificate_message(self, verify: int, sent: int | None) -> str:
        detail = _ffi.string(_lib.X509_verify_cert_error_string(verify))
        whose = "client" if self._server_side else "server"
        message = (
            f"{whose} certificate verify failed: "
            f"{detail.decode('ascii', 'replace')}"
        )
        if verify in _NAME_MISMATCH:
            message += f" (it is not valid for {self._server_hostname!r})"
        if sent is not None:
            message += f"; sent TLS alert {alert_name(sent)}"
        return message


def _reasons(exc: SSL.Error) -> str:
    """OpenSSL's reason strings from a pyOpenSSL error, joined.

    Reasons that only restate a received alert ("tlsv1 alert unknown ca")
    are left out: the message names the alert already.
    """
    if not exc.args:
        return ""
    details = exc.args[0]
    if not isinstance(details, list):
        return " ".join(str(arg) for arg in exc.args)
    texts = [
        str(entry[2])
        for entry in details
        if isinstance(entry, tuple) and len(entry) == 3 and entry[2]
    ]
    return "; ".join(t for t in texts if " alert " not in t)


@functools.lru_cache(maxsize=256)
def check_server_name(name: str, check_hostname: bool) -> None:
    """Refuse a server name a client engine would refuse, before any
    connection exists.

    The engine is made once the first TCP connection is up: a name it
    cannot use failed there, after a connect to the server, and a
    socket the application gave (``sock=``) was closed under it.
    """
    if _ip_address(name) is not None:
        return
    encoded = _idna(name)
    if not check_hostname:
        return
    param = _lib.X509_VERIFY_PARAM_new()
    try:
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded))
    finally:
        _lib.X509_VERIFY_PARAM_free(param)
    if ok != 1:
        raise refused_server_name(name, encoded)


# what a host name holds besides letters and digits, as OpenSSL takes it
_HOST_PUNCTUATION = frozenset(b"-_.")


def refused_server_name(name: str, encoded: bytes) -> ConfigurationError:
    """The error for a server name OpenSSL would not check a certificate
    against, with the reason where the name shows it.

    OpenSSL gives none: ``X509_VERIFY_PARAM_set1_host`` returns 0 and
    queues no error. OpenSSL 3 refused only a NUL there; OpenSSL 4.0
    checks the name's syntax, and refuses, besides what the IDNA codec
    refuses first, a name of one character (``a``; ``ab`` and ``x.y``
    pass), one with a character that is no letter, digit, hyphen,
    underscore or dot (a wildcard ``*`` too), and a label that begins
    or ends with a hyphen. Verification is never left out for such a
    name: the connection is refused.
    """
    reason = _refusal_reason(encoded)
    because = f": it takes no {reason}" if reason else ""
    return ConfigurationError(
        f"OpenSSL refused {shown_value(name)} as the server name to check "
        f"the certificate against{because}"
    )


def _refusal_reason(encoded: bytes) -> str | None:
    if len(encoded) == 1:
        return "name of one character"
    for byte in encoded:
        if not (chr(byte).isalnum() and byte < 0x80) and (
            byte not in _HOST_PUNCTUATION
        ):
            return f"{shown_value(chr(byte))} in a name"
    if any(
        label.startswith(b"-") or label.endswith(b"-")
        for label in encoded.split(b".")
    ):
        return "label that begins or ends with a hyphen"
    return None


# a client names the same few servers again and again: parsing the name
# (a failed IPv4 and IPv6 parse for a host name) and the Python IDNA codec
# cost more than the rest of the engine's setup
@functools.lru_cache(maxsize=256)
def _ip_address(
    name: str,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)
def _idna(name: str) -> bytes:
    # an absolute name ("example.com.") names the same host; SNI carries
    # it without the trailing dot (RFC 6066 section 3), and certificates
    # name hosts without one
    relative = name.removesuffix(".")
    try:
        encoded = relative.encode("idna")
    except UnicodeError as exc:
        raise ConfigurationError(
            f"server_hostname {shown_value(name)} is not a valid host name"
        ) from exc
    # a NUL raised a bare TypeError from pyOpenSSL's SNI call
    if not encoded or b"\x00" in encoded:
        raise ConfigurationError(
            f"server_hostname {shown_value(name)} is not a valid host name"
        )
    return encoded
