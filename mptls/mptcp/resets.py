"""Resets and MP_FASTCLOSE of one connection, sans I/O.

:class:`ResetsMixin` takes the peer's resets (a refused join, a reset
handshake, MP_FASTCLOSE) and sends this end's: :meth:`abort` and the
failure of the connection. What MP_FASTCLOSE carries depends
on the mode (RFC 8684 section 3.5, protocol.md section 11 item 11,
draft-baerts-tcpm-mptcpext for mode E); before any key exists a plain
RST is all an end can send. In mode E that is before TLS gave the first
keys, not before the peer confirmed them (docs/wire.md).

It must never perform I/O, read a clock or draw randomness itself, and
no key or tag may reach a log line, an event or an error.
"""

from __future__ import annotations

import logging
from hmac import compare_digest

from mptls.errors import (
    JoinRefusedError,
    MptlsError,
    PeerResetError,
    ProtocolError,
)
from mptls.mptcp import events as ev
from mptls.mptcp.config import Mode
from mptls.mptcp.crypto import fastclose_tag, fastclose_value
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import MpFastclose, MpTcpRst, ResetReason
from mptls.mptcp.scheduler import Subflow, SubflowState
from mptls.mptcp.state import ConnectionState, options_of
from mptls.tls.keys import KeyMaterial

__all__ = ["ResetsMixin"]

logger = logging.getLogger("mptls.mptcp")

_S = SubflowState


class ResetsMixin(ConnectionState):
    """Resets and MP_FASTCLOSE, both ways."""

    # in

    def _on_reset(self, subflow: Subflow, segment: Segment) -> None:
        options = options_of(segment)
        fastclose = options.get(MpFastclose)
        if isinstance(fastclose, MpFastclose) and self._fastclose_valid(
            fastclose
        ):
            self._on_peer_fastclose(subflow, from_reset=True)
            return
        rst = options.get(MpTcpRst)
        code = rst.reason if isinstance(rst, MpTcpRst) else None
        # RFC 8684 section 3.6: T says the peer expects a new subflow
        # to work (mptls: a key rotation overtook the join, or the
        # connection is out of room or failed-join credit for now)
        transient = isinstance(rst, MpTcpRst) and rst.transient
        if subflow.is_join and subflow.state in (
            _S.SYN_SENT,
            _S.PRE_ESTABLISHED,
        ):
            self._events.append(
                ev.JoinRefused(
                    subflow.subflow_id,
                    _join_reset_message(code, transient),
                    transient,
                    code,
                    by_peer=True,
                )
            )
        if subflow.subflow_id == 0 and not self.handshake_complete:
            subflow.set_state(_S.CLOSED)
            self._finish(
                PeerResetError(
                    self._handshake_reset_message(code), reset_reason=code
                )
            )
            return
        was_join = subflow.is_join and subflow.state in (
            _S.SYN_SENT,
            _S.PRE_ESTABLISHED,
        )
        self._close_subflow(subflow, "reset by peer", code)
        if was_join and code == ResetReason.MPTCP_ERROR and not transient:
            self._join_refused_for_good()

    def _handshake_reset_message(self, code: int | None) -> str:
        """Why the peer reset the MPTCP handshake, as far as one can tell.

        A server refuses an MP_CAPABLE that offers no mode it accepts
        with MP_TCPRST 0x03 (administratively prohibited); an mptls
        client asks for nothing else a server could prohibit, so its
        mode is the likely cause and the user can act on it.
        """
        message = "peer reset the MPTCP handshake"
        if (
            self.is_initiator
            and code == ResetReason.ADMINISTRATIVELY_PROHIBITED
        ):
            message += (
                " (MP_TCPRST 0x03, administratively prohibited): the server "
                f"may not accept mode {self.config.mode.value}; a server "
                "accepts G only unless its mode= or modes= names others"
            )
        return message

    def _join_refused_for_good(self) -> None:
        """A join failed on its token or HMAC while no subflow is left.

        MP_TCPRST 0x01 on a join means the peer does not know the token
        or the keys disagree (RFC 8684 sections 3.2, 3.6); with no other
        subflow no later join can do better, so waiting out
        ``path_loss_timeout`` would only hide a tampered handshake or a
        peer that has forgotten the connection.
        """
        if self._closed or self._live_count():
            return
        self._finish(
            JoinRefusedError(
                "every subflow is gone and the peer refused the join "
                "(MP_TCPRST 0x01): the peer no longer knows this connection "
                "(it ended or aborted it, and its MP_FASTCLOSE may not "
                "have arrived) or the keys disagree"
            )
        )

    def _on_peer_fastclose(
        self, subflow: Subflow, *, from_reset: bool
    ) -> None:
        # RFC 8684 section 3.5: reset every subflow, the connection is gone
        for other in self._subflows.values():
            if other.live and (other is not subflow or not from_reset):
                other.outbox.append(self._reset_segment(None))
            if other.live:
                other.set_state(_S.CLOSED)
        unacknowledged = self._send.size
        message = "the peer aborted the connection (MP_FASTCLOSE)"
        if unacknowledged:
            message += (
                f", {unacknowledged} bytes of ours not acknowledged: they "
                "may be lost"
            )
        self._finish(PeerResetError(message, unacknowledged=unacknowledged))

    # out

    def abort(self) -> None:
        """RST + MP_FASTCLOSE on every subflow (RFC 8684 section 3.5)."""
        if self._closed:
            return
        fastclose = self._fastclose_option()
        self._reset_every_subflow(() if fastclose is None else (fastclose,))
        self._finish(None)

    def _fail_connection(self, error: MptlsError) -> None:
        """Fail the connection: an RST on every subflow left.

        The RST carries the MP_TCPRST of a protocol error and, once keys
        exist, MP_FASTCLOSE, which tells the peer the whole connection
        is gone (RFC 8684 section 3.5): without it a peer that holds
        keys takes the resets for lost paths and keeps the connection
        for ``path_loss_timeout``, waiting for a join. Before any key a
        plain RST is all an end can send.
        """
        logger.info("[%s] connection failed: %s", self._tag(), error)
        options: list[MpTcpRst | MpFastclose] = []
        if isinstance(error, ProtocolError) and error.reset_reason is not None:
            options.append(MpTcpRst(reason=error.reset_reason))
        fastclose = self._fastclose_option()
        if fastclose is not None:
            options.append(fastclose)
        self._reset_every_subflow(tuple(options))
        self._finish(error)

    def _reset_every_subflow(
        self, options: tuple[MpTcpRst | MpFastclose, ...]
    ) -> None:
        """An RST frame with ``options`` on every live subflow, closed."""
        for subflow in self._subflows.values():
            if subflow.live:
                subflow.outbox.append(Segment(flags=Flag.RST, options=options))
                subflow.set_state(_S.CLOSED)

    def _fastclose_option(self) -> MpFastclose | None:
        """The MP_FASTCLOSE to send, or None (a plain RST) before keys.

        RFC 8684 section 3.5 sends the receiver's key, G mode a hash of
        it (protocol.md section 11 item 11), mode E the fast-close tag
        of the current keys with their K (draft-baerts-tcpm-mptcpext);
        before any generation is active, of generation 0 still pending.
        """
        if self.mode is Mode.E:
            key_id = self._current_key_id()
            held = self._fastclose_keys(key_id)
            if not held:
                return None
            local, remote = self._local_token, self._remote_token
            tag = fastclose_tag(local or b"", remote or b"", held[0])
            return MpFastclose(key=tag, key_id=key_id)
        pair = self._hmac_keys()
        if pair is None:
            return None
        return MpFastclose(key=self._fastclose_value(pair[1]))

    def _fastclose_valid(self, option: MpFastclose) -> bool:
        """Whether a received MP_FASTCLOSE carries what ours would."""
        if self.mode is Mode.E:
            # the sender's token first
            local, remote = self._local_token or b"", self._remote_token or b""
            return any(
                compare_digest(fastclose_tag(remote, local, keys), option.key)
                for keys in self._fastclose_keys(option.key_id)
            )
        pair = self._hmac_keys()
        if pair is None:
            return False
        return compare_digest(self._fastclose_value(pair[0]), option.key)

    def _fastclose_keys(self, key_id: int) -> tuple[KeyMaterial, ...]:
        """Mode E: the keys of slot ``key_id``, active or still pending,
        then, while pending, the generation they replaced.

        A pending generation came from this end's own TLS exporter, as
        the peer's came from its own, so a tag under it proves what one
        under active keys does: only the TLS session's holders can make
        it. Confirmation by NEW_KEY gates joins and ADD_ADDR; an end
        that aborts before the peer's NEW_KEY arrived (right after its
        TLS handshake) would otherwise send a plain RST, which the peer
        takes for a lost path and waits ``path_loss_timeout`` for a
        rejoin. For the same reason a rotation that replaced an active
        generation keeps it here until its own keys are active: the end
        that answers a NEW_KEY is active first and may start the next
        rotation at once, in the slot of the generation the peer still
        uses. A slot that holds nothing (this end's TLS not done, or the
        generation dropped unconfirmed) verifies no tag.
        """
        slot = self._slots[key_id & 1]
        if slot is None:
            return ()
        if slot.replaced is None:
            return (slot.keys,)
        return (slot.keys, slot.replaced)

    def _fastclose_value(self, key: bytes) -> bytes:
        if self.mode is Mode.G:
            return fastclose_value(key, self.config.idsn_rule)
        return key


def _join_reset_message(code: int | None, transient: bool) -> str:
    """Why the peer reset a join, as its MP_TCPRST tells."""
    message = f"peer reset the join (MP_TCPRST {code})"
    if not transient:
        return message
    if code == ResetReason.MPTCP_ERROR:
        return message + ", transient: a new join may succeed"
    return message + ", transient: the peer may take a join later"
