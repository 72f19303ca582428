"""Dead paths and lost connections, sans I/O.

:class:`RecoveryMixin` holds the data-level retransmission timeout of
each subflow (a path that stops delivering without a RST is found by
the Data ACK not moving, RFC 8684 section 3.3.6) and the connection's
``path_loss_timeout``: how long it keeps its state with no working path
before it fails with :class:`~mptls.errors.MptlsTimeoutError`.

It must never perform I/O or read a clock: time is an argument.
"""

from __future__ import annotations

import logging

from mptls.errors import MptlsTimeoutError
from mptls.mptcp.options import ResetReason
from mptls.mptcp.scheduler import Subflow
from mptls.mptcp.state import ConnectionState

__all__ = ["RecoveryMixin"]

logger = logging.getLogger("mptls.mptcp")

# RFC 6298 section 2.1: the RTO before a round trip is measured
_INITIAL_RTO = 1.0
# the initial RTO backs off to 64 s at most (path_loss_timeout / 2
# bounds it sooner with the defaults)
_MAX_UNMEASURED_BACKOFF = 64


class RecoveryMixin(ConnectionState):
    """Data-level RTO per subflow and the path-loss limit."""

    def _rto(self, subflow: Subflow) -> float:
        config = self.config
        if subflow.srtt is None:
            # RFC 6298 section 2.1: 1 s until a round trip is measured,
            # backed off by each expiry before one is
            scaled = _INITIAL_RTO * subflow.unmeasured_backoff
        else:
            scaled = config.rto_srtt_factor * subflow.srtt
        # at most half of path_loss_timeout: a path whose round trips
        # grew long (a deep queue) and then died is found, and its data
        # sent on another, before the connection would give up
        return max(config.min_rto, min(scaled, config.path_loss_timeout / 2))

    def _outstanding(self) -> bool:
        return any(s.inflight > 0 for s in self._subflows.values() if s.live)

    def _on_progress(self, now: float) -> None:
        """The Data ACK moved: every path's no-progress clock restarts."""
        self._last_progress = now
        for subflow in self._subflows.values():
            if subflow.live:
                subflow.data_deadline = (
                    now + self._rto(subflow) if subflow.inflight > 0 else None
                )

    def _check_data_timeouts(self, now: float) -> None:
        for subflow in [
            s
            for s in self._subflows.values()
            if s.live
            and s.suspect_until is not None
            and now >= s.suspect_until
        ]:
            self._second_expiry(subflow, now)
        expired = [
            s
            for s in self._subflows.values()
            if s.live
            and s.data_deadline is not None
            and now >= s.data_deadline
        ]
        if not expired:
            return
        # only the path holding the oldest unacknowledged chunk is to
        # blame: the others wait behind its hole in the data stream
        head = self._send.head_subflow()
        for subflow in expired:
            if subflow.inflight <= 0:
                subflow.data_deadline = None
            elif subflow.subflow_id != head or self._heard_lately(
                subflow, now
            ):
                subflow.data_deadline = now + self._rto(subflow)
            else:
                self._data_timeout(subflow, now)

    def _heard_lately(self, subflow: Subflow, now: float) -> bool:
        """Whether the peer's segments still arrive on ``subflow``.

        Then the path works and only its Data ACKs are late: they queue
        behind the peer's own data on the same subflow (a busy path both
        ways, or a link that was down a while and is draining). A reset
        would throw away a working path, and the others may be the ones
        that are down. A blackhole brings nothing, so it is still found
        one RTO after the last segment.

        A path down one way only, or one where a party on it forges
        frames, brings the peer's segments and loses this end's data:
        after half of ``path_loss_timeout`` with no Data ACK progress it
        is blamed all the same, so that its data goes on another path
        before the connection gives up.
        """
        heard = subflow.heard_at
        if heard is None or now - heard >= self._rto(subflow):
            return False
        stall = now - self._last_progress
        return stall < self.config.path_loss_timeout / 2

    def _data_timeout(self, subflow: Subflow, now: float) -> None:
        rto = self._rto(subflow)
        if not self._another_carries_data(subflow):
            # nowhere else to send: keep the path, distrust it, back off
            # (RFC 6298 section 5.5); path_loss_timeout bounds the wait
            subflow.suspect = True
            subflow.data_deadline = now + 2 * rto
            return
        if subflow.srtt is None and subflow.suspect_until is None:
            self._first_expiry(subflow, now, rto)
            return
        # RFC 8684 section 3.3.6: a subflow that stopped delivering is
        # closed and its unacknowledged data reinjected on the others
        self._reset_subflow(
            subflow,
            ResetReason.UNACCEPTABLE_PERFORMANCE,
            f"no Data ACK progress for {rto:.2f} s",
        )

    def _another_carries_data(self, subflow: Subflow) -> bool:
        """Whether a trusted subflow other than ``subflow`` can take its
        data."""
        return any(
            s is not subflow and s.carries_data and not s.suspect
            for s in self._subflows.values()
        )

    def _first_expiry(self, subflow: Subflow, now: float, rto: float) -> None:
        """No round trip measured yet: resend elsewhere, reset later.

        Before a sample the RTO is a guess (RFC 6298 section 2.1), and a
        path whose first round trip takes longer (a loaded peer, a link
        down for a moment) is not dead. Its data goes out again on the
        others now, so nothing waits for it; the path is distrusted and
        its timer backed off (RFC 6298 section 5.5): a Data ACK on it
        within twice the RTO keeps it, none resets it then.
        """
        self._requeue_data(subflow)
        # Karn: a round trip of data also sent elsewhere measures nothing
        subflow.probe_end = None
        subflow.suspect = True
        subflow.suspect_until = now + 2 * rto
        subflow.unmeasured_backoff = min(
            subflow.unmeasured_backoff * 2, _MAX_UNMEASURED_BACKOFF
        )
        logger.debug(
            "[%s] subflow %d: no Data ACK for %.2f s before any round "
            "trip was measured; its data goes out again elsewhere",
            self._tag(),
            subflow.subflow_id,
            rto,
        )

    def _second_expiry(self, subflow: Subflow, now: float) -> None:
        """No Data ACK came on a path after its first expiry: reset it.

        Kept (still suspect) while no other subflow can carry data, as
        :meth:`_data_timeout` keeps a last path.
        """
        subflow.suspect_until = None
        if not self._another_carries_data(subflow):
            return
        self._reset_subflow(
            subflow,
            ResetReason.UNACCEPTABLE_PERFORMANCE,
            "no Data ACK before any round trip was measured here, nor "
            "in twice the RTO after its data went out again elsewhere",
        )

    def _path_loss_expired(self, now: float) -> bool:
        limit = self.config.path_loss_timeout
        if self._paths_lost_at is not None:
            if now < self._paths_lost_at + limit:
                return False
            error = MptlsTimeoutError(
                f"every path was lost and none came back within {limit} s"
            )
        elif self._outstanding() and now >= self._last_progress + limit:
            error = MptlsTimeoutError(
                f"no path delivered data for {limit} s (path_loss_timeout)"
            )
        elif self._hole_since is not None and now >= self._hole_since + limit:
            # later bytes arrived, the ones before them did not, and the
            # peer sends them nowhere again: it took them as delivered
            # (a Data ACK forged on a path can do that) or lost track
            error = MptlsTimeoutError(
                f"the peer's data at offset {self._hole_at} never came, "
                f"though later data did, within {limit} s "
                "(path_loss_timeout)"
            )
        else:
            return False
        self._fail_connection(error)
        return True
