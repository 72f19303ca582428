"""Settings of one sans-I/O MPTCP connection.

A :class:`ConnectionConfig` is checked once, when it is built, so that the
connection core can trust every number in it. It holds no key material
and must never read the environment, a clock or a random source.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mptls.errors import ConfigurationError, shown_value
from mptls.mptcp.crypto import IdsnRule
from mptls.mptcp.framing import MAX_PAYLOAD

__all__ = [
    "RESPONDER_PREFERENCE",
    "ConnectionConfig",
    "Mode",
    "check_bool",
    "check_range",
    "check_seconds",
]

KIB = 1024
MIB = 1024 * KIB


class Mode(enum.Enum):
    """How the MP_CAPABLE handshake carries its secrets.

    The values are the names :class:`mptls.backends.base.MptcpInfo`
    reports.
    """

    # draft-paasch-mptcp-application-authentication: tokens in
    # MP_CAPABLE, keys from TLS (flag G, 0x02)
    G = "G"
    # draft-baerts-tcpm-mptcpext: 32-bit tokens in MP_CAPABLE, keys
    # from TLS confirmed and rotated with NEW_KEY (flag E, 0x08)
    E = "E"
    # RFC 8684 section 3.1: keys in the clear (flag H, 0x01)
    RFC8684 = "rfc8684"


# a responder's pick among the modes an initiator offers and it accepts
RESPONDER_PREFERENCE = (Mode.G, Mode.E, Mode.RFC8684)


# the default of ConnectionConfig.handshake_timeout, in seconds
HANDSHAKE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """Everything a :class:`~mptls.mptcp.connection.Connection` is told.

    ``mode`` is what an initiator offers; ``accept_modes`` is what a
    responder agrees to (the initiator ignores it). Sizes are in bytes,
    times in seconds.
    """

    mode: Mode = Mode.G
    # initiator: offer H next to G, and keep the connection if the
    # responder picks H (joins then follow allow_cleartext_keys)
    allow_legacy_fallback: bool = False
    # joins and ADD_ADDR keyed by the RFC 8684 keys that crossed the wire
    allow_cleartext_keys: bool = False
    accept_modes: frozenset[Mode] = frozenset({Mode.G})
    idsn_rule: IdsnRule = IdsnRule.SHA256
    receive_window: int = 4 * MIB
    # the largest frame payload the wire allows (its 16-bit data_length
    # also counts a DATA_FIN octet): fewer frames, less Python per byte
    max_payload: int = MAX_PAYLOAD - 1
    subflow_inflight_limit: int = 2 * MIB
    join_rto: float = 0.2
    join_timeout: float = 10.0
    # the MP_CAPABLE exchange must finish within this (both ends)
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    # data-level retransmission timeout of a subflow: with data in
    # flight and no Data ACK progress for max(min_rto, min(
    # rto_srtt_factor x srtt, path_loss_timeout / 2)), the subflow is
    # taken for a blackhole, closed, and its data sent again on the
    # others (RFC 8684 section 3.3.6)
    min_rto: float = 1.0
    rto_srtt_factor: float = 4.0
    # with no usable subflow left the connection keeps its state this
    # long, waiting for a new join (or for a stalled path to move)
    path_loss_timeout: float = 30.0
    # failed joins (bad HMAC, timeout) per connection: a token bucket of
    # join_failure_burst, refilled at join_failure_rate per second;
    # while it is empty every join SYN is refused. A client's joins to
    # the addresses its peer announces draw from a bucket of their own
    # of the same size
    join_failure_burst: int = 16
    join_failure_rate: float = 2.0
    max_subflows: int = 8
    max_pending_joins: int = 8
    # a pure Data ACK goes out once this many bytes arrived without one,
    # or when ack_delay has passed since the first of them
    ack_threshold: int = 1
    ack_delay: float = 0.02
    # mode E: ask for the next key generation this long after each one
    # became active (None: only when asked, or when the peer starts
    # one); ignored in the other modes (the public API refuses it where
    # no E connection can come)
    key_rotation_interval: float | None = None

    def __post_init__(self) -> None:
        # each opts out of a protection: a truthy "no" turned it off
        check_bool("allow_legacy_fallback", self.allow_legacy_fallback)
        check_bool("allow_cleartext_keys", self.allow_cleartext_keys)
        if not isinstance(self.mode, Mode):
            raise ConfigurationError(
                f"mode must be a Mode, got {shown_value(self.mode)}"
            )
        try:
            accept = frozenset(self.accept_modes)
        except TypeError:
            accept = frozenset()
        if not accept or not all(isinstance(m, Mode) for m in accept):
            raise ConfigurationError(
                "accept_modes must name at least one Mode"
            )
        object.__setattr__(self, "accept_modes", accept)
        if not isinstance(self.idsn_rule, IdsnRule):
            raise ConfigurationError(
                "idsn_rule must be an IdsnRule, got "
                f"{shown_value(self.idsn_rule)}"
            )
        # data_length (16 bits) counts a DATA_FIN octet on top of the
        # payload (RFC 8684 section 3.3.1)
        check_range("max_payload", self.max_payload, 1, MAX_PAYLOAD - 1)
        check_range(
            "receive_window", self.receive_window, self.max_payload, 2**30
        )
        check_range(
            "subflow_inflight_limit",
            self.subflow_inflight_limit,
            self.max_payload,
            2**40,
        )
        check_range("max_subflows", self.max_subflows, 1, 256)
        check_range("max_pending_joins", self.max_pending_joins, 0, 4096)
        check_range("ack_threshold", self.ack_threshold, 1, 2**30)
        check_seconds("join_timeout", self.join_timeout)
        check_seconds("join_rto", self.join_rto)
        if not self.join_rto <= self.join_timeout:
            raise ConfigurationError("join_rto must be at most join_timeout")
        check_seconds("handshake_timeout", self.handshake_timeout)
        check_seconds("min_rto", self.min_rto)
        check_seconds("path_loss_timeout", self.path_loss_timeout)
        for name in ("rto_srtt_factor", "join_failure_rate", "ack_delay"):
            # the range tests below compare: a str or None raised TypeError
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(
                    f"{name} must be a number, got {shown_value(value)}"
                )
        if not 1.0 <= self.rto_srtt_factor <= 64.0:
            raise ConfigurationError("rto_srtt_factor must be in [1, 64]")
        check_range("join_failure_burst", self.join_failure_burst, 1, 2**20)
        if not 0 < self.join_failure_rate <= 1e6:
            raise ConfigurationError(
                "join_failure_rate must be positive (failures per second)"
            )
        if not 0 < self.ack_delay <= 1.0:
            raise ConfigurationError("ack_delay must be in (0, 1] seconds")
        if self.key_rotation_interval is not None:
            check_seconds("key_rotation_interval", self.key_rotation_interval)


def check_bool(name: str, value: object) -> None:
    """Refuse anything but True or False: a switch read for its truth
    takes "false" or "no" as on."""
    if not isinstance(value, bool):
        raise ConfigurationError(
            f"{name} must be True or False, got {shown_value(value)}"
        )


def check_seconds(name: str, value: object, *, zero: bool = False) -> None:
    """A wait of ``name``: a number of seconds in (0, 86400], or in
    [0, 86400] with ``zero`` (a delay that may be none at all).

    Bounded, so that no wait is infinite; a wait that may be "none"
    is checked only when it is given.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"{name} must be a number of seconds, got {shown_value(value)}"
        )
    if not (value >= 0 if zero else value > 0) or not value <= 86400:
        low = "[0" if zero else "(0"
        raise ConfigurationError(
            f"{name} must be in {low}, 86400] seconds, "
            f"got {shown_value(value)}"
        )


def check_range(name: str, value: object, low: int, high: int) -> None:
    """Refuse ``value`` unless it is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(
            f"{name} must be an int, got {shown_value(value)}"
        )
    if not low <= value <= high:
        raise ConfigurationError(
            f"{name} must be between {low} and {high}, "
            f"got {shown_value(value)}"
        )
