"""Traces of what the userspace backend puts on the wire.

:func:`capture` records every frame of this process's userspace
subflows to a pcap file that Wireshark and tshark decode as MPTCP (see
:mod:`mptls.trace.pcap`); :class:`PcapWriter` is the file format alone.
A trace never holds key material taken from TLS: only what crosses the
wire (tokens, nonces, truncated HMACs, TLS ciphertext, and the keys the
legacy ``rfc8684`` mode sends in the clear), and, with
``payload=False``, not even the ciphertext.
"""

from mptls.trace.pcap import Capture, PcapWriter, capture

__all__ = ["Capture", "PcapWriter", "capture"]
