"""The state every part of an MPTCP connection shares, sans I/O.

:class:`ConnectionState` holds the fields of one connection (tokens,
keys and mode E's key slots, IDSNs, subflows, buffers, events) and the
small steps the handshake, the joins and the data path all use:
building frames, choosing join keys, closing a subflow, finishing the
connection. The parts live in :mod:`mptls.mptcp.handshake`,
:mod:`mptls.mptcp.joins`, :mod:`mptls.mptcp.resets`,
:mod:`mptls.mptcp.rotation` and :mod:`mptls.mptcp.connection`, which
puts them together.

It must never perform I/O, read a clock or draw randomness itself, and
no key material may reach a log line, a repr, an event or an error.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mptls.errors import MptlsError, PathsLostError
from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.credit import CreditBucket
from mptls.mptcp.framing import MAX_OPTIONS_LENGTH, Flag, Payload, Segment
from mptls.mptcp.options import (
    AddAddr,
    CapableFlag,
    Dss,
    MpTcpRst,
    NewKey,
    Option,
    encode_option,
)
from mptls.mptcp.reassembly import (
    SINGLE_PATH_REORDER_LIMIT,
    ReceiveBuffer,
)
from mptls.mptcp.scheduler import SendBuffer, Subflow, SubflowState
from mptls.mptcp.tokens import TokenAllocator
from mptls.tls.keys import KeyMaterial

__all__ = [
    "SEQ_MOD",
    "ConnectionState",
    "KeySlot",
    "RandomSource",
    "options_of",
]

logger = logging.getLogger("mptls.mptcp")

RandomSource = Callable[[int], bytes]

SEQ_MOD = 2**64
# a pure Data ACK option: 4 bytes of header and a 64-bit Data ACK
_DATA_ACK_LENGTH = 12
_S = SubflowState


@dataclass(slots=True)
class KeySlot:
    """Mode E: the keys one key id (K) names, and how far they got.

    A key is *active* once our NEW_KEY for it went out and the peer's
    NEW_KEY with a matching tag came in (draft-baerts-tcpm-mptcpext);
    until then it is pending: our NEW_KEY goes out again at ``rto``
    intervals, doubling, and the key is dropped at ``deadline``.
    """

    keys: KeyMaterial = field(repr=False)
    deadline: float
    rto: float
    active: bool = False
    # the subflow our NEW_KEY last went out on (None: not sent yet)
    sent_on: int | None = None
    # the peer's NEW_KEY with a matching tag arrived
    confirmed: bool = False
    # ours is owed and no subflow could carry it yet
    send_due: bool = False
    # once active, how often ours went out again for a peer's NEW_KEY,
    # and when last: a few times, spaced, as two active ends would
    # otherwise answer each other forever; after a join_timeout without
    # one, the peer asks anew and gets a few more
    answers: int = 0
    answered_at: float | None = None
    retransmit_at: float | None = None
    # while these keys are pending, the active generation they took the
    # slot from: a peer that has not had the generation between yet
    # still tags its MP_FASTCLOSE with it (fast close only)
    replaced: KeyMaterial | None = field(default=None, repr=False)

    @property
    def generation(self) -> int:
        return self.keys.generation

    @property
    def sent(self) -> bool:
        """Our NEW_KEY for these keys went out at least once."""
        return self.sent_on is not None


def options_of(segment: Segment) -> dict[type, object]:
    """The options of a segment by type; the first of each type wins."""
    found: dict[type, object] = {}
    for option in segment.options:
        found.setdefault(type(option), option)
    return found


class ConnectionState:
    """The fields of a connection and the steps its parts share."""

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
        # mode E (protocol.md section 11 item 14): slots K = 0 and 1,
        # generation n in slot n & 1 (the one not active yet is being
        # confirmed); the active generation, and the one asked of the
        # adapter
        self._slots: list[KeySlot | None] = [None, None]
        self._generation: int | None = None
        self._requested: int | None = None
        self._requested_until = 0.0
        # asked for only because a peer's NEW_KEY named it: taken only
        # if that NEW_KEY's tag matches the keys; if not, they wait here
        # for a NEW_KEY that does, with no second exporter call
        self._requested_by_peer = False
        self._spare_keys: KeyMaterial | None = None
        # per K, the latest peer NEW_KEY tag that matched nothing yet
        self._peer_tags: list[bytes | None] = [None, None]
        self._first_keys_failed = False
        # after generation 0 failed: when it is tried again, and how
        # many tries are left
        self._first_retry_at: float | None = None
        self._first_retries = 0
        self._rotate_at: float | None = None
        # when a periodic rotation first waited for joins under way:
        # it waits join_timeout at most from then
        self._rotation_waits_since: float | None = None
        self.handshake_complete = False
        self._capable_sent = False
        self._third_ack_due = False
        self._implicit_receive = True
        # a DSS mapping inside the window has arrived (the IDSNs agree)
        self._mapping_seen = False
        self._send = SendBuffer()
        # until a join may carry data, one TCP connection carries it all,
        # in order: no legitimate peer leaves holes to hold data behind
        self._receive = ReceiveBuffer(
            config.receive_window, reorder_limit=SINGLE_PATH_REORDER_LIMIT
        )
        self._peer_edge = config.max_payload
        self._subflows: dict[int, Subflow] = {}
        self._next_subflow_id = 1
        self._events: deque[ev.Event] = deque()
        self._closed = False
        # the subflow whose segments were last ignored as dead: a flood
        # read in one go after its reset is one DEBUG line, not one each
        self._ignoring_subflow: int | None = None
        self._window_update_due = False
        self._announcements: list[AddAddr] = []
        self._remote_addresses: dict[int, tuple[object, int | None]] = {}
        # the peer's address ids its joins were checked from, and 0, the
        # first subflow's (RFC 8684 section 3.2): with the announced ones,
        # the ids a REMOVE_ADDR is told for, until it is; at most 256,
        # one octet's worth
        self._joined_address_ids: set[int] = {0}
        # the latest time an entry point was given: steps that have no
        # ``now`` of their own (closing a subflow) use it
        self._now = now
        # when the last subflow went away; None while one is live
        self._paths_lost_at: float | None = None
        # last time the Data ACK moved or data left with none in flight
        self._last_progress = now
        # since when bytes are held behind a hole in the peer's stream
        # that has not moved (None: no hole), and where the hole starts
        self._hole_since: float | None = None
        self._hole_at = 0
        # failed-join token bucket (config.join_failure_burst / _rate)
        self._join_credit = CreditBucket(
            config.join_failure_burst, config.join_failure_rate, now
        )

    @property
    def local_token(self) -> bytes | None:
        """This end's token (public, never a key)."""
        return self._local_token

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def joins_allowed(self) -> bool:
        """Whether joins may run now: keys exist and policy allows them.

        False in RFC 8684 mode without ``allow_cleartext_keys``, so that
        an adapter opens no TCP connection for a join that would be
        refused locally anyway (protocol.md section 11 item 16).
        """
        return not self._closed and self._join_keys() is not None

    @property
    def live_subflows(self) -> int:
        """Subflows not closed, joins in progress included."""
        return self._live_count()

    @property
    def receive_buffered(self) -> int:
        """Bytes held here: out of order, or delivered and not consumed.

        Never more than ``config.receive_window``.
        """
        return self._receive.held + self._receive.unconsumed

    @property
    def send_buffer_size(self) -> int:
        return self._send.size

    @property
    def last_progress(self) -> float:
        """When the Data ACK last moved (or data left with nothing in
        flight before it), on the clock of the ``now`` values given."""
        return self._last_progress

    @property
    def peer_window_closed(self) -> bool:
        """Whether the peer has acknowledged all it has room for: its
        receive window is shut, so what is left waits on its reader,
        not on a path."""
        return self._peer_edge <= self._send.acked

    @property
    def has_reinjection(self) -> bool:
        """Whether chunks of a failed or removed subflow wait to be sent
        again (and the peer has not acknowledged them meanwhile)."""
        return self._send.has_reinjection

    @property
    def send_pending(self) -> int:
        """Bytes written and not yet handed to any subflow."""
        return self._send.pending

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        mode = self.mode.value if self.mode else "-"
        token = self.local_token.hex() if self.local_token else "-"
        return f"<Connection {role} mode={mode} token={token}>"

    def _tag(self) -> str:
        token = self.local_token
        return token.hex()[:8] if token else "-"

    # keys

    def _oriented(self, keys: KeyMaterial) -> tuple[bytes, bytes]:
        """(local key, remote key): Key-A is the MPTCP initiator's."""
        if self.is_initiator:
            return keys.key_a, keys.key_b
        return keys.key_b, keys.key_a

    def _current_key_id(self) -> int:
        """The K that new joins, ADD_ADDR and fast closes carry."""
        if self.mode is Mode.E and self._generation is not None:
            return self._generation & 1
        return 0

    def _active_keys(self, key_id: int) -> KeyMaterial | None:
        """Mode E: the keys in slot ``key_id`` if they are active."""
        slot = self._slots[key_id & 1]
        if slot is None or not slot.active:
            return None
        return slot.keys

    def _hmac_keys(
        self, key_id: int | None = None
    ) -> tuple[bytes, bytes] | None:
        """(local key, remote key) for joins, ADD_ADDR and fast close.

        In mode E those of the active slot ``key_id`` names (the current
        one when None); the other modes have one pair and ignore it.
        """
        if self.mode is Mode.E:
            if key_id is None:
                key_id = self._current_key_id()
            active = self._active_keys(key_id)
            return None if active is None else self._oriented(active)
        if self.mode is Mode.G and self._keys is not None:
            return self._oriented(self._keys)
        if (
            self.mode is Mode.RFC8684
            and self.handshake_complete
            and self._local_key is not None
            and self._remote_key is not None
        ):
            return self._local_key, self._remote_key
        return None

    def _join_keys(
        self, key_id: int | None = None
    ) -> tuple[bytes, bytes] | None:
        """Keys for joins and ADD_ADDR: cleartext ones only if allowed."""
        if self.mode is Mode.RFC8684 and not self.config.allow_cleartext_keys:
            return None
        return self._hmac_keys(key_id)

    def _keys_reason(self) -> str:
        if self.mode is None or not self.handshake_complete:
            return "the MPTCP handshake is not complete"
        if self.mode is Mode.RFC8684:
            if self.config.allow_cleartext_keys:
                return "RFC 8684 mode: the keys crossed the wire in clear"
            return "RFC 8684 mode: cleartext keys are not allowed for joins"
        if self.mode is Mode.E:
            return self._rotation_reason()
        if self._keys is None:
            return "waiting for the TLS handshake to export keys"
        return ""

    @property
    def _pending(self) -> int | None:
        """Mode E: the generation installed and not yet confirmed."""
        for slot in self._slots:
            if slot is not None and not slot.active:
                return slot.generation
        return None

    def _rotation_reason(self) -> str:
        """Mode E: why joins wait, or "" once a generation is active."""
        if self._generation is not None:
            return ""
        if self._pending is not None:
            return "waiting for the peer to confirm the keys (NEW_KEY)"
        if self._first_keys_failed:
            return (
                "the peer did not confirm the keys (NEW_KEY) within "
                f"{self.config.join_timeout} s"
            )
        return "waiting for the TLS handshake to export keys"

    # frames

    def _data_ack_number(self) -> int | None:
        """The Data ACK as it goes on the wire, or None before Token-A."""
        if self._remote_idsn is None:
            return None
        return (self._remote_idsn + 1 + self._receive.ack_offset) % SEQ_MOD

    def _data_ack(self) -> Dss | None:
        number = self._data_ack_number()
        return None if number is None else Dss(data_ack=number)

    def _segment(
        self,
        subflow: Subflow,
        flags: Flag,
        options: tuple[Option, ...] = (),
        payload: Payload = b"",
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

    def _reset_segment(
        self, reason: int | None, *, transient: bool = False
    ) -> Segment:
        options: tuple[MpTcpRst, ...] = ()
        if reason is not None:
            options = (MpTcpRst(reason=reason, transient=transient),)
        return Segment(flags=Flag.RST, options=options)

    def _option_segment(self, subflow: Subflow, option: Option) -> Segment:
        """A frame for a path option, with a Data ACK if both fit."""
        ack = self._data_ack()
        options: tuple[Option, ...] = (option,)
        size = len(encode_option(option)) + _DATA_ACK_LENGTH
        if ack is not None and size <= MAX_OPTIONS_LENGTH:
            options = (option, ack)
        return self._segment(subflow, Flag.ACK, options)

    # subflow and connection ends

    def _path_up(self, now: float) -> None:
        """A subflow is established: a wait for one ends, and a hole in
        the received stream gets its full time again (what its lost
        path carried may now come on this one)."""
        self._paths_lost_at = None
        if self._hole_since is not None:
            self._hole_since = now

    def _live_count(self) -> int:
        return sum(1 for s in self._subflows.values() if s.live)

    def _new_subflow_id(self) -> int:
        subflow_id = self._next_subflow_id
        self._next_subflow_id += 1
        return subflow_id

    def _reset_subflow(
        self,
        subflow: Subflow,
        reason: int,
        why: str,
        *,
        transient: bool = False,
    ) -> None:
        """RST with MP_TCPRST ``reason``; ``transient`` sets its T flag
        (RFC 8684 section 3.6: the path may be joined again)."""
        logger.debug(
            "[%s] reset subflow %d: %s", self._tag(), subflow.subflow_id, why
        )
        subflow.outbox.append(self._reset_segment(reason, transient=transient))
        self._close_subflow(subflow, why, int(reason))

    def _close_subflow(
        self, subflow: Subflow, why: str, reset_reason: int | None
    ) -> None:
        if not subflow.live:
            return
        subflow.set_state(_S.CLOSED)
        subflow.retransmit_at = subflow.deadline = None
        subflow.keys = None
        # RFC 8684 section 3.3.6: what it carried and nobody acked goes
        # out again on the other subflows
        self._requeue_data(subflow)
        self._events.append(
            ev.SubflowClosed(subflow.subflow_id, why, reset_reason)
        )
        if not self._closed and self._live_count() == 0:
            self._all_paths_lost()

    def _requeue_data(self, subflow: Subflow) -> None:
        """Queue what ``subflow`` carried and nobody acknowledged to be
        sent again; nothing is in flight there any more."""
        self._send.requeue(subflow.subflow_id)
        subflow.inflight = 0
        subflow.data_deadline = None

    def _all_paths_lost(self) -> None:
        """No subflow is left: wait for a join, or finish if none can come.

        RFC 8684 section 3.3.3 keeps a connection whose subflows all
        closed without a DATA_FIN for a while; here that while is
        ``path_loss_timeout``, and only if a join is possible at all.
        """
        if not self.handshake_complete or self._join_keys() is None:
            self._finish(
                PathsLostError(
                    "every subflow of the connection closed"
                    + self._why_no_join()
                )
            )
            return
        if self._paths_lost_at is None:
            self._paths_lost_at = self._now
        logger.debug(
            "[%s] every subflow closed; waiting %.1f s for a join",
            self._tag(),
            self.config.path_loss_timeout,
        )

    def _why_no_join(self) -> str:
        """Why no join can follow the last subflow, as a clause."""
        if not self.handshake_complete:
            return " before the MPTCP handshake completed"
        if self._hmac_keys(None) is None:
            return " before the TLS handshake gave the keys a join needs"
        # RFC 8684 keys, sent in the clear, which joins may not use
        return ", and joins are off (its keys crossed the wire in the clear)"

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

    # the data path, defined by Connection; the handshake feeds it

    def _take_payload(
        self,
        subflow: Subflow,
        payload: Payload,
        offset: int,
        fin: bool,
        now: float,
    ) -> None:
        raise NotImplementedError

    def _on_window(
        self, subflow: Subflow, dss: Dss | None, window: int, now: float
    ) -> None:
        raise NotImplementedError

    # resets, defined by ResetsMixin; the handshake, the data path and
    # the timers fail the connection with them

    def _fail_connection(self, error: MptlsError) -> None:
        raise NotImplementedError

    # joins, defined by JoinsMixin; the handshake and the keys release
    # the ones that came early

    def _answer_held_joins(self) -> None:
        raise NotImplementedError

    def _refuse_held_joins(self, key_id: int, reason: str) -> None:
        raise NotImplementedError

    # mode E keys, defined by RotationMixin; the path options bring
    # the peer's NEW_KEY

    def _on_new_key(self, subflow: Subflow, option: NewKey) -> None:
        raise NotImplementedError
