"""What a sans-I/O MPTCP connection tells its adapter.

Events come out of :meth:`Connection.next_event`; :class:`ConnectionInfo`
comes out of :meth:`Connection.info`. They are frozen dataclasses and must
never carry key material: tokens and a one-way key fingerprint are all
they may show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from mptls.errors import MptlsError
from mptls.mptcp.config import Mode

__all__ = [
    "PEER_CLOSED_SUBFLOW",
    "AddressAnnounced",
    "AddressRemoved",
    "ConnectionClosed",
    "ConnectionInfo",
    "DataReceived",
    "EndOfStream",
    "Event",
    "HandshakeComplete",
    "JoinRefused",
    "KeyRotationFailed",
    "KeysActivated",
    "KeysRequested",
    "PeerJoinRefused",
    "SubflowClosed",
    "SubflowEstablished",
    "SubflowStatus",
]


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The MP_CAPABLE exchange is done; tokens are the public ones."""

    mode: Mode
    local_token: bytes
    remote_token: bytes


@dataclass(frozen=True, slots=True)
class DataReceived:
    """In-order bytes of the data-level stream.

    A view when the segment's payload was one (see
    ``SegmentDecoder.payload_views``): valid only until the adapter
    reads its socket again, so an adapter that keeps it copies it.
    """

    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer's DATA_FIN arrived after all its data (half-close)."""


@dataclass(frozen=True, slots=True)
class SubflowEstablished:
    """A joined subflow may now carry data."""

    subflow_id: int


# the reason of a SubflowClosed whose peer ended that subflow alone with
# a FIN (RFC 8684 section 3.3.3): its choice, not a fault of the path
PEER_CLOSED_SUBFLOW = "peer closed the subflow"


@dataclass(frozen=True, slots=True)
class SubflowClosed:
    """A subflow ended; ``reset_reason`` is the MP_TCPRST code if any."""

    subflow_id: int
    reason: str
    reset_reason: int | None = None


@dataclass(frozen=True, slots=True)
class AddressAnnounced:
    """The peer announced an address with a valid ADD_ADDR HMAC."""

    address_id: int
    address: IPv4Address | IPv6Address
    port: int | None


@dataclass(frozen=True, slots=True)
class AddressRemoved:
    """The peer withdrew one of its addresses (REMOVE_ADDR).

    Once for an id this end knew: announced by the peer, the first
    subflow's (0), or one a checked join came from; a REMOVE_ADDR's
    other ids, and an id already removed, are ignored (RFC 8684 section
    3.4.2). A client does not join a path to it again by itself.
    """

    address_id: int


@dataclass(frozen=True, slots=True)
class JoinRefused:
    """A join this end started was refused or failed its HMAC check.

    ``transient``: the refusal says nothing against the path (MP_TCPRST
    with T set, RFC 8684 section 3.6). With ``reset_reason`` 0x01 a key
    rotation overtook the join in mode E, and a new join, with the keys
    in use now, may succeed at once; with 0x02 (lack of resources) or
    0x03 (administratively prohibited) the peer is out of room or of
    failed-join credit for now, and a join may be taken later.
    ``reset_reason`` is the MP_TCPRST code of the reset, the peer's or
    this end's; ``None`` when the peer's reset carried none.
    ``by_peer``: the peer reset the join, rather than this end (which
    refuses a SYN|ACK whose HMAC does not match, say).
    """

    subflow_id: int
    reason: str
    transient: bool = False
    reset_reason: int | None = None
    by_peer: bool = False


@dataclass(frozen=True, slots=True)
class PeerJoinRefused:
    """A join the peer started was refused here after its SYN was
    taken: a bad HMAC in its third ACK, or no end within join_timeout
    (no third ACK, or no keys to answer a held SYN with). A SYN refused
    outright never becomes a subflow; the Endpoint's refusal says so
    instead."""

    subflow_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class KeysRequested:
    """Mode E: the core needs the keys of ``generation``.

    The adapter answers with ``install_keys`` of the TLS exporter's
    keys for that generation (context ``uint32(generation)``).
    """

    generation: int


@dataclass(frozen=True, slots=True)
class KeysActivated:
    """Mode E: both ends confirmed ``generation`` with NEW_KEY.

    It is now the one new joins, ADD_ADDR and MP_FASTCLOSE use;
    ``fingerprint`` is the keys' one-way tag, never the keys.
    """

    generation: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class KeyRotationFailed:
    """Mode E: ``generation`` was dropped unconfirmed; keys unchanged."""

    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The MPTCP connection is over; ``error`` is None for a clean close."""

    error: MptlsError | None


Event = (
    HandshakeComplete
    | DataReceived
    | EndOfStream
    | SubflowEstablished
    | SubflowClosed
    | AddressAnnounced
    | AddressRemoved
    | JoinRefused
    | PeerJoinRefused
    | KeysRequested
    | KeysActivated
    | KeyRotationFailed
    | ConnectionClosed
)


@dataclass(frozen=True, slots=True)
class SubflowStatus:
    """One subflow as the core sees it; ``srtt`` in seconds.

    ``address_id`` is this end's address id on the subflow,
    ``remote_address_id`` the peer's (None until its MP_JOIN told it).
    """

    subflow_id: int
    state: str
    bytes_sent: int
    bytes_received: int
    srtt: float | None
    backup: bool
    address_id: int
    remote_address_id: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A snapshot of a connection. Tokens are hex; no key material.

    ``key_generation`` is the active key generation in mode E (None
    before the first is confirmed, and in the other modes).
    """

    role: str
    mode: str | None
    local_token: str | None
    remote_token: str | None
    keys_installed: bool
    keys_reason: str
    key_fingerprint: str | None
    subflows: tuple[SubflowStatus, ...]
    key_generation: int | None = None
