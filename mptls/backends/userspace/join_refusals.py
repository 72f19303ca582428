"""The joins of one connection that the peer refused, and how loudly
to say so.

A join refused for good on a connection that lives on is news for
whoever runs this end: a WARNING. But MP_TCPRST 0x01 without T (the
peer knows no such token, or its connection takes no more joins) is
also what a peer answers when the connection has just ended there: a
server that aborted forgets the token with the connection, and a join
SYN already on its way is refused at once. That refusal often comes
before the MP_FASTCLOSE that ends the connection here, which waits on
the other subflows behind the data the peer had queued on them. So
such a refusal is held for :data:`GRACE`: if the peer's end follows
meanwhile, the refusal was a consequence of it and is said at DEBUG;
if not, it is said then, at WARNING.

Nothing here reads a clock or arms a timer: the owner passes the time
and asks for :attr:`JoinRefusals.deadline`. Nor does anything here
refer to the owner (the transport), which holds it: a reference back
would make every connection a cycle for the garbage collector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mptls.errors import JoinRefusedError, PeerResetError
from mptls.mptcp import events
from mptls.mptcp.options import ResetReason

__all__ = ["GRACE", "JoinRefusals"]

logger = logging.getLogger("mptls.userspace")

# how long a refusal an ending peer would give waits for that end: the
# peer's MP_FASTCLOSE comes behind what it had queued on a subflow,
# which the userspace transport keeps to a quarter second of the path's
# rate, and a round trip; two seconds cover that with room on any path
# a connection keeps
GRACE = 2.0


class JoinRefusals:
    """Says each refused join once, at WARNING or, when the peer's end
    explains it, at DEBUG; ``tag()`` gives the connection's token
    prefix that begins each line."""

    def __init__(self, tag: Callable[[], str]) -> None:
        self._tag = tag
        # (when to warn, the refusal), oldest first
        # oldest first; rarely more than one or two
        self._held: list[tuple[float, events.JoinRefused]] = []

    @property
    def deadline(self) -> float | None:
        """When the oldest held refusal becomes a warning, if any is."""
        return self._held[0][0] if self._held else None

    def refused(
        self, event: events.JoinRefused, now: float, *, ending: bool
    ) -> None:
        """A join refused for good, after which nothing here joins its
        path again; ``ending``: this end is closing the connection."""
        if not _as_an_ending_peer_would(event):
            self._warn(event)
        elif ending:
            self._say(
                logging.DEBUG,
                f"join on subflow {event.subflow_id} refused as the "
                f"connection ends: {event.reason}",
            )
        else:
            self._held.append((now + GRACE, event))

    def handle_timer(self, now: float) -> None:
        """Warn of the refusals held past their grace."""
        while self._held and self._held[0][0] <= now:
            self._warn(self._held.pop(0)[1])

    def connection_ended(self, error: Exception | None) -> None:
        """The connection is over: say what is still held.

        At DEBUG when the peer ended it (its abort or reset, or it no
        longer knew the connection when a rejoin came): the application
        hears of that end, and the refusals were part of it. Otherwise
        at WARNING, for nothing else explains them.
        """
        held, self._held = self._held, []
        if not isinstance(error, PeerResetError | JoinRefusedError):
            for _, event in held:
                self._warn(event)
            return
        for _, event in held:
            self._say(
                logging.DEBUG,
                f"join on subflow {event.subflow_id} refused as the peer "
                f"ended the connection: {event.reason}",
            )

    def _warn(self, event: events.JoinRefused) -> None:
        self._say(
            logging.WARNING,
            f"join on subflow {event.subflow_id} refused: {event.reason}",
        )

    def _say(self, level: int, message: str) -> None:
        # the tag takes a snapshot of the core: only when it is logged
        if logger.isEnabledFor(level):
            logger.log(level, "%s: %s", self._tag(), message)


def _as_an_ending_peer_would(event: events.JoinRefused) -> bool:
    """Whether the refusal is one a peer gives once the connection has
    ended there: the peer's MP_TCPRST 0x01 (MPTCP_ERROR) without T (RFC
    8684 section 3.6; with T it asks for a new join, not for none). This
    end's own refusals (a SYN|ACK whose HMAC fails) are never held."""
    return (
        event.by_peer
        and not event.transient
        and event.reset_reason == ResetReason.MPTCP_ERROR
    )
