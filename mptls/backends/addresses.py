"""Which IP addresses can be a subflow's end, checked before any socket.

A TCP connection runs between two unicast addresses. The system takes a
multicast or broadcast address as a local one to bind, then picks the
source itself (Linux leaves such a socket's source unset), so a path
"from" it was another path, from the address the route chose. An
unspecified remote (``0.0.0.0``, ``::``) connects to this host. A peer
that is told of such an address, in ADD_ADDR, tries to join it.

Only what an address says of itself is known here: ``255.255.255.255``
is the one broadcast address that needs no interface's netmask to tell.
This module opens no socket and looks nothing up.
"""

from __future__ import annotations

import ipaddress

from mptls.errors import AddressError, shown_value

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def unusable_reason(address: IPAddress, *, local: bool) -> str | None:
    """Why ``address`` cannot be a subflow's end, or ``None``.

    A local address may be unspecified: it lets the system choose, as
    ``local_addr=("0.0.0.0", 0)`` does for asyncio.
    """
    if isinstance(address, ipaddress.IPv6Address):
        # an IPv4-mapped address is its IPv4 address to the system
        address = address.ipv4_mapped or address
    if address.is_multicast:
        return "a multicast address"
    if address == _BROADCAST:
        return "the broadcast address"
    if address.is_unspecified and not local:
        return "the unspecified address, which names no host"
    return None


def check_subflow_address(address: object, what: str, *, local: bool) -> None:
    """Refuse an IP literal that no subflow can run from or to.

    ``what`` names the setting in the error. Anything that is no IP
    literal (a host name) is left to the caller's own checks.
    """
    if not isinstance(address, str):
        return
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return
    reason = unusable_reason(parsed, local=local)
    if reason is not None:
        end = "a local" if local else "a remote"
        raise AddressError(
            f"{what} {shown_value(address)} is {reason}; {end} end of a "
            "TCP subflow must be a unicast address"
        )
