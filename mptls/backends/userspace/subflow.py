"""One subflow's TCP connection: the frames of docs/wire.md, both ways.

:class:`SubflowProtocol` is an ``asyncio.Protocol`` on one TCP
connection: it writes the preamble and frames handed to it, decodes the
frames it reads and hands the segments to its :class:`SegmentSink` (a
listener until the first segment is routed, then a transport).

It decides nothing about the protocol and keeps no MPTCP state: it
never reorders, drops or copies a frame it was given to send.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import sys
import weakref
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, Protocol, cast

from mptls.backends.base import reset_on_close
from mptls.backends.buffers import read_buffer
from mptls.backends.tcpinfo import packed
from mptls.errors import NotMptlsPeerError, ProtocolError
from mptls.mptcp.framing import (
    NOT_MPTLS_REPLY,
    PREAMBLE,
    Payload,
    Segment,
    SegmentDecoder,
)
from mptls.trace import pcap

logger = logging.getLogger("mptls.userspace")

# Linux's ioctl for the bytes of a TCP socket's queue not yet sent
_SIOCOUTQNSD = 0x894B
# what a flush reads of Linux's struct tcp_info, in offset order
_TCP_INFO = packed(
    ("snd_mss", "rtt_us", "snd_cwnd", "notsent_bytes", "delivery_rate")
)
_TCP_INFO_OPTION: int | None = getattr(socket, "TCP_INFO", None)
# asyncio's own socket transport joins what writelines gets before
# Python 3.12 (a copy of every flush); from 3.12 it sends them gathered
_JOINING_TRANSPORT = (
    "asyncio.selector_events" if sys.version_info < (3, 12) else None
)
# pieces per writev: Linux takes up to 1024 (IOV_MAX)
_MAX_IOV = 1024
# seconds a closed subflow may take to send what asyncio still holds for
# it (its last frames) before its TCP connection is reset: a path that
# takes nothing more would otherwise keep the socket until TCP gives up
CLOSE_LINGER = 10.0
# seconds a subflow that carried a reset frame (MP_FASTCLOSE: an abort)
# stays open after it, read and thrown away, so that its close does not
# find unread bytes: the kernel answers such a close with a TCP reset
# that drops what is still queued to go, the reset frame included. The
# peer closes its side when the frame arrives, usually one round trip
# later; when it has not, and nothing more left in those seconds (a peer
# that stopped taking bytes, or has them all and never answers), the
# connection is reset. While the bytes before the frame still leave (a
# slow path) it waits again, up to CLOSE_LINGER in all
ABORT_LINGER = 2.0
# reads of the shared buffer a close at once makes of the peer's unread
# bytes (8 MiB): a connection that failed in its handshake has had
# little from the peer; past that the close is a reset
_UNREAD_READS = 16


class SegmentSink(Protocol):
    """Who receives a subflow's segments: a listener, then a transport."""

    def segments_received(
        self, subflow: SubflowProtocol, segments: list[Segment]
    ) -> None: ...

    def subflow_lost(
        self, subflow: SubflowProtocol, exc: BaseException | None
    ) -> None: ...

    def subflow_writable(
        self, subflow: SubflowProtocol, writable: bool
    ) -> None: ...


class Detached:
    """The sink of a subflow whose connection is over: it takes nothing.

    A subflow that lingers after a reset frame hands nothing on, and
    keeping its transport as the sink would keep the whole aborted
    connection (TLS, the core, the data it never had acknowledged) for
    as long as the subflow lingers.
    """

    def segments_received(
        self, subflow: SubflowProtocol, segments: list[Segment]
    ) -> None:
        return None

    def subflow_lost(
        self, subflow: SubflowProtocol, exc: BaseException | None
    ) -> None:
        return None

    def subflow_writable(
        self, subflow: SubflowProtocol, writable: bool
    ) -> None:
        return None


_DETACHED = Detached()

# the subflows of this process by their socket's descriptor, so that a
# socket one of them carries is refused as sock= before it is touched
# (asyncio's loop refuses one its transports use only from 3.12 on)
_CARRIERS: weakref.WeakValueDictionary[int, SubflowProtocol] = (
    weakref.WeakValueDictionary()
)


def carries_socket(sock: socket.socket) -> bool:
    """Whether a live subflow of this process runs over ``sock``."""
    subflow = _CARRIERS.get(sock.fileno())
    if subflow is None or subflow.gone:
        return False
    transport = subflow.transport
    return transport is not None and not transport.is_closing()


def _step(awaitable: Coroutine[Any, Any, object]) -> None:
    """Run one step of an async generator's ``asend()`` or ``aclose()``
    that awaits nothing: it ends at once."""
    with contextlib.suppress(StopIteration, StopAsyncIteration):
        awaitable.send(None)


class SubflowProtocol(asyncio.BufferedProtocol):
    """One TCP connection carrying one subflow's frames."""

    def __init__(self, sink: SegmentSink, *, initiator: bool) -> None:
        self.sink = sink
        self.initiator = initiator
        self.subflow_id: int | None = None
        self.transport: asyncio.Transport | None = None
        self.preamble_sent = False
        self.closed = False
        # why the core closed this subflow (SubflowClosed), once it has
        self.close_reason: str | None = None
        # connection_lost has come: the transport is finished
        self.gone = False
        self._outq_works = True
        self._info_works = True
        # until when the transport, while this is its only subflow,
        # takes its queue to be no limit without measuring it (its
        # loop's clock)
        self.uncapped_until = 0.0
        self._socket: socket.socket | None = None
        self._gather = False
        self._fileno = -1
        self._decoder = SegmentDecoder(preamble=True)
        # after a reset frame: what arrives is read and thrown away
        self._draining = False
        # after a reset frame, with bytes buffered: shut the write side
        # when the transport says its buffer is empty
        self._shut_on_resume = False
        self._linger: asyncio.TimerHandle | None = None
        # what was still queued at the last look, and when it ends
        self._linger_queued = 0
        self._linger_end = 0.0
        # while it lingers: closes the socket if the loop ends first
        self._loop_end: AsyncGenerator[None, None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's transports subclass asyncio.Transport; uvloop's have
        # the same methods without the base class, so no isinstance here
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # pure Data ACK frames are small: Nagle would hold them back
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socket = sock
            self._fileno = sock.fileno()
            if self._fileno >= 0:
                _CARRIERS[self._fileno] = self
            self._gather = (
                type(transport).__module__ == _JOINING_TRANSPORT
                and self._fileno >= 0
            )

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()

    def lend_payloads(self) -> None:
        """Hand payloads on as views of the read buffer, not copies.

        Only for a sink that is done with every segment, or has copied
        what it keeps, when ``segments_received`` returns: the next read
        on this thread, on any socket, overwrites the buffer.
        """
        self._decoder.payload_views = True

    def buffer_updated(self, nbytes: int) -> None:
        if self._draining:
            # the connection was aborted: nothing is decoded or kept,
            # the bytes only leave the socket (see close_after_reset)
            return
        # a view of the shared buffer, not bytes: the decoder takes any
        # buffer and copies what it keeps; subclasses count and forward
        self.data_received(cast(bytes, read_buffer()[:nbytes]))

    def data_received(self, data: bytes) -> None:
        try:
            segments = self._decoder.feed(data)
        except NotMptlsPeerError as exc:
            self._refuse_foreign(exc)
            return
        except ProtocolError as exc:
            logger.debug("subflow framing error: %s", exc)
            self.sink.subflow_lost(self, exc)
            self.close()
            return
        if segments:
            # a packet capture (mptls.trace) records them; none running
            # costs this one test per read (read once: another thread
            # may stop it meanwhile)
            if (capture := pcap.active) is not None:
                capture.frames_received(self, segments)
            self.sink.segments_received(self, segments)

    def _refuse_foreign(self, exc: NotMptlsPeerError) -> None:
        if not self.initiator and self.transport is not None:
            # wire.md: a plain TLS or HTTP client sees this line
            self.transport.write(NOT_MPTLS_REPLY)
        self.sink.subflow_lost(self, exc)
        self.close()

    def eof_received(self) -> bool:
        # asyncio closes the transport: the peer's FIN also ends the
        # lingering of close_after_reset
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if _CARRIERS.get(self._fileno) is self:
            del _CARRIERS[self._fileno]
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._loop_end is not None:
            _step(self._loop_end.aclose())
            self._loop_end = None
        was_closed, self.closed = self.closed, True
        if not was_closed:
            self.sink.subflow_lost(self, exc)

    def pause_writing(self) -> None:
        self.sink.subflow_writable(self, False)

    def resume_writing(self) -> None:
        if self._shut_on_resume:
            # called from the transport's write callback, which would
            # shut the socket itself, unguarded, were write_eof() called
            # from here: the next loop step does it
            self._shut_on_resume = False
            asyncio.get_running_loop().call_soon(self._shut_write_side)
            return
        self.sink.subflow_writable(self, True)

    def unsent(self) -> int:
        """Bytes written here that have not left for the network yet."""
        if self.closed:
            return 0
        return self._queued()

    def _queued(self) -> int:
        """Bytes asyncio and the kernel hold for this socket, unsent."""
        transport = self.transport
        if transport is None or self.gone:
            return 0
        size = transport.get_write_buffer_size()
        if self._fileno >= 0 and self._outq_works:
            count = array.array("i", [0])
            try:
                fcntl.ioctl(self._fileno, _SIOCOUTQNSD, count)
            except (OSError, ValueError):
                # not Linux, or not TCP: asyncio's buffer alone
                self._outq_works = False
            else:
                size += count[0]
        return size

    def queue_state(self) -> tuple[int, float]:
        """:meth:`unsent`, and how fast the path takes bytes (per second).

        The rate is the kernel's (Linux ``TCP_INFO``, one system call
        for both): the larger of its last delivery rate sample and what
        its congestion window carries per round trip, so that a sample
        taken while little was queued does not make the path look
        slower than it is. 0.0 where the kernel does not say.
        """
        transport = self.transport
        if transport is None or self.closed:
            return 0, 0.0
        option, sock = _TCP_INFO_OPTION, self._socket
        if self._info_works and option is not None and sock is not None:
            try:
                raw = sock.getsockopt(
                    socket.IPPROTO_TCP, option, _TCP_INFO.size
                )
            except (OSError, ValueError):
                raw = b""
            found = tcp_queue(raw)
            if found is not None:
                notsent, rate = found
                return transport.get_write_buffer_size() + notsent, rate
            # an older kernel, or not TCP: the ioctl, and no rate
            self._info_works = False
        return self.unsent(), 0.0

    def send(self, data: bytes | list[Payload]) -> None:
        """Write frames: one buffer, or headers and payload views.

        uvloop (and asyncio from Python 3.12) give the pieces of one
        ``writelines`` to one vectored send; asyncio 3.11 would join
        them (a copy of every byte), so there the pieces go to the
        socket in one ``writev`` while the transport holds nothing.
        """
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            # a transport closed under the subflow (its connection_lost
            # comes a loop step later) takes no more: asyncio 3.12 and
            # 3.13 fail writelines() on one with a TypeError
            return
        parts: list[Payload] = [data] if isinstance(data, bytes) else data
        if not self.preamble_sent:
            self.preamble_sent = True
            parts = [PREAMBLE, *parts]
        if self._gather and len(parts) > 1:
            parts = self._write_gathered(transport, parts)
            if not parts:
                return
        transport.writelines(parts)

    def _write_gathered(
        self, transport: asyncio.Transport, parts: list[Payload]
    ) -> list[Payload]:
        """Send what the socket takes now; return what it did not take.

        Only while the transport's buffer is empty, so that the stream
        keeps its order. On any error nothing is sent here and all goes
        to the transport, which reports the error its usual way.
        """
        if transport.get_write_buffer_size() or transport.is_closing():
            return parts
        try:
            sent = os.writev(self._fileno, parts[:_MAX_IOV])
        except OSError:
            return parts
        for index, part in enumerate(parts):
            size = len(part)
            if sent < size:
                rest = parts[index:]
                if sent:
                    rest[0] = memoryview(part)[sent:]
                return rest
            sent -= size
        return []

    def close(self) -> None:
        """Close the TCP connection once asyncio has sent what it holds.

        A subflow is mostly closed because its path failed (RFC 8684
        section 3.3.6), and what it held is sent again on the others:
        if its last frames have not gone within :data:`CLOSE_LINGER`,
        the connection is reset rather than left to TCP's own timeout.
        """
        self.closed = True
        transport = self.transport
        if transport is None or self.gone or self._draining:
            return
        transport.close()
        if transport.get_write_buffer_size():
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(CLOSE_LINGER, self.reset)

    def close_after_reset(self) -> None:
        """Close once the peer has the reset frame just written here.

        A socket closed with bytes of the peer's still unread is reset
        by the kernel, and the reset drops what waits in its send queue:
        an abort's MP_FASTCLOSE, queued behind data, never arrived, and
        the peer took the abort for lost paths (a refused rejoin). So
        the socket stays open: what comes is read and thrown away, never
        kept; once the queued bytes are out the write side is shut
        (the FIN follows the frame); the close comes when the peer
        closes or resets, as it does on the frame, or as a reset once
        :data:`ABORT_LINGER` passed with nothing more leaving (at most
        :data:`CLOSE_LINGER` in all).
        """
        self.closed = True
        transport = self.transport
        if (
            transport is None
            or self.gone
            or self._draining
            or transport.is_closing()
        ):
            return
        self._draining = True
        self.sink = _DETACHED
        if transport.get_write_buffer_size():
            self._shut_when_drained(transport)
        elif not self._shut_write_side():
            return
        loop = asyncio.get_running_loop()
        self._linger_queued = self._queued()
        self._linger_end = loop.time() + CLOSE_LINGER
        self._linger = loop.call_later(ABORT_LINGER, self._linger_expired)
        self._close_at_loop_end()

    def _close_at_loop_end(self) -> None:
        """Close the socket if the loop ends while this subflow lingers.

        Nothing waits for a lingering subflow, so a program may end its
        loop meanwhile (``asyncio.run()`` returns, Ctrl-C): the socket
        was then left to the garbage collector, which closed it with a
        ``ResourceWarning``. An async generator, started here, is one
        the loop finalizes in ``shutdown_asyncgens()``, which
        ``asyncio.run()`` calls before it closes the loop (uvloop's
        too); ``connection_lost()`` finalizes it first otherwise.
        Unlike a task, it needs no loop step to end.
        """
        if self._loop_end is not None:
            return
        self._loop_end = self._until_gone()
        _step(self._loop_end.asend(None))

    async def _until_gone(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self._end_with_the_loop()

    def _end_with_the_loop(self) -> None:
        """The loop ends: close now what would have lingered."""
        transport = self.transport
        if transport is None or self.gone:
            return
        if transport.is_closing():
            # a close still sending asyncio's buffer: it never will now,
            # and what the kernel holds still leaves, ahead of the FIN
            transport.abort()
        else:
            self.close_now()

    def close_now(self) -> None:
        """Close the TCP connection at once, keeping what the kernel has.

        For a connection that failed before its caller had it: asyncio
        has closed such a socket when its call raises, so the lingering
        of :meth:`close_after_reset` is cut short. What was written to
        the socket (a reset frame, a TLS alert) still leaves, ahead of
        the FIN, sent by the kernel after the close. The peer's bytes
        that wait unread are read and dropped first: a close that finds
        any is a TCP reset, which drops what the kernel has not sent.
        What asyncio itself still holds could leave only if the socket
        stayed open: then a reset.
        """
        self.closed = True
        if self._linger is not None:
            # its expiry would set SO_LINGER on a descriptor number that
            # may be another socket's by then
            self._linger.cancel()
            self._linger = None
        transport = self.transport
        if transport is None or self.gone:
            return
        if transport.get_write_buffer_size():
            self.reset()
        elif not transport.is_closing():
            # a transport closed already ends within this loop step; its
            # descriptor is not read, for it may be closed before
            # connection_lost comes
            self._drop_unread()
            transport.abort()

    def _drop_unread(self) -> None:
        """Read what the socket holds from the peer, and throw it away."""
        if self._fileno < 0:
            return
        buffer = read_buffer()
        for _ in range(_UNREAD_READS):
            try:
                taken = os.readv(self._fileno, [buffer])
            except OSError:
                return
            if taken < len(buffer):
                return

    def _shut_when_drained(self, transport: asyncio.Transport) -> None:
        """Shut the write side once the transport's buffer has gone.

        Left to asyncio, a ``write_eof()`` with bytes buffered shuts the
        socket from the loop's write callback, unguarded: a peer's reset
        that lands between the last send and that shutdown (the peer
        resets on the frame) raised ENOTCONN into the loop's exception
        handler. Limits of zero make the transport call
        :meth:`resume_writing` once its buffer is empty instead.
        """
        self._shut_on_resume = True
        try:
            transport.set_write_buffer_limits(high=0, low=0)
        except (AttributeError, NotImplementedError, ValueError):
            self._shut_on_resume = False
            self._shut_write_side()

    def _shut_write_side(self) -> bool:
        """The FIN behind what was written; a reset instead (and False)
        if the socket refused it."""
        transport = self.transport
        if transport is None or self.gone or transport.is_closing():
            return True
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.reset()
            return False
        return True

    def _linger_expired(self) -> None:
        """No close from the peer within :data:`ABORT_LINGER`: wait
        again if the bytes before the reset frame still leave (a slow
        path), up to :data:`CLOSE_LINGER` in all; reset otherwise."""
        self._linger = None
        if self.gone:
            return
        queued = self._queued()
        loop = asyncio.get_running_loop()
        left = self._linger_end - loop.time()
        if queued < self._linger_queued and left > 0:
            self._linger_queued = queued
            self._linger = loop.call_later(
                min(ABORT_LINGER, left), self._linger_expired
            )
            return
        self.reset()

    def reset(self) -> None:
        """End the TCP connection at once with a reset, dropping what
        it holds (a lingering close that waited long enough)."""
        self.closed = True
        # not once connection_lost came: asyncio's abort() then fails
        if self.gone or self.transport is None:
            return
        # a reset, not a close the kernel would go on sending for
        reset_on_close(self.transport)
        self.transport.abort()

    @property
    def heard_from(self) -> bool:
        """Whether the peer sent any byte, the preamble's included."""
        return self._decoder.started

    def name(self, which: str) -> Any:
        """``sockname`` or ``peername`` as asyncio gives it (four items
        for IPv6), or None."""
        if self.transport is None:
            return None
        return self.transport.get_extra_info(which) or None

    def address(self, which: str) -> tuple[str, int] | None:
        return host_port(self.name(which))


def tcp_queue(raw: bytes) -> tuple[int, float] | None:
    """Unsent bytes and path rate from a Linux ``struct tcp_info``.

    None if ``raw`` is too short to hold them (a kernel before 4.9).
    The rate is the larger of ``tcpi_delivery_rate`` and congestion
    window x MSS / smoothed RTT; 0.0 while neither is known.
    """
    if len(raw) < _TCP_INFO.size:
        return None
    mss, rtt_us, cwnd, notsent, delivery = _TCP_INFO.unpack_from(raw)
    window_rate = cwnd * mss * 1e6 / rtt_us if rtt_us else 0.0
    return notsent, max(float(delivery), window_rate)


def host_port(name: Any) -> tuple[str, int] | None:
    """The host and port of a socket name (an IPv6 one has four items)."""
    return None if name is None else (str(name[0]), int(name[1]))
