"""Refused peers, said once each to whoever runs a server.

A server that turns a client or a subflow away (a mode it does not
allow, a failed TLS handshake, a join with a bad HMAC or an unknown
token, a peer that is not mptls) says so here: one INFO record on the
``mptls.refusals`` logger, ``refused HOST:PORT: reason``. The logger is
its own so that an operator can show refusals without every other INFO
line, as ``mptls serve -v`` does; INFO, for a refusal is the outcome of
a negotiation, not a fault of this end.

A flood of refusals (a scanner, forged joins) must not flood the log:
:class:`RefusalLog` shows the first ``burst`` of each ``interval`` one
by one and then a single line with how many more there were. Reasons
are built from protocol facts; callers never pass key material, HMACs,
tokens or exporter output, and nothing here adds any.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RefusalLog", "logger", "refusal_log", "refused"]

logger = logging.getLogger("mptls.refusals")

# refusals shown one by one per interval, and the interval in seconds:
# a client that retries by hand stays well under; a flood is cut short
BURST = 20
INTERVAL = 10.0


def _peer_text(peer: Any) -> str:
    """``host:port`` (brackets around IPv6) of a socket name, or ``-``."""
    if not isinstance(peer, tuple) or len(peer) < 2:
        return "-"
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class RefusalLog:
    """Logs refused peers, at most ``burst`` lines per ``interval``.

    Past the burst, refusals are counted; when the interval ends (on a
    timer of the running event loop, or at the next refusal, whichever
    comes first) one line says how many were not shown and names the
    last of them. ``clock`` is a monotonic clock in seconds.
    """

    def __init__(
        self,
        *,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError("burst must be >= 1 and interval > 0")
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._window_end = float("-inf")
        self._shown = 0
        self._suppressed = 0
        self._last = ""
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, peer: Any, reason: str) -> None:
        """Say that ``peer`` (a socket name, or None) was refused."""
        if not logger.isEnabledFor(logging.INFO):
            return
        line = f"{_peer_text(peer)}: {reason}"
        with self._lock:
            now = self._clock()
            if now >= self._window_end:
                summary = self._take_summary()
                self._window_end = now + self.interval
                self._shown = 0
            else:
                summary = None
            show = self._shown < self.burst
            if show:
                self._shown += 1
            else:
                self._suppressed += 1
                self._last = line
                self._schedule_flush(self._window_end - now)
        if summary is not None:
            logger.info("%s", summary)
        if show:
            logger.info("refused %s", line)

    def flush(self) -> None:
        """Log the count of refusals not shown one by one, if any."""
        with self._lock:
            summary = self._take_summary()
        if summary is not None:
            logger.info("%s", summary)

    def _take_summary(self) -> str | None:
        # under the lock: the line for what was held back, and a clean
        # count for the next interval
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count, self._suppressed = self._suppressed, 0
        if not count:
            return None
        many = "peer" if count == 1 else "peers"
        return (
            f"refused {count} more {many} within {self.interval:g} s, "
            f"not shown one by one (the last: {self._last})"
        )

    def _schedule_flush(self, delay: float) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next refusal reports the count
        self._timer = loop.call_later(max(delay, 0.0), self.flush)


# one per process: a flood toward any server here is one flood of its log
refusal_log = RefusalLog()


def refused(peer: Any, reason: str) -> None:
    """Say that ``peer`` was refused, on the process's :class:`RefusalLog`."""
    refusal_log.refused(peer, reason)
