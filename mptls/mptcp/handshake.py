"""The MP_CAPABLE handshake of one connection, sans I/O.

:class:`HandshakeMixin` sends and checks the three MP_CAPABLE frames of
docs/wire.md in G mode (64-bit tokens), mode E (32-bit tokens) and
RFC 8684 mode (keys), picks the mode and refuses a downgrade the user
did not allow. The first flights of TLS ride these frames, implicitly
mapped.

It must never perform I/O, read a clock or draw randomness itself, and
no token or key may reach a log line or an error beyond the public
tokens.
"""

from __future__ import annotations

import logging
from hmac import compare_digest

from mptls.errors import ConfigurationError, ProtocolError
from mptls.mptcp import events as ev
from mptls.mptcp.config import Mode
from mptls.mptcp.crypto import idsn_from_token, rfc8684_idsn, rfc8684_token
from mptls.mptcp.framing import Flag, Payload, Segment
from mptls.mptcp.options import CapableFlag, MpCapable
from mptls.mptcp.scheduler import Subflow, SubflowState
from mptls.mptcp.state import ConnectionState, options_of
from mptls.mptcp.tokens import E_TOKEN_LAYOUT, TokenAllocator

__all__ = [
    "MODE_FLAG",
    "TOKEN_MODES",
    "HandshakeMixin",
    "offered_flags",
    "own_token",
]

logger = logging.getLogger("mptls.mptcp")

_ALGORITHMS = CapableFlag.G | CapableFlag.E | CapableFlag.H
# the MP_CAPABLE algorithm bit of each mode
MODE_FLAG = {
    Mode.G: CapableFlag.G,
    Mode.E: CapableFlag.E,
    Mode.RFC8684: CapableFlag.H,
}
_FLAG_MODE = {flag: mode for mode, flag in MODE_FLAG.items()}
# the modes whose MP_CAPABLE carries tokens rather than keys
TOKEN_MODES = frozenset({Mode.G, Mode.E})
_S = SubflowState


def own_token(tokens: TokenAllocator, mode: Mode) -> bytes:
    """An initiator's token from ``tokens``: 4 bytes under mode E."""
    token = tokens.allocate()
    if mode is Mode.E and len(token) != E_TOKEN_LAYOUT.token_length:
        tokens.release(token)
        raise ConfigurationError(
            "mode E needs 4-byte tokens: give the initiator a "
            "TokenAllocator with a 32-bit layout (E_TOKEN_LAYOUT)"
        )
    return token


def offered_flags(config_mode: Mode, legacy_fallback: bool) -> CapableFlag:
    """What an initiator's SYN offers: its mode, H next to it if the
    user allows a fallback to keys in the clear."""
    offered = MODE_FLAG[config_mode]
    if legacy_fallback:
        offered |= CapableFlag.H
    return offered


class HandshakeMixin(ConnectionState):
    """MP_CAPABLE out and in (RFC 8684 section 3.1, docs/wire.md)."""

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

    def _implicit_chunk(self, subflow: Subflow, now: float) -> Payload:
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
        secret = self._local_token if mode in TOKEN_MODES else self._local_key
        option = MpCapable(flags=MODE_FLAG[mode], sender_key=secret)
        return self._segment(subflow, Flag.SYN | Flag.ACK, (option,), payload)

    def _capable_third_ack(self, subflow: Subflow, now: float) -> Segment:
        payload = self._implicit_chunk(subflow, now)
        if self.mode in TOKEN_MODES:
            local, remote = self._local_token, self._remote_token
        else:
            local, remote = self._local_key, self._remote_key
        option = MpCapable(
            flags=MODE_FLAG[self.mode or Mode.G],
            sender_key=local,
            receiver_key=remote,
            data_length=len(payload) if payload else None,
        )
        return self._segment(subflow, Flag.ACK, (option,), payload)

    # handshake in

    def _negotiated(self, segment: Segment) -> tuple[Mode, bytes]:
        """The mode and Token-B / Key-B a SYN|ACK selects, or an error."""
        if segment.flags & (Flag.SYN | Flag.ACK) != Flag.SYN | Flag.ACK:
            raise ProtocolError("expected a SYN|ACK on the first subflow")
        option = options_of(segment).get(MpCapable)
        if not isinstance(option, MpCapable):
            # RFC 8684 section 3.1 would fall back to TCP; the userspace
            # wire has no plain TCP to fall back to
            raise ProtocolError("the SYN|ACK carries no MP_CAPABLE")
        if option.version != 1:
            raise ProtocolError(f"MPTCP version {option.version} is not 1")
        if option.flags & CapableFlag.A:
            # RFC 8684 section 3.1: A in either SYN makes checksums
            # mandatory; a server refuses a SYN with A for the same reason
            raise ProtocolError(
                "the SYN|ACK asks for DSS checksums (flag A), which mptls "
                "does not implement"
            )
        if option.flags & CapableFlag.B:
            # the option was decoded with the layout B=0 gives
            raise ProtocolError("the SYN|ACK sets the extensibility flag B")
        chosen = _FLAG_MODE.get(CapableFlag(option.flags & _ALGORITHMS))
        if chosen is None:
            raise ProtocolError(
                "the SYN|ACK must select exactly one of G, E, H"
            )
        if not MODE_FLAG[chosen] & self._offered:
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
            self._fail_connection(exc)
            return
        self.mode = mode
        rule = self.config.idsn_rule
        if mode in TOKEN_MODES:
            # mode E: IDSNs from the 4-byte tokens, by the same rule
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
        subflow.deadline = None
        subflow.set_state(_S.ESTABLISHED)
        self._third_ack_due = True
        self._complete_handshake()
        self._take_payload(
            subflow, segment.payload, subflow.bytes_received, False, now
        )

    def _check_third_ack(self, segment: Segment) -> bytes:
        """Token-A / Key-A from the third ACK, or an error."""
        option = options_of(segment).get(MpCapable)
        if not isinstance(option, MpCapable):
            raise ProtocolError("the third ACK carries no MP_CAPABLE")
        mode = self.mode or Mode.G
        if option.flags & _ALGORITHMS != MODE_FLAG[mode]:
            raise ProtocolError("the third ACK does not echo the chosen mode")
        if option.flags & CapableFlag.A or option.checksum is not None:
            # no end negotiated checksums: the SYN with A was refused
            raise ProtocolError(
                "the third ACK asks for a DSS checksum, which was not "
                "negotiated"
            )
        local = self._local_token if mode in TOKEN_MODES else self._local_key
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
            self._fail_connection(exc)
            return
        if self.mode in TOKEN_MODES:
            self._remote_token = remote
            self._remote_idsn = idsn_from_token(remote, self.config.idsn_rule)
        else:
            self._remote_key = remote
            self._remote_token = rfc8684_token(remote)
            self._remote_idsn = rfc8684_idsn(remote)
        subflow.deadline = None
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
        self._answer_held_joins()
