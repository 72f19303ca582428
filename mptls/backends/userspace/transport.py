"""The userspace backend's asyncio glue: one transport over subflows.

:class:`MultipathTransport` is the ``asyncio.Transport`` the TLS layer
writes to: it owns the sans-I/O :class:`mptls.mptcp.connection.
Connection`, feeds it segments, time and the application's bytes, and
writes what it pulls out of it to the right subflow's TCP connection
(:class:`~mptls.backends.userspace.subflow.SubflowProtocol`).

All protocol decisions are the core's; this module only moves bytes,
keeps timers and maps subflow ids to TCP connections.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from mptls.backends.base import KeyDerivation, MptcpInfo, SubflowInfo
from mptls.backends.userspace.join_refusals import JoinRefusals
from mptls.backends.userspace.paths import Paths, connection_tag
from mptls.backends.userspace.subflow import SubflowProtocol, host_port
from mptls.errors import (
    KeysUnavailableError,
    MptlsError,
    MptlsTimeoutError,
    PeerResetError,
    ProtocolError,
)
from mptls.mptcp import events
from mptls.mptcp.config import Mode
from mptls.mptcp.connection import Connection
from mptls.mptcp.framing import (
    RST_BIT,
    SYN_BIT,
    Flag,
    Payload,
    Segment,
    encode_head,
)
from mptls.mptcp.scheduler import UNCAPPED
from mptls.refusals import refused
from mptls.tls.keys import KeyMaterial
from mptls.trace import pcap

logger = logging.getLogger("mptls.userspace")

_WRITE_HIGH_WATER = 4 * 1024 * 1024
_WRITE_LOW_WATER = 1024 * 1024
# the flag bits that open or end a subflow, as plain ints
_CLOSING_BITS = int(Flag.FIN | Flag.RST)
_EDGE_BITS = SYN_BIT | _CLOSING_BITS
# what a subflow may hold unsent (asyncio's buffer and the kernel's send
# queue) before the scheduler gives the next data to another subflow:
# about 20 ms at 100 Mbit/s; bytes queued past it would make the stream
# wait for a slow path rather than leave on a faster one
_SUBFLOW_QUEUE = 256 * 1024
# and at most what the path sends in this long, alone or not: every
# frame written later (the Data ACKs of the other direction among them)
# waits behind the queue, and a subflow holding seconds of it delays
# the peer's view of progress past its timeouts (a soak at 20 Mbit/s
# shared by 30 connections queued 2 MiB, minutes at its rate). Data
# kept in the core instead can still go on a path that joins, and a
# Data ACK that comes meanwhile drops what the peer already has
_QUEUE_SECONDS = 0.25
# the least such a limit leaves: one TLS record's worth
_MIN_QUEUE = 16 * 1024
# how long a lone subflow found too fast for that limit to bind goes
# unmeasured: the rate of a path may fall, but what its socket holds
# then is bounded by the in-flight limit whether it was measured or not
_RATE_RECHECK = 0.1


class MultipathTransport(asyncio.Transport):
    """One MPTCP connection as an ``asyncio.Transport``."""

    def __init__(
        self,
        core: Connection,
        *,
        initiator: bool,
        local_addrs: Sequence[str] = (),
        remote: tuple[str, int] | None = None,
        announce: Sequence[tuple[str, int]] = (),
        close_timeout: float = 10.0,
        on_closed: Callable[[MultipathTransport], None] | None = None,
    ) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._core = core
        self._initiator = initiator
        self._close_timeout = close_timeout
        self._closed_callback = on_closed
        self._subflows: dict[int, SubflowProtocol] = {}
        self._closing_subflows: list[int] = []
        # its TCP connection may be a socket the application gave; weak,
        # for the subflow refers back here and the table of subflows is
        # what keeps them (a strong one made each connection a cycle)
        self._first_subflow: weakref.ref[SubflowProtocol] | None = None
        # the subflows left open after the end's reset frame, until the
        # peer has it: weak, as the first, and made only then
        self._lingering: list[weakref.ref[SubflowProtocol]] | None = None
        # each subflow's (sockname, peername) as asyncio gave them
        self._addresses: dict[int, tuple[Any, Any]] = {}
        # the local address ids, and the subflows opened beside the first
        self.paths = Paths(
            self,
            core,
            self._loop,
            initiator=initiator,
            local_addrs=local_addrs,
            remote=remote,
            announce=announce,
            names=self._addresses,
        )
        self._closed_by_core: events.ConnectionClosed | None = None
        # the latest refused join and why, for add_path's error: this
        # end may refuse it as well as the peer
        self.last_join_refusal: events.JoinRefused | None = None
        # the refusals that may yet prove to be news of the peer's end
        # (made at the first: most connections never see one), and the
        # timer that makes them warnings if it does not come
        self._join_refusals: JoinRefusals | None = None
        self._refusal_timer: asyncio.TimerHandle | None = None
        self._protocol: asyncio.Protocol | None = None
        # what arrived while reading was paused: one entry per socket
        # read, its frames' payloads (a peer may send a byte per frame,
        # each in a read of its own): a deque, taken from the left
        self._held: deque[list[bytes]] = deque()
        self._held_eof = False
        # the connection ended cleanly while the paused reader still had
        # held data: connection_lost waits until it has taken it
        self._lost_after_held = False
        # the peer's reset after its whole stream, held back for the
        # paused reader: a write before it has read is told of it
        self._held_reset: PeerResetError | None = None
        self._reading = True
        self._discarding = False
        self._write_paused = False
        self._high_water = _WRITE_HIGH_WATER
        self._low_water = _WRITE_LOW_WATER
        self._closing = False
        self._closed = False
        self._eof_written = False
        self._processing = False
        # the peer ended its direction in this step: what is due goes out
        # one loop step later, with the application's answer if any
        self._answer_awaited = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        # the bytes not yet acknowledged when the close timer was set
        self._close_unacked = 0
        # E mode: exports a later key generation from the TLS session,
        # and the rotate_keys() calls waiting for each generation
        self._derive: KeyDerivation | None = None
        self._rotations: dict[int, asyncio.Future[int]] = {}

    # wiring

    def attach(self, subflow_id: int, subflow: SubflowProtocol) -> None:
        subflow.subflow_id = subflow_id
        subflow.sink = self
        # segments_received leaves nothing referring to a payload: the
        # core copies what it holds out of order, TLS what it decrypts,
        # and _on_data what a paused reader leaves (one copy less per
        # byte on the receiving end)
        subflow.lend_payloads()
        self._subflows[subflow_id] = subflow
        if subflow_id == 0:
            self._first_subflow = weakref.ref(subflow)
        # kept after the TCP connection is gone, for the final snapshot
        self._addresses[subflow_id] = (
            subflow.name("sockname"),
            subflow.name("peername"),
        )
        if len(self._addresses) > 1:
            # a join: the first subflow has nothing to forget (and the
            # core's snapshot costs a connection's setup)
            self._forget_addresses()

    def _forget_addresses(self) -> None:
        # the core forgets all but its last closed subflows; their
        # addresses go with them, or every join a long-lived connection
        # ever saw (refused ones included) would stay here. The first
        # subflow's remain: a closed connection's peername and sockname
        first = min(self._addresses)
        reported = {sub.subflow_id for sub in self._core.info().subflows}
        for subflow_id in list(self._addresses):
            if subflow_id != first and subflow_id not in reported:
                del self._addresses[subflow_id]

    def start(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)
        if self._closed:
            # the protocol failed at once (a handshake that could not
            # start): no path is to be opened ahead for it
            return
        self.process()
        self.paths.preconnect()

    # SegmentSink

    def segments_received(
        self, subflow: SubflowProtocol, segments: list[Segment]
    ) -> None:
        subflow_id = subflow.subflow_id
        if subflow_id is None or self._closed:
            return
        now = self._loop.time()
        receive = self._core.receive_segment
        for segment in segments:
            if segment.flags & RST_BIT:
                # what came before the reset reaches TLS first: a
                # client's Finished read together with its abort gives
                # the keys that verify the abort's MP_FASTCLOSE
                self.process()
                if self._closed:
                    return
            receive(subflow_id, segment, now)
        self.process()

    def subflow_lost(
        self, subflow: SubflowProtocol, exc: BaseException | None
    ) -> None:
        subflow_id = subflow.subflow_id
        if subflow_id is None or self._subflows.get(subflow_id) is not subflow:
            return
        del self._subflows[subflow_id]
        if self._closed:
            return
        if (
            isinstance(exc, ProtocolError)
            and not self._core.handshake_complete
        ):
            # the wrong kind of peer, a first subflow reset before the
            # preamble, or frames it cannot read before the handshake
            # completed: no connection exists that a join could carry
            # on, and "every subflow closed" would hide why. A join
            # that reached the wrong service (add_path to another port,
            # an announced address something else listens on) is one
            # lost path, whatever the error, while the others carry on
            self._finish(exc)
            return
        logger.debug("%s: subflow %d lost (%s)", self.tag(), subflow_id, exc)
        self._core.subflow_lost(subflow_id, self._loop.time())
        self.process()

    def subflow_writable(
        self, subflow: SubflowProtocol, writable: bool
    ) -> None:
        if subflow.subflow_id is None or self._closed:
            return
        self._core.set_writable(subflow.subflow_id, writable)
        if writable:
            self.process()

    # the engine: events in, segments out

    def process(self) -> None:
        """Handle the core's events, then send what it has to send."""
        if self._processing:
            return
        self._processing = True
        deferred = False
        try:
            self._handle_events()
            if self._answer_awaited and self._closed_by_core is None:
                # most applications close when the peer has: their
                # close_notify and DATA_FIN then carry the Data ACK of
                # the peer's DATA_FIN, one frame and one write instead
                # of two (the application's task runs before this)
                self._answer_awaited = False
                self._loop.call_soon(self._process_open)
                deferred = True
            else:
                self._flush()
        finally:
            self._processing = False
        if self._closed_by_core is not None:
            self._finish(self._closed_by_core.error)
            return
        if not deferred:
            # else the deferred flush sets it a loop step later: armed
            # now, for the Data ACK it is about to send, it was
            # cancelled again at once
            self._update_timer()
        self._update_write_flow()

    def _process_open(self) -> None:
        if not self._closed:
            self.process()

    def _flush(self) -> None:
        now = self._loop.time()
        if self._core.send_buffer_size:
            # with one subflow there is no other path to choose: no cap
            # in bytes, only in time. Unless data of a lost subflow is to
            # be sent again: past the cap it would wait in the socket,
            # where a Data ACK that comes meanwhile (the peer had most of
            # it) can no longer drop it and the byte the peer waits for
            # queues behind the copies
            several = len(self._subflows) > 1 or self._core.has_reinjection
            room = self._core.set_queue_room
            limit = self._core.config.subflow_inflight_limit
            for subflow_id, tcp in self._subflows.items():
                if not several and tcp.uncapped_until > now:
                    # alone on a path found fast enough a moment ago:
                    # no system call on a bulk transfer's every flush
                    room(subflow_id, UNCAPPED)
                    continue
                room(subflow_id, _queue_room(tcp, several, now, limit))
        out: dict[int, list[Payload]] = {}
        # the subflows to close, and whether a reset frame went on each
        closing: dict[int, bool] = {}
        sent = self._core.segments_to_send(now)
        if (capture := pcap.active) is not None:
            capture.frames_sent(self._subflows, sent)
        for subflow_id, segment in sent:
            # plain ints: one C-level test for each data frame of a
            # transfer, where Flag's operators are Python calls
            edge = int(segment.flags) & _EDGE_BITS
            if edge:
                if edge & SYN_BIT and subflow_id not in out:
                    # a join's SYN goes out ahead of the first subflow's
                    # data of the same flush (the TLS Finished, when the
                    # keys have just come): on paths of like delay the
                    # server then holds it and answers it as the
                    # Finished installs the keys, not after all the
                    # Finished's work
                    out = {subflow_id: [], **out}
                if edge & _CLOSING_BITS:
                    closing[subflow_id] = closing.get(subflow_id, False) or (
                        bool(edge & RST_BIT)
                    )
            # header and payload apart: send gathers them
            parts = out.setdefault(subflow_id, [])
            parts.append(encode_head(segment))
            if segment.payload:
                parts.append(segment.payload)
        for subflow_id, chunks in out.items():
            subflow = self._subflows.get(subflow_id)
            if subflow is not None:
                subflow.send(chunks)
        for subflow_id in self._closing_subflows:
            closing.setdefault(subflow_id, False)
        self._closing_subflows.clear()
        ended = self._closed_by_core
        peer_aborted = ended is not None and isinstance(
            ended.error, PeerResetError
        )
        for subflow_id, reset in closing.items():
            subflow = self._subflows.pop(subflow_id, None)
            if subflow is not None:
                self._end_subflow(
                    subflow, carried_reset=reset, peer_aborted=peer_aborted
                )

    def _end_subflow(
        self,
        subflow: SubflowProtocol,
        *,
        carried_reset: bool,
        peer_aborted: bool,
    ) -> None:
        """End a subflow's TCP connection as the connection's end asks.

        The peer aborted: what this end still has queued reaches nobody,
        and the peer waits for the close (its own linger), so a reset
        now. This end aborted or failed: the subflow that carries the
        reset frame (with its MP_FASTCLOSE) lingers until the peer has
        it. Otherwise an orderly close.
        """
        if peer_aborted:
            subflow.reset()
        elif carried_reset and self._core.closed:
            subflow.close_after_reset()
            if self._lingering is None:
                self._lingering = []
            self._lingering.append(weakref.ref(subflow))
        else:
            subflow.close()

    def _handle_events(self) -> None:
        # the data of consecutive DataReceived events (every frame of a
        # socket read) goes to the protocol in one call: one TLS pass
        # for the lot instead of one per frame
        next_event = self._core.next_event
        batch: list[Payload] = []
        while True:
            event = next_event()
            if event is None:
                break
            if type(event) is events.DataReceived:
                batch.append(event.data)
                continue
            if batch:
                self._on_data(batch)
                batch = []
            handler = _EVENT_HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
        if batch:
            self._on_data(batch)

    def _on_data(self, batch: list[Payload]) -> None:
        # the pieces may be views of the read buffer (lend_payloads):
        # data_received_many copies them into TLS at once; all else gets
        # or keeps bytes
        many = getattr(self._protocol, "data_received_many", None)
        if many is None or self._discarding:
            for data in batch:
                self._on_data_piece(data)
            return
        if not self._reading or self._held:
            # handed over as they came, in one call again on resume
            self._held.append(list(map(bytes, batch)))
            return
        many(batch)
        self._core.consumed(sum(map(len, batch)))

    def _on_data_piece(self, data: Payload) -> None:
        if self._discarding:
            self._core.consumed(len(data))
            return
        if not self._reading or self._held or self._protocol is None:
            self._held.append([bytes(data)])
            return
        self._protocol.data_received(bytes(data))
        self._core.consumed(len(data))

    def _on_end_of_stream(self, event: events.EndOfStream) -> None:
        self._answer_awaited = True
        if self._held or not self._reading:
            self._held_eof = True
            return
        self._deliver_eof()

    def _deliver_eof(self) -> None:
        self._held_eof = False
        if self._protocol is None or self._discarding:
            return
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    def _on_handshake(self, event: events.HandshakeComplete) -> None:
        # tag() takes a snapshot of the core: only when it is logged
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: MPTCP handshake complete", self.tag())

    def _on_subflow_established(
        self, event: events.SubflowEstablished
    ) -> None:
        self.paths.join_established(event.subflow_id)
        if not logger.isEnabledFor(logging.DEBUG):
            return
        subflow = self._subflows.get(event.subflow_id)
        logger.debug(
            "%s: subflow %d established %s -> %s",
            self.tag(),
            event.subflow_id,
            subflow and subflow.address("sockname"),
            subflow and subflow.address("peername"),
        )

    def _on_subflow_closed(self, event: events.SubflowClosed) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s: subflow %d closed: %s",
                self.tag(),
                event.subflow_id,
                event.reason,
            )
        subflow = self._subflows.get(event.subflow_id)
        if subflow is not None:
            subflow.close_reason = event.reason
        # closed after the next flush: a final RST or FIN may be queued
        self._closing_subflows.append(event.subflow_id)
        self.paths.subflow_closed(event)

    def _on_join_refused(self, event: events.JoinRefused) -> None:
        self.last_join_refusal = event
        # a refusal whose path is joined again, or whose end the paths
        # report themselves, is no news
        if not self.paths.join_refused(event):
            logger.info(
                "%s: join on subflow %d refused: %s",
                self.tag(),
                event.subflow_id,
                event.reason,
            )
            return
        if self._join_refusals is None:
            self._join_refusals = JoinRefusals(
                functools.partial(connection_tag, self._core)
            )
        self._join_refusals.refused(
            event, self._loop.time(), ending=self._closing
        )
        self._arm_refusal_timer(self._join_refusals)

    def _arm_refusal_timer(self, refusals: JoinRefusals) -> None:
        deadline = refusals.deadline
        if deadline is None or self._refusal_timer is not None:
            return
        self._refusal_timer = self._loop.call_at(
            deadline, self._on_refusal_timer
        )

    def _on_refusal_timer(self) -> None:
        self._refusal_timer = None
        if self._join_refusals is not None:
            self._join_refusals.handle_timer(self._loop.time())
            self._arm_refusal_timer(self._join_refusals)

    def _on_peer_join_refused(self, event: events.PeerJoinRefused) -> None:
        # the operator's news: which peer, and why (never keys or HMACs)
        subflow = self._subflows.get(event.subflow_id)
        refused(subflow and subflow.name("peername"), event.reason)

    def _on_address(self, event: events.AddressAnnounced) -> None:
        self.paths.address_announced(event)

    def _on_address_removed(self, event: events.AddressRemoved) -> None:
        self.paths.address_removed(event.address_id)

    def _on_closed(self, event: events.ConnectionClosed) -> None:
        # finished after the next flush: the last FIN or RST must go out
        self._closed_by_core = event

    def _on_keys_requested(self, event: events.KeysRequested) -> None:
        # the core wants the next key generation (a rotation asked for
        # here, by the interval, or by the peer's NEW_KEY): it comes
        # from the TLS exporter; without it the rotation times out
        generation = event.generation
        if self._derive is None:
            logger.warning(
                "%s: key generation %d wanted, but no TLS session to "
                "export it from",
                self.tag(),
                generation,
            )
            return
        try:
            keys = self._derive(generation)
        except MptlsError as exc:
            # the error names what failed, never the keys
            logger.warning(
                "%s: cannot export key generation %d: %s",
                self.tag(),
                generation,
                exc,
            )
            return
        if not self._core.install_keys(keys):
            logger.debug(
                "%s: key generation %d not taken", self.tag(), generation
            )

    def _on_keys_activated(self, event: events.KeysActivated) -> None:
        # the core says so at INFO; here it is the transport's step
        logger.debug(
            "%s: key generation %d in use (fingerprint %s)",
            self.tag(),
            event.generation,
            event.fingerprint,
        )
        waiter = self._generation_settled(event.generation)
        if waiter is not None:
            waiter.set_result(event.generation)

    def _on_key_rotation_failed(self, event: events.KeyRotationFailed) -> None:
        logger.warning(
            "%s: key generation %d not confirmed: %s",
            self.tag(),
            event.generation,
            event.reason,
        )
        waiter = self._generation_settled(event.generation)
        if waiter is not None:
            waiter.set_exception(
                MptlsTimeoutError(
                    f"key generation {event.generation} was not confirmed "
                    f"by the peer: {event.reason}"
                )
            )

    def _generation_settled(
        self, generation: int
    ) -> asyncio.Future[int] | None:
        """``generation`` came into use or was given up: the first one
        opens the paths (or tells them none will), and the waiter of a
        rotate_keys() call still waiting for it is handed back."""
        if generation == 0:
            self.paths.keys_installed()
        waiter = self._rotations.pop(generation, None)
        return None if waiter is None or waiter.done() else waiter

    def _fail_rotations(self, error: Exception | None) -> None:
        rotations, self._rotations = self._rotations, {}
        for generation, waiter in rotations.items():
            if waiter.done():
                continue
            failure = KeysUnavailableError(
                f"the connection ended before key generation {generation} "
                "was confirmed"
            )
            failure.__cause__ = error
            waiter.set_exception(failure)

    def _finish(self, error: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        aborted = isinstance(error, PeerResetError)
        for subflow in self._subflows.values():
            self._end_subflow(
                subflow, carried_reset=False, peer_aborted=aborted
            )
        self._subflows.clear()
        self.paths.close()
        self._derive = None
        self._fail_rotations(error)
        if self._join_refusals is not None:
            self._join_refusals.connection_ended(error)
        for handle in (self._timer, self._close_timer, self._refusal_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._close_timer = self._refusal_timer = None
        if self._closed_callback is not None:
            self._closed_callback(self)
        if self._protocol is None:
            return
        if (
            self._held_eof
            and isinstance(error, PeerResetError)
            and error.unacknowledged == 0
        ):
            # the peer's DATA_FIN came in order before its MP_FASTCLOSE:
            # its stream is complete here (RFC 8684 section 3.3.3), and
            # it acknowledged all of ours: a closer that gave up waiting
            # for our end loses nothing
            self._held_reset = error
            error = None
        if (
            error is None
            and not self._discarding
            and (self._held or self._held_eof)
        ):
            # a clean end with data the paused reader has not taken yet:
            # connection_lost comes after it, as a socket's would
            self._lost_after_held = True
            return
        self._loop.call_soon(self._call_connection_lost, self._protocol, error)

    def _call_connection_lost(
        self, protocol: asyncio.Protocol, error: Exception | None
    ) -> None:
        # as asyncio's transports do: once told of the end, the protocol
        # is let go. It holds this transport, and a link back made every
        # connection a reference cycle that only the cyclic garbage
        # collector freed, with the core and both subflows' state on it
        try:
            protocol.connection_lost(error)
        finally:
            if self._protocol is protocol:
                self._protocol = None

    # timers and flow control

    def _update_timer(self) -> None:
        if self._closed:
            return
        deadline = self._core.get_timer()
        armed = self._timer_deadline
        # a timer that fires no later than needed stays armed: fired
        # early, handle_timer finds nothing due and process() arms the
        # next. Every Data ACK moves the data-level deadline, and
        # re-arming for each cost a cancel and a new handle per flush
        if deadline is None or (armed is not None and armed <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = None
        if self._closed:
            return
        self._core.handle_timer(self._loop.time())
        self.process()

    def _update_write_flow(self) -> None:
        if self._protocol is None or self._closed:
            return
        # bytes handed to a subflow are the peer's to acknowledge, as a
        # TCP socket's kernel buffer is: only what waits for a subflow
        # counts, or the application would stop writing while the
        # receiver still had window for more
        size = self._core.send_pending
        if not self._write_paused and size > self._high_water:
            self._write_paused = True
            self._protocol.pause_writing()
        elif self._write_paused and size <= self._low_water:
            self._write_paused = False
            self._protocol.resume_writing()

    # keys: the paths may open

    def install_keys(
        self, keys: KeyMaterial, *, derive: KeyDerivation | None = None
    ) -> bool:
        """Hand the TLS session's keys to the core; whether it took them.

        ``derive(n)`` exports key generation ``n`` later, for the E
        mode's rotations. In E mode the paths open once the peer has
        confirmed the keys (its NEW_KEY), not now.
        """
        if derive is not None:
            self._derive = derive
        installed = self._core.install_keys(keys)
        if self._core.mode is not Mode.E:
            self.paths.keys_installed()
        self.process()
        return installed

    async def rotate_keys(self) -> int:
        """Move to the next key generation; returns it once it is in use.

        E mode only (:class:`~mptls.errors.ConfigurationError`
        otherwise). Right after the TLS handshake the first keys may
        still wait for the peer's NEW_KEY: the call waits for them
        first. :class:`~mptls.errors.KeysUnavailableError` when the
        first keys were never confirmed, or the connection ends first;
        :class:`~mptls.errors.MptlsTimeoutError` when the peer does not
        confirm the new keys. Calls made while a rotation is under way
        wait for that one.
        """
        if self._closed or self._core.closed:
            raise KeysUnavailableError(
                "the connection is closed: no keys to rotate"
            )
        try:
            await self.first_keys()
        except MptlsTimeoutError as exc:
            raise KeysUnavailableError(f"no keys to rotate: {exc}") from exc
        # the core checks the mode and that generation 0 is in use
        generation = self._core.request_rotation()
        # the request goes out (and may even be answered) in this step
        return await self._generation_in_use(generation, process=True)

    async def first_keys(self) -> None:
        """Return once mode E's first keys are confirmed, or at once.

        The TLS handshake ends before the peer's NEW_KEY confirms
        generation 0 (about a round trip later), and neither a join nor
        a rotation can go before it: the calls that need the keys wait
        here rather than fail on a connection that is only just open.
        :class:`~mptls.errors.KeysUnavailableError` when the connection
        has ended or ends first, :class:`~mptls.errors.MptlsTimeoutError`
        when the peer never confirms them.
        """
        if self._closed or self._core.closed:
            # a waiter made now would wait for keys that nothing brings
            raise KeysUnavailableError("the connection is closed: no keys")
        if self._core.first_keys_pending:
            await self._generation_in_use(0)

    async def _generation_in_use(
        self, generation: int, *, process: bool = False
    ) -> int:
        """Wait until the core reports ``generation`` active (or not)."""
        waiter = self._rotations.get(generation)
        if waiter is None:
            waiter = self._loop.create_future()
            waiter.add_done_callback(_retrieve)
            self._rotations[generation] = waiter
        if process:
            self.process()
        # the core gives up on its own after join_timeout; this bounds
        # the wait should its word never come
        limit = 2 * self._core.config.join_timeout
        try:
            async with asyncio.timeout(limit):
                return await asyncio.shield(waiter)
        except MptlsTimeoutError:
            raise  # the core's own word: the peer did not confirm
        except TimeoutError as exc:
            raise MptlsTimeoutError(
                f"key generation {generation} was not confirmed within "
                f"{limit} s"
            ) from exc

    # asyncio.Transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "mptcp":
            return self.mptcp_info()
        if name == "subflow_transports":
            # the TCP transport of each live subflow, by subflow id: for
            # diagnostics and for tests that break one path on purpose
            return {
                subflow_id: subflow.transport
                for subflow_id, subflow in self._subflows.items()
                if subflow.transport is not None and not subflow.closed
            }
        primary = self._primary()
        if primary is None or primary.transport is None:
            return self._closed_extra_info(name, default)
        return primary.transport.get_extra_info(name, default)

    def _closed_extra_info(self, name: str, default: Any) -> Any:
        # asyncio keeps peername and sockname after close: answer from
        # the addresses cached when the first subflow was attached
        index = _ADDRESS_INDEX.get(name)
        if index is None or not self._addresses:
            return default
        address = self._addresses[min(self._addresses)][index]
        return default if address is None else address

    def _primary(self) -> SubflowProtocol | None:
        if not self._subflows:
            return None
        return self._subflows[min(self._subflows)]

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        # None once it has been told of the end, as asyncio's own
        return cast(asyncio.BaseProtocol, self._protocol)

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # the caller may reuse its buffer: bytes(data) copies all else
        self.write_owned(bytes(data))

    def write_owned(self, data: bytes | memoryview) -> None:
        """:meth:`write` of a buffer nobody changes again: not copied.

        The TLS layer hands over its output this way (see
        ``TLSEngine.take_output``); the core keeps the view until the
        peer's Data ACK covers it.
        """
        if self._closed and not self._eof_written:
            # ended by the peer or a failure, not by a close of ours:
            # dropped like the writes below (connection_lost is coming)
            self._lose_held_on_write()
            return
        if self._closing:
            # closed, under its protocol too (a server's close_clients()):
            # the DATA_FIN is queued, so the bytes are dropped, as
            # asyncio's transports drop writes after a loss; the end
            # reaches the protocol as connection_lost
            return
        if self._eof_written:
            raise RuntimeError("cannot write after write_eof()")
        if not data or self._core.closed:
            # a connection that ended (the peer's MP_FASTCLOSE in the
            # read being handled) takes nothing more, as asyncio's socket
            # transports drop writes after a loss: the end reaches the
            # protocol as connection_lost, with its own reason
            return
        self._core.send(data, owned=True)
        self.process()

    def write_eof(self) -> None:
        if self._eof_written or self._closing:
            return
        self._eof_written = True
        self._core.close()
        self.process()

    def write_final(self, data: bytes) -> None:
        """:meth:`write` then :meth:`write_eof`, in one flush.

        The last bytes and the DATA_FIN share one frame (RFC 8684 section
        3.3.3 lets a DSS mapping carry both): a TLS close_notify and the
        end of the data-level stream leave in one write, not two.
        """
        if self._closed and not self._eof_written:
            return  # as in write_owned: the end is on its way
        if self._closing:
            return  # as in write_owned: closed, under its protocol too
        if self._eof_written:
            if data:
                raise RuntimeError("cannot write after write_eof()")
            return
        if data:
            self._core.send(bytes(data))
        self._eof_written = True
        self._core.close()
        self.process()

    def can_write_eof(self) -> bool:
        return True

    def _lose_held_on_write(self) -> None:
        # a write after the peer's reset reaches nobody: as an asyncio
        # transport whose send fails, the end comes now, with the reset,
        # and what the paused reader had not taken goes with it
        reset, self._held_reset = self._held_reset, None
        if reset is None or not self._lost_after_held:
            return
        self._lost_after_held = False
        self._held.clear()
        self._held_eof = False
        if self._protocol is not None:
            self._loop.call_soon(
                self._call_connection_lost, self._protocol, reset
            )

    def _drop_held_after_end(self) -> None:
        # the reader leaves without taking what the clean end left held
        if not self._lost_after_held:
            return
        self._lost_after_held = False
        self._held.clear()
        self._held_eof = False
        if self._protocol is not None:
            self._loop.call_soon(
                self._call_connection_lost, self._protocol, None
            )

    def close(self) -> None:
        self._drop_held_after_end()
        if self._closing:
            return
        self._closing = True
        self._discarding = True
        # the core hears of anything only if held data is dropped (its
        # window opens) or the DATA_FIN is queued now: after a
        # write_final (a TLS close) nothing is left for a flush to send
        changed = bool(self._held)
        for pieces in self._held:
            self._core.consumed(sum(map(len, pieces)))
        self._held.clear()
        if not self._eof_written:
            self._eof_written = True
            self._core.close()
            changed = True
        self._arm_close_timer()
        if changed:
            self.process()

    def _arm_close_timer(self, delay: float | None = None) -> None:
        self._close_unacked = self._core.send_buffer_size
        self._close_timer = self._loop.call_later(
            self._close_timeout if delay is None else delay,
            self._on_close_timeout,
        )

    def _on_close_timeout(self) -> None:
        self._close_timer = None
        if self._closed:
            return
        unacked = self._core.send_buffer_size
        if unacked < self._close_unacked:
            # the peer still takes the data, only slowly (a loaded or
            # narrow path): the close waits while the Data ACK moves,
            # and only one that stood still for close_timeout is cut
            # short, counted from its last move (a peer that took a
            # window's worth just after close() and then stopped is not
            # given a second full period). What was written before
            # close() is finite, so the wait is too
            due = self._core.last_progress + self._close_timeout
            self._arm_close_timer(max(0.0, due - self._loop.time()))
            return
        if unacked and not self._core.peer_window_closed:
            # the peer has room for what stands unacknowledged: a path
            # holds it, not the peer's reader. The connection's own
            # recovery (a data-level timeout moves it to another path)
            # may take longer than close_timeout on a loaded path, so
            # the close waits as long as an open connection would for
            # progress, path_loss_timeout, rather than cut it short
            due = (
                self._core.last_progress + self._core.config.path_loss_timeout
            )
            left = due - self._loop.time()
            if left > 0:
                self._arm_close_timer(left)
                return
        logger.debug("%s: close timed out, aborting", self.tag())
        # bytes the peer never acknowledged at the data level (RFC 8684
        # section 3.3.3) may be lost: the close was no clean one
        self._reset(
            MptlsTimeoutError(
                f"close timed out with {unacked} bytes unacknowledged"
            )
            if unacked
            else None
        )

    def _reset(self, error: Exception | None) -> None:
        """End at once: MP_FASTCLOSE to the peer, then connection_lost."""
        self._closing = True
        self._core.abort()
        self._flush()
        self._finish(error)

    def abort(self) -> None:
        self._drop_held_after_end()
        if self._closed:
            return
        # an abort drops what the paused reader has not taken
        self._held.clear()
        self._held_eof = False
        self._reset(None)

    def abandon(self) -> None:
        """End a connection that failed before its caller had it.

        :meth:`abort`, and then the first subflow's TCP connection and
        those left open after the reset frame are closed at once rather
        than when the peer has the frame: asyncio has closed its socket
        when its ``create_connection`` raises, and a caller that gave
        ``sock=`` may close that socket then, which would free a
        descriptor the loop still watched. What was written to them,
        the frame and a TLS alert, still goes, sent by the kernel (see
        :meth:`SubflowProtocol.close_now`). A path opened ahead of the
        keys and not joined yet is closed as asyncio closes a socket
        whose connect is cancelled: in the loop steps that follow, by
        the task that opens it, or by its transport.
        """
        self.abort()
        ended = [self._first_subflow, *(self._lingering or ())]
        for reference in ended:
            subflow = None if reference is None else reference()
            if subflow is not None:
                subflow.close_now()

    def abort_after_sending(self) -> None:
        """:meth:`abort`, once what was written has gone to the subflows.

        The TLS layer's last words, an alert, are written while a read
        is being handled, when the flush that would send them waits for
        the end of that read: a plain abort then dropped them, and the
        peer saw a reset with no reason.
        """
        if not self._closed and self._core.send_buffer_size:
            self._flush()
        self.abort()

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        while self._held and self._reading and self._protocol is not None:
            self._resume_held(self._protocol, self._held.popleft())
        if self._held_eof and not self._held and self._reading:
            self._deliver_eof()
        if self._lost_after_held and not (self._held or self._held_eof):
            self._lost_after_held = False
            if self._protocol is not None:
                self._loop.call_soon(
                    self._call_connection_lost, self._protocol, None
                )
        self.process()

    def _resume_held(
        self, protocol: asyncio.Protocol, pieces: list[bytes]
    ) -> None:
        # one socket read's pieces in one call, as a reading protocol
        # gets them: one TLS pass, not one per frame
        many = getattr(protocol, "data_received_many", None)
        if many is not None and len(pieces) > 1:
            many(pieces)
            self._core.consumed(sum(map(len, pieces)))
            return
        # one at a time: a pause between two stops at a frame's end
        for index, data in enumerate(pieces):
            if not self._reading or self._protocol is not protocol:
                self._held.appendleft(pieces[index:])
                return
            protocol.data_received(data)
            self._core.consumed(len(data))

    def get_write_buffer_size(self) -> int:
        return self._core.send_pending

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        if high is None:
            high = _WRITE_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r})")
        self._high_water, self._low_water = high, low
        self._update_write_flow()

    # reporting

    def mptcp_info(self) -> MptcpInfo:
        info = self._core.info()
        subflows = []
        for sub in info.subflows:
            names = self._addresses.get(sub.subflow_id, (None, None))
            local, remote = (host_port(name) for name in names)
            subflows.append(
                SubflowInfo(
                    subflow_id=sub.subflow_id,
                    local_address=local,
                    remote_address=remote,
                    state=sub.state,
                    bytes_sent=sub.bytes_sent,
                    bytes_received=sub.bytes_received,
                    rtt_ms=None if sub.srtt is None else sub.srtt * 1000.0,
                    backup=sub.backup,
                    address_id=sub.address_id,
                    remote_address_id=sub.remote_address_id,
                )
            )
        return MptcpInfo(
            backend="userspace",
            mode=info.mode or "pending",
            local_token=info.local_token,
            remote_token=info.remote_token,
            keys_installed=info.keys_installed,
            keys_reason=info.keys_reason,
            key_fingerprint=info.key_fingerprint,
            fallback=False,
            subflows=tuple(subflows),
            key_generation=info.key_generation,
        )

    def tag(self) -> str:
        """The connection's token prefix that begins its log lines."""
        return connection_tag(self._core)

    def __repr__(self) -> str:
        return f"<mptls.MultipathTransport {self.tag()}>"


_EVENT_HANDLERS: dict[type, Callable[[MultipathTransport, Any], None]] = {
    events.EndOfStream: MultipathTransport._on_end_of_stream,
    events.HandshakeComplete: MultipathTransport._on_handshake,
    events.SubflowEstablished: MultipathTransport._on_subflow_established,
    events.SubflowClosed: MultipathTransport._on_subflow_closed,
    events.JoinRefused: MultipathTransport._on_join_refused,
    events.PeerJoinRefused: MultipathTransport._on_peer_join_refused,
    events.AddressAnnounced: MultipathTransport._on_address,
    events.AddressRemoved: MultipathTransport._on_address_removed,
    events.ConnectionClosed: MultipathTransport._on_closed,
    events.KeysRequested: MultipathTransport._on_keys_requested,
    events.KeysActivated: MultipathTransport._on_keys_activated,
    events.KeyRotationFailed: MultipathTransport._on_key_rotation_failed,
}


def _queue_room(
    tcp: SubflowProtocol, several: bool, now: float, inflight_limit: int
) -> int:
    """How many more bytes the scheduler may hand ``tcp`` now.

    256 KiB unsent while the subflow shares the stream with others (or
    copies wait to be sent again), unbounded alone; and, where the
    kernel tells the path's rate, never more than it sends in
    :data:`_QUEUE_SECONDS` (at least :data:`_MIN_QUEUE`). A bound at
    or above ``inflight_limit`` cannot be reached (what waits in the
    socket is in flight too): it is no cap, and a lone subflow is then
    not measured again for :data:`_RATE_RECHECK`.
    """
    unsent, rate = tcp.queue_state()
    limit = _SUBFLOW_QUEUE if several else UNCAPPED
    if rate > 0:
        limit = min(limit, max(_MIN_QUEUE, int(rate * _QUEUE_SECONDS)))
    if limit >= inflight_limit:
        if not several:
            tcp.uncapped_until = now + _RATE_RECHECK
        return UNCAPPED
    return limit - unsent


def _retrieve(waiter: asyncio.Future[int]) -> None:
    # a rotation that fails after its callers gave up must not log
    # "exception was never retrieved"
    if not waiter.cancelled():
        waiter.exception()


# where get_extra_info finds a name in a cached (sockname, peername) pair
_ADDRESS_INDEX = {"sockname": 0, "peername": 1}
