"""TLS over a backend's byte stream, as an asyncio protocol.

:class:`TLSProtocol` sits on the transport a backend returns (userspace
MPTCP or a kernel MPTCP socket) and drives the sans-I/O TLS engine. When
the handshake is complete and the peer verified it exports the MPTCP keys,
hands them to the backend (the one upward-then-down step of the design),
and only then shows the application a transport: :class:`TLSTransport`,
an ordinary ``asyncio.Transport`` that asyncio's own
``StreamReaderProtocol`` and ``StreamWriter`` work on unchanged.

Unlike asyncio's TLS transport, :class:`TLSTransport` can half-close:
``write_eof()`` sends close_notify and then ends the data-level stream,
while the peer may still answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

from OpenSSL import SSL

from mptls.backends.base import (
    Backend,
    KeyInstall,
    MptcpInfo,
    format_address,
    reset_on_close,
    unacknowledged,
)
from mptls.backends.buffers import read_buffer
from mptls.errors import (
    ConfigurationError,
    HandshakeTimeoutError,
    KeysUnavailableError,
    MptlsError,
    MptlsTimeoutError,
    PathError,
    PathsLostError,
    PeerResetError,
    ProtocolError,
    TLSError,
    shown_value,
)
from mptls.refusals import refused
from mptls.tls.engine import AlertDescription, TLSEngine
from mptls.tls.keys import KeyMaterial

logger = logging.getLogger("mptls.aio")

# how long a socket transport that the application closed waits for the
# peer's close_notify before it gives up (asyncio's default)
SHUTDOWN_TIMEOUT = 30.0
# how long the TLS handshake may take when the caller gave None, which
# asyncio takes as its default too: never as no limit
HANDSHAKE_TIMEOUT = 30.0
# where a socket transport pauses its writer (the low mark a quarter of
# it): asyncio's TLS transport's default
TLS_WRITE_BUFFER_HIGH = 512 * 2**10


_Sink = Callable[[memoryview], object]


def _may_have_lost(
    reset: Exception, wrote_after_end: bool, trailing: int
) -> bool:
    """Whether ``reset``, after the peer's whole stream, lost ours.

    What was written after the peer's close_notify may have reached a
    peer that had closed and drops what comes (a Data ACK says its MPTCP
    layer took the bytes, not that its application read them). Else the
    userspace backend counts what the peer had not acknowledged at the
    data level, of which ``trailing`` bytes are TLS output after the
    last application data; the kernel backend has no count.
    """
    if wrote_after_end:
        return True
    unacknowledged: int | None = getattr(reset, "unacknowledged", None)
    return unacknowledged is not None and unacknowledged > trailing


def _in_mptls_tree(exc: Exception | None, when: str) -> Exception | None:
    """A socket transport's own error as an mptls error of the same kind.

    A reset stays a ``ConnectionResetError`` (as :class:`PeerResetError`),
    a timeout a ``TimeoutError`` (as :class:`MptlsTimeoutError`), and any
    other failure of the socket ends the connection as
    :class:`PathsLostError`, so code written for asyncio still catches
    them; what is already mptls's passes through.
    """
    if not isinstance(exc, OSError) or isinstance(exc, MptlsError):
        return exc
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" {when}" if when else ""
    error: MptlsError
    if isinstance(exc, ConnectionError):
        error = PeerResetError(
            f"the peer reset the connection{where}: {reason}"
        )
    elif isinstance(exc, TimeoutError):
        # ETIMEDOUT: unanswered retransmissions, which asyncio's code
        # catches as a TimeoutError, not as a reset
        error = MptlsTimeoutError(f"the connection timed out{where}: {reason}")
    else:
        error = PathsLostError(f"the connection failed{where}: {reason}")
    error.__cause__ = exc
    return error


# alerts a client sends about the server's certificate (RFC 8446
# section 6.2): the operator's certificate or CA is what to look at
_CERTIFICATE_ALERTS = frozenset(
    {
        AlertDescription.BAD_CERTIFICATE,
        AlertDescription.UNSUPPORTED_CERTIFICATE,
        AlertDescription.CERTIFICATE_REVOKED,
        AlertDescription.CERTIFICATE_EXPIRED,
        AlertDescription.CERTIFICATE_UNKNOWN,
        AlertDescription.UNKNOWN_CA,
    }
)


def _refusal_reason(exc: Exception) -> str:
    """Why a server's client failed its handshake, in one line; a TLS
    error says it was the TLS handshake (its text is OpenSSL's, or the
    peer's alert), in the same words whichever end gave up."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, TLSError):
        return text
    text = text.removeprefix("TLS failed: ")
    if not text.startswith("TLS"):
        text = f"TLS handshake failed: {text}"
    if "peer sent" in text and exc.alert in _CERTIFICATE_ALERTS:
        text += " (the client does not accept this server's certificate)"
    return text


def _into_buffers(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Hand ``data`` to a buffered protocol through its own buffers."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view))).cast("B")
        size = min(len(buffer), len(view))
        if not size:
            raise RuntimeError("get_buffer() returned an empty buffer")
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def _not_connected(data: memoryview) -> None:
    raise RuntimeError("TLS output before the transport exists")


class TLSProtocol(asyncio.Protocol, asyncio.BufferedProtocol):
    """Runs TLS on a backend transport and serves one application protocol.

    ``waiter`` (client side) gets the application transport when it is
    ready, or fails with the reason the connection could not be made.
    """

    def __init__(
        self,
        backend: Backend,
        context: SSL.Context,
        app_protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        server_side: bool,
        server_hostname: str | None = None,
        check_hostname: bool = True,
        require_app_keys: bool = False,
        handshake_timeout: float | None = 30.0,
        shutdown_timeout: float | None = 30.0,
        waiter: asyncio.Future[TLSTransport] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._backend = backend
        self._engine = TLSEngine(
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            check_hostname=check_hostname,
        )
        self._app_protocol_factory = app_protocol_factory
        self._server_side = server_side
        self._require_app_keys = require_app_keys
        # None is the default, as for asyncio's own keywords
        self._handshake_timeout = (
            HANDSHAKE_TIMEOUT
            if handshake_timeout is None
            else handshake_timeout
        )
        self._shutdown_timeout = (
            SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout
        )
        self._waiter = waiter
        self._transport: asyncio.Transport | None = None
        # set in connection_made: how TLS output reaches the transport
        self._write_out: Callable[[memoryview], None] = _not_connected
        self._write_final: Callable[[bytes], None] | None = None
        # the application's transport, held until the application has
        # been told of the end, then only weakly: it holds this protocol,
        # and a strong link back made every connection a reference cycle
        # (with its engine, transport and MPTCP core hanging off it) that
        # only the cyclic garbage collector could free
        self._app_transport: TLSTransport | None = None
        self._app_transport_ref: weakref.ref[TLSTransport] | None = None
        # set once the application has been shown the connection, and
        # never unset: None means the handshake is not over
        self._app_protocol: asyncio.BaseProtocol | None = None
        self._timeout_handle: asyncio.TimerHandle | None = None
        # the application closed a socket transport: waiting for the
        # peer's close_notify, with this limit
        self._shutdown: asyncio.TimerHandle | None = None
        self._shutdown_error: MptlsTimeoutError | None = None
        self._key_install: KeyInstall | None = None
        self._key_fingerprint: str | None = None
        self._app_reading = True
        self._eof_delivered = False
        self._write_paused = False
        self._lost = False
        # the application has been told of the end (connection_lost)
        self._app_lost = False
        # the connection ended cleanly while the paused application had
        # plaintext left: it is told once it has taken it
        self._lost_pending = False
        # the application wrote after the peer's close_notify: a reset
        # now may have lost that, and is no clean end
        self._sent_after_peer_end = False
        # a reset after the peer's close_notify, held back so that the
        # reader gets the whole stream: a later write is told of it
        self._held_reset: Exception | None = None
        # the application wrote, and no TLS output since carried it
        self._app_unsent = False
        # bytes of TLS output after the last that carried application data
        self._trailing = 0
        # the server's handler is done: the peer's end closes
        self._ends_with_peer = False
        # a server's client that failed before the application saw it
        # has been reported (mptls.refusals), or needs no report
        self._refusal_said = False
        # the peer has sent a byte: one that leaves before (a port
        # scan, a health check) was not refused
        self._peer_spoke = False
        # this end's server is stopping and ends the connection: a
        # handshake cut short by that is no refusal of the peer's
        self._server_stopping = False

    # backend transport -> TLS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses
        self._transport = sent_to = cast(asyncio.Transport, transport)
        # the multipath transport keeps TLS output without a copy (until
        # the Data ACK) and sends close_notify with the end of the stream
        # in one frame; a socket transport does neither
        self._write_out = getattr(sent_to, "write_owned", sent_to.write)
        self._write_final = getattr(sent_to, "write_final", None)
        if self._write_final is None:
            # a socket transport pauses its writer above 64 KiB; asyncio's
            # TLS transport, whose place this takes, above 512 KiB (a
            # transport without flow control has no limits to set)
            with contextlib.suppress(NotImplementedError):
                sent_to.set_write_buffer_limits(TLS_WRITE_BUFFER_HIGH)
        self._timeout_handle = self._loop.call_later(
            self._handshake_timeout, self._on_handshake_timeout
        )
        if not self._server_side:
            try:
                self._engine.start()
            except MptlsError as exc:
                # no ClientHello could be built: failed here, the error
                # reaches the caller now rather than the loop's handler
                # (and the caller at the handshake timeout)
                self._fail(exc)
                return
            self._flush()

    def data_received(self, data: bytes) -> None:
        self.data_received_many((data,))

    def get_buffer(self, sizehint: int) -> memoryview:
        # the kernel backend's socket transport reads here (the multipath
        # transport calls data_received_many instead)
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # a view, not a copy: receive_all copies it into the TLS engine
        self.data_received_many((cast(bytes, read_buffer()[:nbytes]),))

    def data_received_many(self, chunks: Sequence[bytes]) -> None:
        """Consecutive pieces of the data-level stream, taken at once.

        The multipath transport hands over every frame payload of one
        socket read in one call: one TLS pass decrypts them all and the
        application gets the plaintext in one piece.
        """
        self._peer_spoke = True
        try:
            self._engine.receive_all(chunks)
            if self._shutdown is not None:
                self._read_until_peer_closes()
                return
            if self._app_protocol is None:
                if not self._engine.handshake_complete:
                    self._flush()
                    return
                self._on_handshake_complete()
                if self._app_protocol is None:
                    # the application's protocol factory failed
                    return
            self._deliver()
            if self._app_lost:
                # the application's callback failed and ended it
                return
            self._flush()
            if self._ends_with_peer and self._engine.eof_received:
                self._end_with_peer()
        except MptlsError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        # the data-level stream ended; a clean peer sent close_notify
        # first, which _deliver() has already turned into an EOF
        if self._shutdown is not None:
            # the application closed and waits for nothing more
            return False
        if self._app_protocol is None:
            # a ConnectionResetError, as asyncio's TLS reports this end
            ended = PeerResetError(
                "the peer closed the connection during the TLS handshake"
            )
            self._left_silent(ended)
            self._fail(ended)
            return False
        if not self._engine.eof_received:
            # an end without close_notify may be a truncation: never
            # report it to the application as a clean end of data
            self._fail(
                TLSError(
                    "the peer ended the stream without TLS close_notify; "
                    "the data may be truncated"
                )
            )
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timeout()
        if self._shutdown is not None:
            self._shutdown.cancel()
        if self._app_protocol is None:
            error = _in_mptls_tree(
                exc, "during the TLS handshake"
            ) or TLSError("connection closed during the TLS handshake")
            self._left_silent(error)
            self._say_refused(error)
            self._resolve_waiter(error)
            return
        exc = self._shutdown_error or _in_mptls_tree(exc, "")
        if (
            isinstance(exc, ConnectionResetError)
            and self._engine.eof_received
            and not _may_have_lost(
                exc, self._sent_after_peer_end, self._trailing
            )
        ):
            # the peer's close_notify came first: every byte it sent is
            # here, complete (RFC 8446 section 6.1). A reset after it (a
            # userspace closer's MP_FASTCLOSE at close_timeout while this
            # application had not read yet) truncates nothing, and must
            # not make the reader raise instead of giving those bytes;
            # unless what this end sent was not all acknowledged (the
            # userspace backend knows; the kernel's cannot say)
            self._held_reset = exc
            exc = None
        # an end the application asked for (close, abort) is told at
        # once: it will not read what is left
        transport = self._app_side()
        asked = transport is None or transport._closing
        if transport is not None:
            transport._closing = True
        if exc is None and not asked and self._undelivered():
            # a clean end while the application still has plaintext to
            # take (paused, or resumed with the delivery still to come):
            # it hears of the end after that
            self._lost_pending = True
            if self._app_reading:
                self._loop.call_soon(self._resume_delivery)
            return
        self._tell_app_lost(exc)

    def _undelivered(self) -> bool:
        engine = self._engine
        return engine.unread or (
            engine.eof_received and not self._eof_delivered
        )

    def _tell_app_lost(self, exc: Exception | None) -> None:
        if self._app_lost or self._app_protocol is None:
            return
        self._app_lost = True
        self._update_sink()
        self._loop.call_soon(self._app_protocol.connection_lost, exc)
        self._hold_app_side_weakly()

    def _app_side(self) -> TLSTransport | None:
        """The application's transport, while anything still holds it."""
        transport = self._app_transport
        if transport is None and self._app_transport_ref is not None:
            transport = self._app_transport_ref()
        return transport

    def _hold_app_side_weakly(self) -> None:
        # the application has heard of the end: whoever still uses the
        # transport holds it, and it holds this protocol
        transport = self._app_transport
        if transport is not None:
            self._app_transport_ref = weakref.ref(transport)
            self._app_transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._app_protocol is not None:
            self._app_protocol.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._app_protocol is not None:
            self._app_protocol.resume_writing()

    # the handshake

    def _on_handshake_complete(self) -> None:
        self._cancel_timeout()

        # keys: once, now that the handshake is complete and the peer
        # verified (draft-paasch-mptcp-tls-authentication section 3); a
        # backend that rotates them exports later generations itself
        assert self._transport is not None
        keys: KeyMaterial = self._engine.export_keys()
        self._key_fingerprint = keys.fingerprint()
        engine = self._engine
        self._key_install = self._backend.install_keys(
            self._transport,
            keys,
            derive=lambda generation: engine.export_keys(
                generation=generation
            ),
        )
        del keys
        if self._require_app_keys and not self._key_install.installed:
            raise KeysUnavailableError(
                "TLS-derived MPTCP keys are required but the "
                f"{self._backend.name} backend could not install them: "
                f"{self._key_install.reason}"
            )
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "TLS %s %s complete; MPTCP keys %s (fingerprint %s)",
                self._engine.version(),
                (self._engine.cipher() or ("?",))[0],
                "installed"
                if self._key_install.installed
                else "not installed",
                self._key_fingerprint,
            )

        # the application sees the connection only now
        try:
            protocol = self._app_protocol_factory()
        except Exception as exc:
            # its own error, raised where it waits for the connection
            # rather than left to the handshake timeout
            if self._waiter is None:
                # a server: nobody waits for this connection to hear it
                logger.exception("the application's protocol factory failed")
            # the application's fault, not the client's: no refusal
            self._refusal_said = True
            self._fail(exc)
            return
        transport = self._app_transport = TLSTransport(self)
        self._app_protocol = protocol
        try:
            protocol.connection_made(transport)
        except Exception as exc:
            self._app_failed(exc, "connection_made")
            return
        self._update_sink()
        if self._write_paused:
            self._app_protocol.pause_writing()
        self._resolve_waiter(None, transport)

    def _on_handshake_timeout(self) -> None:
        self._timeout_handle = None
        if self._app_protocol is None:
            why = (
                "TLS handshake did not complete within "
                f"{self._handshake_timeout} s"
            )
            if not self._server_side and not self._peer_spoke:
                # a server that never answered is another fault than a
                # handshake stalled half-way: say which
                why += ": the server sent no TLS data at all"
            self._fail(HandshakeTimeoutError(why))

    def _cancel_timeout(self) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
            self._timeout_handle = None

    def _resolve_waiter(
        self,
        exc: BaseException | None,
        transport: TLSTransport | None = None,
    ) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if exc is None:
            assert transport is not None
            waiter.set_result(transport)
        else:
            waiter.set_exception(exc)

    def _say_refused(self, exc: Exception) -> None:
        """A server's client that ended before the application saw it:
        the operator hears who and why, once (see mptls.refusals)."""
        if (
            not self._server_side
            or self._app_protocol is not None
            or self._refusal_said
        ):
            return
        self._refusal_said = True
        transport = self._transport
        peer = transport.get_extra_info("peername") if transport else None
        if self._server_stopping:
            logger.debug(
                "connection from %s ended in its TLS handshake: the server "
                "is stopping (%s)",
                format_address(peer),
                exc,
            )
            return
        refused(peer, _refusal_reason(exc))

    def _left_silent(self, error: Exception) -> None:
        """The peer ended the connection: if it never sent a byte, it
        came and went (a port scan, a health check) unrefused.

        A protocol error that is no reset is about frames the peer sent
        (an MPTCP handshake gone wrong before any TLS byte came): it
        spoke, if not to TLS.
        """
        if isinstance(error, ProtocolError) and not isinstance(
            error, ConnectionResetError
        ):
            return
        if not self._peer_spoke:
            self._refusal_said = True

    def _fail(self, exc: Exception) -> None:
        logger.debug("connection failed: %s", exc)
        self._engine.set_plaintext_sink(None)
        self._cancel_timeout()
        # a TLS alert may be waiting to go out; send it before aborting
        with contextlib.suppress(MptlsError):
            self._flush()
        if self._transport is not None:
            # the multipath transport may hold the alert until the read
            # it is handling ends: it sends it before the reset
            transport = self._transport
            getattr(transport, "abort_after_sending", transport.abort)()
        if self._app_protocol is None:
            self._say_refused(exc)
            self._resolve_waiter(exc)
        elif not self._lost:
            self._lost = True
            self._app_lost = True
            app_transport = self._app_side()
            if app_transport is not None:
                app_transport._closing = True
            try:
                self._app_protocol.connection_lost(exc)
            except Exception as error:
                # called here, not from the loop: its error must not
                # escape into the backend transport's read
                self._loop.call_exception_handler(
                    {
                        "message": "the application protocol's "
                        "connection_lost() raised",
                        "exception": error,
                        "protocol": self._app_protocol,
                    }
                )
            self._hold_app_side_weakly()

    # TLS -> application

    def _deliver(self) -> None:
        # after connection_lost the application has had its last call,
        # and after its close() nothing more is for it
        if (
            not self._app_reading
            or self._app_protocol is None
            or self._app_lost
            or self._shutdown is not None
        ):
            return
        protocol = self._app_protocol
        take: Callable[[bytes], None]
        if isinstance(protocol, asyncio.BufferedProtocol):
            take = functools.partial(_into_buffers, protocol)
        else:
            take = cast(asyncio.Protocol, protocol).data_received
        try:
            while self._app_reading:
                data = self._engine.read_piece()
                if not data:
                    break
                take(data)
        except Exception as exc:
            self._app_failed(exc, "data_received")
            return
        if self._engine.eof_received and self._app_reading:
            self._deliver_eof()

    def _deliver_eof(self) -> None:
        if self._eof_delivered or self._app_protocol is None:
            return
        self._eof_delivered = True
        # asyncio.Protocol and BufferedProtocol both have it
        protocol = cast(asyncio.Protocol, self._app_protocol)
        try:
            keep_open = protocol.eof_received()
        except Exception as exc:
            self._app_failed(exc, "eof_received")
            return
        transport = self._app_side()
        if not keep_open and transport is not None:
            transport.close()

    def _app_failed(self, exc: Exception, callback: str) -> None:
        """The application's ``callback`` raised ``exc``: end the connection.

        As asyncio's TLS transport does: the loop's exception handler
        hears of it, the connection is aborted, and the application's
        ``connection_lost`` gets the error (a client still waiting for
        its connection gets it raised instead).
        """
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            # raised where the client waits for its connection, as
            # asyncio's create_connection raises it
            waiter.set_exception(exc)
        else:
            self._loop.call_exception_handler(
                {
                    "message": f"the application protocol's {callback}() "
                    "raised; the connection is aborted",
                    "exception": exc,
                    "transport": self._app_side(),
                    "protocol": self._app_protocol,
                }
            )
        self._fail(exc)

    def _flush(self) -> None:
        data = self._engine.take_output()
        if data and self._transport is not None:
            self._count_sent(len(data))
            # the view is ours alone; a socket transport copies what it
            # cannot send at once, as for any write
            self._write_out(data)

    def _count_sent(self, size: int) -> None:
        # TLS output after the last that carried the application's
        # data (close_notify, say): a reset that leaves only these bytes
        # unacknowledged has lost none of the application's. Output that
        # may carry some counts as the application's; what a closing
        # transport drops counts as none
        assert self._transport is not None
        if self._transport.is_closing():
            return
        if self._app_unsent and self._engine.handshake_complete:
            self._app_unsent = False
            self._trailing = 0
        else:
            self._trailing += size

    # called by TLSTransport

    def _app_write(self, data: bytes | bytearray | memoryview) -> None:
        if self._engine.eof_received:
            self._sent_after_peer_end = True
        self._app_unsent = True
        self._engine.send(data)
        self._flush()

    def _app_write_eof(self) -> None:
        self._engine.close()
        if not self._flush_final():
            self._flush()
            assert self._transport is not None
            self._transport.write_eof()

    def _flush_final(self) -> bool:
        # close_notify and the end of the stream in one frame, where the
        # transport can (the multipath one); False: nothing was sent
        if self._write_final is None:
            return False
        data = self._engine.data_to_send()
        self._count_sent(len(data))
        self._write_final(data)
        return True

    def close_application(self) -> None:
        """Close the connection as its application's ``close()`` would
        (close_notify, then the transport's end); before the handshake
        is over, close the transport. A server's ``close_clients()``."""
        if self._app_protocol is None:
            if self._transport is not None:
                self._transport.close()
            return
        # gone only once the application has heard of the end
        transport = self._app_side()
        if transport is not None:
            transport.close()

    def server_stopping(self) -> None:
        """The server is stopping and is about to end this connection
        (``close_clients()``, ``abort_clients()``, a worker's stop).

        A handshake that ends because of it was not refused: nothing is
        logged on ``mptls.refusals`` for it, whatever the peer does
        after, only a debug line.
        """
        self._server_stopping = True

    def _app_close(self) -> None:
        self._drop_pending_lost()
        if self._transport is None:
            return
        if self._transport.is_closing():
            # an ended transport may still hold what the paused reader
            # never took: its close lets that go
            self._transport.close()
            return
        if not self._engine.closed:
            try:
                self._engine.close()
                if not self._flush_final():
                    self._flush()
            except MptlsError:
                pass
        if self._awaits_peer_close():
            # a socket closed with unread bytes (the peer's session
            # tickets, say) answers the peer with a TCP reset; as
            # asyncio's TLS does, read until the peer's close_notify
            self._transport.write_eof()
            self._shutdown = self._loop.call_later(
                self._shutdown_timeout, self._on_shutdown_timeout
            )
            self._update_sink()
            # what a paused application left unread is dropped, and the
            # rest read until the peer's close_notify
            self._engine.read()
            self._transport.resume_reading()
            return
        self._transport.close()

    @property
    def _over_socket(self) -> bool:
        # a socket transport (the kernel backend's) has no write_final:
        # the multipath transport ends the data-level stream in order
        # itself (DATA_FIN both ways) and resets with MP_FASTCLOSE
        return self._write_final is None

    def _awaits_peer_close(self) -> bool:
        transport = self._transport
        return (
            self._over_socket
            and transport is not None
            and transport.can_write_eof()
            and not self._engine.eof_received
        )

    def _on_shutdown_timeout(self) -> None:
        # as asyncio's TLS: the close ends in a TimeoutError, which
        # wait_closed() raises
        self._shutdown_error = MptlsTimeoutError(
            "the peer sent no TLS close_notify within "
            f"ssl_shutdown_timeout ({self._shutdown_timeout} s)"
        )
        transport = self._transport
        if transport is None:
            return
        if unacknowledged(transport) == 0 and not (
            transport.get_write_buffer_size()
        ):
            # the peer has all this end sent: reset it, as the multipath
            # transport resets such a peer. Closed with nothing unread,
            # the kernel keeps the MPTCP connection and takes the peer's
            # bytes for nobody, and a peer that writes on waits for room
            # in drain(). While the peer still takes this end's bytes, a
            # close lets them reach it.
            reset_on_close(transport)
        transport.abort()

    def _end_with_peer(self) -> None:
        """Close once the peer has ended its stream (close_notify).

        Called when nobody will answer the peer any more: what the
        paused application left unread goes with the close.
        """
        self._ends_with_peer = True
        transport = self._app_side()
        if (
            self._engine.eof_received
            and transport is not None
            and not transport.is_closing()
        ):
            transport.close()

    def _read_until_peer_closes(self) -> None:
        # what arrives after the application closed is not for it
        self._engine.read()
        self._flush()
        if self._engine.eof_received and self._transport is not None:
            self._transport.close()

    def _write_after_loss(self) -> None:
        # the write reaches nobody: as asyncio's transports end on a
        # failed write, the reset held back for the reader is the
        # application's news now, and drain() or the reader raise it
        reset, self._held_reset = self._held_reset, None
        if reset is not None and self._lost_pending:
            self._lost_pending = False
            self._tell_app_lost(reset)

    def _drop_pending_lost(self) -> None:
        # the application leaves without taking what was held for it
        if self._lost_pending:
            self._lost_pending = False
            self._tell_app_lost(None)

    def _app_abort(self) -> None:
        self._drop_pending_lost()
        if self._transport is None:
            return
        if self._over_socket:
            # the peer learns of the abort from a TCP reset, as the
            # multipath transport's MP_FASTCLOSE tells it, rather than
            # from an end without close_notify
            reset_on_close(self._transport)
        self._transport.abort()

    def _app_pause_reading(self) -> None:
        if self._shutdown is not None:
            # closed: the shutdown reads until the peer's close_notify
            return
        self._app_reading = False
        self._update_sink()
        if self._transport is not None:
            self._transport.pause_reading()

    def _app_resume_reading(self) -> None:
        if self._app_reading:
            return
        self._app_reading = True
        # later, not inside this call. asyncio's StreamReader resumes
        # reading right before it makes the future it waits on, so
        # plaintext handed over now can pause it again before that
        # future exists, with the transport paused and nothing left to
        # wake it: a readexactly() of more than twice the reader's limit
        # hung (asyncio's TLS transport defers the same way). The
        # multipath transport below may hand over what it holds inside
        # its own resume_reading: its reader is this protocol, which
        # makes no such future.
        self._loop.call_soon(self._resume_delivery)

    def _resume_delivery(self) -> None:
        # a close since the resume reads for itself: nothing more is for
        # the application, and its reader must not pause the shutdown
        if (
            not self._app_reading
            or self._app_lost
            or self._shutdown is not None
        ):
            return
        self._deliver()
        if self._lost_pending:
            if not self._undelivered():
                self._lost_pending = False
                self._tell_app_lost(None)
            return
        if self._transport is not None and self._app_reading:
            self._update_sink()
            self._transport.resume_reading()

    def _update_sink(self) -> None:
        # plaintext straight from TLS's buffer to a reader that copies it
        # anyway, while the application reads and has not been told of
        # the end; else pieces wait in the engine for _deliver
        protocol = self._app_protocol
        copies = (
            type(protocol) is StreamProtocol
            and self._app_reading
            and not self._app_lost
            and self._shutdown is None
        )
        if not copies:
            self._engine.set_plaintext_sink(None)
            return
        # typed for bytes, it takes any buffer: feed_data extends a
        # bytearray with it
        sink = cast(StreamProtocol, protocol).data_received
        self._engine.set_plaintext_sink(cast(_Sink, sink))

    def _extra_info(self, name: str, default: Any) -> Any:
        from_engine = _ENGINE_INFO.get(name)
        if from_engine is not None:
            return from_engine(self._engine)
        transport = self._transport
        if name == "backend":
            return self._backend.name
        # asyncio's StreamReaderProtocol closes the transport at EOF when
        # it sees an SSL context ("sslcontext"); this transport half-closes
        if name == "sslcontext" or transport is None:
            return default
        if name == "socket" and self._lost:
            # as asyncio's TLS transport and the multipath one: a socket
            # transport would still show its closed socket
            return default
        if name == "mptcp":
            info = self._backend.info(transport)
            return _with_key_state(
                info, self._key_install, self._key_fingerprint
            )
        return transport.get_extra_info(name, default)


# get_extra_info names the TLS engine answers
_ENGINE_INFO: dict[str, Callable[[TLSEngine], Any]] = {
    "peercert": lambda engine: engine.peer_certificate(),
    "peercert_binary": lambda engine: engine.peer_certificate(binary=True),
    "cipher": lambda engine: engine.cipher(),
    "tls_version": lambda engine: engine.version(),
    "alpn_protocol": lambda engine: engine.alpn_protocol(),
    # asyncio's TLS transports answer it (None: none in use), and every
    # context mptls makes refuses TLS compression (OP_NO_COMPRESSION)
    "compression": lambda engine: None,
}


def _with_key_state(
    info: MptcpInfo, install: KeyInstall | None, fingerprint: str | None
) -> MptcpInfo:
    if install is None:
        return info
    # whether keys are in use is the backend's to say (in mode E only
    # once the peer confirmed them); the TLS layer adds why not, where
    # the backend gave no reason, and the fingerprint it exported
    reason = info.keys_reason or install.reason
    return dataclasses.replace(
        info,
        keys_reason=reason,
        # a backend that rotates keys names the generation in use
        key_fingerprint=info.key_fingerprint or fingerprint,
    )


class StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, as mptls's streams create it.

    Its ``data_received`` copies what it is handed into the reader's
    buffer and keeps nothing else, so :class:`TLSProtocol` hands it
    plaintext as views of the TLS engine's buffer: one copy less per
    byte received than a ``bytes`` per piece.

    ``drain()`` raises why the connection ended, as the reader does: a
    :class:`~mptls.errors.PeerResetError` (a ``ConnectionResetError``
    too), a TLS error. asyncio's own gives that error only to a writer
    paused at the end, or once the reader holds it; a drain() between
    the end and the step that tells the reader got a bare
    ``ConnectionResetError('Connection lost')``, the cause lost.

    A ``wait_closed()`` that a timeout cancelled leaves the next one
    working: asyncio's raises ``CancelledError`` ever after.
    """

    _lost_error: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost_error = exc
        super().connection_lost(exc)

    async def _drain_helper(self) -> None:
        # asyncio's fallback, for an end with no error, stays; typeshed
        # leaves this private method of asyncio's out
        if self._lost_error is not None:
            raise self._lost_error
        await cast(Any, super())._drain_helper()

    def _get_close_waiter(self, stream: object) -> asyncio.Future[None]:
        """What ``wait_closed()`` awaits: the end, shielded.

        asyncio's hands every ``wait_closed()`` the same future, so one
        that a timeout cancelled cancelled it for good, and every later
        ``wait_closed()`` (after an ``abort()``, say) raised a
        ``CancelledError`` that no cancel had asked for. Here a close
        waits for the peer's end, which may well outlast a timeout.
        """
        closed: asyncio.Future[None] = cast(Any, super())._get_close_waiter(
            stream
        )
        return asyncio.shield(closed)


class TLSTransport(asyncio.Transport):
    """The application's transport: plaintext in and out of TLS.

    Works with asyncio's StreamReaderProtocol and StreamWriter; adds
    half-close (``write_eof``) which asyncio's TLS transport lacks.
    """

    def __init__(self, tls: TLSProtocol) -> None:
        super().__init__()
        self._tls = tls
        self._closing = False
        self._eof_written = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls._extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        if not callable(getattr(protocol, "connection_lost", None)):
            # None was taken as "no handshake yet": the next read
            # called connection_made() again, and get_protocol() failed
            raise ConfigurationError(
                "set_protocol() needs a protocol (an asyncio.Protocol), "
                f"got {shown_value(protocol)}"
            )
        self._tls._app_protocol = protocol
        # views of the TLS buffer went to the old protocol's reader
        self._tls._update_sink()

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol = self._tls._app_protocol
        assert protocol is not None
        return protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._tls._app_close()

    def abort(self) -> None:
        self._closing = True
        self._tls._app_abort()

    def _end_with_peer(self) -> None:
        """Close this transport once the peer has ended its stream.

        For a server's handler that is done: what it wrote goes out,
        and the peer's close_notify (already received, or still to
        come) closes the connection, as asyncio's TLS server does.
        """
        self._tls._end_with_peer()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(
                f"data must be bytes-like, not {type(data).__name__}"
            )
        if self._eof_written:
            raise RuntimeError("cannot write after write_eof()")
        if self._closing:
            if self._tls._lost:
                # ended under the application (a peer's TLS alert, a
                # reset): dropped, as asyncio's transports drop it;
                # drain() and the reader raise why it ended
                self._tls._write_after_loss()
                return
            # closed by the application or by its server's
            # close_clients(): dropped, as asyncio's transports (its TLS
            # one too) drop a write after close()
            return
        if data:
            # encrypted before this returns (or copied by the engine
            # until the handshake ends): the caller's buffer is not kept
            self._tls._app_write(data)

    def write_eof(self) -> None:
        if self._eof_written or self._closing:
            return
        self._eof_written = True
        self._tls._app_write_eof()

    def can_write_eof(self) -> bool:
        return True

    async def add_path(
        self,
        remote: tuple[str, int],
        *,
        local: str | None = None,
        backup: bool = False,
        timeout: float = 10.0,
    ) -> int:
        """Join one more subflow, to ``remote``; its subflow id.

        ``writer.transport.add_path(("192.0.2.7", 443))`` on a client's
        stream. See :meth:`mptls.backends.base.Backend.add_path`.
        """
        backend_transport = self._backend_transport()
        return await self._tls._backend.add_path(
            backend_transport,
            remote,
            local=local,
            backup=backup,
            timeout=timeout,
        )

    async def remove_path(self, subflow_id: int) -> None:
        """Close one subflow; see ``Backend.remove_path``."""
        backend_transport = self._backend_transport()
        await self._tls._backend.remove_path(backend_transport, subflow_id)

    async def rotate_keys(self) -> int:
        """Move to the next MPTCP key generation; returns it once in use.

        ``await writer.transport.rotate_keys()`` on either end of an E
        mode connection: both ends export the next generation from this
        TLS session and confirm it to each other (NEW_KEY); joins and
        ADD_ADDR then use it. See ``Backend.rotate_keys`` for the errors.
        """
        transport = self._tls._transport
        if transport is None or self._closing or self._tls._lost:
            raise KeysUnavailableError(
                "the connection is closed: no keys to rotate"
            )
        return await self._tls._backend.rotate_keys(transport)

    def _backend_transport(self) -> asyncio.Transport:
        transport = self._tls._transport
        if transport is None or self._closing or self._tls._lost:
            raise PathError("the connection is closed")
        return transport

    def is_reading(self) -> bool:
        return self._tls._app_reading

    def pause_reading(self) -> None:
        self._tls._app_pause_reading()

    def resume_reading(self) -> None:
        self._tls._app_resume_reading()

    def get_write_buffer_size(self) -> int:
        transport = self._tls._transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        transport = self._tls._transport
        if transport is None:
            return (0, 0)
        return transport.get_write_buffer_limits()

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        transport = self._tls._transport
        if transport is not None:
            transport.set_write_buffer_limits(high, low)

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<mptls.TLSTransport {self._tls._backend.name} {state}>"
