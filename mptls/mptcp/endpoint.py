"""A listener's table of MPTCP connections, keyed by local token.

:class:`Endpoint` takes the first segment of every new TCP connection a
server accepts: an MP_CAPABLE SYN makes a new responder
:class:`~mptls.mptcp.connection.Connection`, an MP_JOIN SYN is routed to
the connection whose token it names, and anything else is refused with
the RST the peer should get (RFC 8684 sections 3.2 and 3.8). It must
never perform I/O; randomness is injected.

Tokens of three sizes share the table: 64-bit G-mode tokens, and two
kinds of 4-byte ones, mode E's (from a 32-bit allocator) and RFC 8684's
(hashes of keys). A new token of either 4-byte kind that is already in
the table is skipped for the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from mptls.errors import ConfigurationError, JoinRefusedError, MptlsError
from mptls.mptcp.config import RESPONDER_PREFERENCE, ConnectionConfig, Mode
from mptls.mptcp.connection import Connection, RandomSource
from mptls.mptcp.crypto import rfc8684_token
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.handshake import MODE_FLAG
from mptls.mptcp.options import (
    CapableFlag,
    MpCapable,
    MpJoinSyn,
    MpTcpRst,
    ResetReason,
)
from mptls.mptcp.tokens import E_TOKEN_LAYOUT, TokenAllocator

__all__ = ["Accepted", "Endpoint", "Refused"]

logger = logging.getLogger("mptls.mptcp")

# RFC 8684 section 3.1: a listener SHOULD make sure a new key's token is
# not in use; a random 64-bit key collides so rarely that a handful of
# draws is plenty
_KEY_ATTEMPTS = 16
# the responder's preference among the modes it accepts
_MODE_FLAGS = tuple((mode, MODE_FLAG[mode]) for mode in RESPONDER_PREFERENCE)
_SECRET_LENGTH = 32
# checksums (A) and the extensibility bit (B) are not implemented; other
# algorithm bits may be offered next to G or H and are simply not chosen
_UNSUPPORTED = CapableFlag.A | CapableFlag.B


@dataclass(frozen=True, slots=True)
class Accepted:
    """The segment opened a connection or joined one."""

    connection: Connection
    subflow_id: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The segment was refused; send ``reply`` (if any), then close."""

    reply: Segment | None
    reason: str


def _refusal(reason: str, code: int, *, transient: bool = False) -> Refused:
    option = MpTcpRst(reason=code, transient=transient)
    reply = Segment(flags=Flag.RST, options=(option,))
    return Refused(reply=reply, reason=reason)


class Endpoint:
    """Routes first segments to connections by their local token.

    ``tokens`` hands out G-mode tokens; ``e_tokens``, 32-bit tokens for
    mode E (draft-baerts-tcpm-mptcpext). Without it, an endpoint that
    accepts E makes its own from a secret drawn from ``random``.
    """

    def __init__(
        self,
        config: ConnectionConfig,
        *,
        tokens: TokenAllocator,
        random: RandomSource,
        e_tokens: TokenAllocator | None = None,
    ) -> None:
        self.config = config
        self._tokens = tokens
        self._random = random
        self._table: dict[bytes, Connection] = {}
        self._e_tokens: TokenAllocator | None = None
        if Mode.E in config.accept_modes:
            self._e_tokens = _e_allocator(tokens, e_tokens, random)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"<Endpoint connections={len(self._table)}>"

    def receive_first(
        self,
        segment: Segment,
        now: float,
        *,
        local_address_id: Callable[[Connection], int] | None = None,
    ) -> Accepted | Refused:
        """Handle the first segment of a new TCP connection.

        ``local_address_id`` gives, for the connection a join SYN names,
        the id of the local address the SYN reached: its SYN|ACK carries
        it (RFC 8684 section 3.2). The adapter knows the addresses;
        without it every join is answered with id 0.
        """
        if segment.flags & Flag.RST:
            # never answer a reset (RFC 9293 section 3.10.7.1)
            return Refused(reply=None, reason="first segment is a RST")
        if segment.flags & (Flag.SYN | Flag.ACK) != Flag.SYN:
            return _refusal(
                "first segment is not a SYN", ResetReason.MPTCP_ERROR
            )
        for option in segment.options:
            if isinstance(option, MpCapable):
                return self._open(segment, option, now)
            if isinstance(option, MpJoinSyn):
                return self._join(segment, option, now, local_address_id)
        return _refusal(
            "SYN without MP_CAPABLE or MP_JOIN", ResetReason.MPTCP_ERROR
        )

    def remove(self, connection: Connection) -> None:
        """Forget a connection (once closed) and free its token."""
        token = connection.local_token
        if token is None or self._table.get(token) is not connection:
            return
        del self._table[token]
        if connection.mode is Mode.G:
            self._tokens.release(token)
        elif connection.mode is Mode.E and self._e_tokens is not None:
            self._e_tokens.release(token)

    def _choose_mode(self, option: MpCapable) -> Mode | None:
        # RFC 8684 section 3.1: the responder echoes exactly one of the
        # algorithms offered; G, then E, then H when several would do
        for mode, flag in _MODE_FLAGS:
            if option.flags & flag and mode in self.config.accept_modes:
                return mode
        return None

    def _mode_mismatch(self, option: MpCapable) -> str:
        """Why no mode fits, in the modes' names: what the client
        offered and what this endpoint allows."""
        offered = [
            mode.value for mode, flag in _MODE_FLAGS if option.flags & flag
        ]
        allowed = [
            mode.value
            for mode in RESPONDER_PREFERENCE
            if mode in self.config.accept_modes
        ]
        if not offered:
            asked = "the client offered no MPTCP mode this server knows"
        elif len(offered) == 1:
            asked = f"the client asked for mode {offered[0]}"
        else:
            asked = f"the client offered modes {_either(offered)}"
        return f"{asked}, this server allows {_either(allowed)}"

    def _open(
        self, segment: Segment, option: MpCapable, now: float
    ) -> Accepted | Refused:
        if option.version != 1:
            return _refusal(
                f"MPTCP version {option.version} is not supported",
                ResetReason.MPTCP_ERROR,
            )
        if option.flags & _UNSUPPORTED:
            return _refusal(
                "MP_CAPABLE asks for unsupported features",
                ResetReason.ADMINISTRATIVELY_PROHIBITED,
            )
        mode = self._choose_mode(option)
        if mode is None:
            return _refusal(
                self._mode_mismatch(option),
                ResetReason.ADMINISTRATIVELY_PROHIBITED,
            )
        try:
            secret = self._new_secret(mode)
        except MptlsError:
            # every serial of this worker is used: refused, not raised
            # into the transport that read the SYN
            secret = None
        if secret is None:
            return _refusal(
                "no unique token available", ResetReason.LACK_OF_RESOURCES
            )
        connection = Connection.responder(
            self.config,
            mode=mode,
            local_secret=secret,
            syn=segment,
            random=self._random,
            now=now,
        )
        token = connection.local_token
        if token is not None:
            self._table[token] = connection
        return Accepted(connection=connection, subflow_id=0)

    def _new_secret(self, mode: Mode) -> bytes | None:
        """Token-B (G, E mode) or Key-B whose token is free (RFC 8684)."""
        if mode is Mode.G:
            # tokens are unique by construction: no check, no retry
            return self._tokens.allocate()
        if mode is Mode.E:
            return self._new_e_token()
        for _ in range(_KEY_ATTEMPTS):
            key = self._random(8)
            if rfc8684_token(key) not in self._table:
                return key
        return None

    def _new_e_token(self) -> bytes | None:
        """A 32-bit token no connection here holds.

        E tokens never repeat, but an RFC 8684 token (a hash of a key)
        may already hold the same 4 bytes: that one is skipped, for
        good, and the next is taken.
        """
        tokens = self._e_tokens
        if tokens is None:
            return None
        for _ in range(_KEY_ATTEMPTS):
            token = tokens.allocate()
            if token not in self._table:
                return token
            tokens.release(token)
        return None

    def _join(
        self,
        segment: Segment,
        option: MpJoinSyn,
        now: float,
        local_address_id: Callable[[Connection], int] | None,
    ) -> Accepted | Refused:
        connection = self._table.get(option.token)
        if connection is None:
            # RFC 8684 section 3.2: an unknown token gets a RST
            return _refusal(
                "MP_JOIN names an unknown token", ResetReason.MPTCP_ERROR
            )
        try:
            address_id = (
                0 if local_address_id is None else local_address_id(connection)
            )
        except MptlsError as exc:
            # no id left for one more local address: one octet holds 256
            return _refusal(str(exc), ResetReason.LACK_OF_RESOURCES)
        try:
            subflow_id = connection.accept_join(
                segment, now, address_id=address_id
            )
        except JoinRefusedError as exc:
            code = exc.reset_reason
            if code is None:
                code = ResetReason.MPTCP_ERROR
            # T: out of room or credit for now, a join later may be taken
            return _refusal(str(exc), code, transient=exc.transient)
        return Accepted(connection=connection, subflow_id=subflow_id)


def _either(names: list[str]) -> str:
    """``G``, ``G or E``, ``G, E or rfc8684``."""
    if len(names) < 2:
        return "".join(names)
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _e_allocator(
    tokens: TokenAllocator,
    given: TokenAllocator | None,
    random: RandomSource,
) -> TokenAllocator:
    """The 32-bit allocator of an endpoint that accepts mode E.

    32-bit tokens have no room for the server and worker ids that route
    a join to its owner, so an endpoint whose tokens carry such ids
    cannot take E (the load balancer would misroute its joins).
    """
    if tokens.server_id or tokens.worker_id:
        raise ConfigurationError(
            "mode E cannot be accepted with a server or worker id: its "
            "32-bit tokens have no room to route joins"
        )
    if given is None:
        return TokenAllocator(random(_SECRET_LENGTH), layout=E_TOKEN_LAYOUT)
    if given.layout.token_length != E_TOKEN_LAYOUT.token_length:
        raise ConfigurationError(
            "e_tokens must hand out 4-byte tokens (E_TOKEN_LAYOUT)"
        )
    return given
