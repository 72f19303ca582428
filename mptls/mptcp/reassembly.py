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
# pieces with a hole before each count here. Without a limit a peer
# could send a window's worth of one-byte pieces with a hole between
# each (two million in a 4 MiB window), each costing about 100 bytes
# and an insert into the list of starts.
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
        self._starts: list[int] = []
        self._pieces: dict[int, bytes | bytearray] = {}
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
        # fill only the gaps between pieces already held, so that bytes
        # taken once are never replaced by a later copy
        index = max(bisect.bisect_right(self._starts, start) - 1, 0)
        position = start
        while index < len(self._starts) and position < end:
            held_start = self._starts[index]
            held_end = held_start + len(self._pieces[held_start])
            if held_end <= position:
                index += 1
                continue
            if held_start >= end:
                break
            if held_start > position and self._add(
                position, data[position - offset : held_start - offset]
            ):
                # a piece of its own, in front of the held one
                index += 1
            position = max(position, held_end)
            index += 1
        if position < end:
            self._add(position, data[position - offset : end - offset])

    def _pass_on(self, data: Payload) -> Payload:
        # the common case of a bulk transfer: in order, nothing waiting
        self.next_offset += len(data)
        self.unconsumed += len(data)
        return data

    @property
    def held_pieces(self) -> int:
        """How many separate pieces wait out of order."""
        return len(self._starts)

    def _add(self, start: int, piece: Payload) -> bool:
        """Hold ``piece`` at ``start``; False if it joined the piece
        before it rather than taking a place of its own."""
        starts = self._starts
        pieces = self._pieces
        index = bisect.bisect_left(starts, start)
        if index:
            before = starts[index - 1]
            joined = pieces[before]
            if before + len(joined) == start:
                # appended, never prepended: each byte is copied once
                # here, where joining runs in any order could copy a
                # long run again for every hole filled in front of it
                if type(joined) is not bytearray:
                    joined = pieces[before] = bytearray(joined)
                joined += piece
                self.held += len(piece)
                return False
        most = (
            MAX_HELD_PIECES
            if self._reorder_limit is None
            else SINGLE_PATH_MAX_HELD_PIECES
        )
        if len(starts) >= most:
            raise ProtocolError(
                f"the peer left more than {most} pieces of "
                "data out of order, each after a hole",
                reset_reason=ResetReason.LACK_OF_RESOURCES,
            )
        starts.insert(index, start)
        # a view may be of a buffer its owner reuses: held bytes are ours
        pieces[start] = piece if type(piece) is bytes else bytes(piece)
        self.held += len(piece)
        return True

    def _deliver(self) -> bytes:
        out: list[bytes | bytearray] = []
        starts = self._starts
        taken = 0
        # the run of held pieces that now follows in order leaves the
        # list in one cut: a pop(0) each shifted every start still held,
        # so a gap filled behind n small pieces cost n * n / 2 moves
        while taken < len(starts) and starts[taken] == self.next_offset:
            piece = self._pieces.pop(starts[taken])
            taken += 1
            self.held -= len(piece)
            self.next_offset += len(piece)
            self.unconsumed += len(piece)
            out.append(piece)
        if taken:
            del starts[:taken]
        if (
            self.fin_offset is not None
            and not self.fin_reached
            and self.next_offset == self.fin_offset
        ):
            self.fin_reached = True
        return b"".join(out)

    def _drop_beyond(self, fin_offset: int) -> None:
        while self._starts:
            last = self._starts[-1]
            piece = self._pieces[last]
            if last + len(piece) <= fin_offset:
                break
            self.held -= len(piece)
            if last >= fin_offset:
                self._starts.pop()
                del self._pieces[last]
            else:
                self._pieces[last] = piece[: fin_offset - last]
                self.held += fin_offset - last
