"""One MPTCP connection, sans I/O: handshake, joins, data, close.

:class:`Connection` runs RFC 8684 and its token-only "G" mode over the
userspace wire of docs/wire.md. An adapter feeds it segments, time and
the application's bytes, and pulls segments and events out of it. Data
positions are kept as offsets from IDSN+1 and turned into 64-bit DSNs
and Data ACKs only on the wire.

It must never perform I/O, read a clock or draw randomness itself (time
is an argument, randomness the injected ``random`` callable), and no key
material may reach a log line, a repr, an event or an error.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from hmac import compare_digest
from ipaddress import IPv4Address, IPv6Address

from mptls.errors import (
    JoinRefusedError,
    KeysUnavailableError,
    MptlsError,
    PeerResetError,
    ProtocolError,
)
from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.crypto import (
    add_addr_hmac,
    fastclose_value,
    idsn_from_token,
    join_hmac,
    rfc8684_idsn,
    rfc8684_token,
)
from mptls.mptcp.framing import MAX_OPTIONS_LENGTH, Flag, Segment
from mptls.mptcp.options import (
    AddAddr,
    CapableFlag,
    Dss,
    MpCapable,
    MpFastclose,
    MpJoinAck,
    MpJoinSyn,
    MpJoinSynAck,
    MpPrio,
    MpTcpRst,
    Option,
    RemoveAddr,
    ResetReason,
    encode_option,
)
from mptls.mptcp.reassembly import ReceiveBuffer
from mptls.mptcp.scheduler import (
    Chunk,
    SendBuffer,
    Subflow,
    SubflowState,
    pick_subflow,
)
from mptls.mptcp.tokens import TokenAllocator
from mptls.tls.keys import KeyMaterial

__all__ = ["Connection", "RandomSource"]

logger = logging.getLogger("mptls.mptcp")

RandomSource = Callable[[int], bytes]

SEQ_MOD = 2**64
_ALGORITHMS = CapableFlag.G | CapableFlag.H
_MODE_FLAG = {Mode.G: CapableFlag.G, Mode.RFC8684: CapableFlag.H}
_FLAG_MODE = {CapableFlag.G: Mode.G, CapableFlag.H: Mode.RFC8684}
# a pure Data ACK option: 4 bytes of header and a 64-bit Data ACK
_DATA_ACK_LENGTH = 12
# how many closed subflows info() keeps reporting
_CLOSED_KEPT = 16
_S = SubflowState


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


def _options(segment: Segment) -> dict[type, object]:
    """The options of a segment by type; the first of each type wins."""
    found: dict[type, object] = {}
    for option in segment.options:
        found.setdefault(type(option), option)
    return found


class Connection:
    """An MPTCP connection; build one with :meth:`initiator` or let an
    :class:`~mptls.mptcp.endpoint.Endpoint` build responders."""

    def __init__(
        self,
        config: ConnectionConfig,
        *,
        initiator: bool,
        random: RandomSource,
        now: float,
    ) -> None:
        self.config = config
        self.is_initiator = initiator
        self._random = random
        self._created = now
        self.mode: Mode | None = None
        self._tokens: TokenAllocator | None = None
        self._offered = CapableFlag(0)
        # G mode: 8-byte tokens; RFC 8684 mode: cleartext keys, 4-byte
        # tokens derived from them
        self._local_token: bytes | None = None
        self._local_key: bytes | None = None
        self._remote_token: bytes | None = None
        self._remote_key: bytes | None = None
        self._local_idsn: int | None = None
        self._remote_idsn: int | None = None
        self._keys: KeyMaterial | None = None
        self.handshake_complete = False
        self._capable_sent = False
        self._third_ack_due = False
        self._implicit_receive = True
        self._send = SendBuffer()
        self._receive = ReceiveBuffer(config.receive_window)
        self._peer_edge = config.max_payload
        self._subflows: dict[int, Subflow] = {}
        self._next_subflow_id = 1
        self._events: deque[ev.Event] = deque()
        self._closed = False
        self._close_called = False
        self._window_update_due = False
        self._announcements: list[AddAddr] = []
        self._remote_addresses: dict[int, tuple[object, int | None]] = {}

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
        if config.mode is Mode.G:
            self._tokens = tokens
            self._local_token = tokens.allocate()
            self._offered = CapableFlag.G
            if config.allow_legacy_fallback:
                self._offered |= CapableFlag.H
        else:
            self._offered = CapableFlag.H
        if self._offered & CapableFlag.H:
            self._local_key = random(8)
        if config.mode is Mode.RFC8684:
            self._local_token = rfc8684_token(self._local_key)
        self._subflows[0] = Subflow(0, _S.SYN_SENT)
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

        ``local_secret`` is Token-B in G mode and Key-B in RFC 8684 mode;
        the :class:`~mptls.mptcp.endpoint.Endpoint` picks it so that it
        is unique in its table.
        """
        self = cls(config, initiator=False, random=random, now=now)
        self.mode = mode
        if mode is Mode.G:
            self._local_token = local_secret
            self._local_idsn = idsn_from_token(local_secret, config.idsn_rule)
        else:
            self._local_key = local_secret
            self._local_token = rfc8684_token(local_secret)
            self._local_idsn = rfc8684_idsn(local_secret)
        subflow = Subflow(0, _S.SYN_RECEIVED)
        self._subflows[0] = subflow
        # the SYN's window counts from offset 0: nothing is acked yet
        self._peer_edge = syn.window
        self._take_payload(subflow, syn.payload, 0, False, now)
        return self

    # public state

    @property
    def local_token(self) -> bytes | None:
        """This end's token (public, never a key)."""
        return self._local_token

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def send_buffer_size(self) -> int:
        return self._send.size

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        mode = self.mode.value if self.mode else "-"
        token = self.local_token.hex() if self.local_token else "-"
        return f"<Connection {role} mode={mode} token={token}>"

    def _tag(self) -> str:
        token = self.local_token
        return token.hex()[:8] if token else "-"

    # application calls

    def send(self, data: bytes) -> None:
        """Queue bytes of the data-level stream."""
        if self._closed or self._close_called:
            raise MptlsError("send() after close() or on a closed connection")
        self._send.write(data)

    def close(self) -> None:
        """Send a DATA_FIN once everything queued is mapped."""
        if self._closed or self._close_called:
            return
        self._close_called = True
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

    def next_event(self) -> ev.Event | None:
        return self._events.popleft() if self._events else None

    # keys

    def _hmac_keys(self) -> tuple[bytes, bytes] | None:
        """(local key, remote key) for joins, ADD_ADDR and fast close."""
        if self.mode is Mode.G and self._keys is not None:
            keys = self._keys
            if self.is_initiator:
                return keys.key_a, keys.key_b
            return keys.key_b, keys.key_a
        if (
            self.mode is Mode.RFC8684
            and self.handshake_complete
            and self._local_key is not None
            and self._remote_key is not None
        ):
            return self._local_key, self._remote_key
        return None

    def _join_keys(self) -> tuple[bytes, bytes] | None:
        """Keys for joins and ADD_ADDR: cleartext ones only if allowed."""
        if self.mode is Mode.RFC8684 and not self.config.allow_cleartext_keys:
            return None
        return self._hmac_keys()

    def install_keys(self, keys: KeyMaterial) -> bool:
        """Take the TLS-derived keys; False (no effect) if not G mode."""
        if self.mode is not Mode.G or not self.handshake_complete:
            return False
        if self._keys is not None:
            return self._keys == keys
        self._keys = keys
        logger.info(
            "[%s] keys installed (fingerprint %s)",
            self._tag(),
            keys.fingerprint(),
        )
        return True

    # segments out

    def segments_to_send(self, now: float) -> list[tuple[int, Segment]]:
        """Everything to write now, as (subflow id, segment) pairs."""
        out: list[tuple[int, Segment]] = []
        self._emit_handshake(out, now)
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
        closed = [
            sid
            for sid, s in self._subflows.items()
            if not s.live and not s.outbox
        ]
        for sid in closed[: max(0, len(closed) - _CLOSED_KEPT)]:
            del self._subflows[sid]

    def _data_ack(self) -> Dss | None:
        if self._remote_idsn is None:
            return None
        wire = (self._remote_idsn + 1 + self._receive.ack_offset) % SEQ_MOD
        return Dss(data_ack=wire)

    def _segment(
        self,
        subflow: Subflow,
        flags: Flag,
        options: tuple[Option, ...] = (),
        payload: bytes = b"",
    ) -> Segment:
        """A frame on ``subflow``: header window, Data ACK if it fits."""
        if payload:
            subflow.bytes_sent += len(payload)
        if any(
            isinstance(option, Dss) and option.data_ack is not None
            for option in options
        ):
            subflow.ack_due_bytes = 0
            subflow.ack_due_since = None
        return Segment(
            flags=flags,
            options=options,
            payload=payload,
            window=self._receive.advertise(),
        )

    def _ack_segment(
        self, subflow: Subflow, flags: Flag = Flag.ACK
    ) -> Segment:
        ack = self._data_ack()
        options = (ack,) if ack is not None else ()
        return self._segment(subflow, flags, options)

    def _reset_segment(self, reason: int | None) -> Segment:
        options = () if reason is None else (MpTcpRst(reason=reason),)
        return Segment(flags=Flag.RST, options=options)

    # handshake out

    def _emit_handshake(
        self, out: list[tuple[int, Segment]], now: float
    ) -> None:
        first = self._subflows.get(0)
        if first is None or self._closed:
            return
        if not self._capable_sent:
            self._capable_sent = True
            if self.is_initiator:
                out.append((0, self._capable_syn(first, now)))
            else:
                out.append((0, self._capable_syn_ack(first, now)))
        elif self._third_ack_due:
            self._third_ack_due = False
            out.append((0, self._capable_third_ack(first, now)))

    def _implicit_chunk(self, subflow: Subflow, now: float) -> bytes:
        """New data for an implicitly mapped frame on the first subflow.

        Such a frame has no DSS, so it cannot carry a DATA_FIN: that
        waits for the first DSS frame.
        """
        chunk = self._send.take_new(
            self.config.max_payload, self._peer_edge, fin_allowed=False
        )
        if chunk is None:
            return b""
        chunk.subflow_id = subflow.subflow_id
        subflow.inflight += len(chunk.data)
        subflow.start_probe(chunk.end, now)
        return chunk.data

    def _capable_syn(self, subflow: Subflow, now: float) -> Segment:
        payload = self._implicit_chunk(subflow, now)
        option = MpCapable(flags=self._offered)
        return self._segment(subflow, Flag.SYN, (option,), payload)

    def _capable_syn_ack(self, subflow: Subflow, now: float) -> Segment:
        payload = self._implicit_chunk(subflow, now)
        mode = self.mode or Mode.G
        secret = self._local_token if mode is Mode.G else self._local_key
        option = MpCapable(flags=_MODE_FLAG[mode], sender_key=secret)
        return self._segment(subflow, Flag.SYN | Flag.ACK, (option,), payload)

    def _capable_third_ack(self, subflow: Subflow, now: float) -> Segment:
        payload = self._implicit_chunk(subflow, now)
        if self.mode is Mode.G:
            local, remote = self._local_token, self._remote_token
        else:
            local, remote = self._local_key, self._remote_key
        option = MpCapable(
            flags=_MODE_FLAG[self.mode or Mode.G],
            sender_key=local,
            receiver_key=remote,
            data_length=len(payload) if payload else None,
        )
        return self._segment(subflow, Flag.ACK, (option,), payload)

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
        limit = self.config.subflow_inflight_limit
        while True:
            # reinjections first (RFC 8684 section 3.3.6), then new data
            reinject = self._send.has_reinjection
            if not reinject and not self._send.wants_new_chunk(
                self._peer_edge
            ):
                return
            subflow = pick_subflow(self._subflows.values(), limit)
            if subflow is None:
                return
            if reinject:
                chunk = self._send.take_reinjection()
            else:
                chunk = self._send.take_new(
                    self.config.max_payload, self._peer_edge
                )
            if chunk is None:
                return
            segment = self._data_segment(subflow, chunk, now)
            out.append((subflow.subflow_id, segment))

    def _data_segment(
        self, subflow: Subflow, chunk: Chunk, now: float
    ) -> Segment:
        chunk.subflow_id = subflow.subflow_id
        subflow.inflight += len(chunk.data)
        subflow.start_probe(chunk.end, now)
        ack = self._data_ack()
        local_idsn = self._local_idsn or 0
        # RFC 8684 section 3.3.1: a DATA_FIN alone has ssn 0, length 1
        mapping = Dss(
            data_ack=None if ack is None else ack.data_ack,
            dsn=(local_idsn + 1 + chunk.offset) % SEQ_MOD,
            ssn=subflow.bytes_sent + 1 if chunk.data else 0,
            data_length=len(chunk.data) + (1 if chunk.fin else 0),
            data_fin=chunk.fin,
        )
        return self._segment(subflow, Flag.ACK, (mapping,), chunk.data)

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

    def _emit_announcements(self, out: list[tuple[int, Segment]]) -> None:
        if not self._announcements:
            return
        target = next(
            (s for s in self._subflows.values() if s.carries_data), None
        )
        if target is None:
            return
        for option in self._announcements:
            out.append(
                (target.subflow_id, self._option_segment(target, option))
            )
        self._announcements.clear()

    def _option_segment(self, subflow: Subflow, option: AddAddr) -> Segment:
        """A frame for a path option, with a Data ACK if both fit."""
        ack = self._data_ack()
        options: tuple[Option, ...] = (option,)
        size = len(encode_option(option)) + _DATA_ACK_LENGTH
        if ack is not None and size <= MAX_OPTIONS_LENGTH:
            options = (option, ack)
        return self._segment(subflow, Flag.ACK, options)

    # segments in

    def receive_segment(
        self, subflow_id: int, segment: Segment, now: float
    ) -> None:
        """Take one segment that arrived on ``subflow_id``."""
        subflow = self._subflows.get(subflow_id)
        if subflow is None or not subflow.live or self._closed:
            logger.debug(
                "[%s] segment on closed subflow %d ignored",
                self._tag(),
                subflow_id,
            )
            return
        if segment.flags & Flag.RST:
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
        syn = _options(segment).get(MpJoinSyn)
        if segment.flags & Flag.SYN and isinstance(syn, MpJoinSyn):
            # the SYN|ACK crossed a retransmitted SYN: answer it again
            self._answer_join(subflow, syn)
            return
        self._on_join_third_ack(subflow, segment)

    def _on_waiting_keys(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        syn = _options(segment).get(MpJoinSyn)
        if segment.flags & Flag.SYN and isinstance(syn, MpJoinSyn):
            self._answer_join(subflow, syn)

    def _on_pre_established(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        # RFC 8684 section 3.2: the join is usable once the responder
        # acknowledged the third ACK
        dss = _options(segment).get(Dss)
        if segment.flags & Flag.SYN or not isinstance(dss, Dss):
            return
        if dss.data_ack is None:
            return
        subflow.deadline = None
        subflow.set_state(_S.ESTABLISHED)
        self._events.append(ev.SubflowEstablished(subflow.subflow_id))
        self._on_established(subflow, segment, now)

    def _on_established(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        options = _options(segment)
        if MpJoinAck in options:
            # RFC 8684 section 3.2: a join's third ACK counts only once
            self._reset_subflow(
                subflow, ResetReason.MPTCP_ERROR, "replayed MP_JOIN ACK"
            )
            return
        if segment.flags & Flag.SYN:
            return
        fastclose = options.get(MpFastclose)
        if isinstance(fastclose, MpFastclose) and self._fastclose_valid(
            fastclose
        ):
            self._on_peer_fastclose(subflow, from_reset=False)
            return
        dss = options.get(Dss)
        dss = dss if isinstance(dss, Dss) else None
        self._on_window(subflow, dss, segment.window, now)
        if self._closed:
            return
        self._on_mapped_payload(subflow, dss, segment, now)
        self._on_path_options(subflow, options)
        if segment.flags & Flag.FIN and not self._closed:
            self._on_subflow_fin(subflow)

    # handshake in

    def _negotiated(self, segment: Segment) -> tuple[Mode, bytes]:
        """The mode and Token-B / Key-B a SYN|ACK selects, or an error."""
        if segment.flags & (Flag.SYN | Flag.ACK) != Flag.SYN | Flag.ACK:
            raise ProtocolError("expected a SYN|ACK on the first subflow")
        option = _options(segment).get(MpCapable)
        if not isinstance(option, MpCapable):
            # RFC 8684 section 3.1 would fall back to TCP; the userspace
            # wire has no plain TCP to fall back to
            raise ProtocolError("the SYN|ACK carries no MP_CAPABLE")
        if option.version != 1:
            raise ProtocolError(f"MPTCP version {option.version} is not 1")
        chosen = _FLAG_MODE.get(CapableFlag(option.flags & _ALGORITHMS))
        if chosen is None:
            raise ProtocolError("the SYN|ACK must select exactly one of G, H")
        if not _MODE_FLAG[chosen] & self._offered:
            # protocol.md section 11 item 16: H instead of G puts the keys
            # on the wire; only a user who allowed it may get it
            raise ProtocolError(
                f"downgrade: the SYN|ACK selected {chosen.value}, "
                "which was not offered"
            )
        if option.sender_key is None:
            raise ProtocolError("the SYN|ACK MP_CAPABLE has no token or key")
        return chosen, option.sender_key

    def _on_capable_syn_ack(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        try:
            mode, secret = self._negotiated(segment)
        except ProtocolError as exc:
            self._fail(exc)
            return
        self.mode = mode
        rule = self.config.idsn_rule
        if mode is Mode.G:
            self._remote_token = secret
            self._remote_idsn = idsn_from_token(secret, rule)
            self._local_idsn = idsn_from_token(self._local_token or b"", rule)
        else:
            self._release_token()
            local_key = self._local_key or b""
            self._local_token = rfc8684_token(local_key)
            self._local_idsn = rfc8684_idsn(local_key)
            self._remote_key = secret
            self._remote_token = rfc8684_token(secret)
            self._remote_idsn = rfc8684_idsn(secret)
        # nothing of ours is acknowledged yet: the window counts from 0
        self._peer_edge = segment.window
        subflow.set_state(_S.ESTABLISHED)
        self._third_ack_due = True
        self._complete_handshake()
        self._take_payload(
            subflow, segment.payload, subflow.bytes_received, False, now
        )

    def _check_third_ack(self, segment: Segment) -> bytes:
        """Token-A / Key-A from the third ACK, or an error."""
        option = _options(segment).get(MpCapable)
        if not isinstance(option, MpCapable):
            raise ProtocolError("the third ACK carries no MP_CAPABLE")
        mode = self.mode or Mode.G
        if option.flags & _ALGORITHMS != _MODE_FLAG[mode]:
            raise ProtocolError("the third ACK does not echo the chosen mode")
        local = self._local_token if mode is Mode.G else self._local_key
        if option.sender_key is None or option.receiver_key is None:
            raise ProtocolError("the third ACK lacks a token or key")
        if not compare_digest(option.receiver_key, local or b""):
            raise ProtocolError("the third ACK echoes a foreign token or key")
        if option.data_length not in (None, len(segment.payload)):
            raise ProtocolError("the third ACK's data length is wrong")
        return option.sender_key

    def _on_capable_third_ack(
        self, subflow: Subflow, segment: Segment, now: float
    ) -> None:
        if segment.flags & Flag.SYN:
            return
        try:
            remote = self._check_third_ack(segment)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if self.mode is Mode.G:
            self._remote_token = remote
            self._remote_idsn = idsn_from_token(remote, self.config.idsn_rule)
        else:
            self._remote_key = remote
            self._remote_token = rfc8684_token(remote)
            self._remote_idsn = rfc8684_idsn(remote)
        subflow.set_state(_S.ESTABLISHED)
        self._complete_handshake()
        # the SYN's data could not be acknowledged before Token-A was known
        subflow.ack_due_bytes = max(
            subflow.ack_due_bytes, self.config.ack_threshold
        )
        self._on_window(subflow, None, segment.window, now)
        self._take_payload(
            subflow, segment.payload, subflow.bytes_received, False, now
        )

    def _complete_handshake(self) -> None:
        self.handshake_complete = True
        mode = self.mode or Mode.G
        logger.info(
            "[%s] MPTCP handshake complete, mode %s", self._tag(), mode.value
        )
        self._events.append(
            ev.HandshakeComplete(
                mode=mode,
                local_token=self._local_token or b"",
                remote_token=self._remote_token or b"",
            )
        )

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
        fin_was_acked = self._send.fin_acked
        subflow.ack_arrived(offset, now)
        for chunk in self._send.ack(offset):
            owner = self._subflows.get(chunk.subflow_id)
            if owner is not None:
                owner.inflight -= len(chunk.data)
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
        self._take_payload(subflow, payload, offset, dss.data_fin, now)

    def _take_payload(
        self,
        subflow: Subflow,
        payload: bytes,
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
        had_fin = self._receive.fin_reached
        data = self._receive.insert(offset, payload, fin)
        if data:
            self._events.append(ev.DataReceived(data))
        if self._receive.fin_reached and not had_fin:
            # RFC 8684 section 3.3.3: acknowledge the DATA_FIN at once
            subflow.ack_due_bytes = max(
                subflow.ack_due_bytes, self.config.ack_threshold
            )
            self._events.append(ev.EndOfStream())
            self._maybe_finish()

    def _on_path_options(
        self, subflow: Subflow, options: dict[type, object]
    ) -> None:
        add = options.get(AddAddr)
        if isinstance(add, AddAddr):
            self._on_add_addr(subflow, add)
        remove = options.get(RemoveAddr)
        if isinstance(remove, RemoveAddr):
            # RFC 8684 section 3.4.2: an unknown address id is ignored
            for address_id in remove.address_ids:
                self._remote_addresses.pop(address_id, None)
        prio = options.get(MpPrio)
        if isinstance(prio, MpPrio):
            subflow.backup = prio.backup

    def _on_add_addr(self, subflow: Subflow, option: AddAddr) -> None:
        if option.echo:
            return
        keys = self._join_keys()
        if keys is None or option.hmac is None:
            logger.debug("[%s] ADD_ADDR without usable keys", self._tag())
            return
        local, remote = keys
        expected = add_addr_hmac(
            remote, local, option.address_id, option.address, option.port
        )
        # RFC 8684 section 3.4.1: a bad HMAC is ignored silently
        if not compare_digest(expected, option.hmac):
            logger.debug("[%s] ADD_ADDR with a bad HMAC", self._tag())
            return
        address = (option.address, option.port)
        known = self._remote_addresses.get(option.address_id)
        if known is not None and known != address:
            return
        echo = AddAddr(
            option.address_id, option.address, option.port, echo=True
        )
        subflow.outbox.append(self._option_segment(subflow, echo))
        if known is None:
            self._remote_addresses[option.address_id] = address
            self._events.append(
                ev.AddressAnnounced(
                    option.address_id, option.address, option.port
                )
            )

    # joins, initiator side (RFC 8684 section 3.2, docs/wire.md "Joins")

    def open_subflow(
        self, now: float, *, backup: bool = False, address_id: int = 0
    ) -> int:
        """Start a join on a TCP connection the adapter just opened."""
        if not self.is_initiator:
            raise MptlsError("only the initiator opens subflows")
        if self._closed:
            raise MptlsError("the connection is closed")
        keys = self._join_keys()
        if keys is None:
            raise KeysUnavailableError(self._keys_reason() or "no join keys")
        if self._live_count() >= self.config.max_subflows:
            raise MptlsError(
                f"already {self.config.max_subflows} subflows (max_subflows)"
            )
        subflow_id = self._new_subflow_id()
        nonce = int.from_bytes(self._random(4), "big")
        option = MpJoinSyn(
            token=self._remote_token or b"",
            nonce=nonce,
            address_id=address_id,
            backup=backup,
        )
        syn = Segment(flags=Flag.SYN, options=(option,))
        subflow = Subflow(
            subflow_id,
            _S.SYN_SENT,
            is_join=True,
            backup=backup,
            address_id=address_id,
            local_nonce=nonce,
            syn=syn,
            rto=self.config.join_rto,
            retransmit_at=now + self.config.join_rto,
            deadline=now + self.config.join_timeout,
        )
        subflow.outbox.append(syn)
        self._subflows[subflow_id] = subflow
        return subflow_id

    def _on_join_syn_ack(self, subflow: Subflow, segment: Segment) -> None:
        option = _options(segment).get(MpJoinSynAck)
        keys = self._join_keys()
        if (
            not isinstance(option, MpJoinSynAck)
            or keys is None
            or segment.flags & (Flag.SYN | Flag.ACK) != Flag.SYN | Flag.ACK
        ):
            self._refuse_join(subflow, "SYN|ACK without MP_JOIN")
            return
        local, remote = keys
        expected = join_hmac(remote, local, option.nonce, subflow.local_nonce)
        if not compare_digest(expected[:8], option.hmac):
            self._refuse_join(subflow, "bad MP_JOIN HMAC in the SYN|ACK")
            return
        subflow.remote_nonce = option.nonce
        subflow.retransmit_at = None
        subflow.syn = None
        subflow.set_state(_S.PRE_ESTABLISHED)
        mac = join_hmac(local, remote, subflow.local_nonce, option.nonce)
        subflow.outbox.append(
            self._segment(subflow, Flag.ACK, (MpJoinAck(hmac=mac[:20]),))
        )

    def _refuse_join(self, subflow: Subflow, reason: str) -> None:
        self._events.append(ev.JoinRefused(subflow.subflow_id, reason))
        self._reset_subflow(subflow, ResetReason.MPTCP_ERROR, reason)

    # joins, responder side

    def accept_join(self, syn: Segment, now: float) -> int:
        """Take a join SYN routed here by the Endpoint; the subflow id.

        Raises :class:`~mptls.errors.JoinRefusedError` whose
        ``reset_reason`` goes into the MP_TCPRST of the refusal.
        """
        option = _options(syn).get(MpJoinSyn)
        if not isinstance(option, MpJoinSyn):
            raise JoinRefusedError("not an MP_JOIN SYN")
        if self._closed or not self.handshake_complete:
            raise JoinRefusedError("the connection takes no joins now")
        if self.mode is Mode.RFC8684 and not self.config.allow_cleartext_keys:
            raise JoinRefusedError(
                "joins keyed by cleartext keys are not allowed",
                reset_reason=ResetReason.ADMINISTRATIVELY_PROHIBITED,
            )
        pending = sum(
            1
            for s in self._subflows.values()
            if s.state in (_S.WAITING_KEYS, _S.SYN_RECEIVED) and s.is_join
        )
        if (
            self._live_count() >= self.config.max_subflows
            or pending >= self.config.max_pending_joins
        ):
            raise JoinRefusedError(
                "too many subflows or pending joins",
                reset_reason=ResetReason.LACK_OF_RESOURCES,
            )
        subflow_id = self._new_subflow_id()
        subflow = Subflow(
            subflow_id,
            _S.WAITING_KEYS,
            is_join=True,
            backup=option.backup,
            address_id=option.address_id,
            remote_nonce=option.nonce,
            deadline=now + self.config.join_timeout,
        )
        self._subflows[subflow_id] = subflow
        self._answer_join(subflow, option)
        return subflow_id

    def _answer_join(self, subflow: Subflow, option: MpJoinSyn) -> None:
        keys = self._join_keys()
        if keys is None:
            # draft-paasch-mptcp-application-authentication section 3:
            # a known token before the keys is dropped silently; the
            # initiator's retransmitted SYN tries again
            logger.debug("[%s] join SYN before keys dropped", self._tag())
            return
        if subflow.state is _S.WAITING_KEYS:
            subflow.local_nonce = int.from_bytes(self._random(4), "big")
            subflow.set_state(_S.SYN_RECEIVED)
        subflow.remote_nonce = option.nonce
        local, remote = keys
        mac = join_hmac(local, remote, subflow.local_nonce, option.nonce)
        reply = MpJoinSynAck(
            hmac=mac[:8], nonce=subflow.local_nonce, address_id=0
        )
        subflow.outbox.append(
            self._segment(subflow, Flag.SYN | Flag.ACK, (reply,))
        )

    def _on_join_third_ack(self, subflow: Subflow, segment: Segment) -> None:
        option = _options(segment).get(MpJoinAck)
        keys = self._join_keys()
        if not isinstance(option, MpJoinAck) or keys is None:
            self._reset_subflow(
                subflow, ResetReason.MPTCP_ERROR, "join ACK without MP_JOIN"
            )
            return
        local, remote = keys
        expected = join_hmac(
            remote, local, subflow.remote_nonce, subflow.local_nonce
        )
        if not compare_digest(expected[:20], option.hmac):
            self._reset_subflow(
                subflow, ResetReason.MPTCP_ERROR, "bad MP_JOIN HMAC"
            )
            return
        subflow.deadline = None
        subflow.set_state(_S.ESTABLISHED)
        self._events.append(ev.SubflowEstablished(subflow.subflow_id))
        # RFC 8684 section 3.2: this ACK moves the initiator's subflow
        # out of PRE_ESTABLISHED
        subflow.outbox.append(self._ack_segment(subflow))

    # addresses (RFC 8684 section 3.4)

    def announce(
        self,
        address_id: int,
        address: IPv4Address | IPv6Address,
        port: int | None,
    ) -> None:
        """Queue an ADD_ADDR; only once keys exist (protocol.md 11.10)."""
        if self._closed:
            raise MptlsError("the connection is closed")
        keys = self._join_keys()
        if keys is None:
            raise KeysUnavailableError(self._keys_reason() or "no keys")
        local, remote = keys
        mac = add_addr_hmac(local, remote, address_id, address, port)
        self._announcements.append(
            AddAddr(address_id, address, port, hmac=mac)
        )

    # subflow and connection ends

    def _live_count(self) -> int:
        return sum(1 for s in self._subflows.values() if s.live)

    def _new_subflow_id(self) -> int:
        subflow_id = self._next_subflow_id
        self._next_subflow_id += 1
        return subflow_id

    def _reset_subflow(self, subflow: Subflow, reason: int, why: str) -> None:
        logger.debug(
            "[%s] reset subflow %d: %s", self._tag(), subflow.subflow_id, why
        )
        subflow.outbox.append(self._reset_segment(reason))
        self._close_subflow(subflow, why, int(reason))

    def _close_subflow(
        self, subflow: Subflow, why: str, reset_reason: int | None
    ) -> None:
        if not subflow.live:
            return
        subflow.set_state(_S.CLOSED)
        subflow.retransmit_at = subflow.deadline = None
        # RFC 8684 section 3.3.6: what it carried and nobody acked goes
        # out again on the other subflows
        self._send.requeue(subflow.subflow_id)
        subflow.inflight = 0
        self._events.append(
            ev.SubflowClosed(subflow.subflow_id, why, reset_reason)
        )
        if not self._closed and self._live_count() == 0:
            self._finish(MptlsError("every subflow of the connection closed"))

    def subflow_lost(self, subflow_id: int, now: float) -> None:
        """The TCP connection under ``subflow_id`` died."""
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
        self._close_subflow(subflow, "peer closed the subflow", None)

    def _on_reset(self, subflow: Subflow, segment: Segment) -> None:
        options = _options(segment)
        fastclose = options.get(MpFastclose)
        if isinstance(fastclose, MpFastclose) and self._fastclose_valid(
            fastclose
        ):
            self._on_peer_fastclose(subflow, from_reset=True)
            return
        rst = options.get(MpTcpRst)
        code = rst.reason if isinstance(rst, MpTcpRst) else None
        if subflow.is_join and subflow.state in (
            _S.SYN_SENT,
            _S.PRE_ESTABLISHED,
        ):
            reason = f"peer reset the join (MP_TCPRST {code})"
            self._events.append(ev.JoinRefused(subflow.subflow_id, reason))
        if subflow.subflow_id == 0 and not self.handshake_complete:
            subflow.set_state(_S.CLOSED)
            self._finish(
                PeerResetError(
                    "peer reset the MPTCP handshake", reset_reason=code
                )
            )
            return
        self._close_subflow(subflow, "reset by peer", code)

    def _fastclose_value(self, key: bytes) -> bytes:
        if self.mode is Mode.G:
            return fastclose_value(key, self.config.idsn_rule)
        return key

    def _fastclose_valid(self, option: MpFastclose) -> bool:
        keys = self._hmac_keys()
        if keys is None:
            return False
        expected = self._fastclose_value(keys[0])
        return compare_digest(expected, option.key)

    def _on_peer_fastclose(
        self, subflow: Subflow, *, from_reset: bool
    ) -> None:
        # RFC 8684 section 3.5: reset every subflow, the connection is gone
        for other in self._subflows.values():
            if other.live and (other is not subflow or not from_reset):
                other.outbox.append(self._reset_segment(None))
            if other.live:
                other.set_state(_S.CLOSED)
        self._finish(
            PeerResetError("peer closed the connection with MP_FASTCLOSE")
        )

    def abort(self) -> None:
        """RST + MP_FASTCLOSE on every subflow (RFC 8684 section 3.5)."""
        if self._closed:
            return
        keys = self._hmac_keys()
        options: tuple[MpFastclose, ...] = ()
        if keys is not None:
            options = (MpFastclose(key=self._fastclose_value(keys[1])),)
        for subflow in self._subflows.values():
            if subflow.live:
                subflow.outbox.append(Segment(flags=Flag.RST, options=options))
                subflow.set_state(_S.CLOSED)
        self._finish(None)

    def _fail(self, error: ProtocolError) -> None:
        logger.info("[%s] connection failed: %s", self._tag(), error)
        for subflow in self._subflows.values():
            if subflow.live:
                subflow.outbox.append(self._reset_segment(error.reset_reason))
                subflow.set_state(_S.CLOSED)
        self._finish(error)

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

    def _finish(self, error: MptlsError | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._release_token()
        self._events.append(ev.ConnectionClosed(error))

    def _release_token(self) -> None:
        if self._tokens is not None and self._local_token is not None:
            self._tokens.release(self._local_token)
        self._tokens = None

    # timers

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` has work, or None."""
        if self._closed:
            return None
        deadlines: list[float] = []
        for subflow in self._subflows.values():
            if not subflow.live:
                continue
            for when in (subflow.retransmit_at, subflow.deadline):
                if when is not None:
                    deadlines.append(when)
            if subflow.ack_due_bytes and subflow.ack_due_since is not None:
                deadlines.append(subflow.ack_due_since + self.config.ack_delay)
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        """Retransmit join SYNs, expire joins; delayed ACKs go out with
        the next :meth:`segments_to_send`."""
        if self._closed:
            return
        for subflow in list(self._subflows.values()):
            if not subflow.live:
                continue
            if subflow.deadline is not None and now >= subflow.deadline:
                subflow.outbox.append(self._reset_segment(None))
                self._close_subflow(subflow, "join timed out", None)
                continue
            retransmit_at = subflow.retransmit_at
            if retransmit_at is not None and now >= retransmit_at:
                if subflow.syn is not None:
                    subflow.outbox.append(subflow.syn)
                subflow.rto *= 2
                subflow.retransmit_at = now + subflow.rto

    # reporting

    def _keys_reason(self) -> str:
        if self.mode is None or not self.handshake_complete:
            return "the MPTCP handshake is not complete"
        if self.mode is Mode.RFC8684:
            if self.config.allow_cleartext_keys:
                return "RFC 8684 mode: the keys crossed the wire in clear"
            return "RFC 8684 mode: cleartext keys are not allowed for joins"
        if self._keys is None:
            return "waiting for the TLS handshake to export keys"
        return ""

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
            )
            for s in self._subflows.values()
        )
        return ev.ConnectionInfo(
            role="initiator" if self.is_initiator else "responder",
            mode=self.mode.value if self.mode else None,
            local_token=self._local_token.hex() if self._local_token else None,
            remote_token=(
                self._remote_token.hex() if self._remote_token else None
            ),
            keys_installed=self._keys is not None,
            keys_reason=self._keys_reason(),
            key_fingerprint=self._keys.fingerprint() if self._keys else None,
            subflows=subflows,
        )


_Handler = Callable[[Connection, Subflow, Segment, float], None]
_RECEIVE: dict[SubflowState, _Handler] = {
    _S.SYN_SENT: Connection._on_syn_sent,
    _S.SYN_RECEIVED: Connection._on_syn_received,
    _S.WAITING_KEYS: Connection._on_waiting_keys,
    _S.PRE_ESTABLISHED: Connection._on_pre_established,
    _S.ESTABLISHED: Connection._on_established,
}
