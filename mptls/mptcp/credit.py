"""A credit bucket: how often something may happen, with a burst.

It holds at most ``burst`` credits and gains ``rate`` a second; each
use spends one. A connection keeps one for failed joins, and a client
one for the connects it opens to the addresses its peer announces. It
reads the time it is given and never a clock of its own.
"""

from __future__ import annotations

__all__ = ["CreditBucket"]


class CreditBucket:
    """``burst`` credits at most, refilled at ``rate`` per second."""

    __slots__ = ("_at", "_burst", "_credit", "_rate")

    def __init__(self, burst: int, rate: float, now: float) -> None:
        self._burst = float(burst)
        self._rate = rate
        self._credit = self._burst
        self._at = now

    def credit(self, now: float) -> float:
        """The credits there are at ``now`` (a time before the last one
        given adds nothing)."""
        elapsed = max(0.0, now - self._at)
        self._credit = min(self._burst, self._credit + elapsed * self._rate)
        self._at = max(now, self._at)
        return self._credit

    def spend(self, now: float) -> None:
        """Use one credit at ``now``; an empty bucket stays at zero."""
        self._credit = max(0.0, self.credit(now) - 1.0)
