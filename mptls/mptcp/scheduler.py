"""The sending side of a connection: subflows, mapped chunks, the choice.

:class:`SendBuffer` holds what the application wrote, cuts it into
chunks mapped to data offsets (offset 0 is the sender's IDSN+1) and keeps
every chunk until a Data ACK covers it, so that chunks sent on a subflow
that dies can be sent again elsewhere (RFC 8684 section 3.3.6).
:class:`Subflow` is one subflow's state as the connection sees it, and
:func:`pick_subflow` chooses where the next chunk goes. Nothing here
performs I/O or reads a clock.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from mptls.errors import ConfigurationError, ProtocolError
from mptls.mptcp.framing import Payload, Segment
from mptls.tls.keys import KeyMaterial

__all__ = [
    "Chunk",
    "SendBuffer",
    "Subflow",
    "SubflowState",
    "has_room",
    "pick_subflow",
    "smooth_rtt",
]

logger = logging.getLogger("mptls.mptcp")

# a subflow whose transport reports no queue room is never capped
UNCAPPED = 1 << 62


class SubflowState(enum.Enum):
    """Where a subflow is in its life (RFC 8684 sections 3.1, 3.2)."""

    # members are singletons compared by identity: hashed as objects,
    # in C, rather than by Enum's own __hash__ (a Python call) at every
    # table lookup of a frame's handling
    __hash__ = object.__hash__

    SYN_SENT = "SYN_SENT"
    SYN_RECEIVED = "SYN_RECEIVED"
    # a join SYN with a known token arrived before the keys: it waits,
    # unanswered, and is answered when they come (or when it comes again)
    WAITING_KEYS = "WAITING_KEYS"
    # the initiator sent the third ACK of a join; the responder has not
    # acknowledged it yet
    PRE_ESTABLISHED = "PRE_ESTABLISHED"
    ESTABLISHED = "ESTABLISHED"
    CLOSED = "CLOSED"


_S = SubflowState
_EDGES: dict[SubflowState, frozenset[SubflowState]] = {
    _S.SYN_SENT: frozenset({_S.PRE_ESTABLISHED, _S.ESTABLISHED, _S.CLOSED}),
    _S.SYN_RECEIVED: frozenset({_S.ESTABLISHED, _S.CLOSED}),
    _S.WAITING_KEYS: frozenset({_S.SYN_RECEIVED, _S.CLOSED}),
    _S.PRE_ESTABLISHED: frozenset({_S.ESTABLISHED, _S.CLOSED}),
    _S.ESTABLISHED: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}
# RFC 8684 section 3.2 holds a join's data back until the responder
# acknowledged the third ACK, because a lost pure ACK is never sent again
# and data would reach a responder that has not checked HMAC-A. A
# subflow of the userspace wire is one TCP connection: the ACK frame can
# be neither lost nor overtaken, so the responder checks it before the
# data behind it, and the initiator sends at once (docs/wire.md "Joins").
# A refused ACK resets the subflow and its data is reinjected elsewhere.
_CARRIES_DATA = frozenset({_S.PRE_ESTABLISHED, _S.ESTABLISHED})


@dataclass(slots=True)
class Subflow:
    """One subflow: its state, counters and join material."""

    subflow_id: int
    state: SubflowState
    is_join: bool = False
    backup: bool = False
    # RFC 8684 section 3.2: the id of this end's address, which its
    # MP_JOIN carries, and the peer's id (known from its MP_JOIN, and
    # 0 on the first subflow); the adapter names the local one
    address_id: int = 0
    remote_address_id: int | None = None
    writable: bool = True
    # data-level bytes sent here and not yet covered by a Data ACK
    inflight: int = 0
    # new data only while inflight is below this: set from the room
    # left in the transport's socket queue (see set_queue_room)
    inflight_cap: int = UNCAPPED
    srtt: float | None = None
    # one timed chunk at a time: its end offset and when it left
    probe_end: int | None = None
    probe_sent_at: float = 0.0
    # payload bytes; the next payload byte has ssn bytes_sent + 1
    bytes_sent: int = 0
    bytes_received: int = 0
    fin_sent: bool = False
    # a Data ACK is owed on this subflow for data that arrived on it
    ack_due_bytes: int = 0
    ack_due_since: float | None = None
    local_nonce: int = 0
    remote_nonce: int = 0
    # mode E: the key id (K) the join's SYN named, and, while the join
    # runs, the keys of the generation it took from that slot. Held
    # here, they outlive a rotation that makes another generation
    # current or replaces them in their slot, up to the join's deadline
    key_id: int = 0
    keys: KeyMaterial | None = field(default=None, repr=False)
    syn: Segment | None = None
    retransmit_at: float | None = None
    rto: float = 0.0
    deadline: float | None = None
    # data-level retransmission timeout: when data in flight here has
    # seen no Data ACK progress by then, the path is suspect
    data_deadline: float | None = None
    # the data-level timeout expired while no other subflow could take
    # the data, or before any round trip was measured here: used only
    # when no other subflow can carry data
    suspect: bool = False
    # the data-level timeout expired before any round trip was measured
    # here and the data went out again elsewhere: unless a Data ACK
    # arrives here first, the subflow is reset at this time
    suspect_until: float | None = None
    # the initial RTO's factor while no round trip is measured here:
    # doubled at each first expiry (RFC 6298 section 5.5, and kept so,
    # as Karn's algorithm has it, until a sample), so that a path
    # slower than the guess gets a probe through and is measured
    unmeasured_backoff: int = 1
    # when the peer's last segment arrived here: a path it still comes
    # over is slow, not dead, when the Data ACK is late
    heard_at: float | None = None
    outbox: list[Segment] = field(default_factory=list)

    def set_state(self, new: SubflowState) -> None:
        """Move to ``new``; an edge not in the table is a local bug."""
        if new is self.state:
            return
        if new not in _EDGES[self.state]:
            raise ProtocolError(
                f"subflow {self.subflow_id}: no transition "
                f"{self.state.value} -> {new.value}",
                reset_reason=None,
            )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "subflow %d: %s -> %s",
                self.subflow_id,
                self.state.value,
                new.value,
            )
        self.state = new

    def set_queue_room(self, room: int) -> None:
        """The transport's queue for this subflow takes ``room`` more bytes.

        Beyond that, data would wait in a socket buffer instead of on
        the path, where no other subflow can take it any more: on a
        slow path that is delay every later byte of the stream waits
        behind at the receiver (head-of-line blocking), so the
        scheduler hands this subflow no more until it has room again.
        """
        self.inflight_cap = self.inflight + max(room, 0)

    def start_probe(self, end: int, now: float) -> None:
        """Time the chunk ending at ``end`` unless one is timed already."""
        if self.probe_end is None:
            self.probe_end = end
            self.probe_sent_at = now

    def ack_arrived(self, offset: int, now: float) -> None:
        """A Data ACK arrived here: it may end the timed chunk's RTT.

        The sample is taken on the subflow the chunk went out on, even
        when an ACK on a faster subflow covered it first, so a slow path
        is never mistaken for an unmeasured (fast) one.
        """
        if self.probe_end is not None and offset >= self.probe_end:
            self.srtt = smooth_rtt(self.srtt, now - self.probe_sent_at)
            self.probe_end = None

    @property
    def live(self) -> bool:
        return self.state is not SubflowState.CLOSED

    @property
    def carries_data(self) -> bool:
        return self.state in _CARRIES_DATA and not self.fin_sent


@dataclass(slots=True)
class Chunk:
    """A mapped piece of the stream: offsets never change once sent."""

    offset: int
    # a view of what the application wrote (see SendBuffer.write)
    data: Payload
    fin: bool = False
    # -1 while queued for (re)injection, else where it was last sent
    subflow_id: int = -1

    @property
    def end(self) -> int:
        """The first offset after the chunk (a DATA_FIN takes one)."""
        return self.offset + len(self.data) + (1 if self.fin else 0)


class SendBuffer:
    """Unmapped bytes, mapped chunks until acknowledged, reinjections."""

    def __init__(self) -> None:
        # what the application wrote and nothing mapped yet, as views of
        # its own bytes: a chunk is a slice of one of them, not a copy
        self._pending: deque[memoryview] = deque()
        self._pending_bytes = 0
        # offset of the first unmapped byte
        self.next_offset = 0
        # the peer's cumulative Data ACK, as an offset
        self.acked = 0
        self.fin_wanted = False
        self.fin_offset: int | None = None
        self._unacked: deque[Chunk] = deque()
        self._unacked_bytes = 0
        self._reinject: deque[Chunk] = deque()

    @property
    def size(self) -> int:
        """Bytes queued or in flight (for the adapter's flow control)."""
        return self._pending_bytes + self._unacked_bytes

    @property
    def pending(self) -> int:
        return self._pending_bytes

    @property
    def mapped_end(self) -> int:
        """One past the last offset ever mapped (incl. a DATA_FIN)."""
        if self.fin_offset is not None:
            return self.fin_offset + 1
        return self.next_offset

    @property
    def fin_acked(self) -> bool:
        return self.fin_offset is not None and self.acked > self.fin_offset

    @property
    def has_reinjection(self) -> bool:
        # checked before every frame: empty unless a subflow failed
        if not self._reinject:
            return False
        self._skip_acked_reinjections()
        return bool(self._reinject)

    def write(self, data: Payload, *, owned: bool = False) -> None:
        # bytes are immutable and can be sliced without a copy, and so
        # can a buffer handed over for good; anything else (a bytearray
        # the caller may reuse) is copied once here
        if type(data) is bytes:
            view = memoryview(data)
        else:
            view = _bytes_of(data, copy=not owned)
        if not view:
            return
        self._pending.append(view)
        self._pending_bytes += len(view)

    def wants_new_chunk(self, limit: int) -> bool:
        """Whether :meth:`take_new` would give a chunk under ``limit``."""
        if self._pending and self.next_offset < limit:
            return True
        return self._fin_due()

    def take_new(
        self, max_length: int, limit: int, *, fin_allowed: bool = True
    ) -> Chunk | None:
        """Map up to ``max_length`` new bytes below offset ``limit``.

        The chunk that takes the last queued byte after :meth:`close`
        carries the DATA_FIN; with nothing left to map it is a FIN alone.
        A DATA_FIN may sit at the window's edge: it takes no buffer.
        """
        room = min(max_length, limit - self.next_offset, self._pending_bytes)
        if room <= 0 and not (fin_allowed and self._fin_due()):
            return None
        room = max(room, 0)
        chunk = Chunk(self.next_offset, self._take_pending(room))
        self.next_offset += room
        if fin_allowed and self._fin_due():
            chunk.fin = True
            self.fin_offset = self.next_offset
        self._unacked.append(chunk)
        self._unacked_bytes += len(chunk.data)
        return chunk

    def _take_pending(self, count: int) -> Payload:
        """The next ``count`` unmapped bytes, sliced rather than copied.

        A view of the written bytes when one write holds them all (the
        usual case: TLS hands over whole batches of records); joined
        when the chunk spans writes.
        """
        if not count:
            return b""
        self._pending_bytes -= count
        pending = self._pending
        head = pending[0]
        if len(head) > count:
            pending[0] = head[count:]
            return head[:count]
        if len(head) == count:
            pending.popleft()
            return head
        parts: list[memoryview] = []
        while count:
            head = pending[0]
            if len(head) > count:
                parts.append(head[:count])
                pending[0] = head[count:]
                break
            parts.append(pending.popleft())
            count -= len(head)
        return b"".join(parts)

    def take_reinjection(self) -> Chunk | None:
        self._skip_acked_reinjections()
        return self._reinject.popleft() if self._reinject else None

    def ack(self, offset: int) -> list[Chunk]:
        """Apply a cumulative Data ACK; return the chunks it freed."""
        if offset > self.mapped_end:
            raise ProtocolError(
                f"Data ACK {offset} beyond what was sent ({self.mapped_end})"
            )
        freed: list[Chunk] = []
        if offset <= self.acked:
            return freed
        self.acked = offset
        while self._unacked and self._unacked[0].end <= offset:
            chunk = self._unacked.popleft()
            self._unacked_bytes -= len(chunk.data)
            freed.append(chunk)
        return freed

    def head_subflow(self) -> int | None:
        """The subflow the oldest unacknowledged chunk was last sent on.

        None if nothing is unacknowledged; -1 if it waits for
        reinjection.
        """
        return self._unacked[0].subflow_id if self._unacked else None

    def requeue(self, subflow_id: int) -> list[Chunk]:
        """Queue every unacked chunk last sent on ``subflow_id`` again."""
        moved = [c for c in self._unacked if c.subflow_id == subflow_id]
        for chunk in moved:
            chunk.subflow_id = -1
        merged = sorted([*self._reinject, *moved], key=lambda c: c.offset)
        self._reinject = deque(merged)
        return moved

    def close(self) -> None:
        self.fin_wanted = True

    def _fin_due(self) -> bool:
        return (
            self.fin_wanted and self.fin_offset is None and not self._pending
        )

    def _skip_acked_reinjections(self) -> None:
        while self._reinject and self._reinject[0].end <= self.acked:
            self._reinject.popleft()


def _bytes_of(data: object, *, copy: bool) -> memoryview:
    """``data`` as a flat view of its bytes (``copy``: of a copy of
    them), or a ConfigurationError.

    bytes() of an int is that many zero bytes, of a list of ints its
    items: neither is data the caller wrote. A view of wider items
    (an array of ints) is counted and cut by byte, not by item.
    """
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigurationError(
            f"send() takes bytes-like data, got {type(data).__name__}"
        ) from None
    if copy or not view.c_contiguous:
        return memoryview(view.tobytes())
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B")


def smooth_rtt(srtt: float | None, sample: float) -> float:
    """EWMA with gain 1/8, as TCP does (RFC 6298 section 2)."""
    if srtt is None:
        return sample
    return srtt + (sample - srtt) / 8


def pick_subflow(
    subflows: Iterable[Subflow], inflight_limit: int
) -> Subflow | None:
    """The subflow for the next chunk, or None if none has room.

    The lowest smoothed RTT among established, writable subflows with
    room (below the in-flight limit and their queue cap) wins; ties go
    to the one with less in flight. Backup subflows
    are used only when no other subflow is established (RFC 8684
    section 3.3.8), suspect ones only when nothing else is left.
    An unmeasured subflow counts as fastest so that it gets measured.
    """
    alive = [s for s in subflows if s.carries_data]
    if len(alive) == 1:
        # one subflow carries data (every one-path transfer), and this
        # runs per frame: the filters below would keep it whatever its
        # flags, so only its room decides
        only = alive[0]
        return only if has_room(only, inflight_limit) else None
    # a suspect path (its data-level timeout expired) only while no
    # other can carry data
    alive = [s for s in alive if not s.suspect] or alive
    # a full or congested regular subflow is no reason to use a backup
    pool = [s for s in alive if not s.backup] or alive
    ready = [s for s in pool if has_room(s, inflight_limit)]
    if not ready:
        return None
    return min(ready, key=lambda s: (s.srtt or 0.0, s.inflight, s.subflow_id))


def has_room(subflow: Subflow, inflight_limit: int) -> bool:
    """Whether ``subflow`` takes another chunk now: writable, and below
    the in-flight limit and its queue cap."""
    return subflow.writable and subflow.inflight < min(
        inflight_limit, subflow.inflight_cap
    )
