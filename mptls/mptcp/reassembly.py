"""The connection-level receive buffer: reassembly by data offset.

Data offsets count from IDSN+1 of the peer (offset 0 is the first byte of
the data-level stream), so this module never sees a 64-bit wire DSN. It
puts the mapped payloads of every subflow back in order, trims
duplicates and overlaps (a retransmission on another subflow must never
change bytes already taken), holds out-of-order pieces within the
receive window and drops what lies beyond it. It keeps memory bounded by
the window and must never perform I/O.
"""

from __future__ import annotations

import bisect
import logging

from mptls.errors import ProtocolError, shown_value
from mptls.mptcp.framing import MAX_WINDOW, Payload
from mptls.mptcp.options import ResetReason

__all__ = [
    "SINGLE_PATH_MAX_HELD_PIECES",
    "SINGLE_PATH_REORDER_LIMIT",
    "ReceiveBuffer",
]

logger = logging.getLogger("mptls.mptcp")

# Separate pieces held out of order, at most. A piece that starts where
# the one before it ends joins it, so the data of one path held behind
# a stalled one stays one piece however small its frames were; only
# pieces with a hole before each count here, until they are delivered
# (a run they are merged into still keeps each as a chunk). Without a
# limit a peer could send a window's worth of one-byte pieces with a
# hole between each (two million in a 4 MiB window), each costing
# about 100 bytes and an insert into the list of starts.
MAX_HELD_PIECES = 16384
# The reorder_limit of a connection whose one subflow carries all its
# data. A subflow is one TCP connection, in order, so until a join may
# carry data no legitimate peer leaves a hole: without a limit a peer
# that never finishes TLS (no join is answered without its keys) could
# make the server hold a whole receive window out of order. One
# frame's payload leaves room for whatever a sender may reorder.
SINGLE_PATH_REORDER_LIMIT = 65536
# MAX_HELD_PIECES while the reorder limit holds: one-byte pieces with a
# hole before each fit 32,768 times in it, at about 130 bytes a piece
SINGLE_PATH_MAX_HELD_PIECES = 256


class _Run:
    """Held bytes that follow one another, from one or more pieces.

    Bytes that extend a run are appended to its last chunk, so that a
    path's small frames held behind a hole cost one buffer. Two runs a
    filled hole brings together become one: the chunks of the run with
    fewer move over to the other, so a chunk moves at most log2(n)
    times however the holes are filled, and no byte is copied.
    """

    __slots__ = ("chunks", "length")

    def __init__(self, chunk: bytes) -> None:
        self.chunks: list[bytes | bytearray] = [chunk]
        self.length = len(chunk)

    def extend(self, piece: Payload) -> None:
        last = self.chunks[-1]
        if type(last) is not bytearray:
            last = self.chunks[-1] = bytearray(last)
        last += piece
        self.length += len(piece)

    def merged(self, following: _Run) -> _Run:
        """This run and ``following``, which starts where it ends."""
        if len(self.chunks) >= len(following.chunks):
            self.chunks += following.chunks
            self.length += following.length
            return self
        following.chunks[:0] = self.chunks
        following.length += self.length
        return following

    def truncate(self, length: int) -> int:
        """Keep the first ``length`` bytes; the chunks dropped whole."""
        chunks = self.chunks
        dropped = 0
        excess = self.length - length
        while excess:
            last = chunks[-1]
            if len(last) <= excess:
                chunks.pop()
                dropped += 1
                excess -= len(last)
            else:
                chunks[-1] = last[: len(last) - excess]
                excess = 0
        self.length = length
        return dropped


class ReceiveBuffer:
    """Reorders data-level pieces and tracks the receive window.

    ``capacity`` is the configured receive window: the bytes delivered but
    not yet consumed plus the bytes held out of order never exceed it.
    ``reorder_limit``, until lifted, bounds how far past the next
    in-order byte a piece is held; what lies beyond it is dropped.
    """

    def __init__(
        self, capacity: int, *, reorder_limit: int | None = None
    ) -> None:
        self.capacity = capacity
        # next in-order offset expected (the Data ACK point before FIN)
        self.next_offset = 0
        self.unconsumed = 0
        self.held = 0
        self.fin_offset: int | None = None
        self.fin_reached = False
        # the starts of the held runs, in order; no run ends where the
        # next one starts (a filled hole merges the two)
        self._starts: list[int] = []
        self._runs: dict[int, _Run] = {}
        # pieces held, each taken after a hole, merged or not
        self._chunks = 0
        # how far past next_offset data may be held out of order; None:
        # anywhere in the window (see lift_reorder_limit)
        self._reorder_limit = reorder_limit
        # right edge last advertised, as an offset; never moves left
        self._advertised_edge = 0

    @property
    def ack_offset(self) -> int:
        """The Data ACK to send: a reached DATA_FIN takes one octet."""
        return self.next_offset + (1 if self.fin_reached else 0)

    @property
    def limit(self) -> int:
        """The first offset that does not fit in the buffer."""
        return self.next_offset - self.unconsumed + self.capacity

    def insert(self, offset: int, data: Payload, fin: bool = False) -> Payload:
        """Take one mapped piece; return the bytes it made in order.

        ``fin`` says a DATA_FIN follows the piece, at ``offset +
        len(data)`` (RFC 8684 section 3.3.3). A piece that is next in
        order, with nothing held, comes back as it is (a view stays a
        view: the caller's to copy if it keeps it); a piece held for
        later is copied, so that a peer cannot pin the caller's buffer.
        """
        if offset < 0:
            raise ProtocolError(f"data offset {offset} before the stream")
        if fin:
            self._note_fin(offset + len(data))
        end = offset + len(data)
        if (
            offset == self.next_offset
            and not self._starts
            and self.fin_offset is None
            and end <= self.limit
        ):
            return self._pass_on(data)
        if self.fin_offset is not None:
            end = min(end, self.fin_offset)
        if end > self.limit:
            logger.debug(
                "dropping %d bytes beyond the receive window",
                end - max(offset, self.limit),
            )
            end = self.limit
        start = max(offset, self.next_offset)
        if self._reorder_limit is not None and start > self.next_offset:
            reorder_end = self.next_offset + self._reorder_limit
            if end > reorder_end:
                logger.debug(
                    "dropping %d bytes out of order on one path",
                    end - max(start, reorder_end),
                )
                end = reorder_end
        if start < end:
            self._hold(offset, data, start, end)
        return self._deliver()

    def lift_reorder_limit(self) -> None:
        """A join may carry data: hold anywhere in the window."""
        self._reorder_limit = None

    def consumed(self, count: int) -> None:
        """The application took ``count`` delivered bytes."""
        if isinstance(count, bool) or not isinstance(count, int):
            raise ProtocolError(
                f"consumed() takes an int, got {shown_value(count)}"
            )
        if not 0 <= count <= self.unconsumed:
            raise ProtocolError(
                f"consumed({shown_value(count)}) but only {self.unconsumed} "
                "bytes were delivered and not consumed"
            )
        self.unconsumed -= count

    def window(self) -> int:
        """The window to advertise past :attr:`ack_offset`.

        The configured window less what is buffered, but never pulling
        the right edge back from where it was advertised: the peer may
        already have sent up to it (RFC 9293 section 3.8.6 discourages
        shrinking a window for that reason).
        """
        room = self.capacity - self.unconsumed - self.held
        ack = self.ack_offset
        room = max(room, self._advertised_edge - ack, 0)
        return min(room, MAX_WINDOW)

    def advertise(self) -> int:
        """The window to put in an outgoing frame; remembers its edge."""
        window = self.window()
        self._advertised_edge = self.ack_offset + window
        return window

    def window_growth(self) -> int:
        """How far the right edge would move if advertised now."""
        return self.ack_offset + self.window() - self._advertised_edge

    def _note_fin(self, fin_offset: int) -> None:
        if self.fin_offset is None:
            if fin_offset < self.next_offset or fin_offset > self.limit:
                logger.debug("ignoring a DATA_FIN outside the window")
                return
            self.fin_offset = fin_offset
            self._drop_beyond(fin_offset)
        elif fin_offset != self.fin_offset:
            logger.debug("ignoring a second DATA_FIN at another offset")

    def _hold(self, offset: int, data: Payload, start: int, end: int) -> None:
        # fill only the holes between runs already held, so that bytes
        # taken once are never replaced by a later copy. Runs are never
        # adjacent, so a frame that repeats held bytes passes each run
        # it covers once, and every other step fills a hole
        starts = self._starts
        runs = self._runs
        position = start
        while position < end:
            index = bisect.bisect_right(starts, position) - 1
            if index >= 0:
                run_end = starts[index] + runs[starts[index]].length
                if run_end > position:
                    position = run_end
                    continue
            hole_end = end
            if index + 1 < len(starts):
                hole_end = min(end, starts[index + 1])
            self._add(
                index, position, data[position - offset : hole_end - offset]
            )
            position = hole_end

    def _pass_on(self, data: Payload) -> Payload:
        # the common case of a bulk transfer: in order, nothing waiting
        self.next_offset += len(data)
        self.unconsumed += len(data)
        return data

    @property
    def held_pieces(self) -> int:
        """How many separate runs of bytes wait out of order: pieces
        that follow one another count as one."""
        return len(self._starts)

    def _add(self, index: int, start: int, piece: Payload) -> None:
        """Hold ``piece`` at ``start``, in a hole after run ``index``
        (-1: before the first run)."""
        starts = self._starts
        runs = self._runs
        before = runs[starts[index]] if index >= 0 else None
        if before is not None and starts[index] + before.length == start:
            # appended, never prepended: each byte is copied once here,
            # where joining runs in any order could copy a long run
            # again for every hole filled in front of it
            before.extend(piece)
        else:
            most = (
                MAX_HELD_PIECES
                if self._reorder_limit is None
                else SINGLE_PATH_MAX_HELD_PIECES
            )
            if self._chunks >= most:
                raise ProtocolError(
                    f"the peer left more than {most} pieces of "
                    "data out of order, each after a hole",
                    reset_reason=ResetReason.LACK_OF_RESOURCES,
                )
            index += 1
            starts.insert(index, start)
            # a view may be of a buffer its owner reuses: held bytes are
            # ours
            runs[start] = _Run(piece if type(piece) is bytes else bytes(piece))
            self._chunks += 1
        self.held += len(piece)
        if index + 1 < len(starts):
            run_start = starts[index]
            following = starts[index + 1]
            if run_start + runs[run_start].length == following:
                # the hole between two runs is filled: one run now
                del starts[index + 1]
                runs[run_start] = runs[run_start].merged(runs.pop(following))

    def _deliver(self) -> bytes:
        starts = self._starts
        if not starts or starts[0] != self.next_offset:
            out: list[bytes | bytearray] = []
        else:
            # runs are never adjacent: one at most follows in order
            run = self._runs.pop(starts.pop(0))
            self._chunks -= len(run.chunks)
            self.held -= run.length
            self.next_offset += run.length
            self.unconsumed += run.length
            out = run.chunks
        if (
            self.fin_offset is not None
            and not self.fin_reached
            and self.next_offset == self.fin_offset
        ):
            self.fin_reached = True
        return b"".join(out)

    def _drop_beyond(self, fin_offset: int) -> None:
        starts = self._starts
        while starts:
            last = starts[-1]
            run = self._runs[last]
            if last + run.length <= fin_offset:
                break
            if last >= fin_offset:
                starts.pop()
                del self._runs[last]
                self.held -= run.length
                self._chunks -= len(run.chunks)
            else:
                self.held -= run.length - (fin_offset - last)
                self._chunks -= run.truncate(fin_offset - last)
