"""One MPTCP connection, sans I/O: handshake, joins, data, close.

:class:`Connection` runs RFC 8684, its token-only "G" mode and the
rotation profile "E" over the userspace wire of docs/wire.md. The
MP_CAPABLE handshake lives in :mod:`mptls.mptcp.handshake`, joins and
addresses in :mod:`mptls.mptcp.joins`, resets and MP_FASTCLOSE in
:mod:`mptls.mptcp.resets`, mode E's keys in :mod:`mptls.mptcp.rotation`,
the shared fields in :mod:`mptls.mptcp.state`; this module holds the
data path, the close, the timers and the entry points. An adapter feeds
it segments, time and the application's bytes, and pulls segments and
events out of it. Data
positions are kept as offsets from IDSN+1 and turned into 64-bit DSNs
and Data ACKs only on the wire.

It must never perform I/O, read a clock or draw randomness itself (time
is an argument, randomness the injected ``random`` callable), and no key
material may reach a log line, a repr, an event or an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mptls.errors import (
    ConfigurationError,
    MptlsError,
    MptlsTimeoutError,
    ProtocolError,
)
from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.crypto import idsn_from_token, rfc8684_idsn, rfc8684_token
from mptls.mptcp.framing import (
    FIN_BIT,
    RST_BIT,
    SYN_BIT,
    Flag,
    Payload,
    Segment,
)
from mptls.mptcp.handshake import (
    TOKEN_MODES,
    HandshakeMixin,
    offered_flags,
    own_token,
)
from mptls.mptcp.joins import JoinsMixin
from mptls.mptcp.options import (
    CapableFlag,
    Dss,
    MpFastclose,
    MpJoinAck,
    MpJoinSyn,
    ResetReason,
)
from mptls.mptcp.recovery import RecoveryMixin
from mptls.mptcp.resets import ResetsMixin
from mptls.mptcp.rotation import RotationMixin
from mptls.mptcp.scheduler import (
    Chunk,
    Subflow,
    SubflowState,
    has_room,
    pick_subflow,
)
from mptls.mptcp.state import SEQ_MOD, RandomSource, options_of
from mptls.mptcp.tokens import TokenAllocator
from mptls.tls.keys import KeyMaterial

__all__ = ["JOIN_TIMED_OUT", "Connection", "RandomSource"]

logger = logging.getLogger("mptls.mptcp")

# how many closed subflows info() keeps reporting
_CLOSED_KEPT = 16
_NO_LIMIT = 2**62
# the DSS subflow sequence number is a 32-bit field
_SSN_MOD = 2**32
_S = SubflowState
_ACK = Flag.ACK

# RFC 8684 section 3.7: the first DSS mappings continue the implicitly
# mapped bytes, so a first mapping outside the window means the IDSN the
# peer derived differs from ours: a token or key was rewritten on the
# way (G-mode tokens are not authenticated). It fails the connection at
# once: its bytes were acknowledged by the subflow and would never come
# again, so dropping them would only stall. Strays after a mapping
# fitted are dropped.
_IDSN_MISMATCH = (
    "the peer's first DSS mapping lies outside the receive window: a "
    "token or key of the MP_CAPABLE handshake was changed on the way"
)


def _widen(value: int, reference: int) -> int:
    """A 32-bit DSN or Data ACK as the 64-bit value nearest ``reference``.

    RFC 8684 section 3.3.1 lets a sender put only the low 32 bits on the
    wire; the receiver infers the rest.
    """
    candidate = (reference & ~0xFFFFFFFF) | value
    if candidate - reference > 2**31:
        candidate -= 2**32
    elif reference - candidate > 2**31:
        candidate += 2**32
    return candidate % SEQ_MOD


# the SubflowClosed reason of a join that did not complete within
# join_timeout: no refusal of the peer's, which may have said nothing
JOIN_TIMED_OUT = "join timed out"


class Connection(
    HandshakeMixin, JoinsMixin, RecoveryMixin, ResetsMixin, RotationMixin
):
    """An MPTCP connection; build one with :meth:`initiator` or let an
    :class:`~mptls.mptcp.endpoint.Endpoint` build responders."""

    # construction

    @classmethod
    def initiator(
        cls,
        config: ConnectionConfig,
        *,
        tokens: TokenAllocator,
        random: RandomSource,
        now: float,
    ) -> Connection:
        """A client connection; its SYN leaves with the first
        :meth:`segments_to_send`."""
        self = cls(config, initiator=True, random=random, now=now)
        self._offered = offered_flags(
            config.mode, config.allow_legacy_fallback
        )
        if config.mode in TOKEN_MODES:
            self._tokens = tokens
            self._local_token = own_token(tokens, config.mode)
        if self._offered & CapableFlag.H:
            local_key = random(8)
            self._local_key = local_key
            # RFC 8684 mode always offers H, so its token comes from here
            if config.mode is Mode.RFC8684:
                self._local_token = rfc8684_token(local_key)
        # RFC 8684 section 3.2: the first subflow's address ids are
        # implicit, 0 on both sides
        self._subflows[0] = Subflow(
            0,
            _S.SYN_SENT,
            remote_address_id=0,
            deadline=now + config.handshake_timeout,
        )
        return self

    @classmethod
    def responder(
        cls,
        config: ConnectionConfig,
        *,
        mode: Mode,
        local_secret: bytes,
        syn: Segment,
        random: RandomSource,
        now: float,
    ) -> Connection:
        """A server connection for an accepted MP_CAPABLE SYN.

        ``local_secret`` is Token-B in G and E mode (8 and 4 bytes) and
        Key-B in RFC 8684 mode; the
        :class:`~mptls.mptcp.endpoint.Endpoint` picks it so that it is
        unique in its table.
        """
        self = cls(config, initiator=False, random=random, now=now)
        self.mode = mode
        if mode in TOKEN_MODES:
            self._local_token = local_secret
            self._local_idsn = idsn_from_token(local_secret, config.idsn_rule)
        else:
            self._local_key = local_secret
            self._local_token = rfc8684_token(local_secret)
            self._local_idsn = rfc8684_idsn(local_secret)
        subflow = Subflow(
            0,
            _S.SYN_RECEIVED,
            remote_address_id=0,
            deadline=now + config.handshake_timeout,
        )
        self._subflows[0] = subflow
        # the SYN's window counts from offset 0: nothing is acked yet
        self._peer_edge = syn.window
        self._take_payload(subflow, syn.payload, 0, False, now)
        return self

    # application calls

    def send(self, data: Payload, *, owned: bool = False) -> None:
        """Queue bytes of the data-level stream.

        ``bytes`` are kept as they are, and so is a view the caller
        hands over for good (``owned``: nobody changes it again); any
        other buffer is copied, since its owner may reuse it.
        """
        if self._closed or self._send.fin_wanted:
            raise MptlsError("send() after close() or on a closed connection")
        self._send.write(data, owned=owned)

    def close(self) -> None:
        """Send a DATA_FIN once everything queued is mapped."""
        if self._closed or self._send.fin_wanted:
            return
        self._send.close()

    def consumed(self, n: int) -> None:
        """The application took ``n`` delivered bytes."""
        self._receive.consumed(n)
        if self._receive.window_growth() >= self.config.receive_window // 4:
            self._window_update_due = True

    def set_writable(self, subflow_id: int, writable: bool) -> None:
        subflow = self._subflows.get(subflow_id)
        if subflow is not None:
            subflow.writable = writable

    def set_queue_room(self, subflow_id: int, room: int) -> None:
        """The transport can queue ``room`` more bytes on the subflow."""
        subflow = self._subflows.get(subflow_id)
        if subflow is not None:
            subflow.set_queue_room(room)

    def next_event(self) -> ev.Event | None:
        return self._events.popleft() if self._events else None

    # keys

    def install_keys(self, keys: KeyMaterial) -> bool:
        """Take the TLS-derived keys; False (no effect) if not taken.

        G mode takes one pair. Mode E takes the next generation, when
        none is pending: generation 0 when TLS completes, then the one a
        :class:`~mptls.mptcp.events.KeysRequested` asked for (see
        :class:`~mptls.mptcp.rotation.RotationMixin`).
        """
        if not isinstance(keys, KeyMaterial):
            raise ConfigurationError(
                "install_keys() takes a KeyMaterial, got "
                f"{type(keys).__name__}"
            )
        if self.mode is Mode.E and self.handshake_complete:
            return self._install_rotation_keys(keys)
        if self.mode is not Mode.G or not self.handshake_complete:
            return False
        if self._keys is not None:
            return self._keys == keys
        self._keys = keys
        if logger.isEnabledFor(logging.INFO):
            # the fingerprint is a hash: made only for a line logged
            logger.info(
                "[%s] keys installed (fingerprint %s)",
                self._tag(),
                keys.fingerprint(),
            )
        self._answer_held_joins()
        return True

    # segments out

    def segments_to_send(self, now: float) -> list[tuple[int, Segment]]:
        """Everything to write now, as (subflow id, segment) pairs."""
        self._now = now
        out: list[tuple[int, Segment]] = []
        self._emit_handshake(out, now)
        if self.mode is Mode.E:
            self._emit_due_new_keys()
        self._emit_outboxes(out)
        if not self._closed:
            self._emit_announcements(out)
            self._emit_data(out, now)
            self._emit_acks(out, now)
        self._forget_closed_subflows()
        return out

    def _emit_outboxes(self, out: list[tuple[int, Segment]]) -> None:
        for subflow in self._subflows.values():
            for segment in subflow.outbox:
                out.append((subflow.subflow_id, segment))
            subflow.outbox.clear()

    def _forget_closed_subflows(self) -> None:
        # closed subflows stay visible in info() for a while; the oldest
        # go so that refused or failed joins cannot grow the table
        if len(self._subflows) <= _CLOSED_KEPT:
            return  # nothing to forget: this runs every flush
        closed = [
            sid
            for sid, s in self._subflows.items()
            if not s.live and not s.outbox
        ]
        for sid in closed[: max(0, len(closed) - _CLOSED_KEPT)]:
            del self._subflows[sid]

    # data out

    def _emit_data(self, out: list[tuple[int, Segment]], now: float) -> None:
        if self.handshake_complete and self._remote_idsn is not None:
            self._emit_mapped(out, now)
        elif not self.is_initiator and self._capable_sent:
            # wire.md: before the third ACK the responder's flight rides
            # implicitly mapped frames on the first subflow
            first = self._subflows.get(0)
            while first is not None and first.live:
                payload = self._implicit_chunk(first, now)
                if not payload:
                    break
                out.append((0, self._segment(first, Flag.ACK, (), payload)))

    def _emit_mapped(self, out: list[tuple[int, Segment]], now: float) -> None:
        # once per flush, not per frame: nothing below moves them
        limit = self.config.subflow_inflight_limit
        max_payload = self.config.max_payload
        edge = self._peer_edge
        send = self._send
        if not send.has_reinjection and not send.wants_new_chunk(edge):
            return  # most flushes of a receiver: nothing to map
        carriers = [s for s in self._subflows.values() if s.carries_data]
        # one subflow carries data on every one-path transfer: its room
        # alone decides, as in pick_subflow
        lone = carriers[0] if len(carriers) == 1 else None
        # the Data ACK and the window are the same in every frame of the
        # flush; the window is taken (and its edge remembered) only if a
        # frame goes out
        head: tuple[int, int] | None = None
        while True:
            # reinjections first (RFC 8684 section 3.3.6), then new data
            reinject = send.has_reinjection
            if not reinject and not send.wants_new_chunk(edge):
                return
            # a reinjection fills the hole the others' data waits
            # behind: the in-flight limit, which that data holds up, must
            # not block it
            room = _NO_LIMIT if reinject else limit
            if lone is not None:
                subflow = lone if has_room(lone, room) else None
            else:
                subflow = pick_subflow(carriers, room)
            if subflow is None:
                return
            if reinject:
                chunk = send.take_reinjection()
            else:
                chunk = send.take_new(max_payload, edge)
            if chunk is None:
                return
            if head is None:
                head = self._data_head()
            segment = self._data_segment(subflow, chunk, now, head)
            out.append((subflow.subflow_id, segment))

    def _data_head(self) -> tuple[int, int]:
        """The Data ACK and window of a flush's data frames.

        The frame carries the Data ACK and the window (in its header,
        as every frame does) on a subflow the peer takes windows from:
        a window update that was due goes with it, not in a frame of
        its own behind it.
        """
        data_ack = self._data_ack_number()
        # _emit_data maps data only once the peer's IDSN is known
        assert data_ack is not None
        self._window_update_due = False
        return data_ack, self._receive.advertise()

    def _data_segment(
        self,
        subflow: Subflow,
        chunk: Chunk,
        now: float,
        head: tuple[int, int],
    ) -> Segment:
        chunk.subflow_id = subflow.subflow_id
        data = chunk.data
        length = len(data)
        # this subflow's own count answers it during a transfer
        if not subflow.inflight and not any(
            s.inflight for s in self._subflows.values()
        ):
            # nothing was outstanding: the no-progress clock starts now
            self._last_progress = now
        subflow.inflight += length
        if subflow.probe_end is None:
            subflow.start_probe(chunk.end, now)
        if subflow.data_deadline is None:
            subflow.data_deadline = now + self._rto(subflow)
        data_ack, window = head
        fin = chunk.fin
        # RFC 8684 section 3.3.1: a DATA_FIN alone has ssn 0, length 1;
        # the relative subflow sequence number is 32 bits and wraps
        if length:
            ssn = (subflow.bytes_sent + 1) % _SSN_MOD
            subflow.bytes_sent += length
        else:
            ssn = 0
        # the Data ACK it carries is the one that was owed
        subflow.ack_due_bytes = 0
        subflow.ack_due_since = None
        # positional: the Dss fields in their order (data_ack,
        # data_ack_64, dsn, dsn_64, ssn, data_length, checksum, data_fin)
        mapping = Dss(
            data_ack,
            True,
            ((self._local_idsn or 0) + 1 + chunk.offset) % SEQ_MOD,
            True,
            ssn,
            length + 1 if fin else length,
            None,
            fin,
        )
        return Segment(_ACK, (mapping,), data, window)

    def _emit_acks(self, out: list[tuple[int, Segment]], now: float) -> None:
        if self._remote_idsn is None:
            return
        threshold = self.config.ack_threshold
        sent = False
        for subflow in self._subflows.values():
            if not subflow.carries_data or not subflow.ack_due_bytes:
                continue
            since = subflow.ack_due_since
            late = since is not None and now >= since + self.config.ack_delay
            if subflow.ack_due_bytes >= threshold or late:
                # on the subflow the data came in on, for its RTT sample
                out.append((subflow.subflow_id, self._ack_segment(subflow)))
                sent = True
        if self._window_update_due and not sent:
            target = next(
                (s for s in self._subflows.values() if s.carries_data), None
            )
            if target is not None:
                out.append((target.subflow_id, self._ack_segment(target)))
                sent = True
        if sent:
            self._window_update_due = False

    # segments in

    def receive_segment(
        self, subflow_id: int, segment: Segment, now: float
    ) -> None:
        """Take one segment that arrived on ``subflow_id``."""
        self._now = now
        subflow = self._subflows.get(subflow_id)
        if subflow is None or not subflow.live or self._closed:
            if subflow_id != self._ignoring_subflow:
                self._ignoring_subflow = subflow_id
                logger.debug(
                    "[%s] segments on closed subflow %d ignored",
                    self._tag(),
                    subflow_id,
                )
            return
        subflow.heard_at = now
        # plain ints: Flag's own operators are Python calls, per frame
        if int(segment.flags) & RST_BIT:
            self._on_reset(subflow, segment)
            return
        _RECEIVE[subflow.state](self, subflow, segment, now)

    def _on_syn_sent(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        if subflow.is_join:
            self._on_join_syn_ack(subflow, segment)
        else:
            self._on_capable_syn_ack(subflow, segment, now)

    def _on_syn_received(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        if not subflow.is_join:
            self._on_capable_third_ack(subflow, segment, now)
            return
        syn = options_of(segment).get(MpJoinSyn)
        if segment.flags & Flag.SYN and isinstance(syn, MpJoinSyn):
            # the SYN|ACK crossed a retransmitted SYN: answer it again
            self._answer_join(subflow, syn.nonce)
            return
        self._on_join_third_ack(subflow, segment)

    def _on_waiting_keys(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        syn = options_of(segment).get(MpJoinSyn)
        if segment.flags & Flag.SYN and isinstance(syn, MpJoinSyn):
            self._answer_join(subflow, syn.nonce)

    def _on_pre_established(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        # RFC 8684 section 3.2: the join is open once the responder
        # acknowledged the third ACK (data may already ride behind that
        # ACK on this wire: see _CARRIES_DATA in the scheduler)
        dss = options_of(segment).get(Dss)
        if segment.flags & Flag.SYN or not isinstance(dss, Dss):
            return
        if dss.data_ack is None:
            return
        subflow.deadline = None
        subflow.set_state(_S.ESTABLISHED)
        self._path_up(now)
        self._events.append(ev.SubflowEstablished(subflow.subflow_id))
        self._on_established(subflow, segment, now)

    def _on_established(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        options = segment.options
        if len(options) == 1 and type(options[0]) is Dss:
            # a transfer's every frame: its DSS alone, no other option
            # to look for
            if not int(segment.flags) & SYN_BIT:
                self._on_data_frame(subflow, options[0], segment, None, now)
            return
        found = options_of(segment)
        if MpJoinAck in found:
            # RFC 8684 section 3.2: a join's third ACK counts only once
            self._reset_subflow(
                subflow, ResetReason.MPTCP_ERROR, "replayed MP_JOIN ACK"
            )
            return
        if int(segment.flags) & SYN_BIT:
            return
        fastclose = found.get(MpFastclose)
        if isinstance(fastclose, MpFastclose) and self._fastclose_valid(
            fastclose
        ):
            self._on_peer_fastclose(subflow, from_reset=False)
            return
        dss = found.get(Dss)
        dss = dss if isinstance(dss, Dss) else None
        self._on_data_frame(subflow, dss, segment, found, now)

    def _on_data_frame(
        self,
        subflow: Subflow,
        dss: Dss | None,
        segment: Segment,
        found: dict[type, object] | None,
        now: float,
    ) -> None:
        """An established subflow's frame: Data ACK and window, mapped
        payload, the path options ``found`` (None: none came), FIN."""
        self._on_window(subflow, dss, segment.window, now)
        if self._closed:
            return
        self._on_mapped_payload(subflow, dss, segment, now)
        if found is not None:
            self._on_path_options(subflow, found)
        if int(segment.flags) & FIN_BIT and not self._closed:
            self._on_subflow_fin(subflow)

    # data in

    def _on_window(
        self, subflow: Subflow, dss: Dss | None, window: int, now: float
    ) -> None:
        """Apply a Data ACK and the window that counts from it."""
        base = self._send.acked
        if dss is not None and dss.data_ack is not None:
            offset = self._local_offset(dss.data_ack, dss.data_ack_64)
            if offset is None:
                logger.debug("[%s] Data ACK beyond sent data", self._tag())
            else:
                base = offset
                self._on_data_ack(subflow, offset, now)
        # a window never moves its right edge back (RFC 8684 3.3.4):
        # frames of different subflows may arrive in any order
        self._peer_edge = max(self._peer_edge, base + window)

    def _local_offset(self, data_ack: int, is_64: bool) -> int | None:
        idsn = self._local_idsn
        if idsn is None:
            return None
        if not is_64:
            reference = (idsn + 1 + self._send.acked) % SEQ_MOD
            data_ack = _widen(data_ack, reference)
        offset = (data_ack - idsn - 1) % SEQ_MOD
        return offset if offset <= self._send.mapped_end else None

    def _on_data_ack(self, subflow: Subflow, offset: int, now: float) -> None:
        subflow.ack_arrived(offset, now)
        # an ACK that arrived here shows this path works again
        subflow.suspect = False
        subflow.suspect_until = None
        if offset <= self._send.acked:
            # nothing new (every frame of the peer's carries one): no
            # chunk to free, no DATA_FIN newly acknowledged
            return
        fin_was_acked = self._send.fin_acked
        freed = self._send.ack(offset)
        for chunk in freed:
            owner = self._subflows.get(chunk.subflow_id)
            if owner is not None:
                owner.inflight -= len(chunk.data)
        if freed:
            self._on_progress(now)
        if self._send.fin_acked and not fin_was_acked:
            self._maybe_finish()

    def _on_mapped_payload(
        self, subflow: Subflow, dss: Dss | None, segment: Segment, now: float
    ) -> None:
        payload = segment.payload
        if dss is None or dss.dsn is None:
            if not payload:
                return
            if subflow.subflow_id == 0 and self._implicit_receive:
                offset = subflow.bytes_received
                self._take_payload(subflow, payload, offset, False, now)
                return
            # RFC 8684 section 3.7: data without a mapping after DSS
            # started means something between the ends rewrites frames
            self._reset_subflow(
                subflow,
                ResetReason.MIDDLEBOX_INTERFERENCE,
                "payload without a DSS mapping",
            )
            return
        if dss.checksum is not None:
            # RFC 8684 section 3.3: a checksum no end negotiated (mptls
            # negotiates none) is an MPTCP error; the mapping is not
            # taken, whatever its bytes
            self._reset_subflow(
                subflow,
                ResetReason.MPTCP_ERROR,
                "DSS checksum, which was not negotiated",
            )
            return
        remote_idsn = self._remote_idsn
        length = len(payload) + (1 if dss.data_fin else 0)
        if remote_idsn is None or dss.data_length != length:
            self._reset_subflow(
                subflow, ResetReason.MPTCP_ERROR, "DSS mapping does not fit"
            )
            return
        if subflow.subflow_id == 0:
            self._implicit_receive = False
        dsn = dss.dsn
        if not dss.dsn_64:
            reference = remote_idsn + 1 + self._receive.next_offset
            dsn = _widen(dsn, reference % SEQ_MOD)
        offset = (dsn - remote_idsn - 1) % SEQ_MOD
        if not self._mapping_seen and not self._check_first_mapping(offset):
            return
        self._take_payload(subflow, payload, offset, dss.data_fin, now)

    def _check_first_mapping(self, offset: int) -> bool:
        """False (and the connection failed) if the IDSNs disagree."""
        if offset <= self._receive.limit:
            self._mapping_seen = True
            return True
        self._fail_connection(
            ProtocolError(
                _IDSN_MISMATCH,
                reset_reason=ResetReason.MIDDLEBOX_INTERFERENCE,
            )
        )
        return False

    def _take_payload(
        self,
        subflow: Subflow,
        payload: Payload,
        offset: int,
        fin: bool,
        now: float,
    ) -> None:
        if not payload and not fin:
            return
        subflow.bytes_received += len(payload)
        subflow.ack_due_bytes += len(payload) + (1 if fin else 0)
        if subflow.ack_due_since is None:
            subflow.ack_due_since = now
        receive = self._receive
        had_fin = receive.fin_reached
        try:
            data = receive.insert(offset, payload, fin)
        except ProtocolError as exc:
            # more holes than the buffer keeps track of
            self._fail_connection(exc)
            return
        if data:
            self._events.append(ev.DataReceived(data))
        if receive.held:
            if (
                self._hole_since is None
                or receive.next_offset != self._hole_at
            ):
                self._hole_since = now
                self._hole_at = receive.next_offset
        elif self._hole_since is not None:
            self._hole_since = None
        if receive.fin_reached and not had_fin:
            # RFC 8684 section 3.3.3: acknowledge the DATA_FIN at once
            subflow.ack_due_bytes = max(
                subflow.ack_due_bytes, self.config.ack_threshold
            )
            self._events.append(ev.EndOfStream())
            self._maybe_finish()

    # subflow and connection ends

    def subflow_lost(self, subflow_id: int, now: float) -> None:
        """The TCP connection under ``subflow_id`` died."""
        self._now = now
        subflow = self._subflows.get(subflow_id)
        if subflow is None or not subflow.live:
            return
        subflow.outbox.clear()
        self._close_subflow(subflow, "subflow lost", None)

    def _on_subflow_fin(self, subflow: Subflow) -> None:
        # RFC 8684 section 3.3.3: a subflow FIN closes only that subflow
        if not subflow.fin_sent:
            subflow.fin_sent = True
            subflow.outbox.append(
                self._ack_segment(subflow, Flag.FIN | Flag.ACK)
            )
        self._close_subflow(subflow, ev.PEER_CLOSED_SUBFLOW, None)

    def _maybe_finish(self) -> None:
        """Both DATA_FINs acknowledged: FIN every subflow and finish."""
        if self._closed:
            return
        if not (self._send.fin_acked and self._receive.fin_reached):
            return
        for subflow in self._subflows.values():
            if not subflow.live:
                continue
            if not subflow.fin_sent:
                subflow.fin_sent = True
                subflow.outbox.append(
                    self._ack_segment(subflow, Flag.FIN | Flag.ACK)
                )
            subflow.set_state(_S.CLOSED)
        self._finish(None)

    # timers

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` has work, or None."""
        if self._closed:
            return None
        deadlines: list[float] = []
        # _outstanding(), found in the same pass: this runs every flush
        outstanding = False
        for subflow in self._subflows.values():
            if not subflow.live:
                continue
            if subflow.retransmit_at is not None:
                deadlines.append(subflow.retransmit_at)
            if subflow.deadline is not None:
                deadlines.append(subflow.deadline)
            if subflow.data_deadline is not None:
                deadlines.append(subflow.data_deadline)
            if subflow.suspect_until is not None:
                deadlines.append(subflow.suspect_until)
            if subflow.inflight > 0:
                outstanding = True
            if (
                subflow.ack_due_bytes
                and subflow.ack_due_since is not None
                and subflow.carries_data
                and self._remote_idsn is not None
            ):
                # as in _emit_acks: only an ACK that can be sent is due
                deadlines.append(subflow.ack_due_since + self.config.ack_delay)
        limit = self.config.path_loss_timeout
        if self._paths_lost_at is not None:
            deadlines.append(self._paths_lost_at + limit)
        elif outstanding:
            deadlines.append(self._last_progress + limit)
        if self._hole_since is not None:
            deadlines.append(self._hole_since + limit)
        if self.mode is Mode.E:
            deadlines.extend(self._rotation_deadlines())
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        """Retransmit join SYNs, expire handshakes and joins, detect dead
        paths; delayed ACKs go out with the next :meth:`segments_to_send`.
        """
        self._now = now
        if self._closed or self._path_loss_expired(now):
            return
        for subflow in list(self._subflows.values()):
            if not subflow.live:
                continue
            if subflow.deadline is not None and now >= subflow.deadline:
                self._expire(subflow)
                if self._closed:
                    return
                continue
            retransmit_at = subflow.retransmit_at
            if retransmit_at is not None and now >= retransmit_at:
                if subflow.syn is not None:
                    subflow.outbox.append(subflow.syn)
                subflow.rto *= 2
                subflow.retransmit_at = now + subflow.rto
        self._check_data_timeouts(now)
        if not self._closed and self.mode is Mode.E:
            self._handle_rotation_timers(now)

    def _expire(self, subflow: Subflow) -> None:
        if subflow.subflow_id == 0 and not self.handshake_complete:
            self._fail_connection(
                MptlsTimeoutError(
                    "MPTCP handshake did not complete within "
                    f"{self.config.handshake_timeout} s"
                )
            )
            return
        if subflow.is_join and not self.is_initiator:
            # the reason ends up in a refusal line (mptls.refusals): it
            # names no keyword, for whoever reads it may have none to turn
            limit = self.config.join_timeout
            self._peer_join_failed(
                subflow, f"join not completed within {limit:g} s"
            )
        subflow.outbox.append(self._reset_segment(None))
        self._close_subflow(subflow, JOIN_TIMED_OUT, None)

    # reporting

    def info(self) -> ev.ConnectionInfo:
        subflows = tuple(
            ev.SubflowStatus(
                subflow_id=s.subflow_id,
                state=s.state.value,
                bytes_sent=s.bytes_sent,
                bytes_received=s.bytes_received,
                srtt=s.srtt,
                backup=s.backup,
                address_id=s.address_id,
                remote_address_id=s.remote_address_id,
            )
            for s in self._subflows.values()
        )
        keys = self._keys
        if self.mode is Mode.E:
            keys = self._active_keys(self._current_key_id())
        return ev.ConnectionInfo(
            role="initiator" if self.is_initiator else "responder",
            mode=self.mode.value if self.mode else None,
            local_token=self._local_token.hex() if self._local_token else None,
            remote_token=(
                self._remote_token.hex() if self._remote_token else None
            ),
            keys_installed=keys is not None,
            keys_reason=self._keys_reason(),
            key_fingerprint=keys.fingerprint() if keys else None,
            subflows=subflows,
            key_generation=self._generation,
        )


_Handler = Callable[[Connection, Subflow, Segment, float], None]
_RECEIVE: dict[SubflowState, _Handler] = {
    _S.SYN_SENT: Connection._on_syn_sent,
    _S.SYN_RECEIVED: Connection._on_syn_received,
    _S.WAITING_KEYS: Connection._on_waiting_keys,
    _S.PRE_ESTABLISHED: Connection._on_pre_established,
    _S.ESTABLISHED: Connection._on_established,
}
